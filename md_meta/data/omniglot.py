"""Omniglot (Lake, Salakhutdinov and Tenenbaum 2015) as class pools of 28x28x1 uint8 images.

Two ways in (``source``):
  * 'zip': the authors' files at ``data_dir``, as zips (``images_background.zip``) or extracted folders
    (``images_background/<Alphabet>/characterNN/<drawer>_<NN>.png``, 20 PNGs of 105x105 per character);
  * 'tfds': tensorflow-datasets' ``omniglot`` (downloads and prepares in the array_record format, which
    reads without TensorFlow; needs a network the first time);
  * 'auto': the local files when present, else TFDS data already prepared on this machine.

Split protocols (``protocol``):
  * 'maml': the background (964) and evaluation (659) sets, all 1623 characters sorted by name and
    shuffled with a fixed seed (MAML_SPLIT_SEED): 1100 meta-train, 100 meta-val, 423 meta-test;
  * 'minimal': the union of ``images_background_small1`` and ``images_background_small2`` (Greek and
    Latin are in both and are counted once: 242 characters, 4840 images), shuffled by character with
    a fixed seed: 162 meta-train, 40 meta-val, 40 meta-test (the held-out part from which Omniglot
    one-shot challenge runs can be built, see md_meta.data.lake);
  * 'minimal_alphabet': the same 242 characters split by alphabet, so that meta-test characters come
    from alphabets never seen in meta-train (as in Lake's one-shot runs): the 8 alphabets sorted by name
    and shuffled with MINIMAL_SPLIT_SEED; fold f (``alphabet_fold``, 0-3) holds out alphabets 2f and 2f + 1
    of that order for meta-test and the next one for meta-val, the other five are meta-train, so that over
    the four folds every alphabet is a test alphabet once. Fold 0: meta-test Greek, Korean (64 characters),
    meta-val Japanese (katakana) (47), meta-train Balinese, Early Aramaic, Latin, Sanskrit, Tagalog (131).
Images are resized 105 -> 28 with PIL's Lanczos filter (antialiased) and inverted so that strokes are
bright (255) on a dark (0) background. In meta-train, rotations by 90, 180 and 270 degrees of each
character are new classes (x4); meta-val and meta-test are not rotated.
"""
from __future__ import annotations

import io
import os
import zipfile
from typing import Dict, List, Tuple

import numpy as np

from md_meta.data import DataError, cache_path, file_fingerprint, save_npz
from md_meta.data.episodes import ClassPool, pool_from_classes, with_rotations

PROTOCOLS = {'maml': ('images_background', 'images_evaluation'),
             'minimal': ('images_background_small1', 'images_background_small2'),
             'minimal_alphabet': ('images_background_small1', 'images_background_small2')}
SOURCES = ('auto', 'zip', 'tfds')
MAML_SPLIT = (1100, 100, 423)
MINIMAL_HELD_OUT = (40, 40)   # (meta-val, meta-test) characters; the rest is meta-train
MINIMAL_ALPHABETS_HELD_OUT = (1, 2)  # (meta-val, meta-test) alphabets; the rest is meta-train
MAML_SPLIT_SEED = 1
MINIMAL_SPLIT_SEED = 0
DRAWERS = 20
WHERE_TO_GET = ('get the zips from https://github.com/brendenlake/omniglot (python/images_background.zip, '
                'python/images_evaluation.zip, python/images_background_small1.zip, '
                'python/images_background_small2.zip) into config.task.data_dir, or use '
                "config.task.source='tfds' on a machine with a network")

Entry = Tuple[str, object]  # (display path, reader of the PNG bytes)


def find_set(data_dir: str, name: str):
    """('zip', path) or ('dir', path) for the set ``name`` in ``data_dir``, or None."""
    z = os.path.join(data_dir, name + '.zip')
    if os.path.isfile(z):
        return 'zip', z
    d = os.path.join(data_dir, name)
    if os.path.isdir(d):
        nested = os.path.join(d, name)  # unzip into a folder of the same name
        return 'dir', nested if os.path.isdir(nested) else d
    return None


def _ignored(part: str) -> bool:
    return part.startswith('.') or part == '__MACOSX' or part == 'Thumbs.db'


