"""How the meta-step runs over a batch of tasks: execution strategies, which change speed and memory, never the
value (tests/test_meta.py compares the meta-gradients they give).

* task batching (``meta.task_batching``, ``meta.task_chunk``): the per-task work in one ``vmap``, or a
  ``lax.map`` over equal vmapped chunks (``over_tasks``);
* task gradients (``meta.task_gradients``): the gradient of the task mean, or the mean of the per-task
  gradients (``mean_of_task_gradients``), raveled into one vector (``ravel``);
* 'auto' for each, resolved per batch from the backend and the inputs' rank: rules of thumb measured on XLA:CPU
  (docs/benchmarks.md, "Speed switches").

``learner`` is a ``meta.MetaLearner``; only its ``task_batching``, ``task_chunk`` and ``task_gradients`` are read.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from md_meta.tasks import Task

TASK_BATCHING = ('auto', 'vmap', 'map')
TASK_GRADIENTS = ('auto', 'batched', 'per_task')


def resolve_task_batching(task_batching: str, *, images: bool) -> str:
    """'auto' -> 'map' for image tasks on a single CPU device, 'vmap' otherwise. Why: on XLA:CPU chunks of a few
    CNN tasks keep the step's temporaries small and run as fast or faster, small vector tasks (sinusoid MLP) want
    one vmap, accelerators want the whole batch in one vmap, and a task axis sharded over devices must not be
    scanned (the measurements: docs/benchmarks.md, "Speed switches"). ``images``: the inputs are (examples, H,
    W, C) per task."""
    if task_batching not in TASK_BATCHING:
        raise ValueError(f'task_batching must be one of {TASK_BATCHING}, got {task_batching!r}')
    if task_batching == 'auto':
        single_cpu = jax.default_backend() == 'cpu' and jax.device_count() == 1
        return 'map' if single_cpu and images else 'vmap'
    return task_batching


def chunk_size(num_tasks: int, task_chunk: int) -> int:
    """Tasks per chunk under 'map': the largest divisor of ``num_tasks`` that is <= ``task_chunk``. Chunks
    of equal size put one copy of the task program in the step; a remainder (``lax.map``'s ``batch_size``
    with num_tasks % task_chunk != 0) would add a second one and double the compile time."""
    if task_chunk < 1:
        raise ValueError(f'task_chunk must be a positive integer, got {task_chunk!r}')
    return max(c for c in range(1, min(task_chunk, num_tasks) + 1) if num_tasks % c == 0)


def task_batching_for(learner, batch: Task) -> tuple:
    """(mode, tasks per chunk or None) that ``over_tasks`` uses for this batch of tasks."""
    mode = resolve_task_batching(learner.task_batching, images=batch.support_x.ndim == 5)
    return mode, chunk_size(batch.support_x.shape[0], learner.task_chunk) if mode == 'map' else None


def over_tasks(learner, fn: Callable, batch: Task, keys: jax.Array):
    """fn over the leading (task) axis of (batch, keys), outputs stacked: ``vmap``; ``map`` = ``lax.map``
    over equal chunks of ``chunk_size`` tasks, each chunk vmapped (a scan: the same values, less memory)."""
    mode, chunk = task_batching_for(learner, batch)
    if mode == 'vmap':
        return jax.vmap(fn)(batch, keys)
    return jax.lax.map(lambda args: fn(*args), (batch, keys), batch_size=chunk)


def resolve_task_gradients(task_gradients: str, *, images: bool) -> str:
    """'auto' -> 'per_task' for image tasks on CPU, 'batched' otherwise (docs/benchmarks.md, "Speed switches"):
    per-task gradients are faster for CNN4 on XLA:CPU, but on the sinusoid MLP each task materialises its own
    cotangent of MD's small kron matrices (MD's step there ~3x slower than batched). ``images``: the inputs
    are (examples, H, W, C) per task."""
    if task_gradients not in TASK_GRADIENTS:
        raise ValueError(f'task_gradients must be one of {TASK_GRADIENTS}, got {task_gradients!r}')
    if task_gradients == 'auto':
        return 'per_task' if jax.default_backend() == 'cpu' and images else 'batched'
    return task_gradients


def task_gradients_for(learner, batch: Task) -> str:
    """The ``task_gradients`` mode ``meta.meta_value_and_grad`` uses for this batch of tasks."""
    return resolve_task_gradients(learner.task_gradients, images=batch.support_x.ndim == 5)


def mean_of_task_gradients(learner, task_value: Callable, params, batch: Task, keys: jax.Array):
    """((mean_t f_t, mean_t aux_t), mean_t grad f_t) for (f_t, aux_t) = task_value(params, task_t, key_t), the
    gradient with respect to params: the per-task gradients ``over_tasks``, each raveled into one vector first,
    so that the task mean is one reduction, not one per leaf of params (MD's theta has 111 leaves on CNN4: one
    kernel each on an accelerator); XLA:CPU's reductions over the task axis are slow, so one at the end is
    cheaper there than the sum of the task cotangents inside the backward pass."""
    def one(task, k):
        value, grad = jax.value_and_grad(task_value, has_aux=True)(params, task, k)
        return value, ravel(grad)

    (values, aux), grads = over_tasks(learner, one, batch, keys)
    task_mean = lambda tree: jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), tree)
    return (jnp.mean(values), task_mean(aux)), jnp.mean(grads, axis=0)


def ravel(tree) -> jnp.ndarray:
    """The leaves of a pytree as one vector (``jax.flatten_util.ravel_pytree``'s order), for work that is the
    same for every element: one kernel instead of one per leaf."""
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
