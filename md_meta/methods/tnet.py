"""T-net (Lee & Choi, "Gradient-based meta-learning with learned layerwise metric and subspace",
ICML 2018), MT-net without masks:

    y = T_l (W_l x)  for every layer l;   W <- W - alpha * grad_W L(W, T; D_trn),   T held fixed,

with the initialisation W_0 and the transformations T meta-learned. Since T is not adapted, the update
of the effective layer T W is preconditioned by the block-diagonal matrix T T^T. T starts as the identity
(so T-net starts as MAML) and is a linear map on the output features of each dense layer and a 1x1
convolution after each convolution (before batch norm), as in the paper. T (``TLayer``) lives in the
network's ``'warp'`` collection, i.e. in meta['net'], which the inner loop never adapts; this geometry
itself is plain GD on the task parameters.
"""
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from md_meta.geometry import Geometry, gradient_descent, plain_init
from md_meta.networks import feature_matmul

LOWER_LEVEL, LOSS_GEOMETRY = 'PGD', 'block diag. matrix (T-net)'


class TLayer(nn.Module):
    """h -> h T on the last axis, T in the 'warp' collection (identity at start). ``where='linear'``: a
    linear map after every layer's linear part, classifier included, so a network may fold it into a
    convolution's kernel (conv(x, W) T = conv(x, W T))."""
    where: ClassVar[str] = 'linear'

    @nn.compact
    def __call__(self, h):
        t = self.variable('warp', 'T', lambda: jnp.eye(h.shape[-1], dtype=h.dtype)).value
        return feature_matmul(h, t)


def make(config) -> Geometry:
    return Geometry(init=plain_init, inner=gradient_descent(float(config.inner.step_size)), layer=TLayer)