def _list_set(kind: str, path: str, name: str) -> Dict[Tuple[str, str], List[Tuple[str, str, int, object]]]:
    """{(alphabet, character): [(file name, display path, size, reader)]} of one set."""
    chars: Dict[Tuple[str, str], list] = {}
    if kind == 'zip':
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f'{path}: not a readable zip file ({e}); expected the Omniglot set {name!r}; '
                            f'{WHERE_TO_GET}') from e
        for info in zf.infolist():
            parts = [p for p in info.filename.split('/') if p]
            if info.is_dir() or any(_ignored(p) for p in parts):
                continue
            if len(parts) != 4 or parts[0] != name:
                raise DataError(f'{path}: unexpected member {info.filename!r}; expected '
                                f'{name}/<Alphabet>/characterNN/<drawer>_NN.png; {WHERE_TO_GET}')
            chars.setdefault((parts[1], parts[2]), []).append(
                (parts[3], f'{path}::{info.filename}', info.file_size, (lambda zf=zf, i=info: zf.read(i))))
    else:
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not _ignored(d))
            rel = os.path.relpath(root, path)
            depth = 0 if rel == '.' else len(rel.split(os.sep))
            files = [f for f in files if not _ignored(f)]
            if files and depth != 2:
                raise DataError(f'{os.path.join(root, files[0])}: unexpected file; expected '
                                f'{path}/<Alphabet>/characterNN/<drawer>_NN.png; {WHERE_TO_GET}')
            if depth == 2:
                alpha, char = rel.split(os.sep)
                for f in files:
                    p = os.path.join(root, f)
                    chars.setdefault((alpha, char), []).append(
                        (f, p, os.path.getsize(p), (lambda p=p: open(p, 'rb').read())))
                if not files:
                    raise DataError(f'{root}: empty character folder; expected {DRAWERS} PNG files')
    if not chars:
        raise DataError(f'{path}: no character images found; expected {name}/<Alphabet>/characterNN/'
                        f'<drawer>_NN.png; {WHERE_TO_GET}')
    for key, files in chars.items():
        bad = [f for f in files if not f[0].lower().endswith('.png')]
        if bad:
            raise DataError(f'{bad[0][1]}: not a PNG file; expected only <drawer>_NN.png in each character folder')
        if len(files) != DRAWERS:
            raise DataError(f'{path}: character {key[0]}/{key[1]} has {len(files)} images, expected {DRAWERS} '
                            f'(one per drawer); {WHERE_TO_GET}')
        files.sort()
    return chars


