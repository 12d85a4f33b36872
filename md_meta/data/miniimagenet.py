"""miniImageNet (Vinyals et al. 2016; Ravi and Larochelle's split: 64/16/20 classes of 600 images) as
class pools of 84x84x3 uint8 images, from either layout people have:

  (a) ``data_dir/images/`` with ``train.csv``, ``val.csv``, ``test.csv`` beside it, each a header
      ``filename,label`` then one line per image (file name inside images/, class label, e.g. a wnid);
      images are decoded with PIL, converted to RGB and resized to 84x84 (Lanczos) when needed;
  (b) ``data_dir/mini-imagenet-cache-{train,val,test}.pkl``: a pickled dict with ``image_data``
      (uint8 (N, 84, 84, 3)) and ``class_dict`` (class name -> list of row indices).

Layout (b) is used when its three files are present, else (a). Decoded layout-(a) splits are cached
as .npz (see md_meta.data.cache_path). ``tfds_builder`` registers the same data as a TFDS dataset.
"""
from __future__ import annotations

import csv
import os
import pickle
from typing import Dict

import numpy as np

from md_meta.data import DataError, cache_path, file_fingerprint, refuse_shared, save_npz
from md_meta.data.episodes import ClassPool, pool_from_labels

SPLITS = ('train', 'val', 'test')
SIZE = 84
WHERE_TO_GET = ('miniImageNet is not redistributable: build it from ImageNet with Ravi and Larochelle\'s '
                'train/val/test.csv (github.com/twitter/meta-learning-lstm, data/miniImagenet) into images/, '
                'or use the pickle caches mini-imagenet-cache-{train,val,test}.pkl distributed with several '
                'few-shot code bases; put either in config.task.data_dir')


def pickle_path(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f'mini-imagenet-cache-{split}.pkl')


def detect_layout(data_dir: str) -> str:
    """'pickle' or 'csv'; DataError naming data_dir and both layouts otherwise."""
    if not data_dir:
        raise DataError(f'config.task.data_dir is empty; expected a miniImageNet folder; {WHERE_TO_GET}')
    if not os.path.isdir(data_dir):
        raise DataError(f'{data_dir}: no such directory (config.task.data_dir); expected a miniImageNet folder '
                        f'with images/ + train.csv, val.csv, test.csv, or mini-imagenet-cache-{{train,val,test}}.pkl; '
                        f'{WHERE_TO_GET}')
    pkls = [os.path.exists(pickle_path(data_dir, s)) for s in SPLITS]
    if all(pkls):
        return 'pickle'
    csvs = [os.path.exists(os.path.join(data_dir, f'{s}.csv')) for s in SPLITS]
    if all(csvs) and os.path.isdir(os.path.join(data_dir, 'images')):
        return 'csv'
    if any(pkls):
        missing = [pickle_path(data_dir, s) for s, ok in zip(SPLITS, pkls) if not ok]
        raise DataError(f'{missing[0]}: not found; layout (b) needs mini-imagenet-cache-{{train,val,test}}.pkl; '
                        f'{WHERE_TO_GET}')
    if any(csvs) or os.path.isdir(os.path.join(data_dir, 'images')):
        missing = [os.path.join(data_dir, f'{s}.csv') for s, ok in zip(SPLITS, csvs) if not ok]
        missing = missing or [os.path.join(data_dir, 'images')]
        raise DataError(f'{missing[0]}: not found; layout (a) needs images/ and train.csv, val.csv, test.csv '
                        f'("filename,label"); {WHERE_TO_GET}')
    raise DataError(f'{data_dir}: neither miniImageNet layout found; expected (a) images/ + train.csv, val.csv, '
                    f'test.csv ("filename,label") or (b) mini-imagenet-cache-{{train,val,test}}.pkl; {WHERE_TO_GET}')


