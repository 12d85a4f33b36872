"""N-way K-shot Q-query episodes with fixed shapes, sampled on the host and prefetched on a thread.

A ``ClassPool`` holds one split's images as one uint8 array (M, H, W, C), grouped by class:
class c owns rows offsets[c] .. offsets[c+1]-1. Splits are different pools, so classes never cross
splits. A batch of T tasks for step s of split 'split' is a pure function of (seed, split, s) through
``numpy.random.default_rng([seed, split index, s])``:

  * each task draws N distinct classes (argsort of T x C uniform keys);
  * each (task, class) draws K + Q distinct images (argpartition of uniform keys, then ordered by key);
  * labels are a random permutation of 0..N-1 per task;
  * the gather is one fancy-indexing of the pool (no Python loop over images), then /255 to float32.

Support: (T, N*K, H, W, C) float32 in [0, 1], int32 labels (T, N*K); query: (T, N*Q, ...).

``Prefetcher`` wraps ``sample``: after serving step s it computes steps s+1..s+depth (same arguments)
on a background thread, so the trainer's next request is ready. Results do not depend on prefetching.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Dict, NamedTuple, Sequence

import numpy as np

from md_meta.data import DataError
from md_meta.tasks import Task

SPLITS = ('train', 'val', 'test')


class ClassPool(NamedTuple):
    """One split: images (M, H, W, C) uint8 grouped by class; offsets (num_classes + 1,); class names;
    where (the path the data came from, for error messages)."""
    images: np.ndarray
    offsets: np.ndarray
    names: tuple
    where: str = ''

    @property
    def num_classes(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def class_images(self, c: int) -> np.ndarray:
        return self.images[self.offsets[c]:self.offsets[c + 1]]


def pool_from_classes(images: np.ndarray, names: Sequence[str], where: str = '') -> ClassPool:
    """A pool from a (C, per_class, H, W[, Ch]) array (same count per class)."""
    if images.ndim == 4:
        images = images[..., None]
    c, m = images.shape[:2]
    return ClassPool(np.ascontiguousarray(images.reshape((c * m,) + images.shape[2:])),
                     np.arange(c + 1, dtype=np.int64) * m, tuple(names), where)


def pool_from_labels(images: np.ndarray, labels: np.ndarray, names: Sequence[str], where: str = '') -> ClassPool:
    """A pool from images (M, H, W, C) and integer class labels (M,) into ``names``."""
    order = np.argsort(labels, kind='stable')
    counts = np.bincount(labels, minlength=len(names))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ClassPool(np.ascontiguousarray(images[order]), offsets, tuple(names), where)


def with_rotations(pool: ClassPool) -> ClassPool:
    """Each class plus its rotations by 90, 180 and 270 degrees as three new classes (square images)."""
    h, w = pool.images.shape[1:3]
    if h != w:
        raise ValueError(f'rotations need square images, got {h}x{w}')
    parts, offsets, names, start = [], [0], [], 0
    rotated = [np.rot90(pool.images, k, axes=(1, 2)) for k in range(4)]
    for c in range(pool.num_classes):
        a, b = pool.offsets[c], pool.offsets[c + 1]
        for k in range(4):
            parts.append(rotated[k][a:b])
            start += b - a
            offsets.append(start)
            names.append(pool.names[c] if k == 0 else f'{pool.names[c]}@rot{90 * k}')
    return ClassPool(np.ascontiguousarray(np.concatenate(parts)), np.asarray(offsets, np.int64), tuple(names),
                     pool.where)


def check_pool(pool: ClassPool, split: str, ways: int, shots: int, query: int, hint: str = '') -> None:
    """DataError unless the split has >= ways classes each with >= shots + query images."""
    where = pool.where or '(generated data)'
    if pool.num_classes < ways:
        raise DataError(f'{where}: the {split!r} split has {pool.num_classes} classes, fewer than the '
                        f'{ways} needed for {ways}-way tasks (config.task.ways). {hint}'.strip())
    need = shots + query
    counts = pool.counts
    small = np.flatnonzero(counts < need)
    if len(small):  # nothing is silently skipped: every class must hold enough images
        c = int(small[0])
        raise DataError(f'{where}: class {pool.names[c]!r} of the {split!r} split has {int(counts[c])} images, '
                        f'fewer than the {need} needed for {shots}-shot + {query}-query tasks '
                        f'(config.task.shots, config.task.query / config.eval.query); '
                        f'{len(small)} of {pool.num_classes} classes are too small. {hint}'.strip())


class EpisodeSampler:
    """Host-side episode sampler over class-disjoint splits; ``sample`` is deterministic from
    (seed, split, step)."""

    def __init__(self, pools: Dict[str, ClassPool], ways: int, shots: int, seed: int = 0):
        self.pools, self.ways, self.shots, self.seed = dict(pools), ways, shots, seed
        self._uniform = {s: bool(np.all(p.counts == p.counts[0])) for s, p in self.pools.items()}

    def check(self, split: str, query: int, hint: str = '') -> None:
        if split not in self.pools:
            raise DataError(f'no {split!r} split in the data (have {sorted(self.pools)}). {hint}'.strip())
        check_pool(self.pools[split], split, self.ways, self.shots, query, hint)

    def rng(self, split: str, step: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), SPLITS.index(split), int(step)])

    def indices(self, step: int, num_tasks: int, split: str, query: int):
        """(image rows (T, N, K+Q), labels (T, N), classes (T, N)) of step ``step``."""
        pool, n, kq = self.pools[split], self.ways, self.shots + query
        rng = self.rng(split, step)
        classes = np.argsort(rng.random((num_tasks, pool.num_classes)), axis=1)[:, :n]
        labels = np.argsort(rng.random((num_tasks, n)), axis=1).astype(np.int32)
        counts = pool.counts[classes]                        # (T, N)
        width = int(counts.max())
        keys = rng.random((num_tasks, n, width))
        if not self._uniform[split]:
            keys = np.where(np.arange(width) < counts[..., None], keys, np.inf)
        if kq < width:
            pick = np.argpartition(keys, kq - 1, axis=-1)[..., :kq]
        else:
            pick = np.broadcast_to(np.arange(width), keys.shape)
        order = np.argsort(np.take_along_axis(keys, pick, -1), axis=-1)  # random order within the draw
        pick = np.take_along_axis(pick, order, -1)
        rows = pool.offsets[classes][..., None] + pick
        return rows, labels, classes

    def sample(self, step: int, num_tasks: int, split: str, query: int) -> Task:
        rows, labels, _ = self.indices(step, num_tasks, split, query)
        pool, k, t = self.pools[split], self.shots, num_tasks
        scale = np.float32(1.0 / 255.0)

        def gather(r):  # (T, N, m) rows -> (T, N*m, H, W, C) float32 in [0, 1]: one gather, one pass
            return np.multiply(pool.images[r.reshape(t, -1)], scale, dtype=np.float32)

        sx, qx = gather(rows[:, :, :k]), gather(rows[:, :, k:])
        sy = np.repeat(labels, k, axis=1)
        qy = np.repeat(labels, query, axis=1)
        return Task(sx, sy, qx, qy)


class Prefetcher:
    """``sample`` with read-ahead: serving (step, T, split, Q) queues steps step+1..step+depth with the same
    (T, split, Q) on one daemon thread. Cached results are keyed by all arguments, so the output equals
    ``fn(step, ...)`` whatever the access pattern."""

    def __init__(self, fn: Callable, depth: int = 2):
        self.fn, self.depth = fn, depth
        self._lock = threading.Condition()
        self._futures: dict = {}
        self._queue: list = []
        self._closed = False
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._worker, name='md_meta-prefetch', daemon=True)
            self._thread.start()

    def _worker(self):
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                key = self._queue.pop(0)
                fut = self._futures.get(key)
            if fut is None or fut.done():
                continue
            try:
                fut.set_result(self.fn(*key))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                fut.set_exception(e)

    def __call__(self, step: int, num_tasks: int, split: str, query: int):
        key = (int(step), int(num_tasks), split, int(query))
        with self._lock:
            fut = self._futures.pop(key, None)
            if fut is not None and key in self._queue:  # queued but not started: compute here
                self._queue.remove(key)
                fut = None
            # forget read-ahead of other streams or of steps we have passed
            for k in list(self._futures):
                if k[1:] != key[1:] or not (key[0] < k[0] <= key[0] + self.depth):
                    self._futures.pop(k)
                    if k in self._queue:
                        self._queue.remove(k)
            if self._thread is not None and not self._closed:
                for s in range(key[0] + 1, key[0] + self.depth + 1):
                    k = (s,) + key[1:]
                    if k not in self._futures:
                        self._futures[k] = Future()
                        self._queue.append(k)
                self._lock.notify()
        if fut is None:
            return self.fn(*key)
        return fut.result()

    def close(self):
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._futures.clear()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
