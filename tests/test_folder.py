"""Bring your own data and model: the README's example runs as written; the folder loader's layouts
and errors."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from md_meta.data import DataError, folder


def make_image_folder(root, classes=8, per_class=6, size=(30, 26), split_dirs=False):
    """Class folders of PNGs: each class a fixed random pattern plus noise (learnable in a few steps)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        base = rng.integers(0, 256, size + (3,))
        split = ('train', 'train', 'train', 'train', 'val', 'val', 'test', 'test')[c % 8] if split_dirs else ''
        d = os.path.join(root, split, f'class_{c:02d}')
        os.makedirs(d)
        for i in range(per_class + c % 2):   # classes of different sizes
            im = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(os.path.join(d, f'{i}.png'))


def readme_block(title):
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text[text.index(f'## {title}'):]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_readme_own_data_and_model_runs_as_written(tmp_path):
    """The README's code block, unchanged, in a fresh process beside a folder of class folders (at XLA's
    default optimisation level: the suite's level 0 makes its meta-steps ~25x slower)."""
    make_image_folder(str(tmp_path / 'my_images'), classes=32, per_class=6)
    (tmp_path / 'example.py').write_text(readme_block('In a notebook, with your own data and model'))
    flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split() if 'optimization_level' not in f)
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=ROOT, MD_META_CACHE=str(tmp_path / 'cache'),
               JAX_PLATFORMS='cpu')
    r = subprocess.run([sys.executable, 'example.py'], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'accuracy'" in r.stdout and '[md] step 100/100' in r.stdout, r.stdout[-2000:]
    assert os.path.isdir(tmp_path / 'runs' / 'my-images-md' / 'checkpoints')


def test_folder_layouts_split_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('MD_META_CACHE', str(tmp_path / 'cache'))
    make_image_folder(str(tmp_path / 'flat'), classes=10)
    pools = folder.load_splits(str(tmp_path / 'flat'), 12, 1)
    names = {s: set(p.names) for s, p in pools.items()}
    assert [len(names[s]) for s in ('train', 'val', 'test')] == [6, 2, 2]
    assert not (names['train'] & names['val']) and not (names['train'] & names['test'])
    assert pools['train'].images.shape[1:] == (12, 12, 1) and pools['train'].images.dtype == np.uint8
    again = folder.load_splits(str(tmp_path / 'flat'), 12, 1)   # from the cache
    assert os.listdir(tmp_path / 'cache') and all(
        np.array_equal(pools[s].images, again[s].images) and pools[s].names == again[s].names for s in pools)
    make_image_folder(str(tmp_path / 'split'), classes=8, split_dirs=True)
    pools = folder.load_splits(str(tmp_path / 'split'), 16, 3)
    assert [pools[s].num_classes for s in ('train', 'val', 'test')] == [4, 2, 2]
    assert pools['val'].images.shape[1:] == (16, 16, 3)


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match='no such directory'):
        folder.load_splits(str(tmp_path / 'none'), 28, 1)
    make_image_folder(str(tmp_path / 'two'), classes=2)
    with pytest.raises(DataError, match='2 class folders, too few'):
        folder.load_splits(str(tmp_path / 'two'), 28, 1)
    make_image_folder(str(tmp_path / 'bad'), classes=4)
    open(tmp_path / 'bad' / 'class_00' / 'broken.png', 'wb').write(b'not a png')
    with pytest.raises(DataError, match='broken.png: unreadable image'):
        folder.load_splits(str(tmp_path / 'bad'), 28, 1)
    os.makedirs(tmp_path / 'empty' / 'a')
    os.makedirs(tmp_path / 'empty' / 'b')
    with pytest.raises(DataError, match='no images'):
        folder.load_splits(str(tmp_path / 'empty'), 28, 1)
    make_image_folder(str(tmp_path / 'partial'), classes=3)
    os.makedirs(tmp_path / 'partial' / 'train')
    with pytest.raises(DataError, match='not all of train/, val/, test/'):
        folder.load_splits(str(tmp_path / 'partial'), 28, 1)


def folder_config(data_dir, **overrides):
    """A tiny CNN4 config on a folder of class folders."""
    from tests.helpers import tiny_config
    return tiny_config('maml', **{'task.name': 'folder', 'task.data_dir': data_dir, 'task.image_size': 16,
                                  'task.channels': 1, 'task.ways': 2, 'task.shots': 1, 'task.query': 1,
                                  'model.name': 'cnn4', 'model.features': 4, **overrides})


def test_too_large_eval_shots_are_refused_when_built_naming_eval_shots(tmp_path, monkeypatch):
    """config.eval.shots larger than the classes hold was found only after training, naming task.shots."""
    from md_meta import experiment
    monkeypatch.setenv('MD_META_CACHE', str(tmp_path / 'cache'))
    make_image_folder(str(tmp_path / 'd'), classes=10, per_class=6)
    experiment.build(folder_config(str(tmp_path / 'd'), **{'eval.shots': (2,)}))   # fits
    with pytest.raises(DataError, match=r'config\.eval\.shots=\(1, 9\)'):
        experiment.build(folder_config(str(tmp_path / 'd'), **{'eval.shots': (1, 9)}))


