"""The blockIAF (md_meta.blockiaf): identity at init, exact inverse, autoregressive structure, certified
monotonicity, initialisation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from md_meta import blockiaf, blockiaf_engine
from md_meta.networks import make_model
from tests.helpers import perturbed, random_like, tiny_config, tree_max_abs_diff, tree_vdot


def mlp_params(key=0, hidden=(8, 8)):
    return make_model('mlp', hidden=hidden).init(jax.random.PRNGKey(key), jnp.zeros((4, 1)))['params']


def perturbed_theta(spec, params, scale=0.3, key=1):
    return perturbed(jax.random.PRNGKey(key + 1), blockiaf.init(jax.random.PRNGKey(key), params, spec), scale)


def _geom_grads_after_one_step(head_init, monotone):
    """The blockIAF's meta-gradient, by leaf path, after one Adam meta-step from init, for one MD step on a
    random regression task with a 1-32-32-16 MLP (wide enough that no encoder or decoder ReLU of this draw is
    dead: the authors' encoders and decoders start or end in a ReLU, and a tensor of 8 or fewer entries per mode
    reaches a one-number bottleneck, dead for about half of all draws)."""
    params = make_model('mlp', hidden=(32, 32), out=16).init(jax.random.PRNGKey(0), jnp.zeros((4, 1)))['params']
    spec = blockiaf.make_spec(params, monotone=monotone)
    theta = blockiaf.init(jax.random.PRNGKey(10), params, spec, head_init=head_init)  # an open draw
    meta = {'z': blockiaf.inverse(theta, params, spec), 'theta': theta}
    ks = jax.random.split(jax.random.PRNGKey(2), 4)
    xs, ys, xq, yq = (jax.random.normal(k, (10, d)) for k, d in zip(ks, (1, 16, 1, 16)))
    apply = make_model('mlp', hidden=(32, 32), out=16).apply
    loss = lambda phi, x, y: jnp.mean((apply({'params': phi}, x) - y) ** 2)

    def query_loss(m):  # one mirror-descent step, gradient at the primal phi = g(z)
        g = jax.grad(loss)(blockiaf_engine.forward(m['theta'], m['z'], spec), xs, ys)
        z1 = jax.tree_util.tree_map(lambda z, d: z - 0.1 * d, m['z'], g)
        return loss(blockiaf_engine.forward(m['theta'], z1, spec), xq, yq)

    meta_grad = jax.jit(jax.grad(query_loss))   # one compile for both calls (eagerly: ~1 min, op by op)
    opt = optax.adam(1e-2)
    updates, _ = opt.update(meta_grad(meta), opt.init(meta))
    grad = meta_grad(optax.apply_updates(meta, updates))
    return {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grad['theta'])}


@pytest.mark.parametrize('scale,monotone', [('bounded', False), ('exp', False), ('bounded', True)])
def test_blockiaf_identity_at_init_and_exact_inverse(scale, monotone):
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), mlp_params())
        spec = blockiaf.make_spec(params, scale=scale, monotone=monotone)
        theta0 = blockiaf.init(jax.random.PRNGKey(0), params, spec)
        z = random_like(jax.random.PRNGKey(5), params)
        assert tree_max_abs_diff(blockiaf_engine.forward(theta0, z, spec), z) == 0.0
        theta = perturbed_theta(spec, params)
        phi = blockiaf_engine.forward(theta, z, spec)
        assert tree_max_abs_diff(phi, z) > 1e-2  # the perturbed map is not the identity
        assert tree_max_abs_diff(blockiaf.inverse(theta, phi, spec), z) < 1e-10
        # monotone: every factor of the weights g applies has Frobenius norm <= 1
        weights = blockiaf.effective_weights(theta, monotone)
        # the grouped products (forward) compute the per-leaf definition up to rounding
        assert tree_max_abs_diff(blockiaf.forward_per_leaf(theta, z, spec), phi) < 1e-12
        factors = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(weights)
                   if any(getattr(k, 'key', None) in ('u', 'w') for k in path)]
        assert len(factors) > 10
        frob = max(float(jnp.linalg.norm(u)) for u in factors)
        assert (frob <= 1.0 + 1e-12) if monotone else (frob > 1.0)


def test_blockiaf_is_autoregressive():
    """Block i depends on blocks < i only: perturbing the last block changes nothing before it,
    perturbing the first block changes later blocks. (The encoders end in a ReLU and decoders start with one,
    as the authors'; the last layer's small tensors reach one- to five-number bottlenecks that a random map
    often zeroes: docs/methods.md. This draw, width 40 as the sinusoid MLP, keeps the path open.)"""
    params = mlp_params(hidden=(40, 40))
    spec = blockiaf.make_spec(params)
    theta = perturbed_theta(spec, params, key=2)
    z = random_like(jax.random.PRNGKey(3), params)
    phi = blockiaf_engine.forward(theta, z, spec)
    first, last = spec.blocks[0], spec.blocks[-1]
    z_last = dict(z, **{last: jax.tree_util.tree_map(lambda x: x + 1.0, z[last])})
    phi2 = blockiaf_engine.forward(theta, z_last, spec)
    for b in spec.blocks[:-1]:
        assert tree_max_abs_diff(phi2[b], phi[b]) == 0.0
    z_first = dict(z, **{first: jax.tree_util.tree_map(lambda x: x + 1.0, z[first])})
    phi3 = blockiaf_engine.forward(theta, z_first, spec)
    assert tree_max_abs_diff(phi3[last], phi[last]) > 1e-4


def test_monotonicity_on_random_pairs():
    """The monotone blockIAF meets its certified margin, (z - z')^T (g(z) - g(z')) >= C_mono |z - z'|^2 > 0,
    on random pairs of random maps. (The unconstrained map is not monotone in general: nothing to test.)"""
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), mlp_params())
        for monotone in (True,):
            spec = blockiaf.make_spec(params, scale='bounded', monotone=monotone)
            assert blockiaf.monotone_margin(spec) > 0
            for seed in range(3):
                theta = perturbed_theta(spec, params, scale=0.2, key=10 + seed)
                fwd = jax.jit(lambda z: blockiaf_engine.forward(theta, z, spec))
                for pair in range(20):
                    z = random_like(jax.random.PRNGKey(100 * seed + pair), params, 2.0)
                    zp = random_like(jax.random.PRNGKey(100 * seed + pair + 50), params, 2.0)
                    dz = jax.tree_util.tree_map(jnp.subtract, z, zp)
                    gap = tree_vdot(dz, jax.tree_util.tree_map(jnp.subtract, fwd(z), fwd(zp)))
                    norm2 = tree_vdot(dz, dz)
                    assert gap >= blockiaf.monotone_margin(spec) * norm2 - 1e-9


@pytest.mark.parametrize('monotone', [False, True])
def test_blockiaf_learnable_head_init_every_parameter_learns(monotone):
    """md.head_init='learnable' (only the last factor of each decoder head at zero): after one meta-step every
    blockIAF array has a non-zero meta-gradient. 'zero' (the paper's / authors' init): the head factors of
    every kernel (two modes) have exactly zero meta-gradient, then and forever (each is a product of zeros)."""
    learn = _geom_grads_after_one_step('learnable', monotone)
    dead = [k for k, g in learn.items() if not np.any(g)]
    assert not dead, dead
    zero = _geom_grads_after_one_step('zero', monotone)
    multi_mode = {k.split("['u']")[0] for k in zero if "['u'][1]" in k}  # heads of kernels (>= 2 factors)
    heads = [k for k in zero if k.split("['u']")[0] in multi_mode and ("['mu']" in k or "['a']" in k)]
    assert heads and all(not np.any(zero[k]) for k in heads), [k for k in heads if np.any(zero[k])]
    assert all(np.any(learn[k]) for k in heads)


def test_blockiaf_init_same_under_jit_and_vmap():
    """init builds theta on the host from one random draw, and traces too (vmap over keys, as the
    monotonicity harness does): the same numbers either way, up to the rounding of the 1/sqrt(fan_in) scale."""
    params = mlp_params()
    spec = blockiaf.make_spec(params)
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    eager = [blockiaf.init(k, params, spec, head_init='learnable') for k in keys]
    traced = jax.vmap(lambda k: blockiaf.init(k, params, spec, head_init='learnable'))(keys)
    for i in range(2):
        one = jax.tree_util.tree_map(lambda t: t[i], traced)
        assert tree_max_abs_diff(one, eager[i]) < 1e-6
    assert tree_max_abs_diff(eager[0], eager[1]) > 0


def test_blocks_follow_the_network_whatever_the_key_order():
    """md-meta's layer_N in numeric order (layer_10 after layer_9), other names sorted. MD's inner loop, on the
    packed map it meta-learns, computes the per-leaf definition, also for a one-block pytree (nothing to
    condition on: a per-element scale and shift)."""
    from md_meta.methods import md
    assert blockiaf.default_blocks({f'layer_{i}': 0 for i in (10, 2, 0, 1)}) == ('layer_0', 'layer_1', 'layer_2',
                                                                                'layer_10')
    assert blockiaf.default_blocks({'Dense_0': 0, 'Conv_1': 0, 'Conv_0': 0}) == ('Conv_0', 'Conv_1', 'Dense_0')
    key = jax.random.PRNGKey(0)
    config = tiny_config('md', **{'md.kronecker': 'none'})   # the map alone
    geom = md.make(config)
    for params in ({'layer_0': mlp_params()['layer_0']}, mlp_params()):
        spec = md.spec_from_config(config, params)
        z0, packed = geom.init(key, params)       # MD meta-learns the map in the packed layout
        theta = blockiaf.init(key, params, spec)
        assert tree_max_abs_diff(packed, blockiaf_engine.pack(theta, spec)) == 0.0
        theta = jax.tree_util.tree_map(lambda t: t + 0.1, theta)
        phi = geom.inner(blockiaf_engine.pack(theta, spec)).params_of(z0)
        assert tree_max_abs_diff(phi, blockiaf.forward_per_leaf(theta, z0, spec)) < 1e-5
        assert tree_max_abs_diff(phi, z0) > 1e-3


def test_md_step_factors_are_the_monotone_scales():
    """experiments.studies.step_factors: diag(dg/dz) of the monotone map is sigma(a) of its per-element scale logits
    (block i's scale and shift read only blocks < i), computed here from theta directly. The logits are spread and
    the shifts depend on z (one-layer encoders, a shift bound of 0.3: the Jacobian's off-diagonal reaches 1e-2;
    with three layers this small MLP's codes are all zero after the ReLUs), so that row or column sums of the
    Jacobian instead of its diagonal, or a wrong order, would show."""
    from jax.flatten_util import ravel_pytree
    from experiments.studies.step_factors import md_step_factors
    with jax.enable_x64(True):
        model = make_model('mlp', hidden=(8, 8))
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                        model.init(jax.random.PRNGKey(0), jnp.zeros((4, 1)))['params'])
        spec = blockiaf.make_spec(params, monotone=True, s_min=0.5, shift_lipschitz=0.3, encoder_layers=1)
        theta = perturbed(jax.random.PRNGKey(2), blockiaf.init(jax.random.PRNGKey(1), params, spec,
                                                               head_init='learnable'), 1.0)
        z = random_like(jax.random.PRNGKey(5), params)
        flat, unravel = ravel_pytree(z)
        jac = jax.jacfwd(lambda x: ravel_pytree(blockiaf.forward_per_leaf(theta, unravel(x), spec))[0])(flat)
        off_diagonal = jac - jnp.diag(jnp.diagonal(jac))
        assert float(jnp.abs(off_diagonal.sum(0)).max()) > 1e-2 and float(jnp.abs(off_diagonal.sum(1)).max()) > 1e-3
        logits = {b: theta['first']['a'] if i == 0 else theta['a'][b] for i, b in enumerate(spec.blocks)}
        expected = ravel_pytree(jax.tree_util.tree_map(lambda a: blockiaf.sigma(a, spec), logits))[0]
        assert float(jnp.std(expected)) > 0.1
        np.testing.assert_allclose(md_step_factors(theta, z, spec), expected, rtol=1e-12, atol=1e-14)


def test_scales_are_the_jacobian_diagonal_of_the_authors_map():
    """blockiaf.scales_and_shifts: on the authors' map (exp scale, not monotone: each block's scale logits depend
    on earlier blocks' z through learnable heads, one-layer encoders so that no code is dead), sigma is the diagonal
    of dg/dz, the dense Jacobian of blockiaf_engine's g (an independent computation: grouped products), and
    z * sigma + mu is that g(z). The scales are spread (a wrong leaf order or a constant would show), and they move
    with z."""
    from jax.flatten_util import ravel_pytree
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), mlp_params())
        spec = blockiaf.make_spec(params, scale='exp', monotone=False, encoder_layers=1)
        theta = perturbed(jax.random.PRNGKey(2), blockiaf.init(jax.random.PRNGKey(1), params, spec,
                                                               head_init='learnable'), 0.5)
        z = random_like(jax.random.PRNGKey(5), params)
        scales, shifts = blockiaf.scales_and_shifts(theta, z, spec)
        flat_scales = ravel_pytree(scales)[0]
        assert float(jnp.std(flat_scales)) > 0.1
        flat, unravel = ravel_pytree(z)
        jac = jax.jacfwd(lambda x: ravel_pytree(blockiaf_engine.forward(theta, unravel(x), spec))[0])(flat)
        np.testing.assert_allclose(flat_scales, jnp.diagonal(jac), rtol=1e-12, atol=1e-14)
        phi = jax.tree_util.tree_map(lambda zz, s, m: zz * s + m, z, scales, shifts)
        assert tree_max_abs_diff(phi, blockiaf_engine.forward(theta, z, spec)) < 1e-12
        moved = blockiaf.scales_and_shifts(theta, random_like(jax.random.PRNGKey(6), params), spec)[0]
        assert float(jnp.abs(ravel_pytree(moved)[0] - flat_scales).max()) > 1e-3
