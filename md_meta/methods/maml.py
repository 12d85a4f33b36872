"""MAML (Finn et al., ICML 2017): phi <- phi - alpha * grad L(phi; D_trn); the initialisation is learned.

Geometry: the identity matrix (h = |.|^2 / 2 in the mirror-descent view)."""
from md_meta.geometry import Geometry, sgd_step


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)
    return Geometry(
        name='maml',
        init=lambda key, params: (params, {}),
        step=lambda theta, state, grad: sgd_step(state, grad, alpha),
    )
