"""Few-shot image data: Omniglot and miniImageNet loaders, the episode sampler, the Omniglot
one-shot evaluator, ResNet-12 and the image configs. Runs on data generated here and on
../shared/data/omniglot/*.zip (read-only)."""
import importlib
import io
import json
import os
import pickle
import re
import zipfile

import numpy as np
import pytest

from conftest import OMNIGLOT_DIR, ROOT
from md_meta.data import DataError, episodes, lake, miniimagenet, omniglot

needs_shared = pytest.mark.skipif(not os.path.isfile(os.path.join(OMNIGLOT_DIR, 'images_background_small1.zip')),
                                  reason='../shared/data/omniglot not present')


@pytest.fixture(scope='module', autouse=True)
def cache_dir(tmp_path_factory):
    """Decoded-array caches go to a temporary folder, never into the repository."""
    d = str(tmp_path_factory.mktemp('cache'))
    old = os.environ.get('MD_META_CACHE')
    os.environ['MD_META_CACHE'] = d
    yield d
    if old is None:
        os.environ.pop('MD_META_CACHE', None)
    else:
        os.environ['MD_META_CACHE'] = old


@pytest.fixture(scope='module')
def shared_chars():
    return omniglot.load_characters(OMNIGLOT_DIR, 'minimal', 'zip')


@pytest.fixture(scope='module')
def shared_pools(shared_chars):
    return omniglot.load_splits(OMNIGLOT_DIR, 'minimal', 'zip')


# ----------------------------------------------------------------------------- generated data
def _png(rng, size=105, mode='1'):
    from PIL import Image
    im = Image.fromarray(np.where(rng.random((size, size)) < 0.9, 255, 0).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format='PNG')
    return buf.getvalue()


def make_omniglot_folder(root, sets, seed=0, drawers=20):
    """sets: {set name: {alphabet: num characters}} as extracted folders; returns {(alpha, char): bytes[]}."""
    rng = np.random.default_rng(seed)
    for name, alphabets in sets.items():
        for alpha, n in alphabets.items():
            for c in range(1, n + 1):
                d = os.path.join(root, name, alpha, f'character{c:02d}')
                os.makedirs(d, exist_ok=True)
                for j in range(1, drawers + 1):
                    # same bytes for the same (alphabet, character, drawer) in every set
                    r = np.random.default_rng([seed, sum(map(ord, alpha)), c, j])
                    with open(os.path.join(d, f'{1000 + c:04d}_{j:02d}.png'), 'wb') as f:
                        f.write(_png(r))
    return root


def zip_folder(folder, name, out_dir):
    path = os.path.join(out_dir, name + '.zip')
    with zipfile.ZipFile(path, 'w') as z:
        for root, _, files in os.walk(os.path.join(folder, name)):
            for f in sorted(files):
                full = os.path.join(root, f)
                z.write(full, os.path.relpath(full, folder))
    return path


def make_mini(root, layout, classes=(('train', 6), ('val', 5), ('test', 5)), per=4, size=84, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in classes:
        if layout == 'pickle':
            x = rng.integers(0, 256, (n * per, size, size, 3), np.uint8)
            cd = {f'n{split}{c:03d}': list(range(c * per, (c + 1) * per)) for c in range(n)}
            with open(os.path.join(root, f'mini-imagenet-cache-{split}.pkl'), 'wb') as f:
                pickle.dump({'image_data': x, 'class_dict': cd}, f)
        else:
            os.makedirs(os.path.join(root, 'images'), exist_ok=True)
            lines = ['filename,label']
            for c in range(n):
                for j in range(per):
                    fn = f'n{split}{c:03d}{j:04d}.png'
                    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(
                        os.path.join(root, 'images', fn))
                    lines.append(f'{fn},n{split}{c:03d}')
            with open(os.path.join(root, f'{split}.csv'), 'w') as f:
                f.write('\n'.join(lines) + '\n')
    return root


def image_config(task, data_dir, **kw):
    from md_meta.config import base_config
    c = base_config()
    c.method = kw.pop('method', 'maml')
    c.task.name = task
    c.task.data_dir = data_dir
    c.task.split = 'minimal'
    c.task.source = 'zip'
    c.task.ways, c.task.shots, c.task.query = kw.pop('ways', 5), kw.pop('shots', 1), kw.pop('query', 2)
    c.eval.query = kw.pop('eval_query', 1)
    c.model.name = kw.pop('model', 'cnn4')
    c.model.features = kw.pop('features', 4)
    c.inner.steps = 1
    c.meta.batch_size = 2
    c.meta.steps = 2
    c.eval.num_tasks, c.eval.batch_size = 4, 2
    c.train.log_every = 1
    assert not kw, kw
    return c


# ----------------------------------------------------------------------------- Omniglot, shared zips
@needs_shared
def test_shared_minimal_union_counts_greek_and_latin_once(shared_chars):
    images, names = shared_chars
    assert images.shape == (242, 20, 28, 28) and images.dtype == np.uint8
    assert images.shape[0] * images.shape[1] == 4840
    assert len(set(names)) == 242
    alphabets = {n.split('/')[0] for n in names}
    assert len(alphabets) == 8 and {'Greek', 'Latin'} <= alphabets
    assert images.mean() < 64 and images.max() == 255  # strokes bright on a dark background


@needs_shared
def test_shared_minimal_splits_disjoint_and_rotated(shared_pools):
    tr, va, te = shared_pools['train'], shared_pools['val'], shared_pools['test']
    assert (tr.num_classes, va.num_classes, te.num_classes) == (162 * 4, 40, 40)
    base = lambda p: {n.split('@')[0] for n in p.names}
    assert not (base(tr) & base(va)) and not (base(tr) & base(te)) and not (base(va) & base(te))
    assert len(base(tr) | base(va) | base(te)) == 242
    assert tr.images.shape[1:] == (28, 28, 1) and te.images.shape[1:] == (28, 28, 1)
    # class 4i+k is character i rotated by 90k degrees
    i = 7
    for k in range(1, 4):
        assert tr.names[4 * i + k] == f'{tr.names[4 * i]}@rot{90 * k}'
        np.testing.assert_array_equal(tr.class_images(4 * i + k), np.rot90(tr.class_images(4 * i), k, axes=(1, 2)))
    assert not any('@rot' in n for n in va.names + te.names)


def test_alphabet_split_holds_out_whole_alphabets():
    """'minimal_alphabet': no alphabet in two splits; every character in one; fixed (seeded) choice."""
    alphabets = {'Balinese': 24, 'Early_Aramaic': 22, 'Greek': 24, 'Korean': 40, 'Latin': 26,
                 'Japanese_(katakana)': 47, 'Sanskrit': 42, 'Tagalog': 17}
    names = [f'{a}/character{i + 1:02d}' for a, n in sorted(alphabets.items()) for i in range(n)]
    s = omniglot.split_characters(names, 'minimal_alphabet')
    of = {k: {names[i].split('/')[0] for i in v} for k, v in s.items()}
    assert of == {'test': {'Greek', 'Korean'}, 'val': {'Japanese_(katakana)'},
                  'train': {'Balinese', 'Early_Aramaic', 'Latin', 'Sanskrit', 'Tagalog'}}
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(len(names)))
    with pytest.raises(DataError, match='needs more than 3 alphabets'):
        omniglot.split_characters(names[:24 + 22 + 24], 'minimal_alphabet')
    # the four folds: every alphabet a test alphabet exactly once, never in two splits of a fold
    tests = []
    for fold in range(4):
        s = omniglot.split_characters(names, 'minimal_alphabet', alphabet_fold=fold)
        of = {k: {names[i].split('/')[0] for i in v} for k, v in s.items()}
        assert len(of['test']) == 2 and len(of['val']) == 1 and len(of['train']) == 5
        assert not (of['test'] & of['val']) and not ((of['test'] | of['val']) & of['train'])
        assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(len(names)))
        tests += sorted(of['test'])
    assert sorted(tests) == sorted(alphabets)
    with pytest.raises(DataError, match=r'alphabet_fold must be in 0\.\.3'):
        omniglot.split_characters(names, 'minimal_alphabet', alphabet_fold=4)


