"""MetaKFO (Arnold, Iqbal & Sha, "When MAML can adapt fast and how to assist when it cannot",
AISTATS 2021): a meta-learned non-linear transformation of each tensor's gradient by a small network
whose linear maps are Kronecker-factored (KFO, Kronecker-factored optimizer):

    phi <- phi - alpha * f_theta(grad L(phi; D_trn)),
    f_theta(G) = A(G) + C(relu(B(G)))        for each parameter tensor separately,

where A, B, C are Kronecker-factored linear maps on the tensor's view (``_tensor``: 1-D elementwise,
matrices mode by mode, conv kernels as (kh*kw, cin, cout)). The initialisation phi_0 and all factors
are meta-learned with the second-order meta-gradient (MAML backbone). No convergence guarantee.

Choices (the paper fixes only "small network, Kronecker-factored layers"): a residual two-layer
network (one hidden layer of the gradient's shape) without biases, so f is positively homogeneous
(f(cG) = c f(G), c > 0), i.e. insensitive to the gradients' scale, like a linear preconditioner; A and B
start as the identity and C as zero (its first factor zero), so MetaKFO starts as MAML.
"""
import jax

from md_meta.geometry import Geometry, InnerLoop
from md_meta.methods import _tensor

LOWER_LEVEL, LOSS_GEOMETRY = 'NN-transformed GD', 'NN-based gradient transformation'


def transform(theta, grad):
    def f(g, lin, inner, outer):
        return _tensor.kron_apply(lin, g) + _tensor.kron_apply(outer, jax.nn.relu(_tensor.kron_apply(inner, g)))
    return _tensor.map_leaves(f, grad, theta['linear'], theta['hidden'], theta['out'])


def init_factors(params):
    """A = B = identity, C = 0 (its first factor zero): f = identity, so MetaKFO starts as MAML."""
    fac = lambda fill: jax.tree_util.tree_map(lambda p: _tensor.init_factors(p.shape, fill, p.dtype), params)
    return {'linear': fac('identity'), 'hidden': fac('identity'), 'out': fac('zero')}


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)

    def init(key, params):
        return params, init_factors(params)

    def inner(theta):
        def update(phi, grad):
            return jax.tree_util.tree_map(lambda p, u: p - alpha * u, phi, transform(theta, grad))
        return InnerLoop(update=update)

    return Geometry(init=init, inner=inner)
