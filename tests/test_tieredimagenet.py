"""tieredImageNet (md_meta.data.tieredimagenet) on small fakes of its two layouts: class folders per split, and
per-split label pickles with PNG pickles (Ren et al.'s release) or npz arrays; the one-line errors."""
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from md_meta.data import DataError, tieredimagenet

CLASSES = {'train': ['n01', 'n02', 'n03'], 'val': ['n11', 'n12'], 'test': ['n21', 'n22']}
CATEGORIES = {'train': ['garment', 'instrument'], 'val': ['bird'], 'test': ['craft']}


def _image(split, c, k):
    """An 84x84 RGB image whose red plane names the class, green plane the example, blue plane 3 y - x mod 256."""
    x = np.empty((84, 84, 3), np.uint8)
    x[..., 0] = 10 * sum(map(len, CLASSES.values())) - 10 * (list(CLASSES).index(split) * 3 + c)
    x[..., 1] = k
    x[..., 2] = (3 * np.arange(84)[:, None] - np.arange(84)[None]) % 256
    return x


def _png(x):
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format='PNG')
    return buf.getvalue()


def write_pickles(root, images='png', categories=CATEGORIES, per_class=2):
    os.makedirs(root, exist_ok=True)
    for split, names in CLASSES.items():
        labels = np.repeat(np.arange(len(names)), per_class)
        xs = [_image(split, c, k) for c, k in zip(labels, np.tile(np.arange(per_class), len(names)))]
        cats = categories[split]
        d = {'label_specific': labels, 'label_specific_str': names,
             'label_general': labels % len(cats), 'label_general_str': cats}
        with open(os.path.join(root, f'{split}_labels.pkl'), 'wb') as f:
            pickle.dump(d, f, protocol=2)
        if images == 'png':   # a list of PNG byte strings, cv2.imencode's arrays for the val split
            items = [np.frombuffer(_png(x), np.uint8) if split == 'val' else _png(x) for x in xs]
            with open(os.path.join(root, f'{split}_images_png.pkl'), 'wb') as f:
                pickle.dump(items, f, protocol=2)
        else:
            np.savez(os.path.join(root, f'{split}_images.npz'), images=np.stack(xs))


def _check(pools, per_class=2):
    assert {s: sorted(p.names) for s, p in pools.items()} == CLASSES
    for split, pool in pools.items():
        assert pool.images.shape[1:] == (84, 84, 3) and np.all(pool.counts == per_class)
        for c, name in enumerate(pool.names):
            want = _image(split, CLASSES[split].index(name), 0)
            got = pool.class_images(c)
            assert np.array_equal(got[:, ..., 0], np.broadcast_to(want[..., 0], got.shape[:3])), (split, name)
            assert np.array_equal(got[0, ..., 2], want[..., 2])
            assert sorted(got[:, 0, 0, 1]) == list(range(per_class))


@pytest.mark.parametrize('images', ['png', 'npz'])
def test_pickle_layouts(tmp_path, images, monkeypatch):
    monkeypatch.setenv('MD_META_CACHE', str(tmp_path / 'cache'))
    write_pickles(tmp_path / 'd', images)
    _check(tieredimagenet.load_splits(str(tmp_path / 'd')))
    if images == 'png':   # decoded once, then read from the cache
        assert len(os.listdir(tmp_path / 'cache')) == 3
        _check(tieredimagenet.load_splits(str(tmp_path / 'd')))


def test_class_folder_layout(tmp_path, monkeypatch):
    monkeypatch.setenv('MD_META_CACHE', str(tmp_path / 'cache'))
    for split, names in CLASSES.items():
        for c, name in enumerate(names):
            os.makedirs(tmp_path / 'd' / split / name)
            for k in range(2):
                Image.fromarray(_image(split, c, k)).save(tmp_path / 'd' / split / name / f'{k}.png')
    _check(tieredimagenet.load_splits(str(tmp_path / 'd')))


def test_shared_categories_and_classes_and_missing_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv('MD_META_CACHE', str(tmp_path / 'cache'))
    write_pickles(tmp_path / 'cat', 'npz', dict(CATEGORIES, test=['bird']))
    with pytest.raises(DataError, match="category 'bird' is in both the 'val' and 'test' splits"):
        tieredimagenet.load_splits(str(tmp_path / 'cat'))
    write_pickles(tmp_path / 'ok', 'npz')
    _check(tieredimagenet.load_splits(str(tmp_path / 'ok')))
    os.remove(tmp_path / 'ok' / 'test_images.npz')
    with pytest.raises(DataError, match=r'test_images_png.pkl: not found .*test_images.npz'):
        tieredimagenet.load_splits(str(tmp_path / 'ok'))
    os.remove(tmp_path / 'ok' / 'val_labels.pkl')
    with pytest.raises(DataError, match=r'val_labels.pkl: not found'):
        tieredimagenet.load_splits(str(tmp_path / 'ok'))
    with pytest.raises(DataError, match='neither tieredImageNet layout'):
        tieredimagenet.load_splits(str(tmp_path))
    with pytest.raises(DataError, match='no such directory'):
        tieredimagenet.load_splits(str(tmp_path / 'missing'))


def test_config_and_download_help(tmp_path, monkeypatch):
    """The config file builds a tieredImageNet source from the data; `experiments.download tieredimagenet`
    prints where to get it (it has no official direct download)."""
    from experiments.configs import tieredimagenet as config_file
    from md_meta.config import validate
    from md_meta.tasks import make_source
    monkeypatch.setenv('MD_META_CACHE', str(tmp_path / 'cache'))
    write_pickles(tmp_path / 'd', 'npz')
    c = config_file.get_config('maml')
    c.task.data_dir, c.task.ways, c.task.query, c.eval.query = str(tmp_path / 'd'), 2, 1, 1
    validate(c)
    source = make_source(c)
    batch = source.sample(0, 2, 'test', 1)
    source.sample.close()
    assert batch.support_x.shape == (2, 2, 84, 84, 3)
    r = subprocess.run([sys.executable, '-m', 'experiments.download', 'tieredimagenet'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '351/97/160' in r.stdout and '_images_png.pkl' in r.stdout, r.stderr
