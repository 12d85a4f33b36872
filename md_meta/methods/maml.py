"""MAML (Finn et al., ICML 2017): phi <- phi - alpha * grad L(phi; D_trn); the initialisation is learned.

Geometry: the identity matrix (h = |.|^2 / 2 in the mirror-descent view)."""
from md_meta.geometry import Geometry, gradient_descent, plain_init

LOWER_LEVEL, LOSS_GEOMETRY = 'GD', 'identity matrix'


def make(config) -> Geometry:
    return Geometry(init=plain_init, inner=gradient_descent(float(config.inner.step_size)))
