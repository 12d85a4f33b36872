"""The inner loop (lower level): K steps of a geometry as one ``jax.lax.scan``.

    theta_in = prepare(theta);  state_0 = start(theta, init, key);  phi_k = primal(theta_in, state_k)
    state_{k+1} = step(theta_in, state_k, grad_phi L(phi_k; D_trn))
    returns phi_K and, per step k = 0..K, L(phi_k; D_trn) and |grad_phi L(phi_k; D_trn)|_2
    (the last entry only when ``final_stats``; training does not need it).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from md_meta.geometry import Geometry


class InnerConfig(NamedTuple):
    """Static inner-loop settings (hashable, closed over by jit)."""
    steps: int
    first_order: bool = False
    unroll: int = 1       # -1: automatic (``resolve_unroll``)
    remat: bool = False


def resolve_unroll(unroll: int, steps: int) -> int:
    """``unroll = -1`` (automatic) -> 1, a rolled ``while`` loop, on every backend. Measured on XLA:CPU
    (CNN4 MAML and MD, shape (a) of docs/benchmarks.md): with the default patches convolution (``conv_impl=
    'auto'``) the rolled loop is faster than the fully unrolled one (the slow while-loop layout only hits
    ``lax`` convolutions) and compiles 2-3.5x faster. With ``conv_impl='lax'`` on CPU pass
    ``unroll=steps``. Any positive value is used as is."""
    del steps
    return 1 if unroll == -1 else unroll


def adapt(geometry: Geometry, support_loss: Callable, theta: Any, init: Any, key: jax.Array,
          cfg: InnerConfig, final_stats: bool = False):
    """Runs the inner loop; ``support_loss(phi) -> scalar``. Returns (phi_K, {'loss', 'grad_norm'})."""
    grad_fn = jax.value_and_grad(support_loss)
    theta_in = geometry.prepare(theta)

    def body(state, _):
        phi = geometry.primal(theta_in, state)
        loss, grad = grad_fn(phi)
        if cfg.first_order:
            grad = jax.lax.stop_gradient(grad)
        return geometry.step(theta_in, state, grad), (loss, optax.tree.norm(grad))

    if cfg.remat:
        body = jax.checkpoint(body)
    state0 = geometry.start(theta, init, key)
    unroll = resolve_unroll(cfg.unroll, cfg.steps)
    state, (losses, norms) = jax.lax.scan(body, state0, None, length=cfg.steps, unroll=unroll)
    phi = geometry.primal(theta_in, state)
    if final_stats:
        loss, grad = grad_fn(phi)
        losses = jnp.append(losses, loss)
        norms = jnp.append(norms, optax.tree.norm(grad))
    return phi, {'loss': losses, 'grad_norm': norms}
