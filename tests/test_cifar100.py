"""CIFAR-FS and FC100 (md_meta.data.cifar100, experiments/configs/cifar_fs.py, fc100.py): the split files, the
reader of the official archive (on a small archive in its format) and a short training run through each config."""
import os
import shutil
import tarfile

import numpy as np
import pytest

from md_meta.config import ConfigError, validate
from md_meta.data import DataError, cifar100
from tests.helpers import CIFAR100_SUPERCLASSES, write_cifar100_archive

FINE = sorted(n for names in CIFAR100_SUPERCLASSES.values() for n in names)
SUPER = {n: i for i, names in enumerate(CIFAR100_SUPERCLASSES.values()) for n in names}


def test_split_files_are_disjoint_and_cover_cifar100():
    fs = cifar100.split_file('cifar_fs')
    assert [len(fs[s]) for s in cifar100.SPLITS] == [64, 16, 20]
    assert sorted(fs['train'] + fs['val'] + fs['test']) == FINE   # disjoint and all 100 fine classes
    fc = cifar100.split_file('fc100')
    assert [len(fc[s]) for s in cifar100.SPLITS] == [12, 4, 4]
    assert sorted(fc['train'] + fc['val'] + fc['test']) == list(range(20))
    assert fc['coarse_label_names'] == list(CIFAR100_SUPERCLASSES)
    assert (fc['val'], fc['test']) == ([8, 11, 13, 16], [0, 7, 12, 14])
    assert 'Bertinetto' in fs['source'] and 'Oreshkin' in fc['source']


def _check_pools(pools, per_class):
    for split, pool in pools.items():
        assert pool.images.shape[1:] == (32, 32, 3) and pool.images.dtype == np.uint8
        assert np.all(pool.counts == per_class), split
        for c, name in enumerate(pool.names):
            imgs = pool.class_images(c)
            assert np.all(imgs[..., 0] == FINE.index(name)), (split, name)   # the red plane: its own label
            assert np.all(imgs[..., 2] == np.add.outer(7 * np.arange(32), np.arange(32))), name   # rows, columns


def test_cifar_fs_pools_from_the_archive(tmp_path):
    write_cifar100_archive(tmp_path, train_per_class=2, test_per_class=1)
    pools = cifar100.load_splits(str(tmp_path), 'cifar_fs')
    fs = cifar100.split_file('cifar_fs')
    assert {s: sorted(p.names) for s, p in pools.items()} == {s: sorted(fs[s]) for s in cifar100.SPLITS}
    _check_pools(pools, 3)   # train + test images of each class pooled


def test_fc100_pools_never_share_a_superclass(tmp_path):
    write_cifar100_archive(tmp_path)
    pools = cifar100.load_splits(str(tmp_path), 'fc100')
    supers = {s: {SUPER[n] for n in p.names} for s, p in pools.items()}
    assert supers == {s: set(cifar100.split_file('fc100')[s]) for s in cifar100.SPLITS}
    assert not (supers['train'] & supers['val'] or supers['train'] & supers['test'] or supers['val'] & supers['test'])
    assert [p.num_classes for p in pools.values()] == [60, 20, 20]
    assert sorted(n for p in pools.values() for n in p.names) == FINE
    _check_pools(pools, 3)


def test_extracted_folder_and_one_line_errors(tmp_path):
    path = write_cifar100_archive(tmp_path)
    with tarfile.open(path) as t:
        t.extractall(tmp_path / 'x', filter='data')
    a = cifar100.load_splits(str(tmp_path), 'cifar_fs')
    for folder in (tmp_path / 'x', tmp_path / 'x' / 'cifar-100-python'):
        b = cifar100.load_splits(str(folder), 'cifar_fs')
        assert all(np.array_equal(a[s].images, b[s].images) and a[s].names == b[s].names for s in a)
    with pytest.raises(DataError, match=r'cifar-100-python.tar.gz: not found.*experiments.download cifar100'):
        cifar100.load_splits(str(tmp_path / 'empty'), 'fc100')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'cifar-100-python.tar.gz').write_bytes(b'not a tar')
    with pytest.raises(DataError, match='not a readable tar.gz'):
        cifar100.load_splits(str(tmp_path / 'bad'), 'cifar_fs')
    (tmp_path / 'other').mkdir()
    write_cifar100_archive(tmp_path / 'other', coarse_names=sorted(CIFAR100_SUPERCLASSES, reverse=True))
    with pytest.raises(DataError, match='coarse_label_names differ'):
        cifar100.load_splits(str(tmp_path / 'other'), 'fc100')


@pytest.mark.parametrize('name', ['cifar_fs', 'fc100'])
def test_config_trains_a_few_meta_steps(name, tmp_path):
    """The config file as shipped (5-way 1-shot CNN4 at 32x32), shrunk to a tiny network and 2 meta-steps on the
    small archive: build, train, evaluate; the argument picks shots and ResNet-12."""
    import importlib
    from md_meta import evaluation, experiment, training
    mod = importlib.import_module(f'experiments.configs.{name}')
    assert (mod.get_config('5').task.shots, mod.get_config('1,resnet12').model.name) == (5, 'resnet12')
    with pytest.raises(ValueError, match='SHOTS,MODEL'):
        mod.get_config('5,vgg')
    write_cifar100_archive(tmp_path)
    c = mod.get_config()
    assert (c.task.name, c.task.ways, c.task.shots, c.model.name) == (name, 5, 1, 'cnn4')
    c.task.data_dir = str(tmp_path)
    c.task.query, c.eval.query = 1, 1
    c.model.features = 4
    c.inner.steps, c.inner.eval_steps = 1, 1
    c.meta.steps, c.meta.batch_size = 2, 2
    c.eval.num_tasks, c.eval.batch_size = 4, 2
    c.train.eval_every, c.train.checkpoint_every, c.train.log_every, c.train.tensorboard = 0, 0, 1, False
    validate(c)
    exp = experiment.build(c)
    assert exp.source.example_x.shape == (5, 32, 32, 3)
    meta, _, hist = training.train(exp, str(tmp_path / 'run'), log=lambda s: None)
    assert len(hist) == 2 and all(np.isfinite(h['meta_loss']) for h in hist)
    r = evaluation.evaluate(exp, meta, 'test')
    assert 0.0 <= r['metrics']['accuracy']['mean'] <= 1.0
    getattr(exp.source.sample, 'close', lambda: None)()
    c.task.data_dir = str(tmp_path / 'missing')
    with pytest.raises(ConfigError, match='missing'):
        experiment.build(c)
