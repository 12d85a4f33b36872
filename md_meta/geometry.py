"""The one interface every lower-level optimizer ("loss geometry") implements.

In the spirit of optax's ``GradientTransformation``: a named tuple of pure functions.

    init(key, params) -> (state0, theta)            meta-learned start of the inner state, and the
                                                   method's own meta-parameters (both are meta-learned)
    prepare(theta) -> theta_in                     theta-only work hoisted out of the inner loop, done once
                                                   per adaptation (MD: the normalised blockIAF weights);
                                                   primal and step receive theta_in. Default: identity
    start(theta, state0, key) -> state             per-task inner state (e.g. sample MT-net's masks)
    primal(theta_in, state) -> phi                 task-model parameters (MD: phi = g(z); else phi = state)
    step(theta_in, state, grad_phi) -> state       one inner step, given grad_phi L(phi; D_trn)
    penalty(theta, phi0, apply_support, support_y) -> scalar   extra meta-loss (ECML); None for most

The shared ``lax.scan`` inner loop (``md_meta.inner.adapt``) calls only these; the meta-step,
training, evaluation and plotting never know which method runs. ``transform`` names the network
layer transform the method needs (``'none' | 'tnet' | 'warpgrad'``, see ``md_meta.networks``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax


class Geometry(NamedTuple):
    name: str
    init: Callable
    step: Callable
    primal: Callable = lambda theta, state: state
    start: Callable = lambda theta, state0, key: state0
    penalty: Optional[Callable] = None
    transform: str = 'none'
    prepare: Callable = lambda theta: theta


def sgd_step(state, grad, step_size):
    """z <- z - alpha * grad, leafwise."""
    return jax.tree_util.tree_map(lambda s, g: s - step_size * g, state, grad)