@needs_shared
def test_cache_is_reused_and_outside_repo(shared_chars, cache_dir):
    files = [f for f in os.listdir(cache_dir) if f.startswith('omniglot-minimal')]
    assert files, 'the decoded array is cached'
    again = omniglot.load_characters(OMNIGLOT_DIR, 'minimal', 'zip')
    np.testing.assert_array_equal(again[0], shared_chars[0])
    assert not any('.npz' in f for _, _, fs in os.walk(os.path.join(ROOT, 'md_meta')) for f in fs)


def test_cache_goes_to_the_cache_folder_never_the_data_folder(tmp_path, monkeypatch):
    from md_meta.data import cache_path
    monkeypatch.delenv('MD_META_CACHE', raising=False)
    monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    rw = tmp_path / 'rw'
    rw.mkdir()
    assert cache_path(str(rw), 'x', 'y').startswith(str(tmp_path / 'home' / '.cache' / 'md_meta'))
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert cache_path(str(rw), 'x', 'y').startswith(str(tmp_path / 'xdg' / 'md_meta'))
    monkeypatch.setenv('MD_META_CACHE', os.path.join(ROOT, 'tests'))
    assert cache_path(str(rw), 'x', 'y') == ''   # never inside the repository
    ro = tmp_path / 'ro'
    ro.mkdir()
    os.chmod(ro, 0o555)  # root passes os.access: the mode bits decide
    try:
        monkeypatch.setenv('MD_META_CACHE', str(ro))
        assert cache_path(str(rw), 'x', 'y') == ''
    finally:
        os.chmod(ro, 0o755)
    assert os.listdir(rw) == [] and os.listdir(ro) == []


def test_maml_protocol_split():
    names = [f'a{i:04d}' for i in range(1623)]
    s = omniglot.split_characters(names, 'maml')
    assert [len(s[k]) for k in ('train', 'val', 'test')] == [1100, 100, 423]
    assert len(set(np.concatenate(list(s.values())))) == 1623
    s2 = omniglot.split_characters(names, 'maml')
    assert all(np.array_equal(s[k], s2[k]) for k in s)
    with pytest.raises(DataError, match='1623'):
        omniglot.split_characters(names[:500], 'maml')


# ----------------------------------------------------------------------------- Omniglot, generated folders
@pytest.fixture(scope='module')
def fake_omniglot(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('omni'))
    make_omniglot_folder(root, {'images_background_small1': {'Alpha': 6, 'Shared': 4},
                                'images_background_small2': {'Beta': 5, 'Shared': 4}})
    return root


def test_fake_folders_and_zips_dedup(fake_omniglot, tmp_path):
    images, names = omniglot.load_characters(fake_omniglot, 'minimal', 'zip')
    assert images.shape == (15, 20, 28, 28) and len(set(names)) == 15
    zdir = tmp_path / 'zips'
    zdir.mkdir()
    for n in omniglot.PROTOCOLS['minimal']:
        zip_folder(fake_omniglot, n, str(zdir))
    zimages, znames = omniglot.load_characters(str(zdir), 'minimal', 'zip')
    assert znames == names
    np.testing.assert_array_equal(zimages, images)


