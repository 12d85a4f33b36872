"""CIFAR-FS and FC100: few-shot splits of CIFAR-100 (Krizhevsky 2009; 100 fine classes in 20 superclasses,
32x32x3), read from the official python archive ``cifar-100-python.tar.gz``
(www.cs.toronto.edu/~kriz/cifar.html; ``python -m experiments.download cifar100 --dest=DIR``).

The archive holds three pickles under ``cifar-100-python/``: ``train`` (50000 images) and ``test`` (10000),
each a dict with ``data`` (uint8 (N, 3072): the red, green and blue 32x32 planes of each image, row by row),
``fine_labels`` and ``coarse_labels``; and ``meta`` with ``fine_label_names`` and ``coarse_label_names``.
Few-shot splits are over classes, so ``train`` and ``test`` are pooled: 600 images per class.
``config.task.data_dir`` holds the archive, or the extracted ``cifar-100-python/`` folder, or is that folder.

    CIFAR-FS (Bertinetto et al., ICLR 2019): 64/16/20 fine classes (data/splits/cifar_fs.json)
    FC100 (Oreshkin et al., NeurIPS 2018): by superclass, 12/4/4 superclasses = 60/20/20 fine classes
        (data/splits/fc100.json), so no superclass is shared between meta-train and meta-test

Each split file names its source. Every problem with the data raises DataError naming the path.
"""
from __future__ import annotations

import json
import os
import pickle
import tarfile
import zlib
from typing import Dict

import numpy as np

from md_meta.data import DataError
from md_meta.data.episodes import ClassPool, pool_from_labels

ARCHIVE = 'cifar-100-python.tar.gz'
FOLDER = 'cifar-100-python'
MD5 = 'eb9058c3a382ffc7106e4002c42a8d85'   # published on www.cs.toronto.edu/~kriz/cifar.html
URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
SPLITS = ('train', 'val', 'test')
PROTOCOLS = ('cifar_fs', 'fc100')
SIZE = 32
WHERE_TO_GET = (f'get it with: python -m experiments.download cifar100 --dest=DIR (or {URL}, md5 {MD5}) and '
                'set config.task.data_dir=DIR')
SPLITS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'splits')


def split_file(protocol: str) -> dict:
    """The class split of ``protocol`` ('cifar_fs': fine class names; 'fc100': coarse label indices)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f'protocol must be one of {PROTOCOLS}, got {protocol!r}')
    with open(os.path.join(SPLITS_DIR, f'{protocol}.json')) as f:
        return json.load(f)


def _members(data_dir: str):
    """(where, {'train', 'test', 'meta': bytes}) from the archive or the extracted folder in ``data_dir``."""
    if not data_dir:
        raise DataError(f'config.task.data_dir is empty; expected a folder holding {ARCHIVE}; {WHERE_TO_GET}')
    archive = os.path.join(data_dir, ARCHIVE)
    for folder in (os.path.join(data_dir, FOLDER), data_dir):
        if all(os.path.isfile(os.path.join(folder, n)) for n in ('train', 'test', 'meta')):
            raw = {}
            for n in ('train', 'test', 'meta'):
                with open(os.path.join(folder, n), 'rb') as f:
                    raw[n] = f.read()
            return folder, raw
    if not os.path.isfile(archive):
        raise DataError(f'{archive}: not found (nor an extracted {FOLDER}/ with train, test, meta); {WHERE_TO_GET}')
    try:
        with tarfile.open(archive, 'r:gz') as tar:
            names = set(tar.getnames())
            missing = [n for n in ('train', 'test', 'meta') if f'{FOLDER}/{n}' not in names]
            if missing:
                raise DataError(f'{archive}: no member {FOLDER}/{missing[0]}; expected the official CIFAR-100 python '
                                f'archive; {WHERE_TO_GET}')
            return archive, {n: tar.extractfile(f'{FOLDER}/{n}').read() for n in ('train', 'test', 'meta')}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f'{archive}: not a readable tar.gz ({e}); {WHERE_TO_GET}') from e


def _unpickle(raw: bytes, where: str, keys) -> dict:
    """The batch's dict with str keys (the archive's pickles are Python 2's: latin-1 strings)."""
    try:
        d = pickle.loads(raw, encoding='latin1')
    except Exception as e:  # noqa: BLE001
        raise DataError(f'{where}: unreadable pickle ({type(e).__name__}: {e}); {WHERE_TO_GET}') from e
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()} if isinstance(d, dict) else {}
    missing = [k for k in keys if k not in d]
    if missing:
        raise DataError(f'{where}: expected a dict with {tuple(keys)}, missing {missing[0]!r}')
    return d