def decode(data: bytes, where: str, size: int = 28) -> np.ndarray:
    """PNG bytes -> (size, size) uint8, strokes bright: 255 - Lanczos-resized grey levels."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert('L')
            if im.size != (size, size):
                im = im.resize((size, size), Image.LANCZOS)
            return 255 - np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - any decoder failure is reported with the path
        raise DataError(f'{where}: unreadable image ({type(e).__name__}: {e}); expected a PNG of an Omniglot '
                        f'character; {WHERE_TO_GET}') from e


def _merge(sets: List[Tuple[str, dict]]) -> Dict[Tuple[str, str], list]:
    """Union by (alphabet, character); a character present in several sets (Greek and Latin in both
    small sets) is kept once, after checking that its files agree."""
    merged: Dict[Tuple[str, str], list] = {}
    origin = {}
    for path, chars in sets:
        for key, files in chars.items():
            if key in merged:
                a = [(f[0], f[2]) for f in merged[key]]
                b = [(f[0], f[2]) for f in files]
                if a != b:
                    raise DataError(f'{path}: character {key[0]}/{key[1]} is also in {origin[key]} with different '
                                    'files; the Omniglot sets should agree where they overlap')
                continue
            merged[key] = files
            origin[key] = path
    return merged


def load_characters_local(data_dir: str, protocol: str, size: int = 28):
    """(images (C, 20, size, size) uint8, names ('Alphabet/characterNN',)) from zips/folders, cached."""
    if not data_dir:
        raise DataError(f'config.task.data_dir is empty; expected a folder holding the Omniglot sets '
                        f'{PROTOCOLS[protocol]}; {WHERE_TO_GET}')
    if not os.path.isdir(data_dir):
        raise DataError(f'{data_dir}: no such directory (config.task.data_dir); expected a folder holding the '
                        f'Omniglot sets {PROTOCOLS[protocol]} as zips or folders; {WHERE_TO_GET}')
    found = []
    for name in PROTOCOLS[protocol]:
        f = find_set(data_dir, name)
        if f is None:
            raise DataError(f'{data_dir}: {name}.zip (or the folder {name}/) not found; the {protocol!r} split '
                            f'protocol needs {" and ".join(PROTOCOLS[protocol])}; {WHERE_TO_GET}')
        found.append((name,) + f)
    fp = []
    for name, kind, path in found:
        if kind == 'zip':
            fp.append(file_fingerprint([path]))
        else:
            n, tot = 0, 0
            for root, _, files in os.walk(path):
                n += len(files)
                tot += sum(os.path.getsize(os.path.join(root, f)) for f in files)
            fp.append(f'{os.path.abspath(path)}:{n}:{tot}')
    cache = cache_path(data_dir, f"omniglot-{'maml' if protocol == 'maml' else 'minimal'}-{size}", '|'.join(fp) + f'|{size}|v1')
    if cache and os.path.exists(cache):
        try:
            with np.load(cache) as z:
                return z['images'], tuple(str(n) for n in z['names'])
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            pass
    merged = _merge([(path, _list_set(kind, path, name)) for name, kind, path in found])
    keys = sorted(merged)
    images = np.empty((len(keys), DRAWERS, size, size), np.uint8)
    for c, key in enumerate(keys):
        for j, (_, where, _, read) in enumerate(merged[key]):
            try:
                data = read()
            except Exception as e:  # noqa: BLE001
                raise DataError(f'{where}: unreadable ({e})') from e
            images[c, j] = decode(data, where, size)
    names = tuple(f'{a}/{ch}' for a, ch in keys)
    save_npz(cache, images=images, names=np.asarray(names))
    return images, names


def load_characters_tfds(protocol: str, size: int = 28, download: bool = True, data_dir: str | None = None):
    """The same from tensorflow-datasets' 'omniglot' (splits train+test for 'maml', small1+small2 for
    'minimal'), prepared in the array_record format so that reading needs no TensorFlow."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f'tensorflow-datasets is not installed (pip install tensorflow-datasets); or '
                        f"use config.task.source='zip'; {WHERE_TO_GET}") from e
    splits = ('train', 'test') if protocol == 'maml' else ('small1', 'small2')  # minimal, minimal_alphabet
    try:
        builder = tfds.builder('omniglot', data_dir=data_dir, file_format='array_record')
        if not builder.is_prepared():
            if not download:
                raise DataError(f'{builder.data_dir}: TFDS omniglot is not prepared here')
            builder.download_and_prepare()
        alphabets = builder.info.features['alphabet'].names
        per_char: Dict[Tuple[str, str], list] = {}
        seen_in = {}
        for sp in splits:
            ds = builder.as_data_source(split=sp)
            local: Dict[Tuple[str, str], list] = {}
            for ex in ds:
                key = (alphabets[int(ex['alphabet'])], f'character{int(ex["alphabet_char_id"]) + 1:02d}')
                local.setdefault(key, []).append(np.asarray(ex['image'])[..., 0])
            for key, ims in local.items():
                if key not in seen_in:  # the small sets overlap on Greek and Latin: keep one copy
                    per_char[key] = ims
                    seen_in[key] = sp
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f'tensorflow-datasets omniglot could not be loaded ({type(e).__name__}: {e}); it needs a '
                        f"network the first time. Or use config.task.source='zip'; {WHERE_TO_GET}") from e
    from PIL import Image
    keys = sorted(per_char)
    images = np.empty((len(keys), DRAWERS, size, size), np.uint8)
    for c, key in enumerate(keys):
        if len(per_char[key]) != DRAWERS:
            raise DataError(f'TFDS omniglot: character {key} has {len(per_char[key])} images, expected {DRAWERS}')
        for j, im in enumerate(per_char[key]):
            im = np.asarray(im, np.uint8)
            if im.max() <= 1:   # the one-bit PNGs decode to 0/1 here, to 0/255 through PIL's 'L'
                im = im * np.uint8(255)
            im = Image.fromarray(im).resize((size, size), Image.LANCZOS)
            images[c, j] = 255 - np.asarray(im, np.uint8)
    return images, tuple(f'{a}/{ch}' for a, ch in keys)


