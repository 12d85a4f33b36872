"""Theorem 1 in code: the constrained blockIAF is monotone with the certified margin, the
falsification harness finds violations of the unconstrained form, and the diagnostics are right.

All checks of inequalities run in float64."""
import math

import jax
from jax import enable_x64
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.flatten_util import ravel_pytree

from md_meta import blockiaf, blockiaf_engine
from md_meta import monotonicity as mono

# a small pytree with three blocks (a block with two leaves, a 3-way leaf, a vector); d = 18
def _params(dtype):
    return {'l0': {'w': jnp.zeros((2, 3), dtype), 'b': jnp.zeros((2,), dtype)},
            'l1': {'w': jnp.zeros((2, 2, 2), dtype)},
            'l2': {'b': jnp.zeros((2,), dtype)}}


def _perturbed_theta(key, params, spec, scale):
    theta = blockiaf.init(key, params, spec)
    return mono._perturb(jax.random.fold_in(key, 1), theta, scale)


def _random_z(key, params, scale):
    flat, unravel = ravel_pytree(params)
    return unravel(scale * jax.random.normal(key, flat.shape, flat.dtype))


def _dense_jac(theta, z, spec):
    flat, unravel = ravel_pytree(z)
    f = lambda x: ravel_pytree(blockiaf_engine.forward(theta, unravel(x), spec))[0]
    return np.asarray(jax.jacfwd(f)(flat))


# two certified specs (a static spec means one compilation each): the default constants with a
# two-layer encoder/decoder, and an extreme one (wide scale range, c at 99% of the admissible limit)
_SPECS = {'default': dict(s_min=0.1, s_max=2.0, shift_lipschitz=None, encoder_layers=2),
          'extreme': dict(s_min=0.5, s_max=10.0, shift_lipschitz=0.99 * 0.5 / math.sqrt(2), encoder_layers=1)}
_CHECKERS = {}


def _checker(name):
    """jit: (theta, z, z') -> (gap, lambda_min of sym J at z, |J|_2 at z, inverse gap / |dphi|^2)."""
    if name not in _CHECKERS:
        spec = blockiaf.make_spec(_params(jnp.float64), monotone=True, **_SPECS[name])

        def check(theta, z, zp):
            J = jax.jacfwd(lambda x: ravel_pytree(blockiaf_engine.forward(theta, unravel(x), spec))[0])(
                ravel_pytree(z)[0])
            dphi = ravel_pytree(z)[0] - ravel_pytree(zp)[0]   # z, z' also serve as two primal points
            dinv = (ravel_pytree(blockiaf.inverse(theta, z, spec))[0]
                    - ravel_pytree(blockiaf.inverse(theta, zp, spec))[0])
            return (mono.gap(theta, z, zp, spec), jnp.linalg.eigvalsh(0.5 * (J + J.T))[0],
                    jnp.linalg.norm(J, 2), (dphi @ dinv) / (dphi @ dphi))

        unravel = ravel_pytree(_params(jnp.float64))[1]
        _CHECKERS[name] = (spec, jax.jit(check))
    return _CHECKERS[name]


@pytest.mark.parametrize('spec_name', sorted(_SPECS))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**30), theta_scale=st.sampled_from([0.3, 3.0, 30.0]),
       z_scale=st.sampled_from([0.1, 1.0, 100.0]), pair_scale=st.sampled_from([1e-3, 1.0, 10.0]))
def test_monotone_map_never_violates_the_certified_margin(spec_name, seed, theta_scale, z_scale, pair_scale):
    with enable_x64():
        params = _params(jnp.float64)
        spec, check = _checker(spec_name)
        cert = mono.certificate(spec)
        k = jax.random.split(jax.random.PRNGKey(seed), 4)
        theta = _perturbed_theta(k[0], params, spec, theta_scale)   # large scales: the normalisation binds
        z = _random_z(k[1], params, z_scale)
        zp = jax.tree_util.tree_map(lambda a, d: a + d, z, _random_z(k[2], params, pair_scale))
        g, lam, norm, inv_gap = (float(x) for x in check(theta, z, zp))
        tol = 1e-9
        assert g >= cert['C_mono'] - tol                 # (9) with the margin
        assert lam >= cert['C_mono'] - tol               # the infinitesimal form: sym(J) >= C_mono
        assert norm <= cert['M'] + tol                   # |J| <= M
        assert inv_gap >= cert['C'] - tol                # (10) for g^-1 with C = C_mono / M^2


