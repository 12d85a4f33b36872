"""The inner loop (lower level): K steps of a geometry as one ``jax.lax.scan``.

    state_0 = start(theta, init, key);  phi_k = primal(theta, state_k)
    state_{k+1} = step(theta, state_k, grad_phi L(phi_k; D_trn))
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
    unroll: int = 1
    remat: bool = False


def adapt(geometry: Geometry, support_loss: Callable, theta: Any, init: Any, key: jax.Array,
          cfg: InnerConfig, final_stats: bool = False):
    """Runs the inner loop; ``support_loss(phi) -> scalar``. Returns (phi_K, {'loss', 'grad_norm'})."""
    grad_fn = jax.value_and_grad(support_loss)

    def body(state, _):
        phi = geometry.primal(theta, state)
        loss, grad = grad_fn(phi)
        if cfg.first_order:
            grad = jax.lax.stop_gradient(grad)
        return geometry.step(theta, state, grad), (loss, optax.global_norm(grad))

    if cfg.remat:
        body = jax.checkpoint(body)
    state0 = geometry.start(theta, init, key)
    state, (losses, norms) = jax.lax.scan(body, state0, None, length=cfg.steps, unroll=cfg.unroll)
    phi = geometry.primal(theta, state)
    if final_stats:
        loss, grad = grad_fn(phi)
        losses = jnp.append(losses, loss)
        norms = jnp.append(norms, optax.global_norm(grad))
    return phi, {'loss': losses, 'grad_norm': norms}