def load_characters(data_dir: str, protocol: str = 'minimal', source: str = 'auto', size: int = 28):
    if protocol not in PROTOCOLS:
        raise DataError(f'config.task.split: must be one of {tuple(PROTOCOLS)} for omniglot, got {protocol!r}')
    if source not in SOURCES:
        raise DataError(f'config.task.source: must be one of {SOURCES}, got {source!r}')
    if source == 'zip':
        return load_characters_local(data_dir, protocol, size)
    if source == 'tfds':
        return load_characters_tfds(protocol, size, download=True)
    local_present = bool(data_dir) and all(find_set(data_dir, n) for n in PROTOCOLS[protocol])
    if local_present:
        return load_characters_local(data_dir, protocol, size)
    try:
        return load_characters_tfds(protocol, size, download=False)
    except DataError:
        return load_characters_local(data_dir, protocol, size)  # raises the error naming data_dir


def split_characters(names, protocol: str, alphabet_fold: int = 0) -> Dict[str, np.ndarray]:
    """{split: character indices} of a protocol (fixed seeds; class-disjoint); ``alphabet_fold``: which
    alphabets 'minimal_alphabet' holds out (module docstring)."""
    n = len(names)
    if protocol == 'maml':
        if n != sum(MAML_SPLIT):
            raise DataError(f"the 'maml' split protocol needs all {sum(MAML_SPLIT)} Omniglot characters "
                            f'(images_background + images_evaluation), found {n}; {WHERE_TO_GET}')
        perm = np.random.default_rng(MAML_SPLIT_SEED).permutation(n)
        a, b = MAML_SPLIT[0], MAML_SPLIT[0] + MAML_SPLIT[1]
    elif protocol == 'minimal_alphabet':
        alphabet_of = np.array([name.split('/')[0] for name in names])
        alphabets = sorted(set(alphabet_of))
        nv, nt = MINIMAL_ALPHABETS_HELD_OUT
        if len(alphabets) <= nv + nt:
            raise DataError(f"the 'minimal_alphabet' split protocol needs more than {nv + nt} alphabets, found "
                            f'{len(alphabets)}; {WHERE_TO_GET}')
        folds = -(-len(alphabets) // nt)
        if not 0 <= alphabet_fold < folds:
            raise DataError(f'alphabet_fold must be in 0..{folds - 1} ({len(alphabets)} alphabets, {nt} held out '
                            f'for meta-test per fold), got {alphabet_fold}')
        order = [alphabets[i] for i in np.random.default_rng(MINIMAL_SPLIT_SEED).permutation(len(alphabets))]
        start = alphabet_fold * nt
        order = order[start:] + order[:start]
        held = {'test': order[:nt], 'val': order[nt:nt + nv], 'train': order[nt + nv:]}
        return {split: np.flatnonzero(np.isin(alphabet_of, held[split])) for split in ('train', 'val', 'test')}
    else:
        nv, nt = MINIMAL_HELD_OUT
        if n <= nv + nt:
            raise DataError(f"the 'minimal' split protocol needs more than {nv + nt} characters, found {n}")
        perm = np.random.default_rng(MINIMAL_SPLIT_SEED).permutation(n)
        a, b = n - nv - nt, n - nt
    return {'train': np.sort(perm[:a]), 'val': np.sort(perm[a:b]), 'test': np.sort(perm[b:])}


def load_splits(data_dir: str, protocol: str = 'minimal', source: str = 'auto', size: int = 28,
                rotate_train: bool = True, alphabet_fold: int = 0) -> Dict[str, ClassPool]:
    """{split: ClassPool (., size, size, 1) uint8}; meta-train with rotations as new classes."""
    images, names = load_characters(data_dir, protocol, source, size)
    where = data_dir or 'tfds:omniglot'
    pools = {}
    for split, idx in split_characters(names, protocol, alphabet_fold).items():
        pool = pool_from_classes(images[idx], [names[i] for i in idx], where)
        pools[split] = with_rotations(pool) if (split == 'train' and rotate_train) else pool
    return pools
