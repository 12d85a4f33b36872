"""Meta-SGD (Li, Zhou, Chen & Li, "Meta-SGD: Learning to learn quickly for few-shot learning", 2017):

    phi <- phi - a (.) grad L(phi; D_trn),      a = exp(w),  w meta-learned, one entry per parameter,

with the initialisation phi_0 and the log step sizes w meta-learned (w starts at log alpha, as in the
reference implementation, so Meta-SGD starts as MAML). Geometry: a diagonal preconditioner.

Implementation note: the step size is computed as ``alpha * exp(w - log alpha)``, which equals exp(w)
exactly in real arithmetic (same values and gradients for any w) but is bitwise alpha at w = log alpha,
so that Meta-SGD reproduces MAML's inner trajectory exactly at initialisation.
"""
import jax
import jax.numpy as jnp
import numpy as np

from md_meta.geometry import Geometry, InnerLoop

LOWER_LEVEL, LOSS_GEOMETRY = 'PGD', 'diag. matrix'


def log_alpha(alpha: float) -> tuple:
    """(log alpha as a float32-representable number, exp of it): the initial w and the reference step."""
    log_a = float(np.float32(np.log(alpha))) if alpha > 0 else -30.0
    return log_a, float(np.exp(log_a))


def step_sizes(theta, alpha: float):
    """exp(w) per parameter, computed as alpha_ref * exp(w - log alpha) (bitwise alpha at w = log alpha)."""
    log_a, alpha_ref = log_alpha(alpha)
    return jax.tree_util.tree_map(lambda w: alpha_ref * jnp.exp(w - log_a), theta['log_lr'])


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)
    log_a, _ = log_alpha(alpha)

    def init(key, params):
        return params, {'log_lr': jax.tree_util.tree_map(lambda p: jnp.full(p.shape, log_a, p.dtype), params)}

    def inner(theta):
        def update(phi, grad):  # exp(w) inside the step: hoisting it out changes the meta-gradient's rounding
            return jax.tree_util.tree_map(lambda p, a, g: p - a * g, phi, step_sizes(theta, alpha), grad)
        return InnerLoop(update=update)

    return Geometry(init=init, inner=inner)


def learns_step_sizes(config) -> bool:
    """inner.step_size only initialises the learned steps exp(w)."""
    return True


def validate(config, require) -> None:
    require(config.inner.step_size > 0, 'inner.step_size', 'must be positive for Meta-SGD (log step size)')
