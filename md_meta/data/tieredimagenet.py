"""tieredImageNet (Ren et al., "Meta-learning for semi-supervised few-shot classification", ICLR 2018) as class
pools of 84x84x3 uint8 images.

What it is: 608 ImageNet (ILSVRC-2012) classes grouped under 34 high-level categories of the ImageNet hierarchy.
The categories, not the classes, are split 20/6/8 into meta-train/val/test, which gives 351/97/160 classes
(779,165 images), so that meta-test classes share no high-level category with meta-train ones. The split is the
one the data comes in (md-meta ships no list of it); where the data names the categories, ``load_splits`` checks
that no category is in two splits. Two layouts under ``data_dir``:

  (a) ``train/``, ``val/``, ``test/``, each with one folder per class (e.g. named by wnid) of image files,
      decoded with PIL to RGB and resized to 84x84 (Lanczos) when needed (md_meta.data.folder; cached);
  (b) per split, ``{split}_labels.pkl`` (a dict: ``label_specific``, the class index of each image, and where
      present ``label_specific_str`` (class names), ``label_general`` / ``label_general_str`` (categories)) with
      the images as ``{split}_images_png.pkl`` (a list of PNG-encoded images: Ren et al.'s release; decoded once
      and cached as .npz, md_meta.data.cache_path) or ``{split}_images.npz`` (key ``images``, uint8
      (N, 84, 84, 3): the decoded form several code bases use).
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Dict

import numpy as np

from md_meta.data import DataError, cache_path, file_fingerprint, folder, refuse_shared, save_npz
from md_meta.data.episodes import ClassPool, pool_from_labels

SPLITS = ('train', 'val', 'test')
SIZE = 84
WHERE_TO_GET = ('tieredImageNet is built from ImageNet (ILSVRC-2012, image-net.org, after accepting its terms) with '
                'Ren et al.\'s scripts and class lists (github.com/renmengye/few-shot-ssl-public, tiered-imagenet), '
                'or taken as the {train,val,test}_images_png.pkl + _labels.pkl files that release produces; put '
                'the split folders or the files in config.task.data_dir')
LAYOUTS = ('expected (a) train/, val/, test/ of class folders or (b) {split}_labels.pkl with '
           '{split}_images_png.pkl or {split}_images.npz for each split')


def detect_layout(data_dir: str) -> str:
    """'folders' or 'pickle'; DataError naming data_dir otherwise."""
    if not data_dir:
        raise DataError(f'config.task.data_dir is empty; {LAYOUTS}; {WHERE_TO_GET}')
    if not os.path.isdir(data_dir):
        raise DataError(f'{data_dir}: no such directory (config.task.data_dir); {LAYOUTS}; {WHERE_TO_GET}')
    if all(os.path.isdir(os.path.join(data_dir, s)) for s in SPLITS):
        return 'folders'
    labels = [os.path.join(data_dir, f'{s}_labels.pkl') for s in SPLITS]
    if any(os.path.exists(p) for p in labels):
        missing = [p for p in labels if not os.path.exists(p)]
        if missing:
            raise DataError(f'{missing[0]}: not found; {LAYOUTS}; {WHERE_TO_GET}')
        return 'pickle'
    raise DataError(f'{data_dir}: neither tieredImageNet layout found; {LAYOUTS}; {WHERE_TO_GET}')


def _unpickle(path: str):
    """A pickle of Ren et al.'s release (Python 2: latin-1 strings) or of Python 3."""
    try:
        with open(path, 'rb') as f:
            return pickle.load(f, encoding='latin1')
    except Exception as e:  # noqa: BLE001
        raise DataError(f'{path}: unreadable pickle ({type(e).__name__}: {e}); {WHERE_TO_GET}') from e


def _names(value) -> list:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in value]


