"""MT-net (Lee & Choi, "Gradient-based meta-learning with learned layerwise metric and subspace",
ICML 2018): T-net (meta-learned layer transformations T, see ``tnet``) plus meta-learned masks that
choose which output units of each layer adapt:

    W <- W - alpha * (m 1^T) (.) grad_W L(W, T; D_trn),   m_j ~ Bernoulli(sigmoid(zeta_j)) per task,

so the inner loop moves in a meta-learned subspace. The masks are sampled per task (``InnerLoop.start``,
from the per-task key) with the binary Gumbel-softmax and a straight-through estimator:
s = sigmoid((zeta + g_1 - g_0) / tau), m = 1[s > 1/2] + s - stop_gradient(s) (forward: the hard 0/1
mask; backward: the gradient of s), g_0, g_1 ~ Gumbel(0, 1).

Choices: one mask entry per output unit of every layer (conv: per output channel); a masked-out unit is
frozen as a whole (its kernel column, bias and, for CNN4, batch-norm scale and offset). The logits zeta
start at ``config.mtnet.init_logit`` (0: each unit adapts with probability 1/2); with a large
init_logit (e.g. 50, beyond any float32 Gumbel sample) every mask is on and MT-net is T-net. The
straight-through gradient w.r.t. zeta is a surrogate (the hard mask is piecewise constant in zeta), so
finite differences cannot check it; the other meta-gradients are exact.
"""
import jax
import jax.numpy as jnp
import ml_collections

from md_meta.geometry import Geometry, InnerLoop
from md_meta.methods import _tensor, tnet

LOWER_LEVEL, LOSS_GEOMETRY = 'PGD', 'block diag. matrix'


def mask_sizes(params) -> dict:
    """Output units per layer: the last dimension of the layer's kernel (its first leaf of rank >= 2)."""
    out = {}
    for name in _tensor.layer_names(params):
        leaves = jax.tree_util.tree_leaves(params[name])
        mats = [l for l in leaves if l.ndim >= 2] or leaves
        out[name] = mats[0].shape[-1]
    return out


def sample_masks(logits: dict, key: jax.Array, temperature: float) -> dict:
    names = sorted(logits)
    keys = jax.random.split(key, len(names))
    masks = {}
    for name, k in zip(names, keys):
        z = logits[name]
        g = jax.random.gumbel(k, (2,) + z.shape, z.dtype)
        soft = jax.nn.sigmoid((z + g[1] - g[0]) / temperature)
        hard = (soft > 0.5).astype(z.dtype)
        masks[name] = hard + (soft - jax.lax.stop_gradient(soft))
    return masks


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)
    init_logit = float(config.mtnet.init_logit)
    tau = float(config.mtnet.temperature)

    def init(key, params):
        sizes = mask_sizes(params)
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        return params, {'mask_logit': {n: jnp.full((s,), init_logit, dtype) for n, s in sizes.items()}}

    def inner(theta):
        def start(params, key):
            return {'phi': params, 'mask': sample_masks(theta['mask_logit'], key, tau)}

        def update(state, grad):
            phi, masks = state['phi'], state['mask']
            new = {}
            for name in phi:  # the mask scales the output-unit axis (the last) of every leaf of the layer
                m = masks.get(name)
                def upd(p, g, m=m):
                    if m is not None and p.shape[-1:] == m.shape:
                        return p - alpha * m * g
                    return p - alpha * g
                new[name] = jax.tree_util.tree_map(upd, phi[name], grad[name])
            return {'phi': new, 'mask': masks}

        return InnerLoop(update=update, params_of=lambda state: state['phi'], start=start)

    return Geometry(init=init, inner=inner, layer=tnet.TLayer)


def config_section() -> ml_collections.ConfigDict:
    """config.mtnet: the masks' logits at start and the Gumbel-softmax temperature."""
    c = ml_collections.ConfigDict()
    c.init_logit = 0.0       # mask logits at start (0: each unit adapts w.p. 1/2; >= 50: all on)
    c.temperature = 1.0      # Gumbel-softmax temperature
    return c


def validate(config, require) -> None:
    require(config.mtnet.temperature > 0, 'mtnet.temperature', f'must be positive, got {config.mtnet.temperature}')