def test_constants_match_the_written_bound():
    params = _params(jnp.float32)
    spec = blockiaf.make_spec(params, monotone=True, s_min=0.2, s_max=3.0, shift_lipschitz=0.1)
    cert = mono.certificate(spec)
    B = 3
    assert cert['C_mono'] == pytest.approx(0.2 - 0.1 * math.sqrt(B - 1))
    assert cert['M'] == pytest.approx(3.0 + 0.1 * math.sqrt(B - 1))
    assert cert['C'] == pytest.approx(cert['C_mono'] / cert['M'] ** 2)
    # the default c = s_min / (2 sqrt(B - 1)) leaves half of s_min as the margin
    spec = blockiaf.make_spec(params, monotone=True, s_min=0.1, s_max=2.0)
    assert spec.shift_lipschitz == pytest.approx(0.1 / (2 * math.sqrt(2)))
    assert mono.certificate(spec)['C_mono'] == pytest.approx(0.05)
    with pytest.raises(ValueError):
        blockiaf.make_spec(params, monotone=True, s_min=0.1, shift_lipschitz=0.1 / math.sqrt(2))
    with pytest.raises(ValueError):
        mono.certificate(blockiaf.make_spec(params))


def test_monotone_map_starts_as_identity_and_inverts_exactly():
    with enable_x64():
        params = _params(jnp.float64)
        spec = blockiaf.make_spec(params, monotone=True)
        key = jax.random.PRNGKey(3)
        z = _random_z(key, params, 2.0)
        theta = blockiaf.init(jax.random.PRNGKey(0), params, spec)
        phi = blockiaf_engine.forward(theta, z, spec)
        for a, b in zip(jax.tree_util.tree_leaves(phi), jax.tree_util.tree_leaves(z)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        theta = _perturbed_theta(jax.random.PRNGKey(1), params, spec, 3.0)
        back = blockiaf.inverse(theta, blockiaf_engine.forward(theta, z, spec), spec)
        np.testing.assert_allclose(ravel_pytree(back)[0], ravel_pytree(z)[0], rtol=0, atol=1e-12)


def _hand_built(slope, scale_slope=0.0, scale='bounded'):
    """Two blocks of size 1: phi_1 = z_1, phi_2 = z_2 sigma(scale_slope z_1) + slope z_1 + const for
    z_1 > -10 (the encoder's bias keeps the encoder's and the decoder's ReLUs active)."""
    params = {'a': jnp.zeros((1,), jnp.float64), 'b': jnp.zeros((1,), jnp.float64)}
    spec = blockiaf.make_spec(params, blocks=('a', 'b'), scale=scale, encoder_layers=1)
    theta = blockiaf.init(jax.random.PRNGKey(0), params, spec)
    one = jnp.ones((1, 1), jnp.float64)
    theta['enc']['a'][0][0]['u'] = [one]
    theta['enc']['a'][0][0]['b'] = jnp.full((1,), 10.0, jnp.float64)
    theta['link']['b']['w'] = one
    theta['link']['b']['b'] = jnp.zeros((1,), jnp.float64)
    theta['dec']['b'][0]['a']['b'] = jnp.full((1,), -10.0 * scale_slope, jnp.float64)
    theta['dec']['b'][0]['mu']['u'] = [slope * one]
    theta['dec']['b'][0]['a']['u'] = [scale_slope * one]
    return params, spec, theta


def test_harness_finds_the_violation_of_a_steep_shift():
    # Jacobian [[1, 0], [L, 1]] for z_1 > 0: symmetric part 1 - L/2 < 0 once L^2 > 4 s1 s2 = 4
    with enable_x64():
        params, spec, theta = _hand_built(slope=5.0)
        res = mono.falsify(spec, params, jax.random.PRNGKey(0), restarts=2, steps=100, lr=0.1,
                           optimize_theta=False, theta=theta, theta_noise=0.0, z_scale=5.0)
        assert res.gap < -1.0 and res.gap >= 1.0 - 5.0 / 2 - 1e-9   # the exact infimum is -1.5
        z, zp = ravel_pytree(res.z)[0], ravel_pytree(res.z_prime)[0]
        assert float(mono.gap(res.theta, res.z, res.z_prime, spec)) < 0 and not np.allclose(z, zp)
        # a gentle shift (L^2 < 4) is monotone here: the harness finds nothing below 1 - L/2
        params, spec, theta = _hand_built(slope=1.0)
        res = mono.falsify(spec, params, jax.random.PRNGKey(0), restarts=2, steps=100, lr=0.1,
                           optimize_theta=False, theta=theta, theta_noise=0.0, z_scale=5.0)
        assert res.gap >= 0.5 - 1e-9


def test_harness_finds_the_unbounded_scale_term():
    # shift 0, bounded scale depending on z_1: the z_2 * dsigma/dz_1 term grows with |z_2|
    with enable_x64():
        params, spec, theta = _hand_built(slope=0.0, scale_slope=1.0)
        res = mono.falsify(spec, params, jax.random.PRNGKey(1), restarts=2, steps=100, lr=0.1,
                           optimize_theta=False, theta=theta, theta_noise=0.0, z_scale=5.0)
        assert res.gap < 0


def test_harness_finds_nothing_for_the_monotone_map():
    with enable_x64():
        params = {k: jnp.zeros((2,), jnp.float64) for k in ('a', 'b', 'c')}
        spec = blockiaf.make_spec(params, monotone=True, encoder_layers=1)
        res = mono.falsify(spec, params, jax.random.PRNGKey(0), restarts=2, steps=40, lr=0.1,
                           optimize_theta=True, theta_noise=1.0)
        assert res.gap >= mono.certificate(spec)['C_mono'] - 1e-9


@pytest.mark.parametrize('monotone', [True, False])
def test_lanczos_lambda_min_matches_dense(monotone):
    with enable_x64():
        params = _params(jnp.float64)
        spec = blockiaf.make_spec(params, monotone=monotone, encoder_layers=1)
        theta = _perturbed_theta(jax.random.PRNGKey(2), params, spec, 1.0)
        z = _random_z(jax.random.PRNGKey(4), params, 1.0)
        J = _dense_jac(theta, z, spec)
        dense = np.linalg.eigvalsh(0.5 * (J + J.T))
        d = J.shape[0]
        lam = float(mono.sym_jacobian_lambda_min(theta, z, spec, jax.random.PRNGKey(5), num_iters=d))
        assert lam == pytest.approx(dense[0], abs=1e-8)
        # breakdown handling: the identity map has a one-dimensional Krylov space
        theta0 = blockiaf.init(jax.random.PRNGKey(0), params, spec)
        lam0 = float(mono.sym_jacobian_lambda_min(theta0, z, spec, jax.random.PRNGKey(5), num_iters=d))
        assert lam0 == pytest.approx(1.0, abs=1e-10)
        if not monotone:
            return
        # diagnostics run and, for the monotone map, respect the certificate
        out = mono.diagnose(theta, spec, z, jax.random.PRNGKey(6), num_points=3, num_pairs=32, num_iters=d)
        assert out['lambda_min_at_center'] == pytest.approx(dense[0], abs=1e-8)
        assert out['lambda_min'] >= out['certificate']['C_mono'] - 1e-9
        assert out['gap']['min'] >= out['certificate']['C_mono'] - 1e-9
