"""N-way K-shot Q-query episodes with fixed shapes, sampled on the host and prefetched on a thread.

A ``ClassPool`` holds one split's images as one uint8 array (M, H, W, C), grouped by class:
class c owns rows offsets[c] .. offsets[c+1]-1. Splits are different pools, so classes never cross
splits. A batch of T tasks for step s of split 'split' is a pure function of (seed, split, s) through
``numpy.random.default_rng([seed, split index, s])``:

  * each task draws N distinct classes (argsort of T x C uniform keys); with ``same_alphabet`` the N classes
    are drawn from one group, picked uniformly among the groups of at least N classes, where a class's group
    is its name up to the first '/' (Omniglot's alphabet: 'Greek/character03@rot90' is in 'Greek');
  * each (task, class) draws K + Q distinct images (argpartition of uniform keys, then ordered by key);
  * labels are a random permutation of 0..N-1 per task;
  * the gather is one fancy-indexing of the pool (no Python loop over images), then /255 to float32;
  * with ``augment``, each meta-train image (support and query; never 'val' or 'test') is warped by its own
    random affine map and some strokes thickened (``augment_images``), from a stream of its own, so that the
    classes and images drawn are the same with and without augmentation.

Support: (T, N*K, H, W, C) float32 in [0, 1], int32 labels (T, N*K); query: (T, N*Q, ...).

``Prefetcher`` wraps ``sample``: after serving step s it computes steps s+1..s+depth (same arguments)
on a background thread, so the trainer's next request is ready. Results do not depend on prefetching.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Dict, NamedTuple, Sequence

import numpy as np

from md_meta.data import DataError
from md_meta.tasks import Task

SPLITS = ('train', 'val', 'test')


class ClassPool(NamedTuple):
    """One split: images (M, H, W, C) uint8 grouped by class; offsets (num_classes + 1,); class names;
    where (the path the data came from, for error messages)."""
    images: np.ndarray
    offsets: np.ndarray
    names: tuple
    where: str = ''

    @property
    def num_classes(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def class_images(self, c: int) -> np.ndarray:
        return self.images[self.offsets[c]:self.offsets[c + 1]]


def pool_from_classes(images: np.ndarray, names: Sequence[str], where: str = '') -> ClassPool:
    """A pool from a (C, per_class, H, W[, Ch]) array (same count per class)."""
    if images.ndim == 4:
        images = images[..., None]
    c, m = images.shape[:2]
    return ClassPool(np.ascontiguousarray(images.reshape((c * m,) + images.shape[2:])),
                     np.arange(c + 1, dtype=np.int64) * m, tuple(names), where)


def pool_from_labels(images: np.ndarray, labels: np.ndarray, names: Sequence[str], where: str = '') -> ClassPool:
    """A pool from images (M, H, W, C) and integer class labels (M,) into ``names``."""
    order = np.argsort(labels, kind='stable')
    counts = np.bincount(labels, minlength=len(names))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ClassPool(np.ascontiguousarray(images[order]), offsets, tuple(names), where)


def with_rotations(pool: ClassPool) -> ClassPool:
    """Each class plus its rotations by 90, 180 and 270 degrees as three new classes (square images)."""
    h, w = pool.images.shape[1:3]
    if h != w:
        raise ValueError(f'rotations need square images, got {h}x{w}')
    parts, offsets, names, start = [], [0], [], 0
    rotated = [np.rot90(pool.images, k, axes=(1, 2)) for k in range(4)]
    for c in range(pool.num_classes):
        a, b = pool.offsets[c], pool.offsets[c + 1]
        for k in range(4):
            parts.append(rotated[k][a:b])
            start += b - a
            offsets.append(start)
            names.append(pool.names[c] if k == 0 else f'{pool.names[c]}@rot{90 * k}')
    return ClassPool(np.ascontiguousarray(np.concatenate(parts)), np.asarray(offsets, np.int64), tuple(names),
                     pool.where)


def check_pool(pool: ClassPool, split: str, ways: int, shots: int, query: int, hint: str = '',
               shots_field: str = 'config.task.shots') -> None:
    """DataError unless the split has >= ways classes each with >= shots + query images; ``shots_field``
    names the setting the shots come from (config.eval.shots for the support sizes evaluated after training)."""
    where = pool.where or '(generated data)'
    if pool.num_classes < ways:
        raise DataError(f'{where}: the {split!r} split has {pool.num_classes} classes, fewer than the '
                        f'{ways} needed for {ways}-way tasks (config.task.ways). {hint}'.strip())
    need = shots + query
    counts = pool.counts
    small = np.flatnonzero(counts < need)
    if len(small):  # nothing is silently skipped: every class must hold enough images
        c = int(small[0])
        raise DataError(f'{where}: class {pool.names[c]!r} of the {split!r} split has {int(counts[c])} images, '
                        f'fewer than the {need} needed for {shots}-shot + {query}-query tasks '
                        f'({shots_field}, config.task.query / config.eval.query); '
                        f'{len(small)} of {pool.num_classes} classes are too small. {hint}'.strip())


def split_record(pools: Dict[str, ClassPool]) -> dict:
    """The split and a fingerprint of the data: {'splits': {split: {class name: '<n> images <sha1 of their
    pixels, 16 hex digits>'}}}. Taken from the decoded images, not the files, so that one record serves every
    source (folders, zips, pickles, tfds) and a file rewritten with the same name and size still counts as
    changed."""
    import hashlib
    out = {}
    for split, pool in pools.items():
        out[split] = {}
        for c, name in enumerate(pool.names):
            images = np.ascontiguousarray(pool.class_images(c))
            digest = hashlib.sha1(f'{images.shape}'.encode() + images.tobytes()).hexdigest()[:16]
            out[split][name] = f'{len(images)} images {digest}'
    return {'splits': out}


def class_groups(pool: ClassPool) -> np.ndarray:
    """(num_classes,) int: the group of each class, numbered by first appearance; a class's group is its name
    up to the first '/' (Omniglot: the alphabet, rotations included), or the class itself without a '/'."""
    keys = [n.split('/', 1)[0] if '/' in n else n for n in pool.names]
    index: Dict[str, int] = {}
    return np.asarray([index.setdefault(k, len(index)) for k in keys], np.int64)


# Augmentation (Koch, Zemel and Salakhutdinov 2015's affine ranges, translation in pixels of the pool's image):
AUGMENT_ROTATION_DEG = 10.0   # theta ~ U[-10, 10] degrees
AUGMENT_SHEAR = 0.3           # shear_x, shear_y ~ U[-0.3, 0.3]
AUGMENT_SCALE = (0.8, 1.2)    # s_x, s_y ~ U[0.8, 1.2]
AUGMENT_SHIFT = 2.0           # t_x, t_y ~ U[-2, 2] pixels
AUGMENT_THICKEN = 0.25        # probability that an image's strokes are thickened by one pixel (2x2 max filter)


def warp_affine(x: np.ndarray, a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """x (B, H, W, C) warped by per-image affine maps: the output pixel at p = (col, row) - centre shows the
    input at a[i] p + t[i] + centre, by bilinear interpolation, 0 outside. a (B, 2, 2), t (B, 2) in (x, y)
    pixel units. Vectorised over B."""
    b, h, w, c = x.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing='ij')
    src = a @ np.stack([xx.ravel(), yy.ravel()]) + t[:, :, None]                        # (B, 2, H*W)
    sxf, syf = src[:, 0] + cx, src[:, 1] + cy
    x0, y0 = np.floor(sxf).astype(np.int64), np.floor(syf).astype(np.int64)
    fx, fy = (sxf - x0).astype(np.float32), (syf - y0).astype(np.float32)
    flat = x.reshape(b, h * w, c)
    out = np.zeros((b, h * w, c), np.float32)
    rows = np.arange(b)[:, None]
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi, xi = y0 + dy, x0 + dx
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        out += flat[rows, np.where(inside, yi * w + xi, 0)] * (wgt * inside)[..., None]
    return out.reshape(b, h, w, c)


def augment_images(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image of x (B, H, W, C) float32 in [0, 1], bright strokes on 0, warped (``warp_affine``) by its own
    a = R(theta) Shear(shx, shy) diag(sx, sy) and shift t, drawn from the AUGMENT_* ranges; then with probability
    AUGMENT_THICKEN its strokes are thickened by one pixel (the max over each 2x2 neighbourhood)."""
    b, h, w, _ = x.shape
    th = np.deg2rad(rng.uniform(-AUGMENT_ROTATION_DEG, AUGMENT_ROTATION_DEG, b))
    shx, shy = rng.uniform(-AUGMENT_SHEAR, AUGMENT_SHEAR, (2, b))
    sx, sy = rng.uniform(*AUGMENT_SCALE, (2, b))
    t = rng.uniform(-AUGMENT_SHIFT, AUGMENT_SHIFT, (b, 2))
    thicken = rng.random(b) < AUGMENT_THICKEN
    cos, sin, one = np.cos(th), np.sin(th), np.ones(b)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)            # (B, 2, 2)
    shear = np.stack([np.stack([one, shx], -1), np.stack([shy, one], -1)], -2)
    out = warp_affine(x, rot @ shear * np.stack([sx, sy], -1)[:, None, :], t)           # columns scaled by s
    if thicken.any():
        pad = np.pad(out[thicken], ((0, 0), (0, 1), (0, 1), (0, 0)))
        out[thicken] = np.maximum.reduce([pad[:, :h, :w], pad[:, 1:, :w], pad[:, :h, 1:], pad[:, 1:, 1:]])
    return np.clip(out, 0.0, 1.0, out=out)


class EpisodeSampler:
    """Host-side episode sampler over class-disjoint splits; ``sample`` is deterministic from
    (seed, split, step). ``same_alphabet``: each task's classes from one group (``class_groups``), in every
    split; ``augment``: meta-train images warped by ``augment_images``."""

    def __init__(self, pools: Dict[str, ClassPool], ways: int, shots: int, seed: int = 0,
                 same_alphabet: bool = False, augment: bool = False):
        self.pools, self.ways, self.shots, self.seed = dict(pools), ways, shots, seed
        self.same_alphabet, self.augment = same_alphabet, augment
        self._uniform = {s: bool(np.all(p.counts == p.counts[0])) for s, p in self.pools.items()}
        self._groups = {s: class_groups(p) for s, p in self.pools.items()} if same_alphabet else {}

    def _eligible_groups(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.bincount(self._groups[split]) >= self.ways)

    def check(self, split: str, query: int, hint: str = '', shots: int | None = None,
              shots_field: str = 'config.task.shots') -> None:
        """DataError unless ``split`` serves episodes of ``shots`` (default: the sampler's) + ``query``."""
        if split not in self.pools:
            raise DataError(f'no {split!r} split in the data (have {sorted(self.pools)}). {hint}'.strip())
        check_pool(self.pools[split], split, self.ways, self.shots if shots is None else shots, query, hint,
                   shots_field)
        if self.same_alphabet and not len(self._eligible_groups(split)):
            sizes = np.bincount(self._groups[split])
            raise DataError(f'{self.pools[split].where or "(generated data)"}: no alphabet of the {split!r} split has '
                            f'{self.ways} classes for {self.ways}-way tasks within one alphabet '
                            f'(config.task.same_alphabet; the largest has {int(sizes.max())}). {hint}'.strip())

    def rng(self, split: str, step: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), SPLITS.index(split), int(step)])

    def indices(self, step: int, num_tasks: int, split: str, query: int):
        """(image rows (T, N, K+Q), labels (T, N), classes (T, N)) of step ``step``."""
        pool, n, kq = self.pools[split], self.ways, self.shots + query
        rng = self.rng(split, step)
        keys = rng.random((num_tasks, pool.num_classes))
        if self.same_alphabet:
            eligible = self._eligible_groups(split)
            group = eligible[rng.integers(0, len(eligible), num_tasks)]          # (T,)
            keys = np.where(self._groups[split][None, :] == group[:, None], keys, np.inf)
        classes = np.argsort(keys, axis=1)[:, :n]
        labels = np.argsort(rng.random((num_tasks, n)), axis=1).astype(np.int32)
        counts = pool.counts[classes]                        # (T, N)
        width = int(counts.max())
        keys = rng.random((num_tasks, n, width))
        if not self._uniform[split]:
            keys = np.where(np.arange(width) < counts[..., None], keys, np.inf)
        if kq < width:
            pick = np.argpartition(keys, kq - 1, axis=-1)[..., :kq]
        else:
            pick = np.broadcast_to(np.arange(width), keys.shape)
        order = np.argsort(np.take_along_axis(keys, pick, -1), axis=-1)  # random order within the draw
        pick = np.take_along_axis(pick, order, -1)
        rows = pool.offsets[classes][..., None] + pick
        return rows, labels, classes

    def sample(self, step: int, num_tasks: int, split: str, query: int) -> Task:
        rows, labels, _ = self.indices(step, num_tasks, split, query)
        pool, k, t = self.pools[split], self.shots, num_tasks
        scale = np.float32(1.0 / 255.0)

        def gather(r):  # (T, N, m) rows -> (T, N*m, H, W, C) float32 in [0, 1]: one gather, one pass
            return np.multiply(pool.images[r.reshape(t, -1)], scale, dtype=np.float32)

        sx, qx = gather(rows[:, :, :k]), gather(rows[:, :, k:])
        if self.augment and split == 'train':
            rng = np.random.default_rng([int(self.seed), SPLITS.index(split), int(step), 1])
            both = augment_images(np.concatenate([sx, qx], 1).reshape((-1,) + sx.shape[2:]), rng)
            both = both.reshape((t, -1) + sx.shape[2:])
            sx, qx = both[:, :sx.shape[1]], both[:, sx.shape[1]:]
        sy = np.repeat(labels, k, axis=1)
        qy = np.repeat(labels, query, axis=1)
        return Task(sx, sy, qx, qy)


