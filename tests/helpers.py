"""Small shared builders for tests."""
import jax
import jax.numpy as jnp

from md_meta.config import base_config


def tiny_config(method='maml', **overrides):
    """A sinusoid config with tiny shapes; overrides as dotted keys, e.g. {'inner.steps': 2}."""
    c = base_config()
    c.method = method
    c.task.shots = 4
    c.task.query = 4
    c.model.hidden = (8, 8)
    c.meta.batch_size = 3
    c.meta.steps = 10
    c.eval.num_tasks = 20
    c.eval.batch_size = 10
    c.train.log_every = 5
    c.train.steps_per_call = 5
    for k, v in overrides.items():
        node = c
        *path, last = k.split('.')
        for p in path:
            node = node[p]
        node[last] = v
    return c


def tree_max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def random_like(key, tree, scale=1.0):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def nan_build(config, at, count):
    """``training.build(config)`` whose task source serves NaN query inputs to the meta-steps
    [at, at + count) (0-based), so that those meta-updates are non-finite; sampled on the host, one
    meta-step per call (``nan_build(c, 0, 0)`` is the same run without NaN)."""
    from md_meta import tasks, training
    source = tasks.make_source(config)

    def sample(step, num_tasks, split, query):
        batch = source.sample(step, num_tasks, split, query)
        if split == 'train' and at <= step < at + count:
            batch = batch._replace(query_x=jnp.full_like(batch.query_x, jnp.nan))
        return batch
    return training.build(config, source=source._replace(sample=sample, device_sample=None))