def test_omniglot_errors_name_the_path(fake_omniglot, tmp_path):
    missing = str(tmp_path / 'nowhere')
    with pytest.raises(DataError, match='nowhere.*github.com/brendenlake/omniglot'):
        omniglot.load_characters(missing, 'minimal', 'zip')
    with pytest.raises(DataError, match='images_background_small2'):
        d = tmp_path / 'half'
        make_omniglot_folder(str(d), {'images_background_small1': {'A': 1}}, drawers=20)
        omniglot.load_characters(str(d), 'minimal', 'zip')
    # a character with 19 drawers
    d = tmp_path / 'short'
    make_omniglot_folder(str(d), {'images_background_small1': {'A': 2}, 'images_background_small2': {'B': 2}})
    os.remove(os.path.join(d, 'images_background_small2', 'B', 'character02', '1002_20.png'))
    with pytest.raises(DataError, match='B/character02 has 19 images, expected 20'):
        omniglot.load_characters(str(d), 'minimal', 'zip')
    # an unreadable image
    d = tmp_path / 'bad'
    make_omniglot_folder(str(d), {'images_background_small1': {'A': 2}, 'images_background_small2': {'B': 2}})
    bad = os.path.join(d, 'images_background_small1', 'A', 'character01', '1001_03.png')
    with open(bad, 'wb') as f:
        f.write(b'not a png')
    with pytest.raises(DataError, match='1001_03.png: unreadable image'):
        omniglot.load_characters(str(d), 'minimal', 'zip')
    # a wrong layout (an image one level too high)
    d = tmp_path / 'layout'
    make_omniglot_folder(str(d), {'images_background_small1': {'A': 1}, 'images_background_small2': {'B': 1}})
    with open(os.path.join(d, 'images_background_small1', 'A', 'stray.png'), 'wb') as f:
        f.write(b'x')
    with pytest.raises(DataError, match='stray.png: unexpected file'):
        omniglot.load_characters(str(d), 'minimal', 'zip')


# ----------------------------------------------------------------------------- episodes
def _toy_pools(classes=(12, 6, 6), per=7, hw=(4, 4, 1)):
    rng = np.random.default_rng(0)
    pools = {}
    for s, n in zip(('train', 'val', 'test'), classes):
        # every image stores its (class, index) so that tests can read where it came from
        x = np.zeros((n, per) + hw, np.uint8)
        x[..., 0, 0, 0] = np.arange(n)[:, None]
        x[..., 0, 1, 0] = np.arange(per)[None, :]
        x[..., 1:, :, :] = rng.integers(0, 256, (n, per, hw[0] - 1) + hw[1:])
        pools[s] = episodes.pool_from_classes(x, [f'{s}{i}' for i in range(n)], f'/toy/{s}')
    return pools


def test_sampler_shapes_labels_and_classes():
    pools = _toy_pools()
    smp = episodes.EpisodeSampler(pools, ways=5, shots=2, seed=3)
    t = smp.sample(0, 8, 'train', 3)
    assert t.support_x.shape == (8, 10, 4, 4, 1) and t.support_x.dtype == np.float32
    assert t.query_x.shape == (8, 15, 4, 4, 1)
    assert t.support_y.shape == (8, 10) and t.support_y.dtype == np.int32 and t.query_y.shape == (8, 15)
    assert 0.0 <= t.support_x.min() and t.support_x.max() <= 1.0
    cls_of = lambda x: np.rint(x[..., 0, 0, 0] * 255).astype(int)
    idx_of = lambda x: np.rint(x[..., 0, 1, 0] * 255).astype(int)
    perms = set()
    for i in range(8):
        assert sorted(t.support_y[i]) == sorted(np.repeat(np.arange(5), 2))
        assert sorted(t.query_y[i]) == sorted(np.repeat(np.arange(5), 3))
        # one class per label, shared by support and query; distinct images within a class
        mapping = {}
        for x, y in zip(np.concatenate([t.support_x[i], t.query_x[i]]), np.concatenate([t.support_y[i], t.query_y[i]])):
            assert mapping.setdefault(int(y), cls_of(x)) == cls_of(x)
        assert len(set(mapping.values())) == 5
        ims = [(cls_of(x), idx_of(x)) for x in np.concatenate([t.support_x[i], t.query_x[i]])]
        assert len(set(ims)) == 25
        perms.add(tuple(mapping[k] for k in range(5)))
    assert len(perms) > 1, 'labels are assigned afresh per task'
    # the label of a class position is a permutation: label sequences differ across tasks
    _, labels, _ = smp.indices(0, 50, 'train', 3)
    assert len({tuple(l) for l in labels}) > 10


def test_sampler_determinism_and_splits():
    pools = _toy_pools()
    a = episodes.EpisodeSampler(pools, 5, 1, seed=0)
    b = episodes.EpisodeSampler(pools, 5, 1, seed=0)
    c = episodes.EpisodeSampler(pools, 5, 1, seed=1)
    eq = lambda u, v: all(np.array_equal(x, y) for x, y in zip(u, v))
    assert eq(a.sample(5, 4, 'train', 2), b.sample(5, 4, 'train', 2))
    assert not eq(a.sample(5, 4, 'train', 2), a.sample(6, 4, 'train', 2))
    assert not eq(a.sample(5, 4, 'train', 2), c.sample(5, 4, 'train', 2))
    # class-disjoint: each split samples only its own classes
    for split in ('train', 'val', 'test'):
        _, _, classes = a.indices(0, 20, split, 1)
        assert classes.max() < pools[split].num_classes
        t = a.sample(0, 20, split, 1)
        assert np.all(np.rint(t.support_x[..., 0, 0, 0] * 255) < pools[split].num_classes)


