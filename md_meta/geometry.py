"""The one interface every lower-level optimizer ("loss geometry") implements, in the spirit of optax's
``GradientTransformation``: a named tuple of pure functions.

    init(key, params) -> (state0, theta)     the meta-learned start of the inner state and the method's own
                                             meta-parameters (both meta-learned)
    inner(theta) -> InnerLoop                the inner optimizer with theta bound; work that depends on theta
                                             alone (MD: the normalised blockIAF weights) is done here, once
                                             per adaptation, not once per inner step
    penalty(theta, phi0, apply_support, support_y) -> scalar    optional extra meta-loss term (ECML)
    layer                                    optional Flax module class the method inserts into md-meta's
                                             networks (T-net's T, WarpGrad's warp; ``md_meta.networks``)

    InnerLoop.start(state0, key) -> state    per-task inner state (MT-net samples its masks here)
    InnerLoop.params_of(state) -> phi        task-model parameters (MD: phi = g(z); otherwise the state)
    InnerLoop.update(state, grad_phi) -> state    one inner step, given grad_phi L(phi; D_trn)

The shared ``lax.scan`` inner loop (``md_meta.inner.adapt``) calls only these; the meta-step, training,
evaluation and plotting never know which method runs. A method is one module of ``md_meta.methods``
with ``make(config) -> Geometry`` and a line in the registry (``md_meta.methods``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax

Params = Any   # a pytree of task-model parameters (phi, and its gradient)
State = Any    # a pytree: the inner loop's state (MD: z; MT-net: (params, masks); otherwise phi itself)
Theta = Any    # a pytree: the method's own meta-parameters (MD: the blockIAF and K; Meta-SGD: step sizes)


class UpdateFn(Protocol):
    def __call__(self, state: State, grad_phi: Params) -> State:
        """One inner step from grad_phi L(phi; D_trn), phi = params_of(state)."""


class ParamsOfFn(Protocol):
    def __call__(self, state: State) -> Params:
        """The task model's parameters phi of an inner state."""


class StartFn(Protocol):
    def __call__(self, state0: State, key: jax.Array) -> State:
        """A task's first inner state from the meta-learned start (a method may draw from ``key``)."""


class InitFn(Protocol):
    def __call__(self, key: jax.Array, params: Params) -> tuple[State, Theta]:
        """(state0, theta) from the network's initial parameters: both are meta-learned."""


class InnerFn(Protocol):
    def __call__(self, theta: Theta) -> 'InnerLoop':
        """The inner optimizer with theta bound."""


class PenaltyFn(Protocol):
    def __call__(self, theta: Theta, phi0: Params, apply_support: Callable[[Params], jax.Array],
                 support_y: jax.Array) -> jax.Array:
        """An extra meta-loss term (a scalar)."""


class InnerLoop(NamedTuple):
    update: UpdateFn
    params_of: ParamsOfFn = lambda state: state
    start: StartFn = lambda state0, key: state0


class Geometry(NamedTuple):
    init: InitFn
    inner: InnerFn
    penalty: Optional[PenaltyFn] = None
    layer: Optional[Any] = None


def plain_init(key, params):
    """(state0, theta) = (params, {}): the start of the inner loop is the network's initialisation and the
    method has no meta-parameters of its own."""
    del key
    return params, {}


def sgd_step(state, grad, step_size):
    """z <- z - alpha * grad, leafwise."""
    return jax.tree_util.tree_map(lambda s, g: s - step_size * g, state, grad)


def gradient_descent(step_size: float) -> Callable:
    """theta -> the InnerLoop of plain gradient descent with step size alpha (theta unused)."""
    return lambda theta: InnerLoop(update=lambda state, grad: sgd_step(state, grad, step_size))
