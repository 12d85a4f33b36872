"""Few-shot image data: Omniglot and miniImageNet loaders, the episode sampler and the Omniglot
one-shot (Lake et al. 2015) evaluator.

    omniglot.load_splits(data_dir, protocol, source)  -> {split: ClassPool}   (28x28x1 uint8)
    miniimagenet.load_splits(data_dir)                -> {split: ClassPool}   (84x84x3 uint8)
    tieredimagenet.load_splits(data_dir)              -> {split: ClassPool}   (84x84x3 uint8)
    cifar100.load_splits(data_dir, 'cifar_fs'|'fc100') -> {split: ClassPool}  (32x32x3 uint8)
    episodes.EpisodeSampler(pools, ways, shots, seed) -> sample(step, num_tasks, split, query) -> Task
    lake.evaluate_runs(root, classify) / lake.build_runs(pool, root)

Every problem with the data (missing path, wrong layout, unreadable image, a split too small for the
requested episodes) raises ``DataError`` (a ``ConfigError``, so the trainer reports it in one line and
exits before training) whose message names the path, what was expected and where to get the data.
Decoded arrays are cached as .npz in ``$MD_META_CACHE`` when set, else ``$XDG_CACHE_HOME/md_meta``
(default ``~/.cache/md_meta``); never in the data folder, which may be shared or read-only.
"""
from __future__ import annotations

import hashlib
import os

from md_meta.config import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DataError(ConfigError):
    """The data named by the config is missing, malformed or too small; the message names the path."""


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


def _writable(d: str) -> bool:
    """A folder we may write: os.access, and (since root passes os.access everywhere) a write bit in its
    mode, so that a read-only data folder (e.g. ../shared/data) is never written."""
    try:
        return os.path.isdir(d) and os.access(d, os.W_OK) and bool(os.stat(d).st_mode & 0o222)
    except OSError:
        return False


def cache_dir() -> str:
    """$MD_META_CACHE, else $XDG_CACHE_HOME/md_meta, else ~/.cache/md_meta."""
    env = os.environ.get('MD_META_CACHE')
    if env:
        return env
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'md_meta')


def cache_path(data_dir: str, name: str, fingerprint: str) -> str:
    """Where to cache a decoded array of ``data_dir``: a file in ``cache_dir()`` whose name carries a
    fingerprint of the sources; '' when the cache folder cannot be written (or lies inside the
    repository). The data folder itself is never written."""
    del data_dir  # the fingerprint names the sources
    fname = f'{name}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:16]}.npz'
    d = cache_dir()
    if _inside(d, REPO_ROOT):
        return ''
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:
        return ''
    return os.path.join(d, fname) if _writable(d) else ''


def file_fingerprint(paths) -> str:
    """The files' paths, sizes and modification times in nanoseconds (whole seconds missed a file rewritten
    within the same second, and the cache served its old pixels)."""
    parts = []
    for p in sorted(paths):
        st = os.stat(p)
        parts.append(f'{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}')
    return '|'.join(parts)


def save_npz(path: str, **arrays) -> None:
    """Atomic np.savez (a partial file is never left under the final name); failures are ignored (the
    cache is an optimisation)."""
    import numpy as np
    if not path:
        return
    tmp = f'{path}.tmp{os.getpid()}.npz'
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass


def refuse_shared(data_dir: str, members: dict, what: str = 'class', why: str = 'meta-train, meta-val and '
                  'meta-test classes must be disjoint') -> None:
    """DataError naming the first ``what`` that two splits share; ``members``: {split: set of names}, in split order."""
    splits = list(members)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            shared = set(members[a]) & set(members[b])
            if shared:
                raise DataError(f'{data_dir}: {what} {sorted(shared)[0]!r} is in both the {a!r} and {b!r} splits; {why}')