def test_prefetcher_matches_direct_sampling():
    pools = _toy_pools()
    smp = episodes.EpisodeSampler(pools, 5, 1, seed=0)
    pf = episodes.Prefetcher(smp.sample, depth=2)
    try:
        for step in (0, 1, 2, 3, 10, 4, 4, 11):
            for split in ('train', 'val'):
                got, want = pf(step, 3, split, 2), smp.sample(step, 3, split, 2)
                assert all(np.array_equal(x, y) for x, y in zip(got, want))
    finally:
        pf.close()


def test_too_small_splits_are_reported():
    pools = _toy_pools(classes=(12, 4, 6), per=7)
    smp = episodes.EpisodeSampler(pools, 5, 1)
    with pytest.raises(DataError, match=r"/toy/val: the 'val' split has 4 classes, fewer than the 5"):
        smp.check('val', 1)
    smp = episodes.EpisodeSampler(pools, 5, 2)
    with pytest.raises(DataError, match=r'/toy/train: class .* has 7 images, fewer than the 8 needed for 2-shot \+ 6-query'):
        smp.check('train', 6)
    smp.check('train', 5)


def _alphabet_pools(per=7):
    """Toy pools whose class names carry an alphabet: 'train' has A (6 classes, two of them rotations of the
    others), B (5) and C (2, too few for 5-way); 'val' and 'test' one alphabet each."""
    pools = _toy_pools(classes=(13, 6, 6), per=per)
    names = {'train': [f'A/c{i}' for i in range(4)] + ['A/c0@rot90', 'A/c1@rot180'] + [f'B/c{i}' for i in range(5)]
             + ['C/c0', 'C/c1'],
             'val': [f'D/c{i}' for i in range(6)], 'test': [f'E/c{i}' for i in range(6)]}
    return {s: p._replace(names=tuple(names[s])) for s, p in pools.items()}


def test_same_alphabet_tasks_draw_all_classes_from_one_alphabet():
    pools = _alphabet_pools()
    assert list(episodes.class_groups(pools['train'])) == [0] * 6 + [1] * 5 + [2] * 2
    smp = episodes.EpisodeSampler(pools, 5, 1, seed=0, same_alphabet=True)
    for split in ('train', 'val', 'test'):
        smp.check(split, 2)
    _, _, classes = smp.indices(0, 400, 'train', 2)
    alphabet = np.asarray([pools['train'].names[c].split('/')[0] for c in classes.ravel()]).reshape(classes.shape)
    assert (alphabet == alphabet[:, :1]).all(), 'a task mixes alphabets'
    assert (np.sort(classes, 1)[:, 1:] != np.sort(classes, 1)[:, :-1]).all(), 'classes repeat within a task'
    picked = set(alphabet[:, 0])
    assert picked == {'A', 'B'}, picked      # C has 2 classes: never enough for 5-way
    share_a = np.mean(alphabet[:, 0] == 'A')
    assert 0.4 < share_a < 0.6, share_a        # alphabets are picked uniformly, not by size
    plain = episodes.EpisodeSampler(pools, 5, 1, seed=0)
    _, _, mixed = plain.indices(0, 400, 'train', 2)
    assert len({pools['train'].names[c].split('/')[0] for c in mixed[0]}) > 1 or any(
        len({pools['train'].names[c].split('/')[0] for c in row}) > 1 for row in mixed)
    with pytest.raises(DataError, match=r"/toy/train: no alphabet of the 'train' split has 7 classes for 7-way tasks "
                                        r'within one alphabet \(config.task.same_alphabet; the largest has 6\)'):
        episodes.EpisodeSampler(pools, 7, 1, same_alphabet=True).check('train', 2)


def test_warp_affine_agrees_with_scipy_and_is_the_identity_at_a_eq_1():
    scipy_ndimage = pytest.importorskip('scipy.ndimage')
    rng = np.random.default_rng(0)
    x = rng.random((4, 9, 11, 2)).astype(np.float32)
    eye = np.broadcast_to(np.eye(2), (4, 2, 2))
    np.testing.assert_array_equal(episodes.warp_affine(x, eye, np.zeros((4, 2))), x)
    a = eye + rng.normal(0, 0.3, (4, 2, 2))
    t = rng.normal(0, 2, (4, 2))
    got = episodes.warp_affine(x, a, t)
    swap = np.array([[0, 1], [1, 0]])           # (x, y) -> (row, col)
    centre = np.array([4.0, 5.0])               # (row, col) centre of 9 x 11
    for i in range(4):
        m = swap @ a[i] @ swap
        for ch in range(2):
            want = scipy_ndimage.affine_transform(x[i, ..., ch].astype(np.float64), m, centre - m @ centre + swap @ t[i],
                                                  order=1, mode='grid-constant', cval=0.0)
            np.testing.assert_allclose(got[i, ..., ch], want, atol=1e-5)


