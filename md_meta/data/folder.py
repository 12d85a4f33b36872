"""Your own images: a folder of class folders, as class pools (config.task.name='folder').

Two layouts under ``data_dir``:
  (a) ``train/``, ``val/`` and ``test/``, each holding one folder per class (the split is yours);
  (b) one folder per class directly; classes are split by a fixed seeded shuffle of their sorted names
      into FOLDER_SPLIT (64% / 16% / 20%: meta-train / meta-val / meta-test, as miniImageNet's 64/16/20).
Images (.png, .jpg, .jpeg, .bmp, .gif, .webp, any size) directly in a class folder are read; anything else
there (subfolders, other files) is skipped with one warning line that counts it. Each image is decoded by
its mode (``decode``): turned upright by its EXIF orientation, 16-bit grey levels scaled (not clipped) to
8 bits, transparency composited onto white (the background a viewer shows: a black glyph on a transparent
background becomes black on white), then converted to ``channels`` (1: grey levels, 3: RGB) and resized to
``size`` x ``size`` with PIL's Lanczos filter; classes may hold different numbers of images. Decoded splits
are cached (md_meta.data.cache_path), keyed by the files' names, sizes and nanosecond modification times.
Every problem (missing folder, no classes, unreadable image, a split with too few classes) raises DataError
naming the path.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Tuple

import numpy as np

from md_meta.data import DataError, cache_path, file_fingerprint, save_npz
from md_meta.data.episodes import ClassPool, pool_from_labels

EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
FOLDER_SPLIT = (0.64, 0.16, 0.20)
FOLDER_SPLIT_SEED = 0
SPLITS = ('train', 'val', 'test')
LAYOUT = ('expected <data_dir>/<class>/<image> (split by a seeded shuffle of the classes) or '
          '<data_dir>/{train,val,test}/<class>/<image>')


def _class_folders(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if not d.startswith('.') and os.path.isdir(os.path.join(root, d)))


def _images_of(folder: str, skipped: List[str] | None = None) -> List[str]:
    """The image files directly in a class folder; what else is there (subfolders, other files; not hidden
    ones) is appended to ``skipped``."""
    files = sorted(f for f in os.listdir(folder) if not f.startswith('.'))
    images = [os.path.join(folder, f) for f in files
              if f.lower().endswith(EXTENSIONS) and not os.path.isdir(os.path.join(folder, f))]
    if skipped is not None:
        skipped.extend(os.path.join(folder, f) for f in files if os.path.join(folder, f) not in images)
    if not images:
        raise DataError(f'{folder}: no images ({", ".join(EXTENSIONS)}) in this class folder; {LAYOUT}')
    return images


def skipped_note(data_dir: str, skipped: List[str]) -> str:
    """One warning line counting what the class folders hold besides images, or ''."""
    if not skipped:
        return ''
    folders = [p for p in skipped if os.path.isdir(p)]
    files = [p for p in skipped if not os.path.isdir(p)]
    parts = ([f'{len(folders)} subfolder{"s" * (len(folders) > 1)} (images in subfolders are not read; e.g. '
              f'{os.path.relpath(folders[0], data_dir)})'] if folders else []) + \
            ([f'{len(files)} file{"s" * (len(files) > 1)} that are not {"/".join(EXTENSIONS)} images (e.g. '
              f'{os.path.relpath(files[0], data_dir)})'] if files else [])
    return f'warning: {data_dir}: skipped ' + ' and '.join(parts) + ' in the class folders'


def list_classes(data_dir: str, skipped: List[str] | None = None) -> Dict[str, List[Tuple[str, List[str]]]]:
    """{split: [(class name, [image paths])]} for layout (a) or (b); what the class folders hold besides
    images is appended to ``skipped``."""
    if not data_dir:
        raise DataError(f'config.task.data_dir is empty; {LAYOUT}')
    if not os.path.isdir(data_dir):
        raise DataError(f'{data_dir}: no such directory (config.task.data_dir); {LAYOUT}')
    top = _class_folders(data_dir)
    if set(SPLITS) <= set(top):
        out = {}
        for split in SPLITS:
            root = os.path.join(data_dir, split)
            out[split] = [(c, _images_of(os.path.join(root, c), skipped)) for c in _class_folders(root)]
        return out
    if any(s in top for s in SPLITS):
        raise DataError(f'{data_dir}: has {[s for s in SPLITS if s in top]} but not all of train/, val/, test/; '
                        f'{LAYOUT}')
    classes = [(c, _images_of(os.path.join(data_dir, c), skipped)) for c in top]
    if len(classes) < 3:
        raise DataError(f'{data_dir}: {len(classes)} class folders, too few to split into meta-train, meta-val '
                        f'and meta-test; {LAYOUT}')
    perm = np.random.default_rng(FOLDER_SPLIT_SEED).permutation(len(classes))
    n_val = max(1, int(round(FOLDER_SPLIT[1] * len(classes))))
    n_test = max(1, int(round(FOLDER_SPLIT[2] * len(classes))))
    n_train = len(classes) - n_val - n_test
    parts = {'train': perm[:n_train], 'val': perm[n_train:n_train + n_val], 'test': perm[n_train + n_val:]}
    return {s: [classes[i] for i in sorted(idx)] for s, idx in parts.items()}


SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')   # 'I': how older PIL opens 16-bit PNGs


def to_8bit_upright(im):
    """A PIL image as 8-bit 'L' or 'RGB' the way a viewer shows it: EXIF orientation applied, 16-bit grey
    levels scaled by 255/65535 (PIL's convert clips them, so full-range data became mostly 255), and
    transparency composited onto white (PIL's convert drops alpha, so a black glyph on a transparent
    background became all black)."""
    from PIL import Image, ImageOps
    im = ImageOps.exif_transpose(im)
    if im.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), 'L')
    if im.mode in ('P', 'PA') or 'transparency' in im.info:   # a palette, or a transparent colour (tRNS)
        im = im.convert('RGBA')
    if im.mode in ('RGBA', 'LA', 'La', 'RGBa'):
        rgba = im.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return im if im.mode in ('L', 'RGB') else im.convert('RGB')


def decode(path: str, size: int, channels: int) -> np.ndarray:
    """An image file -> (size, size, channels) uint8 (``to_8bit_upright``, then grey or RGB, then resized)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = to_8bit_upright(im).convert('L' if channels == 1 else 'RGB')
            if im.size != (size, size):
                im = im.resize((size, size), Image.LANCZOS)
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - any decoder failure is reported with the path
        raise DataError(f'{path}: unreadable image ({type(e).__name__}: {e})') from e
    return a[..., None] if channels == 1 else a


def load_splits(data_dir: str, size: int, channels: int, warn=None) -> Dict[str, ClassPool]:
    """{split: ClassPool (., size, size, channels) uint8} of a folder of class folders; ``warn`` (default:
    stderr) gets the line counting what was skipped."""
    if channels not in (1, 3):
        raise DataError(f'config.task.channels: must be 1 (grey) or 3 (RGB), got {channels}')
    skipped = []
    listed = list_classes(data_dir, skipped)
    if skipped:
        (warn or (lambda s: print(s, file=sys.stderr, flush=True)))(skipped_note(data_dir, skipped))
    paths = [p for s in SPLITS for _, files in listed[s] for p in files]
    cache = cache_path(data_dir, f'folder-{size}-{channels}',
                       file_fingerprint(paths) + f'|{size}|{channels}|v2')   # v2: decoded by mode (to_8bit_upright)
    pools = {}
    if cache and os.path.exists(cache):
        try:
            with np.load(cache) as z:
                for s in SPLITS:
                    names = [c for c, _ in listed[s]]
                    pools[s] = pool_from_labels(z[f'{s}_images'], z[f'{s}_labels'], names, data_dir)
            return pools
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            pools = {}
    arrays = {}
    for s in SPLITS:
        images = [decode(p, size, channels) for _, files in listed[s] for p in files]
        labels = np.concatenate([np.full(len(files), i, np.int64) for i, (_, files) in enumerate(listed[s])]) \
            if listed[s] else np.zeros(0, np.int64)
        images = np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8)
        arrays[f'{s}_images'], arrays[f'{s}_labels'] = images, labels
        pools[s] = pool_from_labels(images, labels, [c for c, _ in listed[s]], data_dir)
    save_npz(cache, **arrays)
    return pools