class Prefetcher:
    """``sample`` with read-ahead: serving (step, T, split, Q) queues steps step+1..step+depth with the same
    (T, split, Q) on one daemon thread. Cached results are keyed by all arguments, so the output equals
    ``fn(step, ...)`` whatever the access pattern."""

    def __init__(self, fn: Callable, depth: int = 2):
        self.fn, self.depth = fn, depth
        self._lock = threading.Condition()
        self._futures: dict = {}
        self._queue: list = []
        self._closed = False
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._worker, name='md_meta-prefetch', daemon=True)
            self._thread.start()

    def _worker(self):
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                key = self._queue.pop(0)
                fut = self._futures.get(key)
            if fut is None or fut.done():
                continue
            try:
                fut.set_result(self.fn(*key))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                fut.set_exception(e)

    def __call__(self, step: int, num_tasks: int, split: str, query: int):
        key = (int(step), int(num_tasks), split, int(query))
        with self._lock:
            fut = self._futures.pop(key, None)
            if fut is not None and key in self._queue:  # queued but not started: compute here
                self._queue.remove(key)
                fut = None
            # forget read-ahead of other streams or of steps we have passed
            for k in list(self._futures):
                if k[1:] != key[1:] or not (key[0] < k[0] <= key[0] + self.depth):
                    self._futures.pop(k)
                    if k in self._queue:
                        self._queue.remove(k)
            if self._thread is not None and not self._closed:
                for s in range(key[0] + 1, key[0] + self.depth + 1):
                    k = (s,) + key[1:]
                    if k not in self._futures:
                        self._futures[k] = Future()
                        self._queue.append(k)
                self._lock.notify()
        if fut is None:
            return self.fn(*key)
        return fut.result()

    def close(self):
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._futures.clear()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