def read_labels(path: str) -> dict:
    """{'labels': (N,) int, 'names': class names, 'categories': (N,) int or None, 'category_names': list or None}."""
    d = _unpickle(path)
    if not isinstance(d, dict) or 'label_specific' not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f'{path}: expected a dict with label_specific (and label_specific_str), got {keys}')
    labels = np.asarray(d['label_specific'], np.int64).reshape(-1)
    n = int(labels.max()) + 1 if labels.size else 0
    names = _names(d['label_specific_str']) if 'label_specific_str' in d else [f'class_{i}' for i in range(n)]
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f'{path}: label_specific outside the {len(names)} classes of label_specific_str')
    cats = np.asarray(d['label_general'], np.int64).reshape(-1) if 'label_general' in d else None
    if cats is not None and cats.shape != labels.shape:
        raise DataError(f'{path}: {cats.size} label_general for {labels.size} label_specific')
    cat_names = _names(d['label_general_str']) if 'label_general_str' in d else None
    return {'labels': labels, 'names': names, 'categories': cats, 'category_names': cat_names}


def _decode_png(item, where: str, i: int) -> np.ndarray:
    from PIL import Image
    if isinstance(item, str):   # a Python 2 byte string read as latin-1
        raw = item.encode('latin1')
    elif isinstance(item, np.ndarray):   # cv2.imencode's output
        raw = item.astype(np.uint8).tobytes()
    else:
        raw = bytes(item)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert('RGB')
            if im.size != (SIZE, SIZE):
                im = im.resize((SIZE, SIZE), Image.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise DataError(f'{where}: image {i} is not a readable PNG ({type(e).__name__}: {e})') from e


def read_images(data_dir: str, split: str) -> np.ndarray:
    """(N, 84, 84, 3) uint8 of a split: {split}_images.npz, else {split}_images_png.pkl (decoded, cached)."""
    npz = os.path.join(data_dir, f'{split}_images.npz')
    if os.path.exists(npz):
        try:
            with np.load(npz) as z:
                x = z['images']
        except Exception as e:  # noqa: BLE001
            raise DataError(f'{npz}: unreadable (expected the key images; {type(e).__name__}: {e})') from e
    else:
        png = os.path.join(data_dir, f'{split}_images_png.pkl')
        if not os.path.exists(png):
            raise DataError(f'{png}: not found (nor {npz}); {LAYOUTS}; {WHERE_TO_GET}')
        cache = cache_path(data_dir, f'tieredimagenet-{split}', file_fingerprint([png]) + '|v1')
        if cache and os.path.exists(cache):
            try:
                with np.load(cache) as z:
                    return z['images']
            except Exception:  # noqa: BLE001 - rebuilt below
                pass
        items = _unpickle(png)
        x = np.stack([_decode_png(item, png, i) for i, item in enumerate(items)]) if len(items) else \
            np.zeros((0, SIZE, SIZE, 3), np.uint8)
        save_npz(cache, images=x)
        return x
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise DataError(f'{npz}: images must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}')
    return x


def load_split_pickle(data_dir: str, split: str):
    """(ClassPool, the names of its high-level categories, or None where the labels do not name them: the
    category indices of Ren et al.'s files count within a split)."""
    path = os.path.join(data_dir, f'{split}_labels.pkl')
    lab = read_labels(path)
    images = read_images(data_dir, split)
    if len(images) != len(lab['labels']):
        raise DataError(f'{path}: {len(lab["labels"])} labels for {len(images)} images of the {split!r} split')
    cats, names = None, lab['category_names']
    if lab['categories'] is not None and names:
        if lab['categories'].size and (lab['categories'].min() < 0 or lab['categories'].max() >= len(names)):
            raise DataError(f'{path}: label_general outside the {len(names)} categories of label_general_str')
        cats = {names[c] for c in np.unique(lab['categories'])}
    return pool_from_labels(images, lab['labels'], lab['names'], path), cats


def load_splits(data_dir: str) -> Dict[str, ClassPool]:
    """{split: ClassPool (., 84, 84, 3) uint8}; DataError when a class or a named category is in two splits."""
    if detect_layout(data_dir) == 'folders':
        pools, cats = folder.load_splits(data_dir, SIZE, 3), {}   # the folders name no category
    else:
        pools, cats = {}, {}
        for s in SPLITS:
            pools[s], cats[s] = load_split_pickle(data_dir, s)
    refuse_shared(data_dir, {s: pools[s].names for s in SPLITS})
    refuse_shared(data_dir, {s: cats.get(s) or set() for s in SPLITS}, 'high-level category',
                  'tieredImageNet splits by category')
    return pools
