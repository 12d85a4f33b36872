"""WarpGrad (Flennerhag, Rusu, Pascanu, Visin, Yin & Hadsell, "Meta-learning with warped gradient
descent", ICLR 2020), with MAML as the backbone (the paper's Table 1 setting):

    h_l = omega_l(f_l(h_{l-1}; W_l)),   W <- W - alpha * grad_W L(W, omega; D_trn),   omega held fixed,

where the warp layers omega_l (meta-learned, interleaved with the task layers) are never adapted, so
back-propagation through them preconditions the task layers' gradients (P = J_omega^T J_omega,
non-linear, input-dependent). Warp layer: residual omega(h) = h + W2 relu(W1 h + b1), W2 = 0 at start
(identity warp, so WarpGrad starts as MAML), after every hidden layer (``md_meta.networks``,
transform='warpgrad'; the warps live in meta['net']).

Choices: WarpGrad's own meta-objective (a trajectory-sampling first-order objective that avoids
back-propagating through the inner loop) is replaced by the MAML backbone's meta-gradient through the
unrolled inner loop, as in this paper's comparison; the warp is a residual two-layer map on the feature
(channel) axis.
"""
from md_meta.geometry import Geometry, sgd_step


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)
    return Geometry(name='warpgrad', init=lambda key, params: (params, {}),
                    step=lambda theta, state, grad: sgd_step(state, grad, alpha), transform='warpgrad')
