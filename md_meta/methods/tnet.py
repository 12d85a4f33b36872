"""T-net (Lee & Choi, "Gradient-based meta-learning with learned layerwise metric and subspace",
ICML 2018), MT-net without masks:

    y = T_l (W_l x)  for every layer l;   W <- W - alpha * grad_W L(W, T; D_trn),   T held fixed,

with the initialisation W_0 and the transformations T meta-learned. Since T is not adapted, the update
of the effective layer T W is preconditioned by the block-diagonal matrix T T^T. T starts as the identity
(so T-net starts as MAML) and is a linear map on the output features of each dense layer and a 1x1
convolution after each convolution (before batch norm), as in the paper. T lives in the network's
``'warp'`` collection (``md_meta.networks``, transform='tnet'), i.e. in meta['net'], which the inner
loop never adapts; this geometry itself is plain GD on the task parameters.
"""
from md_meta.geometry import Geometry, sgd_step


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)
    return Geometry(name='tnet', init=lambda key, params: (params, {}),
                    step=lambda theta, state, grad: sgd_step(state, grad, alpha), transform='tnet')
