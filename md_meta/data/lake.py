"""The Omniglot one-shot classification challenge (Lake, Salakhutdinov and Tenenbaum, Science 2015).

A directory of runs in the official layout:

    runNN/training/classNN.png   20 images, one per class
    runNN/test/itemNN.png        20 images
    runNN/class_labels.txt       20 lines 'runNN/test/itemNN.png runNN/training/classNN.png'

Each run is a 20-way 1-shot task: adapt on the 20 training images (labels 0..19 in class file order),
classify the 20 test images; the error of a run is the % of test images misclassified, the score the
mean over runs. ``evaluate_runs(root, classify)`` takes any ``classify(support_x, support_y, query_x) ->
labels`` (``model_classifier`` builds one from a meta-learner: adapt with the evaluation inner loop, then
argmax); ``build_runs`` writes runs in this layout from held-out characters of a ClassPool.
Images are read like md_meta.data.omniglot (grey, Lanczos-resized to 28x28, strokes bright).
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, NamedTuple

import numpy as np

from md_meta.data import DataError
from md_meta.data.episodes import ClassPool

WAYS = 20
OFFICIAL = ('the official runs are in github.com/brendenlake/omniglot (python/one-shot-classification/'
            'all_runs.zip); md_meta.data.lake.build_runs writes runs from held-out characters')


class Run(NamedTuple):
    name: str
    support_x: np.ndarray   # (20, H, W, 1) float32 in [0, 1]
    support_y: np.ndarray   # (20,) int32
    query_x: np.ndarray     # (20, H, W, 1)
    query_y: np.ndarray     # (20,) int32 (from class_labels.txt)


def _read_image(path: str, size: int) -> np.ndarray:
    from md_meta.data.omniglot import decode
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DataError(f'{path}: unreadable ({e}); {OFFICIAL}') from e
    return decode(data, path, size)


def load_run(run_dir: str, size: int = 28) -> Run:
    """One run; DataError naming the file for a missing file, a bad line or an unreadable image."""
    name = os.path.basename(os.path.normpath(run_dir))
    root = os.path.dirname(os.path.normpath(run_dir))
    labels_path = os.path.join(run_dir, 'class_labels.txt')
    if not os.path.isfile(labels_path):
        raise DataError(f'{labels_path}: not found; expected runNN/class_labels.txt with lines '
                        f"'runNN/test/itemNN.png runNN/training/classNN.png'; {OFFICIAL}")
    train_dir = os.path.join(run_dir, 'training')
    if not os.path.isdir(train_dir):
        raise DataError(f'{train_dir}: not found; expected {WAYS} images training/classNN.png; {OFFICIAL}')
    classes = sorted(f for f in os.listdir(train_dir) if not f.startswith('.'))
    if len(classes) != WAYS or any(not re.fullmatch(r'class\d+\.png', f) for f in classes):
        raise DataError(f'{train_dir}: expected {WAYS} files classNN.png, found {len(classes)}: {classes[:3]}...')
    class_index = {f'{name}/training/{f}': i for i, f in enumerate(classes)}
    pairs = []
    with open(labels_path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in class_index or not re.fullmatch(
                    rf'{re.escape(name)}/test/item\d+\.png', parts[0]):
                raise DataError(f'{labels_path}, line {i}: expected \'{name}/test/itemNN.png '
                                f'{name}/training/classNN.png\' naming one of the {WAYS} training files, '
                                f'got {line.strip()!r}')
            pairs.append((parts[0], class_index[parts[1]]))
    if len(pairs) != WAYS or len({p for p, _ in pairs}) != WAYS:
        raise DataError(f'{labels_path}: expected {WAYS} lines, one per distinct test image, found {len(pairs)}')
    sx = np.stack([_read_image(os.path.join(train_dir, f), size) for f in classes])
    qx = np.stack([_read_image(os.path.join(root, p), size) for p, _ in pairs])
    scale = np.float32(1.0 / 255.0)
    return Run(name, sx[..., None].astype(np.float32) * scale, np.arange(WAYS, dtype=np.int32),
               qx[..., None].astype(np.float32) * scale, np.asarray([c for _, c in pairs], np.int32))


def find_runs(root: str) -> List[str]:
    if not os.path.isdir(root):
        raise DataError(f'{root}: no such directory; expected runNN/ folders of the Omniglot one-shot '
                        f'challenge; {OFFICIAL}')
    runs = sorted(d for d in os.listdir(root) if re.fullmatch(r'run\d+', d) and os.path.isdir(os.path.join(root, d)))
    if not runs:
        raise DataError(f'{root}: no runNN/ folders; expected runNN/training, runNN/test, runNN/class_labels.txt; '
                        f'{OFFICIAL}')
    return [os.path.join(root, r) for r in runs]


def evaluate_runs(root: str, classify: Callable, size: int = 28) -> Dict:
    """{'runs': {name: error %}, 'mean_error': %, 'num_runs': n}; every run is loaded (and checked)
    before any classification."""
    runs = [load_run(r, size) for r in find_runs(root)]
    errors = {}
    for run in runs:
        pred = np.asarray(classify(run.support_x, run.support_y, run.query_x)).reshape(-1)
        if pred.shape != run.query_y.shape:
            raise ValueError(f'classify returned {pred.shape[0]} labels for {run.query_y.shape[0]} test images')
        errors[run.name] = float(100.0 * np.mean(pred != run.query_y))
    return {'runs': errors, 'mean_error': float(np.mean(list(errors.values()))), 'num_runs': len(errors)}


def build_runs(pool: ClassPool, root: str, num_runs: int = 20, seed: int = 0, same_drawer: bool = False,
               within_alphabet: bool = False) -> List[str]:
    """Writes ``num_runs`` runs in the official layout from the characters of ``pool`` (e.g. the 'test'
    split of md_meta.data.omniglot, not rotated): each run takes 20 random characters and, per character,
    two different drawers (the first gives training/classNN.png, the second a test image; test images in
    random order). ``within_alphabet``: the 20 characters of a run come from one alphabet (the part of a
    class name before '/'), as in the official runs; the runs cycle through the alphabets with at least 20
    characters. ``same_drawer`` uses one drawer for both (for testing an evaluator). Images are written
    as grey PNGs with the original polarity (dark strokes on white). Returns the run folders."""
    from PIL import Image
    if pool.num_classes < WAYS:
        raise DataError(f'{pool.where}: {pool.num_classes} characters, fewer than the {WAYS} a run needs')
    groups = [np.arange(pool.num_classes)]
    if within_alphabet:
        alphabet = np.array([n.split('/')[0] for n in pool.names])
        groups = [np.flatnonzero(alphabet == a) for a in sorted(set(alphabet))]
        groups = [g for g in groups if g.size >= WAYS]
        if not groups:
            raise DataError(f'{pool.where}: no alphabet has the {WAYS} characters a within-alphabet run needs')
    if np.any(pool.counts < (1 if same_drawer else 2)):
        raise DataError(f'{pool.where}: every character needs two drawers to build a run')
    rng = np.random.default_rng(seed)
    dirs = []
    for r in range(num_runs):
        name = f'run{r + 1:02d}'
        rd = os.path.join(root, name)
        os.makedirs(os.path.join(rd, 'training'), exist_ok=True)
        os.makedirs(os.path.join(rd, 'test'), exist_ok=True)
        chars = rng.choice(groups[r % len(groups)], WAYS, replace=False)
        order = rng.permutation(WAYS)   # test item j shows class order[j]
        lines = []
        for i, c in enumerate(chars):
            imgs = pool.class_images(int(c))
            a, b = (0, 0) if same_drawer else rng.choice(len(imgs), 2, replace=False)
            Image.fromarray(255 - imgs[a][..., 0]).save(os.path.join(rd, 'training', f'class{i + 1:02d}.png'))
            j = int(np.flatnonzero(order == i)[0])
            Image.fromarray(255 - imgs[b][..., 0]).save(os.path.join(rd, 'test', f'item{j + 1:02d}.png'))
        for j in range(WAYS):
            lines.append(f'{name}/test/item{j + 1:02d}.png {name}/training/class{int(order[j]) + 1:02d}.png')
        with open(os.path.join(rd, 'class_labels.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        dirs.append(rd)
    return dirs


def model_classifier(exp, meta, key=None) -> Callable:
    """classify(support_x, support_y, query_x) -> labels for a md_meta.experiment.Experiment whose network
    has 20 outputs (config.task.ways = 20): adapt with the evaluation inner loop, then argmax (jitted)."""
    import jax
    import jax.numpy as jnp
    from md_meta import losses
    from md_meta.inner import adapt
    learner = exp.learner
    if exp.source.out_dim != WAYS:
        raise ValueError(f'the one-shot challenge is {WAYS}-way; build the experiment with config.task.ways={WAYS} '
                         f'(got {exp.source.out_dim})')
    loss_fn = losses.get(learner.loss)
    key = jax.random.PRNGKey(0) if key is None else key

    @jax.jit
    def predict(meta, sx, sy, qx):
        apply = lambda phi, x: learner.model.apply({'params': phi, **meta['net']}, x)
        phi, _ = adapt(learner.geometry.inner(meta['geom']), lambda p: loss_fn(apply(p, sx), sy), meta['init'], key,
                       learner.eval_inner_config)
        return jnp.argmax(apply(phi, qx), -1)

    return lambda sx, sy, qx: np.asarray(predict(meta, jnp.asarray(sx), jnp.asarray(sy), jnp.asarray(qx)))
