"""Task families behind one ``TaskSource``.

    sample(step, num_tasks, split, query) -> Task     host-side, deterministic from (seed, split, step)
    device_sample(key, num_tasks, split, query) -> Task   pure-JAX, jittable (None for host-only sources)

``loss`` names the task loss ('mse' | 'xent'); ``example_x`` is one task's support inputs (for init);
``split_record`` (data sets split into classes) returns the split and a fingerprint of the data
(md_meta.data.episodes.split_record), which a workdir records at its first run and checks on resume and
evaluation (md_meta.workdirs.check_data); None for generated tasks.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

SPLITS = ('train', 'val', 'test')


class Task(NamedTuple):
    """One task (or, with a leading axis, a batch of tasks): support set D_trn and query set D_val."""
    support_x: Any
    support_y: Any
    query_x: Any
    query_y: Any


class TaskSource(NamedTuple):
    name: str
    loss: str
    example_x: Any
    sample: Callable
    device_sample: Optional[Callable] = None
    out_dim: int = 1
    split_record: Optional[Callable[[], dict]] = None


def split_key(seed: int, split: str) -> jax.Array:
    """Independent streams per split: fold_in(PRNGKey(seed), index of split)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), SPLITS.index(split))


def make_source(config) -> TaskSource:
    name = config.task.name
    if name == 'sinusoid':
        from md_meta.tasks import sinusoid
        shots = config.task.shots
        frequency = tuple(float(f) for f in config.task.frequency)

        def device_sample(key, num_tasks, split, query):
            del split  # one distribution; splits differ by key only
            return sinusoid.sample(key, num_tasks, shots, query, frequency)

        sample_jit = jax.jit(device_sample, static_argnums=(1, 2, 3))

        def sample(step, num_tasks, split, query):
            key = jax.random.fold_in(split_key(config.seed, split), step)
            return sample_jit(key, num_tasks, split, query)

        return TaskSource('sinusoid', 'mse', np.zeros((shots, 1), np.float32), sample, device_sample, 1)
    if name in ('omniglot', 'miniimagenet', 'tieredimagenet', 'cifar_fs', 'fc100', 'folder'):
        from md_meta.tasks import images
        return images.make_source(config)
    raise ValueError(f'unknown task {name!r}')