def read_cifar100(data_dir: str):
    """(images uint8 (N, 32, 32, 3), fine (N,), coarse (N,), fine names, coarse names, where), the train and
    test batches pooled (train first)."""
    where, raw = _members(data_dir)
    meta = _unpickle(raw['meta'], f'{where}: meta', ('fine_label_names', 'coarse_label_names'))
    fine_names = [n.decode() if isinstance(n, bytes) else n for n in meta['fine_label_names']]
    coarse_names = [n.decode() if isinstance(n, bytes) else n for n in meta['coarse_label_names']]
    images, fine, coarse = [], [], []
    for part in ('train', 'test'):
        d = _unpickle(raw[part], f'{where}: {part}', ('data', 'fine_labels', 'coarse_labels'))
        x = np.asarray(d['data'])
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * SIZE * SIZE:
            raise DataError(f'{where}: {part}[data] must be uint8 (N, 3072), got {x.dtype} {x.shape}')
        f, c = np.asarray(d['fine_labels'], np.int64), np.asarray(d['coarse_labels'], np.int64)
        if f.shape != (len(x),) or c.shape != (len(x),):
            raise DataError(f'{where}: {part} has {len(x)} images but {f.size} fine and {c.size} coarse labels')
        images.append(x.reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1))
        fine.append(f)
        coarse.append(c)
    fine, coarse = np.concatenate(fine), np.concatenate(coarse)
    if fine.size and (fine.min() < 0 or fine.max() >= len(fine_names) or coarse.min() < 0
                      or coarse.max() >= len(coarse_names)):
        raise DataError(f'{where}: labels outside meta\'s {len(fine_names)} fine / {len(coarse_names)} coarse names')
    return np.ascontiguousarray(np.concatenate(images)), fine, coarse, fine_names, coarse_names, where


def superclass_of(fine: np.ndarray, coarse: np.ndarray, num_fine: int, where: str) -> np.ndarray:
    """(num_fine,) the coarse label of each fine class (-1: no image); DataError where a class has two."""
    out = np.full(num_fine, -1, np.int64)
    for f in range(num_fine):
        cs = np.unique(coarse[fine == f])
        if cs.size > 1:
            raise DataError(f'{where}: fine class {f} has images of several superclasses {cs.tolist()}')
        if cs.size:
            out[f] = cs[0]
    return out


def split_classes(protocol: str, fine_names, coarse_names, superclass, where: str) -> Dict[str, list]:
    """{split: fine class names} of ``protocol``, checked against the archive's names."""
    spec = split_file(protocol)
    if protocol == 'cifar_fs':
        unknown = [n for s in SPLITS for n in spec[s] if n not in fine_names]
        if unknown:
            raise DataError(f'{where}: CIFAR-FS class {unknown[0]!r} is not a CIFAR-100 fine class of meta')
        return {s: list(spec[s]) for s in SPLITS}
    if list(coarse_names) != list(spec['coarse_label_names']):
        raise DataError(f'{where}: meta\'s coarse_label_names differ from the ones FC100\'s superclass indices '
                        f'refer to (md_meta/data/splits/fc100.json); expected the official CIFAR-100 archive')
    return {s: [n for i, n in enumerate(fine_names) if superclass[i] in spec[s]] for s in SPLITS}


def load_splits(data_dir: str, protocol: str) -> Dict[str, ClassPool]:
    """{split: ClassPool (., 32, 32, 3) uint8} of CIFAR-FS ('cifar_fs') or FC100 ('fc100'); DataError where a
    class of a split has no image."""
    images, fine, coarse, fine_names, coarse_names, where = read_cifar100(data_dir)
    superclass = superclass_of(fine, coarse, len(fine_names), where)
    pools = {}
    for split, names in split_classes(protocol, fine_names, coarse_names, superclass, where).items():
        index = [fine_names.index(n) for n in names]
        empty = [n for n, i in zip(names, index) if superclass[i] < 0]
        if empty:
            raise DataError(f'{where}: class {empty[0]!r} of the {protocol} {split!r} split has no image; '
                            f'{WHERE_TO_GET}')
        keep = np.isin(fine, index)
        relabel = np.full(len(fine_names), -1, np.int64)
        relabel[index] = np.arange(len(index))
        pools[split] = pool_from_labels(images[keep], relabel[fine[keep]], names, f'{where} ({protocol} {split})')
    return pools
