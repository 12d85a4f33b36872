"""WarpGrad (Flennerhag, Rusu, Pascanu, Visin, Yin & Hadsell, "Meta-learning with warped gradient
descent", ICLR 2020), with MAML as the backbone (the paper's Table 1 setting):

    h_l = omega_l(f_l(h_{l-1}; W_l)),   W <- W - alpha * grad_W L(W, omega; D_trn),   omega held fixed,

where the warp layers omega_l (meta-learned, interleaved with the task layers) are never adapted, so
back-propagation through them preconditions the task layers' gradients (P = J_omega^T J_omega,
non-linear, input-dependent). Warp layer: residual omega(h) = h + W2 relu(W1 h + b1), W2 = 0 at start
(identity warp, so WarpGrad starts as MAML), after every hidden layer (``WarpLayer``; the warps live in
the network's 'warp' collection, i.e. in meta['net']).

Choices: WarpGrad's own meta-objective (a trajectory-sampling first-order objective that avoids
back-propagating through the inner loop) is replaced by the MAML backbone's meta-gradient through the
unrolled inner loop, as in this paper's comparison; the warp is a residual two-layer map on the feature
(channel) axis.
"""
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from md_meta.geometry import Geometry, gradient_descent, plain_init
from md_meta.networks import feature_matmul

LOWER_LEVEL, LOSS_GEOMETRY = 'PGD', 'NN-based low-rank matrix'


class WarpLayer(nn.Module):
    """h -> h + relu(h W1 + b1) W2 on the last axis (W2 = 0 at start: the identity), in the 'warp' collection.
    ``where='block'``: after every hidden layer's output (in the conv nets after the block's pooling, where
    WarpGrad's released Omniglot model puts its warp layers), not after the classifier."""
    where: ClassVar[str] = 'block'

    @nn.compact
    def __call__(self, h):
        c = h.shape[-1]
        w1 = self.variable('warp', 'w1', lambda: jax.random.normal(self.make_rng('params'), (c, c), h.dtype)
                           / jnp.sqrt(c)).value
        b1 = self.variable('warp', 'b1', lambda: jnp.zeros((c,), h.dtype)).value
        w2 = self.variable('warp', 'w2', lambda: jnp.zeros((c, c), h.dtype)).value
        return h + feature_matmul(jax.nn.relu(feature_matmul(h, w1) + b1), w2)


def make(config) -> Geometry:
    return Geometry(init=plain_init, inner=gradient_descent(float(config.inner.step_size)), layer=WarpLayer)
