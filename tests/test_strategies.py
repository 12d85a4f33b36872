"""The execution strategies (md_meta.strategies), alone: the 'auto' resolutions and the config's checks, equal
chunks, the task map against the vmap and the mean of per-task gradients against the gradient of the mean on a
small function of their own. (That the meta-gradient is the same under every strategy: tests/test_meta.py.)"""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_meta.config import ConfigError, validate
from md_meta.strategies import (chunk_size, mean_of_task_gradients, over_tasks, ravel, resolve_task_batching,
                                resolve_task_gradients, task_batching_for)
from md_meta.tasks import Task
from tests.helpers import image_batch, image_learner, tiny_config


def _tasks(num_tasks):
    """A batch of image-shaped tasks (inputs of rank 5, so 'auto' may map them) of random numbers."""
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    return Task(*(jax.random.normal(k, (num_tasks, 3, 2, 2, 1)) for k in ks))


def _task_value(params, task, key):
    """A small smooth function of params per task, with an auxiliary output."""
    x = task.support_x.reshape(-1)
    value = jnp.sum(jnp.tanh(params['w'] * x) ** 2) + params['b'] * jnp.mean(task.query_x) * jax.random.normal(key)
    return value, {'x_mean': jnp.mean(x)}


def test_resolve_task_batching_and_config():
    single_cpu = jax.default_backend() == 'cpu' and jax.device_count() == 1
    assert resolve_task_batching('auto', images=True) == ('map' if single_cpu else 'vmap')
    assert resolve_task_batching('auto', images=False) == 'vmap'
    assert resolve_task_batching('map', images=False) == 'map'
    with pytest.raises(ValueError, match='task_batching'):
        resolve_task_batching('pmap', images=True)
    # equal chunks only (no remainder program): the largest divisor of the batch <= task_chunk
    assert [chunk_size(n, 2) for n in (1, 2, 3, 4, 32)] == [1, 2, 1, 2, 2]
    assert [chunk_size(n, 4) for n in (6, 7, 8, 3)] == [3, 1, 4, 3]
    with pytest.raises(ValueError, match='task_chunk'):
        chunk_size(4, 0)
    images, vectors = image_batch(tasks=3), Task(*(jnp.zeros((25, 5, 1)),) * 4)
    assert task_batching_for(image_learner(task_batching='map', task_chunk=2), images) == ('map', 1)
    assert task_batching_for(image_learner(task_batching='auto', task_chunk=2), vectors) == ('vmap', None)
    for field, value in (('task_batching', 'pmap'), ('task_chunk', 0)):
        c = tiny_config('maml')
        c.meta[field] = value
        with pytest.raises(ConfigError, match=f'meta.{field}'):
            validate(c)


def test_resolve_task_gradients_and_config():
    cpu = jax.default_backend() == 'cpu'
    assert resolve_task_gradients('auto', images=True) == ('per_task' if cpu else 'batched')
    assert resolve_task_gradients('auto', images=False) == 'batched'
    assert resolve_task_gradients('per_task', images=False) == 'per_task'
    with pytest.raises(ValueError, match='task_gradients'):
        resolve_task_gradients('sum', images=True)
    c = tiny_config('maml')
    c.meta.task_gradients = 'sum'
    with pytest.raises(ConfigError, match='meta.task_gradients'):
        validate(c)


def test_over_tasks_map_is_the_vmap():
    """'map' (lax.map over equal vmapped chunks: 6 tasks in chunks of 3, 2 and 1) stacks the same outputs as one
    vmap, keys included."""
    batch, keys = _tasks(6), jax.random.split(jax.random.PRNGKey(1), 6)
    fn = lambda task, k: (jnp.sum(jnp.sin(task.support_x)), jax.random.uniform(k, (2,)))
    learner = lambda mode, chunk: SimpleNamespace(task_batching=mode, task_chunk=chunk)
    want = jax.jit(lambda b, k: over_tasks(learner('vmap', 1), fn, b, k))(batch, keys)
    for chunk in (3, 2, 1):
        got = jax.jit(lambda b, k: over_tasks(learner('map', chunk), fn, b, k))(batch, keys)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize('mode,chunk', [('vmap', 1), ('map', 2)])
def test_mean_of_task_gradients_is_the_gradient_of_the_mean(mode, chunk):
    """mean_t grad f_t, raveled (ravel's order), == grad mean_t f_t; the values and auxiliary outputs are the
    task means too."""
    batch, keys = _tasks(4), jax.random.split(jax.random.PRNGKey(1), 4)
    params = {'w': jnp.asarray([0.3, -0.7]).reshape(2, 1), 'b': jnp.asarray(0.5)}
    learner = SimpleNamespace(task_batching=mode, task_chunk=chunk)
    (value, aux), grad = jax.jit(lambda p: mean_of_task_gradients(learner, _task_value, p, batch, keys))(params)

    def mean(p):
        values, auxes = jax.vmap(lambda t, k: _task_value(p, t, k))(batch, keys)
        return jnp.mean(values), jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), auxes)
    (want_value, want_aux), want_grad = jax.jit(jax.value_and_grad(mean, has_aux=True))(params)
    assert grad.shape == (3,)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ravel(want_grad)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
    np.testing.assert_allclose(float(aux['x_mean']), float(want_aux['x_mean']), rtol=1e-6)
