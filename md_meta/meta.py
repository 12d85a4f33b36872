"""The upper level: meta-parameters, the meta-loss over a batch of tasks and the jitted meta-step.

Meta-parameters theta = {'init': state_0, 'geom': method parameters, 'net': meta-learned network
collections (e.g. warp layers)}. For a batch of tasks t (support D_trn, query D_val):

    meta_loss(theta) = mean_t [ L(phi_t^K(theta); D_val_t) + penalty_t ]

whose gradient is the full second-order meta-gradient (``first_order`` stops the inner gradients). How the
per-task work and its gradients are batched over tasks is ``md_meta.strategies`` (the same values); the step is
one ``jit``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from md_meta import losses, strategies
from md_meta.geometry import Geometry
from md_meta.inner import InnerConfig, adapt
from md_meta.networks import Model
from md_meta.tasks import Task


class MetaLearner(NamedTuple):
    """Everything static about a meta-learning problem: method, network, loss, inner-loop settings."""
    geometry: Geometry
    model: Model
    loss: Any                        # a name in losses.LOSSES or a callable (outputs, targets) -> scalar
    inner_config: InnerConfig        # the training inner loop (K, first order, unroll, remat)
    eval_inner_config: InnerConfig   # the evaluation inner loop (inner.eval_steps, first order)
    task_batching: str = 'auto'      # how tasks are batched (``strategies.resolve_task_batching``)
    compute_dtype: str = 'float32'   # 'bfloat16': network forward/backward in bf16, parameters stay fp32
    task_gradients: str = 'auto'     # how the meta-gradient is batched over tasks (``meta_value_and_grad``)
    task_chunk: int = 2              # at most this many tasks per chunk under 'map' (``strategies.chunk_size``)
    norm_stats: str = 'batch'        # batch norm's statistics for the query: 'batch' | 'support' (``query_outputs``)


def init_meta_params(learner: MetaLearner, key: jax.Array, example_x: jnp.ndarray) -> dict:
    """theta = {'init', 'geom', 'net'} for the network applied to ``example_x`` (one task's inputs). The
    network's init is jitted: eagerly, every distinct shape of its ops compiles separately (seconds)."""
    k_net, k_geom = jax.random.split(key)
    variables = dict(jax.jit(learner.model.init)(k_net, example_x))
    params = variables.pop('params')
    state0, geom = learner.geometry.init(k_geom, params)
    return {'init': state0, 'geom': geom, 'net': variables}


def _low_precision(apply_vars: Callable, dtype, net: dict) -> Callable:
    """(phi, x) -> apply_vars({'params': phi, **net}, x) computed in ``dtype`` (floating leaves of phi, net
    and x cast), outputs cast to fp32. Gradients flow back through the casts, so parameters,
    meta-gradients and the meta-optimizer state stay fp32."""
    cast = lambda t: jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)

    def fn(phi, x, **kwargs):
        return apply_vars(cast({'params': phi, **net}), cast(x), **kwargs).astype(jnp.float32)
    return fn


def query_outputs(apply: Callable, phi, support_x, query_x, norm_stats: str = 'batch'):
    """The adapted network's outputs on the query set, f(query_x; phi), with batch norm's statistics
        'batch':   of the query batch itself (transductive: a query prediction depends on the other query
                   examples; MAML's and the reference's protocol),
        'support': of the support set alone (inductive: each query prediction depends on that example and the
                   support set only), computed as f([support; query]) with the statistics of the first
                   |support| rows (``apply(..., stats_from=n)``), the query rows kept.
    The support loss of the inner loop is the same under both (a support batch's statistics are its own)."""
    if norm_stats == 'batch':
        return apply(phi, query_x)
    if norm_stats != 'support':
        raise ValueError(f"norm_stats must be 'batch' or 'support', got {norm_stats!r}")
    n = support_x.shape[0]
    return apply(phi, jnp.concatenate([support_x, query_x]), stats_from=n)[n:]


def task_result(learner: MetaLearner, meta: dict, task: Task, key: jax.Array, inner: InnerConfig,
                final_stats: bool = False):
    """Adapts to one task and evaluates on its query set: (query metrics, inner-loop curves, penalty)."""
    loss_fn = losses.get(learner.loss)
    apply = lambda phi, x, **kw: learner.model.apply({'params': phi, **meta['net']}, x, **kw)
    if learner.compute_dtype != 'float32':  # mixed precision: cast in, compute, fp32 out (before the loss)
        apply = _low_precision(learner.model.apply, jnp.dtype(learner.compute_dtype), meta['net'])
    support_loss = lambda phi: loss_fn(apply(phi, task.support_x), task.support_y)
    loop = learner.geometry.inner(meta['geom'])
    phi, curves = adapt(loop, support_loss, meta['init'], key, inner, final_stats)
    outputs = query_outputs(apply, phi, task.support_x, task.query_x, learner.norm_stats)
    metrics = losses.metrics(learner.loss, outputs, task.query_y)
    penalty = 0.0
    if learner.geometry.penalty is not None:
        phi0 = loop.params_of(loop.start(meta['init'], key))
        penalty = learner.geometry.penalty(meta['geom'], phi0, lambda p: apply(p, task.support_x),
                                           task.support_y)
    return metrics, curves, penalty


