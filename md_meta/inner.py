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
    """Runs the inner loop; ``support_loss(phi) -> scalar``. Returns (phi_K, {'loss', 'grad_norm'})."""
    grad_fn = jax.value_and_grad(support_loss)

    def body(state, _):
        loss, grad = grad_fn(loop.params_of(state))
        if cfg.first_order:
            grad = jax.lax.stop_gradient(grad)
        return loop.update(state, grad), (loss, optax.tree.norm(grad))

    if cfg.remat:
        body = jax.checkpoint(body)
    state, (losses, norms) = jax.lax.scan(body, loop.start(init, key), None, length=cfg.steps,
                                          unroll=cfg.unroll)
    phi = loop.params_of(state)
    if final_stats:
        loss, grad = grad_fn(phi)
        losses = jnp.append(losses, loss)
        norms = jnp.append(norms, optax.tree.norm(grad))
    return phi, {'loss': losses, 'grad_norm': norms}
