"""MetaCurvature (Park & Oliva, "Meta-Curvature", NeurIPS 2019):

    phi <- phi - alpha * M(grad L(phi; D_trn)),

where M acts on each parameter tensor's gradient G separately (block-diagonal over tensors) as a
Kronecker-factored matrix applied by tensor mode products:
  * 1-D tensors (biases, batch-norm scale/offset): elementwise, m (.) g, m starting at ones;
  * matrices (Flax layout (in, out)):  G x_1 M_in x_2 M_out = M_in G M_out^T, the paper's
    M_out G M_in in its (out, in) layout (up to transposing the learned factors);
  * conv kernels (kh, kw, cin, cout) viewed as (kh*kw, cin, cout):  G x_1 M_f x_2 M_in x_3 M_out.
All factors start as the identity, so MetaCurvature starts as MAML. The initialisation phi_0 and
the factors are meta-learned with the second-order meta-gradient (MAML backbone).

Choices: the factors are unconstrained (the paper does not force M to be positive definite); every
tensor gets full factors, whatever its mode sizes (for CNN4 on 84x84 images that is a 1600x1600 factor
for the classifier's input mode).
"""
import jax

from md_meta.geometry import Geometry, InnerLoop
from md_meta.methods import _tensor

LOWER_LEVEL, LOSS_GEOMETRY = 'PGD', 'block diag. & Kron. (low-rank) matrix'


def precondition(factors, grad):
    return _tensor.map_leaves(lambda g, f: _tensor.kron_apply(f, g), grad, factors)


def init_factors(params):
    return jax.tree_util.tree_map(lambda p: _tensor.init_factors(p.shape, 'identity', p.dtype), params)


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)

    def inner(theta):
        def update(phi, grad):
            return jax.tree_util.tree_map(lambda p, u: p - alpha * u, phi, precondition(theta['factors'], grad))
        return InnerLoop(update=update)

    return Geometry(init=lambda key, params: (params, {'factors': init_factors(params)}), inner=inner)
