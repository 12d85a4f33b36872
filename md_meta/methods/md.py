"""Mirror descent with a blockIAF inverse mirror map (Zhang, Li & Giannakis; this paper), eq. (7):

    z_k = z_{k-1} - alpha * grad_phi L(g(z_{k-1}); D_trn),     phi_hat = g(z_K),

with the dual initialisation z_0 and the blockIAF parameters theta_g meta-learned. The gradient is
taken with respect to the primal phi = g(z), not through g (the reference implementation's choice).
With g = identity this is exactly MAML."""
import jax

from md_meta import blockiaf
from md_meta.geometry import Geometry, sgd_step


def spec_from_config(config, params) -> blockiaf.BlockIAFSpec:
    c = config.md
    return blockiaf.make_spec(params, scale=c.scale, s_min=c.s_min, s_max=c.s_max, monotone=c.monotone,
                              shift_lipschitz=c.shift_lipschitz,
                              encoder_layers=c.encoder_layers)


def make(config) -> Geometry:
    alpha = float(config.inner.step_size)

    def spec_for(params):  # the spec is a pure function of the config and the pytree's block keys
        return spec_from_config(config, params)

    def init(key, params):
        spec = spec_for(params)
        theta = blockiaf.init(key, params, spec, head_init=config.md.head_init)
        # one compiled inverse: eagerly, each of its many small ops compiles separately (seconds)
        return jax.jit(lambda th, p: blockiaf.inverse(th, p, spec))(theta, params), theta

    def prepare(theta):  # the normalised blockIAF weights, once per adaptation
        return blockiaf.effective_weights(theta, bool(config.md.monotone))

    def primal(theta_in, z):
        return blockiaf.forward(theta_in, z, spec_for(z), prepared=True)

    return Geometry(name='md', init=init, step=lambda theta, z, grad: sgd_step(z, grad, alpha), primal=primal,
                    prepare=prepare)
