"""Mirror descent with a blockIAF inverse mirror map (Zhang, Li & Giannakis; this paper), eq. (7):

    z_k = z_{k-1} - alpha * grad_phi L(g(z_{k-1}); D_trn),     phi_hat = g(z_K),

with the dual initialisation z_0 and the blockIAF parameters theta_g meta-learned (stored in
``blockiaf_engine.pack``'s layout: the leaves' encoder / decoder layers stacked per group). The gradient is
taken with respect to the primal phi = g(z), not through g (the reference implementation's choice).
With g = identity this is exactly MAML.

Inside one layer the blockIAF's Jacobian is diagonal (dg/dz = diag(sigma) + a strictly block-lower-triangular
part), so g can scale each entry of a kernel but never mix them. ``md.kronecker`` adds a meta-learned
Kronecker-factored matrix K per tensor (MetaCurvature's tensor mode products, starting at the identity) that does:

* 'dual_step':  z_k = z_{k-1} - alpha * K grad_phi L(g(z_{k-1})): mirror descent with the inverse map g o K in
  the variable K^-1 z (z_0 stays the meta-learned start, so K^-1 is never formed). With g = identity it is
  MetaCurvature; with K = I it is the map alone. K is unconstrained, as MetaCurvature's.
* 'sandwich':  phi = g~(w) = P g(P w), w_k = w_{k-1} - alpha * grad_phi L(g~(w_{k-1})), with P = K^{1/2} the
  Kronecker product of symmetric positive definite factors A = L L^T + eps I (a vector factor: l^2 + eps).
  (w - w')^T (g~(w) - g~(w')) = (u - u')^T (g(u) - g(u')) with u = P w, so a monotone g with margin C and
  Lipschitz bound M gives g~ the margin C lambda_min(P)^2 and the bound M lambda_max(P)^2 (Theorem 1 keeps
  holding; docs/monotonicity.md). With g = identity it is MetaCurvature with M = P^2 = K, positive definite.

* 'kfo_step':  z_k = z_{k-1} - alpha * f(grad_phi L(g(z_{k-1}))), f MetaKFO's learned nonlinear transformation of
  each tensor's gradient (``metakfo.transform``; f = identity at the start). It gives up what makes MD mirror
  descent: f is not the gradient of a convex function's conjugate, so the step is no mirror step of any map, no
  monotonicity certificate covers it (Theorem 1 is about g alone), and f may vanish at non-zero gradients (a
  stationary point of the support loss is a fixed point, not necessarily conversely). With g = identity it is
  MetaKFO.

``md.start``: 'dual' meta-learns the dual start z_0 (the paper; phi_0 = g(z_0) then moves whenever the map does);
'primal' meta-learns phi_0 and starts each adaptation at z_0 = g^-1(phi_0) (w_0 = P^-1 g^-1(P^-1 phi_0)), through
the blockIAF's explicit inverse, so that the map's parameters change the steps and never the start.
"""
import jax
import jax.numpy as jnp
import ml_collections

from md_meta import blockiaf, blockiaf_engine
from md_meta.geometry import Geometry, InnerLoop, sgd_step
from md_meta.methods import _tensor, metakfo

LOWER_LEVEL, LOSS_GEOMETRY = 'MD', 'blockIAF-based mirror map'
KRONECKER = ('none', 'dual_step', 'sandwich', 'kfo_step')
STARTS = ('dual', 'primal')


def spec_from_config(config, params) -> blockiaf.BlockIAFSpec:
    """The blockIAF's spec: one block per top-level entry of ``params`` (only its keys are read), in
    ``blockiaf.default_blocks`` order, whatever the dict's key order. (``md.group_cost_max``, how g's products
    are grouped, is no part of the map: ``make`` gives it to ``blockiaf_engine``.)"""
    c = config.md
    return blockiaf.make_spec(params, scale=c.scale, s_min=c.s_min, s_max=c.s_max,
                              monotone=c.monotone, shift_lipschitz=c.shift_lipschitz,
                              encoder_layers=c.encoder_layers, activation=c.activation)


# ----------------------------------------------------------------------------- the Kronecker factors

def init_kronecker(params, kind: str, eps: float):
    """K's factors for each tensor of ``params``, so that K = I: MetaCurvature's identity factors ('dual_step'),
    the square roots L = sqrt(1 - eps) I of P's factors A = L L^T + eps I ('sandwich'), or MetaKFO's factors with
    f = identity ('kfo_step')."""
    if kind == 'kfo_step':
        return metakfo.init_factors(params)
    scale = 1.0 if kind == 'dual_step' else (1.0 - eps) ** 0.5
    return jax.tree_util.tree_map(
        lambda p: jax.tree_util.tree_map(lambda f: f * jnp.asarray(scale, f.dtype),
                                         _tensor.init_factors(p.shape, 'identity', p.dtype)), params)