def read_csv(path: str):
    """[(filename, label)] of a split file; DataError on a wrong header or row."""
    try:
        with open(path, newline='') as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'{path}: unreadable ({e}); expected a CSV "filename,label"') from e
    if not rows or [c.strip() for c in rows[0]] != ['filename', 'label']:
        raise DataError(f'{path}: expected the header "filename,label", got {",".join(rows[0]) if rows else "an empty file"!r}')
    out = []
    for i, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        if len(r) != 2 or not r[0] or not r[1]:
            raise DataError(f'{path}, line {i}: expected "filename,label", got {",".join(r)!r}')
        out.append((r[0].strip(), r[1].strip()))
    if not out:
        raise DataError(f'{path}: no images listed; expected lines "filename,label"')
    return out


def decode_rgb(path: str, size: int = SIZE) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            if im.size != (size, size):
                im = im.resize((size, size), Image.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DataError(f'{path}: listed in the split CSV but not found in images/; {WHERE_TO_GET}') from e
    except Exception as e:  # noqa: BLE001
        raise DataError(f'{path}: unreadable image ({type(e).__name__}: {e}); expected a JPEG/PNG image') from e


def load_split_csv(data_dir: str, split: str, size: int = SIZE) -> ClassPool:
    path = os.path.join(data_dir, f'{split}.csv')
    rows = read_csv(path)
    names = sorted({lab for _, lab in rows})
    index = {n: i for i, n in enumerate(names)}
    img_dir = os.path.join(data_dir, 'images')
    files = [os.path.join(img_dir, f) for f, _ in rows]
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f'{f}: listed in {path} but not found; {WHERE_TO_GET}')
    cache = cache_path(data_dir, f'miniimagenet-{split}-{size}', file_fingerprint([path]) + f'|{len(files)}|v1')
    labels = np.asarray([index[lab] for _, lab in rows], np.int64)
    if cache and os.path.exists(cache):
        try:
            with np.load(cache) as z:
                if list(z['names']) == names and np.array_equal(z['labels'], labels):
                    return pool_from_labels(z['images'], labels, names, path)
        except Exception:  # noqa: BLE001 - rebuilt below
            pass
    images = np.empty((len(files), size, size, 3), np.uint8)
    for i, f in enumerate(files):
        images[i] = decode_rgb(f, size)
    save_npz(cache, images=images, labels=labels, names=np.asarray(names))
    return pool_from_labels(images, labels, names, path)


def load_split_pickle(data_dir: str, split: str) -> ClassPool:
    path = pickle_path(data_dir, split)
    try:
        with open(path, 'rb') as f:
            d = pickle.load(f)
    except Exception as e:  # noqa: BLE001
        raise DataError(f'{path}: unreadable pickle ({type(e).__name__}: {e}); expected a dict with image_data '
                        f'and class_dict; {WHERE_TO_GET}') from e
    if not isinstance(d, dict) or 'image_data' not in d or 'class_dict' not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f'{path}: expected a dict with keys image_data and class_dict, got {keys}')
    x = np.asarray(d['image_data'])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise DataError(f'{path}: image_data must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}')
    names = sorted(d['class_dict'])
    labels = np.full(len(x), -1, np.int64)
    for i, n in enumerate(names):
        idx = np.asarray(d['class_dict'][n], np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(x)):
            raise DataError(f'{path}: class_dict[{n!r}] indexes rows outside image_data (N={len(x)})')
        if np.any(labels[idx] >= 0):
            raise DataError(f'{path}: class_dict[{n!r}] shares images with another class')
        labels[idx] = i
    if np.any(labels < 0):
        raise DataError(f'{path}: {int(np.sum(labels < 0))} rows of image_data belong to no class of class_dict')
    return pool_from_labels(x, labels, names, path)


def load_splits(data_dir: str) -> Dict[str, ClassPool]:
    """{split: ClassPool (., 84, 84, 3) uint8}; DataError when classes are shared between splits."""
    layout = detect_layout(data_dir)
    load = load_split_pickle if layout == 'pickle' else load_split_csv
    pools = {s: load(data_dir, s) for s in SPLITS}
    refuse_shared(data_dir, {s: pools[s].names for s in SPLITS})
    return pools