def test_augmentation_changes_meta_train_images_only(monkeypatch):
    pools = _alphabet_pools(per=7)
    pools = {s: p._replace(images=np.ascontiguousarray(np.broadcast_to(
        np.random.default_rng(1).integers(0, 256, (p.images.shape[0], 8, 8, 1), dtype=np.uint8),
        (p.images.shape[0], 8, 8, 1)))) for s, p in pools.items()}
    plain = episodes.EpisodeSampler(pools, 5, 1, seed=0)
    aug = episodes.EpisodeSampler(pools, 5, 1, seed=0, augment=True)
    eq = lambda u, v: all(np.array_equal(x, y) for x, y in zip(u, v))
    for split in ('val', 'test'):
        assert eq(plain.sample(3, 4, split, 2), aug.sample(3, 4, split, 2))
    a, b = plain.sample(3, 4, 'train', 2), aug.sample(3, 4, 'train', 2)
    assert np.array_equal(a.support_y, b.support_y) and np.array_equal(a.query_y, b.query_y)
    assert not np.array_equal(a.support_x, b.support_x) and b.support_x.dtype == np.float32
    assert 0.0 <= b.query_x.min() and b.query_x.max() <= 1.0
    assert eq(b, aug.sample(3, 4, 'train', 2)), 'augmentation is a function of (seed, split, step)'
    # with every range at zero the warp is the identity: the same images as without augmentation
    for name, value in (('AUGMENT_ROTATION_DEG', 0.0), ('AUGMENT_SHEAR', 0.0), ('AUGMENT_SCALE', (1.0, 1.0)),
                        ('AUGMENT_SHIFT', 0.0), ('AUGMENT_THICKEN', 0.0)):
        monkeypatch.setattr(episodes, name, value)
    np.testing.assert_allclose(aug.sample(3, 4, 'train', 2).support_x, a.support_x, atol=1e-6)
    monkeypatch.setattr(episodes, 'AUGMENT_THICKEN', 1.0)   # thickening alone: the 2x2 max filter
    thick = aug.sample(3, 4, 'train', 2).support_x
    pad = np.pad(a.support_x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
    np.testing.assert_allclose(thick, np.maximum.reduce([pad[:, :, :8, :8], pad[:, :, 1:, :8], pad[:, :, :8, 1:],
                                                         pad[:, :, 1:, 1:]]), atol=1e-6)


# ----------------------------------------------------------------------------- miniImageNet
@pytest.mark.parametrize('layout', ['pickle', 'csv'])
def test_miniimagenet_layouts(tmp_path, layout):
    root = make_mini(str(tmp_path / layout), layout)
    assert miniimagenet.detect_layout(root) == layout
    pools = miniimagenet.load_splits(root)
    assert [pools[s].num_classes for s in ('train', 'val', 'test')] == [6, 5, 5]
    assert pools['train'].images.shape == (24, 84, 84, 3) and pools['train'].images.dtype == np.uint8
    from md_meta.tasks import images
    cfg = image_config('miniimagenet', root, ways=5, shots=1, query=3, eval_query=1)
    src = images.make_source(cfg)
    try:
        t = src.sample(0, 2, 'train', 3)
        assert t.support_x.shape == (2, 5, 84, 84, 3) and t.query_x.shape == (2, 15, 84, 84, 3)
        assert src.example_x.shape == (5, 84, 84, 3) and src.loss == 'xent' and src.out_dim == 5
    finally:
        src.sample.close()


def test_miniimagenet_pickle_and_csv_agree(tmp_path):
    from PIL import Image
    root = make_mini(str(tmp_path / 'p'), 'pickle')
    pk = miniimagenet.load_splits(root)
    # write the same images as PNGs + CSVs
    croot = str(tmp_path / 'c')
    os.makedirs(os.path.join(croot, 'images'))
    for s in ('train', 'val', 'test'):
        lines = ['filename,label']
        for c, n in enumerate(pk[s].names):
            for j, im in enumerate(pk[s].class_images(c)):
                Image.fromarray(im).save(os.path.join(croot, 'images', f'{n}_{j}.png'))
                lines.append(f'{n}_{j}.png,{n}')
        with open(os.path.join(croot, f'{s}.csv'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    cs = miniimagenet.load_splits(croot)
    for s in pk:
        assert pk[s].names == cs[s].names
        np.testing.assert_array_equal(pk[s].images, cs[s].images)


def test_miniimagenet_errors(tmp_path):
    with pytest.raises(DataError, match='nope: no such directory.*images/.*mini-imagenet-cache'):
        miniimagenet.load_splits(str(tmp_path / 'nope'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DataError, match='neither miniImageNet layout'):
        miniimagenet.load_splits(str(empty))
    root = make_mini(str(tmp_path / 'c'), 'csv')
    os.remove(os.path.join(root, 'test.csv'))
    with pytest.raises(DataError, match='test.csv: not found'):
        miniimagenet.load_splits(root)
    root = make_mini(str(tmp_path / 'h'), 'csv')
    with open(os.path.join(root, 'val.csv'), 'w') as f:
        f.write('file,class\nx.png,a\n')
    with pytest.raises(DataError, match='val.csv: expected the header "filename,label"'):
        miniimagenet.load_splits(root)
    root = make_mini(str(tmp_path / 'u'), 'csv')
    with open(os.path.join(root, 'images', 'ntrain0020001.png'), 'wb') as f:
        f.write(b'garbage')
    with pytest.raises(DataError, match='ntrain0020001.png: unreadable image'):
        miniimagenet.load_splits(root)
    root = make_mini(str(tmp_path / 'm'), 'csv')
    os.remove(os.path.join(root, 'images', 'nval0010002.png'))
    with pytest.raises(DataError, match='nval0010002.png: listed in .*val.csv but not found'):
        miniimagenet.load_splits(root)
    root = make_mini(str(tmp_path / 'k'), 'pickle')
    with open(os.path.join(root, 'mini-imagenet-cache-val.pkl'), 'wb') as f:
        pickle.dump({'images': 1}, f)
    with pytest.raises(DataError, match='cache-val.pkl: expected a dict with keys image_data and class_dict'):
        miniimagenet.load_splits(root)
    root = make_mini(str(tmp_path / 'd'), 'pickle', classes=(('train', 6), ('val', 5), ('test', 5)))
    with open(os.path.join(root, 'mini-imagenet-cache-test.pkl'), 'rb') as f:
        d = pickle.load(f)
    d['class_dict']['ntrain000'] = d['class_dict'].pop('ntest000')
    with open(os.path.join(root, 'mini-imagenet-cache-test.pkl'), 'wb') as f:
        pickle.dump(d, f)
    with pytest.raises(DataError, match="'ntrain000' is in both the 'train' and 'test' splits"):
        miniimagenet.load_splits(root)


def test_split_too_small_stops_build_before_training(tmp_path):
    from md_meta import experiment
    root = make_mini(str(tmp_path / 'p'), 'pickle')
    cfg = image_config('miniimagenet', root, ways=5, shots=1, query=15)
    with pytest.raises(DataError, match=r"cache-train.pkl: class .* has 4 images, fewer than the 16 needed"):
        experiment.build(cfg)
    cfg = image_config('miniimagenet', str(tmp_path / 'missing'))
    with pytest.raises(DataError, match='missing: no such directory'):
        experiment.build(cfg)


def test_tfds_builder_without_tensorflow(tmp_path):
    pytest.importorskip('importlib_resources')  # tfds needs it to locate a builder's code
    tfds = pytest.importorskip('tensorflow_datasets')
    from md_meta.data.tfds_miniimagenet import MdMetaMiniImagenet
    root = make_mini(str(tmp_path / 'p'), 'pickle', classes=(('train', 2), ('val', 1), ('test', 1)), per=2)
    b = MdMetaMiniImagenet(data_dir=str(tmp_path / 'tfds'), file_format='array_record')
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    ds = b.as_data_source('train')
    assert len(ds) == 4
    ex = ds[0]
    assert ex['image'].shape == (84, 84, 3) and ex['image'].dtype == np.uint8
    pool = miniimagenet.load_split_pickle(root, 'train')
    found = [e['image'] for e in (ds[i] for i in range(4))]
    assert any(np.array_equal(f, pool.images[0]) for f in found)


# ----------------------------------------------------------------------------- the trainer and the networks
def test_resnet12_layers_and_shapes():
    """Structure by eval_shape (no compilation: a numeric run costs ~40 s of XLA:CPU compile on 2 cores)."""
    import jax
    import jax.numpy as jnp
    from md_meta import blockiaf
    from md_meta.networks import make_model, resnet12_widths
    assert resnet12_widths(64) == (64, 160, 320, 640) and resnet12_widths(32) == (32, 80, 160, 320)
    for shape in ((5, 84, 84, 3), (5, 28, 28, 1)):
        m = make_model('resnet12', num_classes=5, features=64)
        v = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.ones(shape))
        assert blockiaf.default_blocks(v['params']) == tuple(f'layer_{i}' for i in range(5))
        assert v['params']['layer_3']['conv2'].shape == (3, 3, 640, 640)
        assert v['params']['layer_4']['dense']['kernel'].shape == (640, 5)
        assert jax.eval_shape(m.apply, v, jnp.ones(shape)).shape == (5, 5)
        if shape[-1] == 3:
            assert sum(x.size for x in jax.tree_util.tree_leaves(v)) == 12427525  # the usual ~12.4M
    from md_meta.methods import tnet, warpgrad
    for transform, layer in (('tnet', tnet.TLayer), ('warpgrad', warpgrad.WarpLayer)):  # T before the pool, warp after
        m = make_model('resnet12', layer=layer, num_classes=5, features=8)
        v = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.ones((5, 28, 28, 1)))
        assert jax.eval_shape(m.apply, v, jnp.ones((5, 28, 28, 1))).shape == (5, 5)
        assert set(v['warp']['layer_3']['transform']) == ({'T'} if transform == 'tnet' else {'w1', 'b1', 'w2'})


@pytest.mark.parametrize('name', ['omniglot', 'omniglot_minimal', 'omniglot_paper', 'miniimagenet', 'lake_minimal',
                                  'cifar_fs', 'fc100', 'tieredimagenet'])
def test_configs_validate_for_every_method(name):
    from md_meta import config as config_lib, methods
    mod = importlib.import_module(f'experiments.configs.{name}')
    for method in methods.names():
        c = mod.get_config()
        c.method = method
        config_lib.validate(c)
        c.model.name = 'resnet12'
        config_lib.validate(c)
    c = mod.get_config()
    if name == 'lake_minimal':
        assert (c.task.ways, c.task.shots, c.task.split) == (20, 1, 'minimal_alphabet')
        return
    assert (c.task.ways, c.task.shots, c.task.query, c.meta.batch_size) == (5, 1, 15, 4)
    if name == 'omniglot':
        assert (c.inner.steps, c.inner.step_size, c.meta.optimizer, c.meta.lr, c.meta.steps, c.task.split) == \
            (5, 0.01, 'adam', 1e-3, 60000, 'maml')
    if name == 'miniimagenet':
        assert (c.meta.optimizer, c.meta.lr_decay_every, c.meta.weight_decay) == ('sgd_nesterov', 20000, 1e-4)
    if name == 'omniglot_paper':
        for variant in mod.VARIANTS:
            c = mod.get_config(f'{variant},5')
            config_lib.validate(c)
            assert (c.task.shots, c.eval.query, c.inner.steps, c.inner.step_size, c.meta.optimizer,
                    c.task.split) == (5, 5, 5, 0.01, 'adam', 'minimal_alphabet')
        assert mod.get_config('md-paper').md.monotone is False and mod.get_config('md-monotone').md.monotone


# ----------------------------------------------------------------------------- Lake's one-shot runs
def _nn_classify(sx, sy, qx):
    d = ((qx[:, None] - sx[None]) ** 2).reshape(len(qx), len(sx), -1).sum(-1)
    return sy[np.argmin(d, 1)]


@needs_shared
def test_lake_runs_built_from_held_out_characters(shared_pools, tmp_path):
    test_pool = shared_pools['test']
    same = lake.build_runs(test_pool, str(tmp_path / 'same'), num_runs=3, same_drawer=True)
    assert [os.path.basename(r) for r in same] == ['run01', 'run02', 'run03']
    r = os.path.join(tmp_path, 'same', 'run02')
    assert len(os.listdir(os.path.join(r, 'training'))) == 20 and len(os.listdir(os.path.join(r, 'test'))) == 20
    with open(os.path.join(r, 'class_labels.txt')) as f:
        first = f.readline().split()
    assert first[0] == 'run02/test/item01.png' and first[1].startswith('run02/training/class')
    res = lake.evaluate_runs(str(tmp_path / 'same'), _nn_classify)
    assert res['num_runs'] == 3 and res['mean_error'] == 0.0  # a perfect classifier scores 0 %

    def five_wrong(sx, sy, qx):
        p = _nn_classify(sx, sy, qx).copy()
        p[:5] = (p[:5] + 1) % 20
        return p
    res = lake.evaluate_runs(str(tmp_path / 'same'), five_wrong)
    assert res['runs'] == {'run01': 25.0, 'run02': 25.0, 'run03': 25.0} and res['mean_error'] == 25.0
    # different drawers: held-out characters, a harder task; an error in [0, 100]
    lake.build_runs(test_pool, str(tmp_path / 'diff'), num_runs=2, seed=1)
    res = lake.evaluate_runs(str(tmp_path / 'diff'), _nn_classify)
    assert 0.0 <= res['mean_error'] < 95.0
    # the runs only use held-out (test-split) characters
    assert not set(test_pool.names) & {n.split('@')[0] for n in shared_pools['train'].names}


@needs_shared
def test_lake_runs_within_one_held_out_alphabet(tmp_path):
    """Runs built from the alphabet-held-out split: each run's 20 characters come from one alphabet
    (cycling through Greek and Korean), as in Lake's official runs."""
    from PIL import Image
    pool = omniglot.load_splits(OMNIGLOT_DIR, 'minimal_alphabet', 'zip')['test']
    alphabet_of = {}
    for c, name in enumerate(pool.names):
        for im in pool.class_images(c):
            alphabet_of[(255 - im[..., 0]).tobytes()] = name.split('/')[0]
    runs = lake.build_runs(pool, str(tmp_path / 'runs'), num_runs=4, within_alphabet=True)
    seen = []
    for r in runs:
        found = {alphabet_of[np.asarray(Image.open(os.path.join(r, 'training', f))).tobytes()]
                 for f in sorted(os.listdir(os.path.join(r, 'training')))}
        assert len(found) == 1, (r, found)
        seen.append(found.pop())
    assert seen == ['Greek', 'Korean', 'Greek', 'Korean']
    with pytest.raises(DataError, match='no alphabet has the 20 characters'):
        small = episodes.pool_from_classes(pool.images[:24 * 20].reshape(24, 20, 28, 28, 1),
                                           [f'{"AB"[i % 2]}/c{i}' for i in range(24)], 'x')  # 12 + 12
        lake.build_runs(small, str(tmp_path / 'none'), within_alphabet=True)


@needs_shared
def test_lake_layout_errors(shared_pools, tmp_path):
    root = str(tmp_path / 'runs')
    lake.build_runs(shared_pools['test'], root, num_runs=1)
    labels = os.path.join(root, 'run01', 'class_labels.txt')
    text = open(labels).read()
    with open(labels, 'w') as f:
        f.write(text.replace('run01/training/class03.png', 'run01/training/class99.png', 1))
    with pytest.raises(DataError, match='class_labels.txt, line'):
        lake.evaluate_runs(root, _nn_classify)
    with open(labels, 'w') as f:
        f.write(text)
    os.remove(os.path.join(root, 'run01', 'training', 'class07.png'))
    with pytest.raises(DataError, match='training: expected 20 files classNN.png'):
        lake.evaluate_runs(root, _nn_classify)
    with pytest.raises(DataError, match='no runNN/ folders'):
        lake.evaluate_runs(str(tmp_path), _nn_classify)


@needs_shared
def test_omniglot_meta_training_then_lake_runs(shared_pools, tmp_path):
    """A 20-way 1-shot source on the shared data through the trainer (2 meta-steps), then the Omniglot
    one-shot evaluator with the adapted tiny network on runs built from held-out characters."""
    from md_meta import experiment, training
    from md_meta.tasks import images
    cfg = image_config('omniglot', OMNIGLOT_DIR, ways=20, shots=1, query=1, features=4)
    images_load = images.load_pools
    images.load_pools = lambda c: shared_pools
    try:
        exp = experiment.build(cfg)
    finally:
        images.load_pools = images_load
    assert exp.source.example_x.shape == (20, 28, 28, 1)
    meta, _, hist = training.train(exp, log=lambda s: None)
    exp.source.sample.close()
    assert len(hist) == 2 and all(np.isfinite(h['meta_loss']) for h in hist)
    root = str(tmp_path / 'runs')
    lake.build_runs(shared_pools['test'], root, num_runs=2)
    res = lake.evaluate_runs(root, lake.model_classifier(exp, meta))
    assert res['num_runs'] == 2 and all(0.0 <= e <= 100.0 and (e / 5.0).is_integer() for e in res['runs'].values())
    assert res['mean_error'] == np.mean(list(res['runs'].values()))


def test_lake_table_pairs_by_run_and_by_seed(tmp_path):
    """experiments.studies.lake_table: mean +- t-interval over runs (one seed) or over seeds; paired differences."""
    import json
    from experiments.studies import lake_table

    def write(name, errors, seed=0):
        rec = {'seed': seed, 'step': 10, 'eval_inner_steps': 5, 'eval_step_size': 0.4, 'config': {'inner': {}},
               'lake': {'runs': {f'run{i + 1:02d}': float(e) for i, e in enumerate(errors)}}}
        (tmp_path / name).write_text(json.dumps(rec))
    write('eval-base-maml.json', [10, 20, 30, 40])
    write('eval-base-md.json', [5, 20, 25, 40])
    write('eval-aug-md.json', [0, 10, 25, 30])
    for s, shift in ((0, 0), (1, 10)):
        write(f'eval-long-md-seed{s}.json', [10 + shift, 10 + shift, 20 + shift, 20 + shift], seed=s)
        write(f'eval-long-maml-seed{s}.json', [20 + shift, 20 + shift, 20 + shift, 20 + shift], seed=s)
    table = {(r['variant'], r['method']): r for r in
             lake_table.rows(lake_table.load(str(tmp_path / 'eval-*.json')), 'base')}
    t3 = 3.182   # t_{0.975, 3}: four runs
    mean, half, over = table[('base', 'md')]['error']
    assert (mean, over) == (22.5, 'runs') and np.isclose(half, t3 * np.std([5, 20, 25, 40], ddof=1) / 2)
    d = table[('base', 'md')]['minus_against']          # paired by run: [-5, 0, -5, 0]
    assert d[:3] == (-2.5, t3 * np.std([-5, 0, -5, 0], ddof=1) / 2, 'runs') and d[3] == 1
    assert table[('aug', 'md')]['minus_reference'][0] == -6.25 and table[('aug', 'md')]['minus_against'] is None
    long = table[('long', 'md')]                      # two seeds: over the seeds' means (15, 25)
    assert long['seeds'] == [0, 1] and long['error'][0] == 20 and long['error'][2] == 'seeds'
    assert np.isclose(long['error'][1], 12.706 * np.std([15, 25], ddof=1) / np.sqrt(2))
    assert long['minus_against'][0] == -5 and long['minus_against'][3] == 2
    assert '| long | md | 0,1 | 10 | 5, 0.4 | 20.00 +- ' in lake_table.markdown(list(table.values()), 'base')
    pooled = {(r['variant'], r['method']): r for r in
              lake_table.rows(lake_table.load(str(tmp_path / 'eval-*.json')), 'base', pool_runs=True)}
    d = [-10, -10, 0, 0] * 2                          # md - maml by run, both seeds
    assert pooled[('long', 'md')]['minus_against'][:3] == (-5, 2.365 * np.std(d, ddof=1) / np.sqrt(8), 'runs')
    rows = lake_table.rows(lake_table.load(str(tmp_path / 'eval-*.json')), 'base', against='md')
    assert {(r['variant'], r['method']): r for r in rows}[('base', 'maml')]['minus_against'][0] == 2.5
    assert [r['method'] for r in rows[:2]] == ['md', 'maml'] and 'minus md (paired)' in lake_table.markdown(
        rows, 'base', against='md')
    lake_table.plot(rows, str(tmp_path / 'lake.png'), mark=13.5)
    assert (tmp_path / 'lake.png').stat().st_size > 0 and rows[0]['per_seed'] == [22.5]
    (tmp_path / 'eval-x.json').write_text('{}')
    with pytest.raises(ValueError, match='expected a name eval-<variant>-<method>'):
        lake_table.load(str(tmp_path / 'eval-*.json'))


def test_alphabet_fold_is_checked_with_the_config():
    """task.alphabet_fold: a non-negative integer, and only with task.split='minimal_alphabet'."""
    from md_meta import config as config_lib
    c = config_lib.base_config()
    c.task.name, c.model.name, c.task.split = 'omniglot', 'cnn4', 'minimal_alphabet'
    c.task.alphabet_fold = 1
    config_lib.validate(c)
    for split, fold, why in (('minimal', 1, "only applies to task.split='minimal_alphabet'"),
                             ('minimal_alphabet', -1, 'non-negative integer')):
        c.task.split, c.task.alphabet_fold = split, fold
        with pytest.raises(config_lib.ConfigError, match=f'config.task.alphabet_fold: .*{re.escape(why)}'):
            config_lib.validate(c)


def test_same_alphabet_and_augment_are_checked_with_the_config():
    from md_meta import config as config_lib
    c = config_lib.base_config()
    c.task.name, c.model.name = 'omniglot', 'cnn4'
    c.task.same_alphabet = c.task.augment = True
    config_lib.validate(c)
    c.task.augment, c.task.name = False, 'miniimagenet'
    with pytest.raises(config_lib.ConfigError, match=r"config.task.same_alphabet: is for Omniglot .*'miniimagenet'"):
        config_lib.validate(c)


def test_image_sources_carry_a_split_record_that_sees_changed_data(tmp_path):
    """Every image route (Omniglot, miniImageNet, folders: tasks.images.make_source) records its split and a
    fingerprint of its data; here miniImageNet's (the folder route's resume and evaluate: tests/test_folder.py)."""
    from md_meta import workdirs
    from md_meta.tasks import images
    root, wd = make_mini(str(tmp_path / 'm'), 'csv', per=3), str(tmp_path / 'w')
    os.makedirs(wd)
    cfg = image_config('miniimagenet', root, ways=2, shots=1, query=1, eval_query=1)
    src = images.make_source(cfg)
    src.sample.close()
    workdirs.check_data(wd, src.split_record())
    assert set(json.load(open(os.path.join(wd, 'split.json')))['splits']['test']) == {f'ntest{c:03d}' for c in range(5)}
    with open(os.path.join(root, 'test.csv')) as f:   # a test class relabelled
        text = f.read().replace(',ntest004', ',nnew000')
    with open(os.path.join(root, 'test.csv'), 'w') as f:
        f.write(text)
    src = images.make_source(cfg)
    src.sample.close()
    with pytest.raises(workdirs.WorkdirMismatchError, match=r"1 class removed \(e\.g\. 'ntest004' of test\); 1 class added"):
        workdirs.check_data(wd, src.split_record())