def spd_factors(kron, eps: float):
    """P's factors from their square roots: A = L L^T + eps I per matrix, l^2 + eps per vector factor."""
    def one(f):
        if isinstance(f, (list, tuple)):
            return [m @ m.T + eps * jnp.eye(m.shape[0], dtype=m.dtype) for m in f]
        return f * f + eps
    return jax.tree_util.tree_map(one, kron, is_leaf=lambda x: isinstance(x, (list, tuple)))


def inverse_factors(factors):
    """The factors of P^-1 (each A^-1, a vector's reciprocal): P^-1 = kron of the inverses."""
    def one(f):
        if isinstance(f, (list, tuple)):
            return [jnp.linalg.inv(m) for m in f]
        return 1.0 / f
    return jax.tree_util.tree_map(one, factors, is_leaf=lambda x: isinstance(x, (list, tuple)))


def eigenvalue_range(factors) -> tuple:
    """(lambda_min, lambda_max) of the block-diagonal matrix whose tensor blocks are the Kronecker products of
    ``factors`` (symmetric, e.g. ``spd_factors``): a Kronecker product's eigenvalues are the products of its
    factors' eigenvalues, and the products' extremes come from the factors' extremes (all positive)."""
    lo, hi = [], []
    for f in jax.tree_util.tree_leaves(factors, is_leaf=lambda x: isinstance(x, (list, tuple))):
        eigs = [jnp.linalg.eigvalsh(m) for m in f] if isinstance(f, (list, tuple)) else [f]
        lo.append(jnp.prod(jnp.stack([e.min() for e in eigs])))
        hi.append(jnp.prod(jnp.stack([e.max() for e in eigs])))
    return jnp.min(jnp.stack(lo)), jnp.max(jnp.stack(hi))


def sandwich_certificate(spec: blockiaf.BlockIAFSpec, kron, eps: float) -> dict:
    """Theorem 1's constants for g~(w) = P g(P w) with a monotone g: the margin C_mono lambda_min(P)^2 and the
    Lipschitz bound M lambda_max(P)^2 (docs/monotonicity.md)."""
    lo, hi = eigenvalue_range(spd_factors(kron, eps))
    return {'C_mono': blockiaf.monotone_margin(spec) * lo ** 2, 'M': blockiaf.lipschitz_bound(spec) * hi ** 2}


def apply_kronecker(factors, tree):
    """Each tensor of ``tree`` times its Kronecker-factored matrix (tensor mode products)."""
    return _tensor.map_leaves(lambda x, f: _tensor.kron_apply(f, x), tree, factors)


# ----------------------------------------------------------------------------- the geometry

def split_geom(geom) -> tuple:
    """(the packed blockIAF, K's factors or None) of MD's meta-parameters ``meta['geom']``."""
    if 'kron' not in geom:
        return geom, None
    return {k: v for k, v in geom.items() if k != 'kron'}, geom['kron']


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)
    c = config.md
    kind, eps, primal = c.kronecker, float(c.kronecker_eps), c.start == 'primal'

    def spec_for(params):  # the spec is a pure function of the config and the pytree's block keys
        return spec_from_config(config, params)

    def maps(geom):
        """(phi = g~(w), w = g~^-1(phi)) of MD's meta-parameters: g~ = g, or P g(P .) for the sandwich."""
        packed, kron = split_geom(geom)
        weights = blockiaf_engine.effective_packed(packed, c.monotone, c.group_cost_max)
        g = lambda z: blockiaf_engine.apply_packed(weights, z, spec_for(z), c.group_cost_max)
        g_inv = lambda phi: blockiaf.inverse(blockiaf_engine.unpack(packed, spec_for(phi), phi), phi, spec_for(phi))
        if kind != 'sandwich':
            return g, g_inv
        p = spd_factors(kron, eps)
        p_inv = inverse_factors(p)
        return (lambda w: apply_kronecker(p, g(apply_kronecker(p, w))),
                lambda phi: apply_kronecker(p_inv, g_inv(apply_kronecker(p_inv, phi))))

    def init(key, params):
        spec = spec_for(params)
        geom = blockiaf_engine.pack(blockiaf.init(key, params, spec, head_init=c.head_init), spec)
        if kind != 'none':
            geom = dict(geom, kron=init_kronecker(params, kind, eps))
        if primal:
            return params, geom
        # one compiled inverse: eagerly, each of its many small ops compiles separately (seconds)
        return jax.jit(lambda gm, p: maps(gm)[1](p))(geom, params), geom

    def inner(geom):
        params_of, inverse = maps(geom)   # the map's weights: once per adaptation
        kron = split_geom(geom)[1]
        if kind == 'dual_step':
            update = lambda z, grad: sgd_step(z, apply_kronecker(kron, grad), alpha)
        elif kind == 'kfo_step':
            update = lambda z, grad: sgd_step(z, metakfo.transform(kron, grad), alpha)
        else:
            update = lambda z, grad: sgd_step(z, grad, alpha)
        if primal:
            return InnerLoop(update=update, params_of=params_of, start=lambda phi0, key: inverse(phi0))
        return InnerLoop(update=update, params_of=params_of)

    return Geometry(init=init, inner=inner)


