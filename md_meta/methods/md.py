"""Mirror descent with a blockIAF inverse mirror map (Zhang, Li & Giannakis; this paper), eq. (7):

    z_k = z_{k-1} - alpha * grad_phi L(g(z_{k-1}); D_trn),     phi_hat = g(z_K),

with the dual initialisation z_0 and the blockIAF parameters theta_g meta-learned (stored in
``blockiaf.pack``'s layout: the leaves' encoder / decoder layers stacked per group). The gradient is
taken with respect to the primal phi = g(z), not through g (the reference implementation's choice).
With g = identity this is exactly MAML."""
import jax

from md_meta import blockiaf
from md_meta.geometry import Geometry, InnerLoop, sgd_step

LOWER_LEVEL, LOSS_GEOMETRY = 'MD', 'blockIAF-based mirror map'


def spec_from_config(config, params) -> blockiaf.BlockIAFSpec:
    """The blockIAF's spec: one block per top-level entry of ``params`` (only its keys are read), in
    ``blockiaf.default_blocks`` order, whatever the dict's key order."""
    c = config.md
    return blockiaf.make_spec(params, scale=c.scale, s_min=c.s_min, s_max=c.s_max,
                              monotone=c.monotone, shift_lipschitz=c.shift_lipschitz,
                              encoder_layers=c.encoder_layers, group_cost_max=c.group_cost_max)


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)

    def spec_for(params):  # the spec is a pure function of the config and the pytree's block keys
        return spec_from_config(config, params)

    def init(key, params):
        spec = spec_for(params)
        theta = blockiaf.init(key, params, spec, head_init=config.md.head_init)
        # one compiled inverse: eagerly, each of its many small ops compiles separately (seconds)
        z0 = jax.jit(lambda th, p: blockiaf.inverse(th, p, spec))(theta, params)
        return z0, blockiaf.pack(theta, spec)

    def inner(theta):
        weights = blockiaf.effective_packed(theta, config.md.monotone, config.md.group_cost_max)  # once per adaptation
        return InnerLoop(update=lambda z, grad: sgd_step(z, grad, alpha),
                         params_of=lambda z: blockiaf.apply_packed(weights, z, spec_for(z)))

    return Geometry(init=init, inner=inner)


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
    if c.monotone:
        require(c.scale == 'bounded' and c.s_min > 0, 'md.monotone',
                "the monotone blockIAF (the default) needs md.scale='bounded' and md.s_min > 0; "
                "set md.monotone=False for the paper's / reference's unconstrained map")