def test_decode_by_mode_16bit_alpha_and_exif(tmp_path):
    """16-bit grey was clipped (full-range data mostly 255), RGBA lost its alpha (a black glyph on transparency
    decoded to all zeros), EXIF orientation was ignored."""
    from PIL import Image
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / 'grey16.png')
    assert Image.open(tmp_path / 'grey16.png').mode in folder.SIXTEEN_BIT_MODES
    got = folder.decode(str(tmp_path / 'grey16.png'), 16, 1)[..., 0]
    assert np.abs(got.astype(int) - np.rint(ramp / 257.0)).max() <= 1 and got.min() == 0 and got.max() == 255
    glyph = np.zeros((16, 16, 4), np.uint8)
    glyph[4:12, 7:9, 3] = 255                        # black opaque stroke, transparent (black) elsewhere
    Image.fromarray(glyph, 'RGBA').save(tmp_path / 'glyph.png')
    for channels in (1, 3):
        got = folder.decode(str(tmp_path / 'glyph.png'), 16, channels)
        assert (got[4:12, 7:9] == 0).all() and (got[:4] == 255).all() and (got[:, :6] == 255).all()
    half = np.zeros((16, 16), np.uint8)
    half[:, 8:] = 255                                # dark left half, bright right half
    exif = Image.Exif()
    exif[0x0112] = 3                                 # orientation: rotated 180 degrees
    Image.fromarray(half).save(tmp_path / 'rotated.jpg', exif=exif, quality=95)
    got = folder.decode(str(tmp_path / 'rotated.jpg'), 16, 1)[..., 0].astype(int)
    assert got[:, :6].mean() > 200 and got[:, 10:].mean() < 50   # upright: bright left, dark right


def test_skipped_entries_are_counted_and_a_rewritten_file_is_not_served_from_the_cache(tmp_path, monkeypatch):
    """Images in nested subfolders were ignored without a word; the cache was keyed on whole-second mtimes,
    so a file rewritten within the same second returned stale pixels."""
    from PIL import Image
    monkeypatch.setenv('MD_META_CACHE', str(tmp_path / 'cache'))
    root = tmp_path / 'd'
    make_image_folder(str(root), classes=4, per_class=2)
    os.makedirs(root / 'class_00' / 'more')
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'class_00' / 'more' / 'x.png')
    (root / 'class_01' / 'notes.txt').write_text('not an image')
    warns = []
    folder.load_splits(str(root), 8, 1, warn=warns.append)
    assert len(warns) == 1 and 'skipped 1 subfolder' in warns[0] and 'class_00/more' in warns[0] \
        and '1 file' in warns[0] and 'notes.txt' in warns[0], warns
    # a BMP of fixed size, rewritten within the same second with other pixels
    for c in range(4):
        for f in os.listdir(root / f'class_{c:02d}'):
            if f.endswith('.png'):
                os.remove(root / f'class_{c:02d}' / f)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 10 * c + i, np.uint8)).save(root / f'class_{c:02d}' / f'{i}.bmp')
    target = root / 'class_00' / '0.bmp'
    second = (os.stat(target).st_mtime_ns // 10**9) * 10**9
    os.utime(target, ns=(second + 1000, second + 1000))
    before = folder.load_splits(str(root), 8, 1, warn=lambda s: None)
    size = os.path.getsize(target)
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(target)
    os.utime(target, ns=(second + 2000, second + 2000))
    assert os.path.getsize(target) == size
    after = folder.load_splits(str(root), 8, 1, warn=lambda s: None)
    split = next(s for s, p in after.items() if 'class_00' in p.names)
    c = after[split].names.index('class_00')
    assert 200 in after[split].class_images(c) and 200 not in before[split].class_images(c)


def test_a_changed_data_set_is_refused_on_resume_and_evaluation(tmp_path, monkeypatch):
    """Removing one of 20 class folders moved the seeded split (3 of the 4 test classes had been meta-train
    classes) and resume and evaluate accepted it. The workdir records the split at its first run."""
    import shutil
    from md_meta import evaluation, experiment, training, workdirs
    monkeypatch.setenv('MD_META_CACHE', str(tmp_path / 'cache'))
    data, wd = str(tmp_path / 'd'), str(tmp_path / 'w')
    make_image_folder(data, classes=20, per_class=2)
    c = folder_config(data, **{'meta.steps': 1, 'train.checkpoint_every': 1, 'train.eval_every': 0,
                               'meta.batch_size': 1, 'eval.num_tasks': 2, 'eval.batch_size': 2})
    training.train(experiment.build(c), wd, log=lambda s: None)
    record = json.load(open(os.path.join(wd, 'split.json')))
    assert sorted(len(v) for v in record['splits'].values()) == [3, 4, 13]
    evaluation.load_run(wd)   # the same data: accepted
    before = folder.list_classes(data)
    shutil.rmtree(os.path.join(data, 'class_00'))
    after = folder.list_classes(data)
    test_now = {n for n, _ in after['test']}
    assert test_now & {n for n, _ in before['train']}, 'the split moved (the leak this guards against)'
    c2 = folder_config(data, **{'meta.steps': 2, 'train.checkpoint_every': 1, 'train.eval_every': 0,
                                'meta.batch_size': 1, 'eval.num_tasks': 2, 'eval.batch_size': 2})
    with pytest.raises(workdirs.WorkdirMismatchError, match=r"trained on other data .*moved between splits .*"
                                                            r"1 class removed \(e\.g\. 'class_00'"):
        training.train(experiment.build(c2), wd, log=lambda s: None)
    with pytest.raises(workdirs.WorkdirMismatchError, match='moved between splits'):
        evaluation.load_run(wd)
    # the same class names with other pixels: named as such
    make_image_folder(str(tmp_path / 'd2'), classes=20, per_class=2)
    shutil.rmtree(data)
    shutil.copytree(str(tmp_path / 'd2'), data)
    from PIL import Image
    Image.fromarray(np.zeros((30, 26, 3), np.uint8)).save(os.path.join(data, 'class_05', '0.png'))
    with pytest.raises(workdirs.WorkdirMismatchError, match=r"1 class with other images \(e\.g\. 'class_05'"):
        evaluation.load_run(wd)