def config_section() -> ml_collections.ConfigDict:
    """config.md: the blockIAF map (``spec_from_config``) and its Kronecker forms."""
    c = ml_collections.ConfigDict()
    c.scale = 'bounded'
    c.s_min = 0.1
    c.s_max = 2.0
    c.monotone = True       # Theorem 1 by construction (docs/monotonicity.md); False: the paper's/reference's form
    c.shift_lipschitz = ml_collections.FieldReference(None, field_type=float)
    c.encoder_layers = 3
    c.head_init = 'zero'    # decoder heads: 'zero' (paper/authors: kernels' factors never learn) | 'learnable'
    c.group_cost_max = 1.5  # how g is computed, not what: higher, fewer kernels for more FLOPs (docs/benchmarks.md)
    c.activation = 'relu'   # of the map's encoders / link / decoders: 'relu' (authors) | 'elu' (no dead codes)
    c.kronecker = 'dual_step'  # mixing each tensor's entries: 'dual_step' | 'none' (the map alone, the paper's)
    #                          | 'sandwich' | 'kfo_step' (docs/methods.md)
    c.kronecker_eps = 0.01  # 'sandwich': each factor is L L^T + eps I
    c.start = 'dual'        # meta-learned start: 'dual' (z_0, the paper) | 'primal' (phi_0; z_0 = g^-1(phi_0))
    return c


def validate(config, require) -> None:
    c = config.md
    require(isinstance(c.encoder_layers, int) and not isinstance(c.encoder_layers, bool) and c.encoder_layers > 0,
            'md.encoder_layers', f'must be a positive integer, got {c.encoder_layers!r}')
    require(c.scale in ('bounded', 'exp'), 'md.scale', f"must be 'bounded' or 'exp', got {c.scale!r}")
    if c.scale == 'bounded':
        require(0 <= c.s_min < 1, 'md.s_min', f'must be in [0, 1) so that g starts as the identity, got {c.s_min}')
        require(c.s_max > 1, 'md.s_max', f'must exceed 1 so that g starts as the identity, got {c.s_max}')
    require(isinstance(c.group_cost_max, (int, float)) and not isinstance(c.group_cost_max, bool)
            and c.group_cost_max >= 1, 'md.group_cost_max', f'must be a number >= 1, got {c.group_cost_max!r}')
    require(c.head_init in blockiaf.HEAD_INITS, 'md.head_init',
            f'must be one of {blockiaf.HEAD_INITS}, got {c.head_init!r}')
    require(c.activation in blockiaf.ACTIVATIONS, 'md.activation',
            f'must be one of {blockiaf.ACTIVATIONS}, got {c.activation!r}')
    require(c.kronecker in KRONECKER, 'md.kronecker', f'must be one of {KRONECKER}, got {c.kronecker!r}')
    require(isinstance(c.kronecker_eps, (int, float)) and not isinstance(c.kronecker_eps, bool)
            and 0 < c.kronecker_eps < 1, 'md.kronecker_eps',
            f'must be in (0, 1) (the floor of each positive definite factor), got {c.kronecker_eps!r}')
    require(c.start in STARTS, 'md.start', f'must be one of {STARTS}, got {c.start!r}')
    if c.monotone:
        require(c.scale == 'bounded' and c.s_min > 0, 'md.monotone',
                "the monotone blockIAF (the default) needs md.scale='bounded' and md.s_min > 0; "
                "set md.monotone=False for the paper's / reference's unconstrained map")
        if c.shift_lipschitz is not None:
            require(c.shift_lipschitz >= 0, 'md.shift_lipschitz',
                    f'must be >= 0 (the bound of each shift\'s Lipschitz constant), got {c.shift_lipschitz}')