def meta_loss(learner: MetaLearner, meta: dict, batch: Task, key: jax.Array):
    """The meta-objective on a batch of tasks t: mean_t [ L(phi_K^t; D_val^t) + penalty_t ], phi_K^t the inner
    loop's K steps on D_trn^t from meta['init'] in the method's geometry (``learner.inner_config``).

    Args:
      learner: the static problem; meta: {'init', 'geom', 'net'}; batch: a Task with a leading task axis;
      key: split into one key per task (methods that sample in the inner loop).
    Returns:
      (loss, metrics): the scalar meta-loss and the mean query metrics over the tasks."""
    num_tasks = batch.support_x.shape[0]
    keys = jax.random.split(key, num_tasks)

    def one(task, k):
        metrics, _, penalty = task_result(learner, meta, task, k, learner.inner_config)
        return metrics, penalty

    metrics, penalty = strategies.over_tasks(learner, one, batch, keys)
    metrics = jax.tree_util.tree_map(jnp.mean, metrics)
    total = metrics['loss'] + jnp.mean(penalty)
    return total, metrics


def meta_value_and_grad(learner: MetaLearner, meta: dict, batch: Task, key: jax.Array):
    """((meta_loss, metrics), grad_theta meta_loss), two ways with the same value (``task_gradients``,
    ``strategies.task_gradients_for``):

    'batched':  grad of the mean over the tasks; the backward pass sums the task cotangents of the shared
                theta inside the inner loop's backward scan, once per inner step;
    'per_task': mean_t grad_theta [L_t + penalty_t], the per-task gradients averaged once at the end
                (``strategies.mean_of_task_gradients``)."""
    value, flat_grad = _value_and_raveled_grad(learner, meta, batch, key)
    return value, jax.flatten_util.ravel_pytree(meta)[1](flat_grad)


def _value_and_raveled_grad(learner: MetaLearner, meta: dict, batch: Task, key: jax.Array):
    """``meta_value_and_grad`` with the gradient as one vector (``strategies.ravel``'s order)."""
    if strategies.task_gradients_for(learner, batch) == 'batched':
        value, grad = jax.value_and_grad(meta_loss, argnums=1, has_aux=True)(learner, meta, batch, key)
        return value, strategies.ravel(grad)
    keys = jax.random.split(key, batch.support_x.shape[0])

    def total(m, task, k):   # L_t + penalty_t
        metrics, _, penalty = task_result(learner, m, task, k, learner.inner_config)
        return metrics['loss'] + penalty, metrics

    return strategies.mean_of_task_gradients(learner, total, meta, batch, keys)


def init_optimizer_state(optimizer: optax.GradientTransformation, meta):
    """The optimizer's state for ``meta_update``, which updates theta as one vector: init(ravel(theta))."""
    return optimizer.init(strategies.ravel(meta))


def meta_update(learner: MetaLearner, optimizer: optax.GradientTransformation, meta, opt_state,
                batch: Task, key: jax.Array):
    """One meta-step, un-jitted: theta <- theta + optimizer.update(grad, ...) on theta raveled into one vector
    (an elementwise optimizer's update is the same as leaf by leaf, in a few kernels instead of a few per leaf;
    ``opt_state`` from ``init_optimizer_state``). A non-finite meta-loss or meta-gradient leaves theta and the
    optimizer state unchanged and reports ``skipped = 1``."""
    flat_meta, unravel = jax.flatten_util.ravel_pytree(meta)
    shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)
    if shapes(opt_state) != shapes(jax.eval_shape(optimizer.init, flat_meta)):   # structure and shapes
        raise ValueError('opt_state is not the optimizer\'s state of the raveled meta-parameters: '
                         'make it with meta.init_optimizer_state(optimizer, meta)')
    (loss, metrics), grads = _value_and_raveled_grad(learner, meta, batch, key)
    ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(grads))

    def apply(_):
        updates, new_opt_state = optimizer.update(grads, opt_state, flat_meta)
        return optax.apply_updates(flat_meta, updates), new_opt_state

    # lax.cond rather than a jnp.where: same result, less XLA:CPU compile time (measured)
    new_flat, new_opt_state = jax.lax.cond(ok, apply, lambda _: (flat_meta, opt_state), None)
    metrics = dict(metrics, meta_loss=loss, grad_norm=jnp.linalg.norm(grads), skipped=1 - ok.astype(jnp.int32))
    return unravel(new_flat), new_opt_state, metrics


def make_meta_step(learner: MetaLearner, optimizer: optax.GradientTransformation, donate: bool = False):
    """jit(meta_update): (meta, opt_state, batch, key) -> (meta, opt_state, metrics)."""
    def step(meta, opt_state, batch, key):
        chex.assert_rank(batch.support_x, batch.query_x.ndim)
        return meta_update(learner, optimizer, meta, opt_state, batch, key)
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


@functools.lru_cache(maxsize=32)
def make_evaluate(learner: MetaLearner, final_stats: bool = True):
    """jit: (meta, batch, key) -> per-task query metrics and inner curves (k = 0..K), eval inner loop.
    One jitted function per learner (cached), so meta-validation and the final evaluation compile once."""
    def evaluate(meta, batch, key):
        keys = jax.random.split(key, batch.support_x.shape[0])
        fn = lambda task, k: task_result(learner, meta, task, k, learner.eval_inner_config, final_stats)[:2]
        return strategies.over_tasks(learner, fn, batch, keys)
    return jax.jit(evaluate)
