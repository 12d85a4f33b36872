"""The inner loop (lower level): K steps of a geometry as one ``jax.lax.scan``.

    loop = geometry.inner(theta);  state_0 = loop.start(init, key);  phi_k = loop.params_of(state_k)
    state_{k+1} = loop.update(state_k, grad_phi L(phi_k; D_trn))
    returns phi_K and, per step k = 0..K, L(phi_k; D_trn) and |grad_phi L(phi_k; D_trn)|_2
    (the last entry only when ``final_stats``; training does not need it).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from md_meta.geometry import InnerLoop


class InnerConfig(NamedTuple):
    """Static inner-loop settings (hashable, closed over by jit). ``unroll``: inner steps per iteration of
    the rolled loop (1, the default, was measured fastest on XLA:CPU with the patches convolution and
    compiles 2-3.5x faster than ``unroll=steps``; docs/benchmarks.md)."""
    steps: int
    first_order: bool = False
    unroll: int = 1
    remat: bool = False


def adapt(loop: InnerLoop, support_loss: Callable, init, key: jax.Array, cfg: InnerConfig,
          final_stats: bool = False):
    """Runs the inner loop: K steps state_k = loop.update(state_{k-1}, grad_phi support_loss(phi_{k-1})),
    phi_k = loop.params_of(state_k), from state_0 = loop.start(init, key).

    Args:
      loop: the method's InnerLoop (``Geometry.inner(theta)``); support_loss: phi -> scalar (the task's D_trn);
      init: the meta-learned start; key: the task's key; cfg: InnerConfig (K, first order, unroll, remat);
      final_stats: also the support loss and gradient norm at phi_K.
    Returns:
      (phi_K, {'loss': (K [+ 1],), 'grad_norm': (K [+ 1],)}) along the loop.

    K = 1 is one step, no loop: phi_0 = params_of(state_0), state_1, phi_1 = params_of(state_1) (``remat``
    applies to the loop's bodies: with one step there is nothing to keep between them; under a vmap over
    tasks that share state_0, phi_0 is computed once). For K > 1, where phi
    is computed from the state (``loop.params_of`` does arithmetic: MD's g), the scan runs K + 1 bodies and
    phi_K is the one the last body computed (its gradient step skipped by a ``lax.cond`` unless
    ``final_stats``), so that the program holds that map once, not also after the loop; with ``remat`` the
    step inside the cond is checkpointed too, so that the cond keeps only the step's inputs and its backward
    recomputes and transposes the step in one branch. Where it only selects (MAML's identity, MT-net's
    state['phi']), the scan runs K bodies."""
    grad_fn = jax.value_and_grad(support_loss)

    def step(state, phi):
        loss, grad = grad_fn(phi)
        if cfg.first_order:
            grad = jax.lax.stop_gradient(grad)
        return loop.update(state, grad), (loss, optax.tree.norm(grad))

    def with_final_stats(state, phi, losses, norms):
        if final_stats:
            _, (loss, norm) = step(state, phi)
            losses, norms = jnp.append(losses, loss), jnp.append(norms, norm)
        return phi, {'loss': losses, 'grad_norm': norms}

    start = loop.start(init, key)
    if cfg.steps == 1:
        state, (loss, norm) = step(start, loop.params_of(start))
        return with_final_stats(state, loop.params_of(state), loss[None], norm[None])
    start_shape = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), start)
    params_of_jaxpr, phi_shape = jax.make_jaxpr(loop.params_of, return_shape=True)(start_shape)
    if not params_of_jaxpr.eqns:   # phi is (part of) the state: nothing to recompute
        body = lambda state, _: step(state, loop.params_of(state))
        body = jax.checkpoint(body) if cfg.remat else body
        state, (losses, norms) = jax.lax.scan(body, start, None, length=cfg.steps, unroll=cfg.unroll)
        return with_final_stats(state, loop.params_of(state), losses, norms)

    zeros = lambda tree: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
    no_stats = zeros(jax.eval_shape(step, start_shape, phi_shape)[1])

    remat = jax.checkpoint if cfg.remat else (lambda f: f)
    remat_step = remat(step)   # inside the body's checkpoint: the cond's residuals are the step's inputs

    def body(carry, k):
        state, _ = carry
        phi = loop.params_of(state)
        if final_stats:
            state, stats = remat_step(state, phi)
        else:
            state, stats = jax.lax.cond(k < cfg.steps, remat_step, lambda state, phi: (state, no_stats), state, phi)
        return (state, phi), stats

    body = remat(body)
    (_, phi), (losses, norms) = jax.lax.scan(body, (start, zeros(phi_shape)), jnp.arange(cfg.steps + 1),
                                             unroll=cfg.unroll)
    n = cfg.steps + 1 if final_stats else cfg.steps
    return phi, {'loss': losses[:n], 'grad_norm': norms[:n]}
