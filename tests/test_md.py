"""MD's forms (md_meta/methods/md.py): the Kronecker dual step, the monotone sandwich, the primal start.

Each special case is an independent computation the form must agree with in float64: with g = identity the
dual step is MetaCurvature with the same factors, and the sandwich is MetaCurvature with the squared positive
definite factors; with K = identity both are the map alone; with the primal start the map moves phi_K and not
phi_0. Then: every array of the map and of K learns, and the sandwich is monotone where g is.
"""
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest

from md_meta import losses, monotonicity
from md_meta.meta import init_meta_params, init_optimizer_state, make_meta_step, meta_loss
from md_meta.methods import md
from tests.helpers import perturbed, tiny_config, tree_max_abs_diff
from tests.test_methods import batch_for, make_learner, trajectory


def _f64(tree):
    """Floating leaves in float64 (labels stay integers)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
                                  else x, tree)


def _setup(method, net, overrides=None, steps=2):
    learner = make_learner(method, net, steps, overrides)
    batch = _f64(batch_for(net, tasks=2))
    meta = _f64(init_meta_params(learner, jax.random.PRNGKey(0), batch.support_x[0]))
    return learner, batch, meta


def _value_grad(learner, meta, batch):
    return jax.jit(jax.value_and_grad(lambda m: meta_loss(learner, m, batch, jax.random.PRNGKey(1))[0]))(meta)


def _phi_k(learner, meta, batch):
    task = jax.tree_util.tree_map(lambda a: a[0], batch)
    return jax.jit(lambda m: trajectory(learner, m, task, jax.random.PRNGKey(1))[0])(meta)


def _close(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize('net', ['mlp', 'cnn'])
def test_kronecker_dual_step_with_the_identity_map_is_metacurvature(net):
    """g = identity (the map at its zero-head start: a = mu = 0 whatever z) and random, non-identity factors K
    copied into MetaCurvature: phi_K, the meta-loss and its second-order meta-gradient w.r.t. the start and
    every factor are MetaCurvature's."""
    with jax.enable_x64(True):
        learner, batch, meta = _setup('md', net, {'md.kronecker': 'dual_step'})
        meta['geom']['kron'] = perturbed(jax.random.PRNGKey(5), meta['geom']['kron'], 0.3)
        mc, _, mc_meta = _setup('metacurvature', net)
        mc_meta = dict(mc_meta, init=meta['init'], geom={'factors': meta['geom']['kron']})
        _close(_phi_k(learner, meta, batch), _phi_k(mc, mc_meta, batch))
        (v, g), (v_mc, g_mc) = _value_grad(learner, meta, batch), _value_grad(mc, mc_meta, batch)
        np.testing.assert_allclose(float(v), float(v_mc), rtol=1e-12)
        _close(g['init'], g_mc['init'])
        _close(g['geom']['kron'], g_mc['geom']['factors'])


@pytest.mark.parametrize('net', ['mlp', 'cnn'])
def test_kfo_step_with_the_identity_map_is_metakfo(net):
    """md.kronecker='kfo_step' with g = identity and random MetaKFO factors (C non-zero, so f is nonlinear) is
    MetaKFO: phi_K, the meta-loss and the meta-gradient w.r.t. the start and every factor."""
    with jax.enable_x64(True):
        learner, batch, meta = _setup('md', net, {'md.kronecker': 'kfo_step'})
        meta['geom']['kron'] = perturbed(jax.random.PRNGKey(5), meta['geom']['kron'], 0.3)
        kfo, _, kfo_meta = _setup('metakfo', net)
        kfo_meta = dict(kfo_meta, init=meta['init'], geom=meta['geom']['kron'])
        _close(_phi_k(learner, meta, batch), _phi_k(kfo, kfo_meta, batch))
        (v, g), (v_kfo, g_kfo) = _value_grad(learner, meta, batch), _value_grad(kfo, kfo_meta, batch)
        np.testing.assert_allclose(float(v), float(v_kfo), rtol=1e-12)
        _close(g['init'], g_kfo['init'])
        _close(g['geom']['kron'], g_kfo['geom'])


@pytest.mark.parametrize('net', ['mlp', 'cnn'])
def test_sandwich_with_the_identity_map_is_metacurvature_with_squared_positive_definite_factors(net):
    """phi = P g(P w) with g = identity is phi = P^2 w: MetaCurvature with M = P^2, each factor A^2 with
    A = L L^T + eps I (a vector factor: (l^2 + eps)^2). With the primal start both meta-learn phi_0: phi_K,
    the meta-loss, and the meta-gradient w.r.t. phi_0 and w.r.t. L (MetaCurvature's through A(L)^2) agree."""
    eps = 0.05
    with jax.enable_x64(True):
        learner, batch, meta = _setup('md', net, {'md.kronecker': 'sandwich', 'md.start': 'primal',
                                                  'md.kronecker_eps': eps})
        # factors well conditioned (P^2 multiplies the factors' condition numbers over the modes, and the primal
        # start goes through P^-1): a perturbation of 0.1 keeps float64 agreement near 1e-12
        roots = perturbed(jax.random.PRNGKey(5), meta['geom']['kron'], 0.1)
        meta['geom']['kron'] = roots
        mc, _, mc_meta = _setup('metacurvature', net)

        def squared(r):
            a = md.spd_factors(r, eps)
            return jax.tree_util.tree_map(lambda f: f @ f if f.ndim == 2 else f * f, a)

        mc_meta = dict(mc_meta, init=meta['init'])
        mc_loss = lambda m, r: meta_loss(mc, dict(m, geom={'factors': squared(r)}), batch, jax.random.PRNGKey(1))[0]
        v_mc, (g_mc, g_roots) = jax.jit(jax.value_and_grad(mc_loss, argnums=(0, 1)))(mc_meta, roots)
        v, g = _value_grad(learner, meta, batch)
        # phi_K goes through P^-1 (inverted factors) and back: a few float64 ulps of conditioning
        _close(_phi_k(learner, meta, batch), _phi_k(mc, dict(mc_meta, geom={'factors': squared(roots)}), batch),
               rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(float(v), float(v_mc), rtol=1e-10)
        _close(g['init'], g_mc['init'], rtol=1e-8, atol=1e-10)
        _close(g['geom']['kron'], g_roots, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize('kind', ['dual_step', 'sandwich'])
def test_identity_kronecker_is_the_map_alone(kind):
    """K = I (the start of both forms) on a perturbed, non-identity map: phi_K and the meta-gradient w.r.t.
    the start and the map's parameters equal MD without K."""
    with jax.enable_x64(True):
        ref, batch, ref_meta = _setup('md', 'mlp', {'md.head_init': 'learnable', 'md.kronecker': 'none'})
        ref_meta = dict(ref_meta, init=perturbed(jax.random.PRNGKey(3), ref_meta['init'], 0.1),
                        geom=perturbed(jax.random.PRNGKey(4), ref_meta['geom'], 0.1))
        learner, _, meta = _setup('md', 'mlp', {'md.head_init': 'learnable', 'md.kronecker': kind})
        kron = md.init_kronecker(meta['init'], kind, 0.01)   # in float64: P = I to float64 rounding
        meta = dict(meta, init=ref_meta['init'], geom=dict(ref_meta['geom'], kron=kron))
        _close(_phi_k(learner, meta, batch), _phi_k(ref, ref_meta, batch))
        (v, g), (v_ref, g_ref) = _value_grad(learner, meta, batch), _value_grad(ref, ref_meta, batch)
        np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-12)
        _close(g['init'], g_ref['init'])
        _close(md.split_geom(g['geom'])[0], g_ref['geom'])


@pytest.mark.parametrize('kind', ['none', 'dual_step', 'sandwich'])
def test_primal_start_the_map_moves_phi_K_not_phi_0(kind):
    """With md.start='primal', phi_0 = g~(g~^-1(phi_0)) for any map: two different random maps (and K) give
    the same phi_0 and different phi_K; the dual start's phi_0 moves with the map."""
    with jax.enable_x64(True):
        for start in ('primal', 'dual'):
            learner, batch, meta = _setup('md', 'mlp', {'md.head_init': 'learnable', 'md.kronecker': kind,
                                                        'md.start': start})
            task = jax.tree_util.tree_map(lambda a: a[0], batch)

            @jax.jit
            def phis(m):
                loop = learner.geometry.inner(m['geom'])
                phi0 = loop.params_of(loop.start(m['init'], jax.random.PRNGKey(1)))
                return phi0, trajectory(learner, m, task, jax.random.PRNGKey(1))[0]

            out = [phis(dict(meta, geom=perturbed(jax.random.PRNGKey(k), meta['geom'], 0.2))) for k in (1, 2)]
            if start == 'primal':
                assert tree_max_abs_diff(out[0][0], meta['init']) < 1e-10
                assert tree_max_abs_diff(out[1][0], meta['init']) < 1e-10
            else:
                assert tree_max_abs_diff(out[0][0], out[1][0]) > 1e-3
            assert tree_max_abs_diff(out[0][1], out[1][1]) > 1e-3


FULL = {'md.kronecker': 'dual_step', 'md.activation': 'elu', 'md.head_init': 'learnable'}


def _silent_arrays(learner, meta, batch, key):
    """(paths of the arrays of meta['geom'] whose meta-gradient is exactly 0, paths of the network's parameters
    whose own support-loss gradient at phi_0 is 0 to rounding (CNN4's conv biases before batch norm), count)."""
    g = jax.jit(jax.grad(lambda m: meta_loss(learner, m, batch, key)[0]))(meta)
    task = jax.tree_util.tree_map(lambda a: a[0], batch)
    loss_fn = losses.get(learner.loss)

    @jax.jit
    def net_grad(m):
        loop = learner.geometry.inner(m['geom'])
        phi0 = loop.params_of(loop.start(m['init'], key))
        return jax.grad(lambda phi: loss_fn(learner.model.apply({'params': phi, **m['net']}, task.support_x),
                                            task.support_y))(phi0)

    gn = net_grad(meta)
    top = max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(gn))
    paths = lambda tree, dead: {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                                if dead(np.asarray(x))}
    return (paths(g['geom'], lambda x: not np.any(x != 0)), paths(gn, lambda x: np.abs(x).max() <= 1e-10 * top),
            len(jax.tree_util.tree_leaves(g['geom'])))


@pytest.mark.parametrize('net', ['mlp', 'cnn'])
@pytest.mark.parametrize('kind', ['dual_step', 'sandwich'])
@pytest.mark.parametrize('start', ['dual', 'primal'])
def test_every_array_of_the_map_and_of_K_learns(net, kind, start):
    """After one meta-step every array of the blockIAF and of K has a non-zero meta-gradient in float64 (ELU
    codes and learnable heads: with ReLU the 1-number codes of floor halving, and the codes of a leaf at zero, are
    dead at initialisation; with zero heads the factors of every kernel's head never learn). Two exceptions,
    both parameters that do not change the adapted model: the scale and K of a network parameter whose own
    gradient is 0 (CNN4's conv biases, followed by batch norm), and with the primal start the constant shifts
    (block 1's mu and each decoder head's bias), which cancel in phi_K = phi_0 + g(z_K) - g(z_0)."""
    overrides = dict(FULL, **{'md.kronecker': kind, 'md.start': start, 'inner.step_size': 0.1 if net == 'cnn' else 0.01})
    key = jax.random.PRNGKey(0)
    with jax.enable_x64(True):
        learner, batch, meta = _setup('md', net, overrides)
        opt = optax.adam(1e-3)
        meta, _, _ = make_meta_step(learner, opt)(meta, init_optimizer_state(opt, meta), batch, key)
        silent, net_silent, total = _silent_arrays(learner, meta, batch, key)
    excused = {f"['{part}']{p}" for p in net_silent for part in ('kron', 'a')}
    excused |= {f"['first']['{part}']" + p[len("['layer_0']"):] for p in net_silent if p.startswith("['layer_0']")
                for part in ('a', 'mu')}
    if start == 'primal':
        excused |= {p for p in silent if p.startswith("['first']['mu']")}
        head = tiny_config().md.encoder_layers - 1   # each decoder: encoder_layers - 1 trunk layers, then mu
        excused |= {p for p in silent if p.startswith("['dec']") and p.endswith(f"[{head}]['b']")}
    assert not silent - excused, f'{len(silent - excused)} of {total} arrays get no meta-gradient: {sorted(silent - excused)[:8]}'


def test_relu_codes_of_floor_halving_are_dead_at_initialisation():
    """The control of the test above: the same form with ReLU leaves arrays without a meta-gradient on the
    sinusoid MLP, so that test could fail."""
    with jax.enable_x64(True):
        learner, batch, meta = _setup('md', 'mlp', dict(FULL, **{'md.activation': 'relu'}))
        silent, _, _ = _silent_arrays(learner, meta, batch, jax.random.PRNGKey(0))
    assert any(p.startswith(("['enc']", "['dec']", "['link']")) for p in silent), silent


def test_sandwich_of_a_monotone_map_is_monotone():
    """Theorem 1 for the sandwich: the falsification search, run on g~(w) = P g(P w) around a perturbed monotone
    map with random positive definite factors, finds no gap below the certificate C_mono lambda_min(P)^2; the
    certificate is positive; and the sandwich of the paper's unconstrained map has no such certificate."""
    eps, overrides = 0.05, {'md.kronecker': 'sandwich', 'md.kronecker_eps': 0.05, 'md.head_init': 'learnable'}
    with jax.enable_x64(True):
        learner, batch, meta = _setup('md', 'mlp', overrides)
        geom = perturbed(jax.random.PRNGKey(7), meta['geom'], 0.5)
        spec = md.spec_from_config(tiny_config('md', **overrides), meta['init'])
        cert = md.sandwich_certificate(spec, md.split_geom(geom)[1], eps)
        assert float(cert['C_mono']) > 0
        worst = monotonicity.falsify_map(learner.geometry.inner(geom).params_of, meta['init'], jax.random.PRNGKey(0),
                                         restarts=4, steps=100, lr=0.1, z_scale=3.0)
        assert worst.gap >= float(cert['C_mono']) * (1 - 1e-9), (worst.gap, cert)


def test_step_matrix_mixes_within_tensors_only_with_K():
    """experiments.studies.step_factors: the step matrix S (phi_1 - phi_0 = -alpha S grad) of the map alone is diagonal
    inside every tensor (the blockIAF's scale and shift of block i read only blocks < i) and couples tensors; with
    the identity map and random K, MD's dual step has MetaCurvature's S, which mixes within tensors only."""
    from experiments.studies.step_factors import mixing, step_matrix
    with jax.enable_x64(True):
        # the paper's form (scales and shifts both read earlier blocks), whose coupling is not bounded by a margin
        learner, _, meta = _setup('md', 'mlp', {'md.head_init': 'learnable', 'md.encoder_layers': 1,
                                                'md.monotone': False, 'md.scale': 'exp', 'md.kronecker': 'none'})
        meta = dict(meta, init=perturbed(jax.random.PRNGKey(3), meta['init'], 0.5),
                    geom=perturbed(jax.random.PRNGKey(4), meta['geom'], 0.5))
        S = step_matrix(learner.geometry, meta, 0.01)
        mix = mixing(S, meta['init'])
        assert mix['within'] == 0.0 and mix['between'] > 1e-6, mix

        learner, _, meta = _setup('md', 'mlp', {'md.kronecker': 'dual_step'})
        meta['geom']['kron'] = perturbed(jax.random.PRNGKey(5), meta['geom']['kron'], 0.3)
        mc, _, mc_meta = _setup('metacurvature', 'mlp')
        mc_meta = dict(mc_meta, init=meta['init'], geom={'factors': meta['geom']['kron']})
        S, S_mc = step_matrix(learner.geometry, meta, 0.01), step_matrix(mc.geometry, mc_meta, 0.01)
        np.testing.assert_allclose(S, S_mc, rtol=1e-12, atol=1e-14)
        mix = mixing(S, meta['init'])
        assert mix['within'] > 0.1 and mix['between'] == 0.0, mix


def test_map_scales_are_the_step_matrix_diagonal():
    """experiments.studies.step_factors --map_scales: per tensor, the map's scales at z_0 are the diagonal of the
    dense step matrix S of the map alone (through MD's inner loop: an independent computation) on the authors' form
    with its heads moved (scales spread, depending on earlier blocks); the sandwich, whose map is not g, is refused."""
    from experiments.studies.step_factors import map_scales, step_matrix
    overrides = {'md.head_init': 'learnable', 'md.encoder_layers': 1, 'md.monotone': False, 'md.scale': 'exp',
                 'md.kronecker': 'none'}
    with jax.enable_x64(True):
        learner, _, meta = _setup('md', 'mlp', overrides)
        meta = dict(meta, init=perturbed(jax.random.PRNGKey(3), meta['init'], 0.5),
                    geom=perturbed(jax.random.PRNGKey(4), meta['geom'], 0.5))
        config = tiny_config('md', **overrides)
        scales = map_scales(config, meta)
        assert [shape for _, shape, _ in scales] == [np.shape(x) for x in jax.tree_util.tree_leaves(meta['init'])]
        flat = np.concatenate([x.ravel() for _, _, x in scales])
        assert flat.std() > 0.1
        np.testing.assert_allclose(flat, np.diagonal(step_matrix(learner.geometry, meta, 0.01)), rtol=1e-10)
    with pytest.raises(ValueError, match='sandwich'):
        map_scales(tiny_config('md', **{'md.kronecker': 'sandwich'}), meta)


def test_step_matrix_of_the_nonlinear_kfo_step():
    """experiments.studies.step_factors at a gradient v: MetaKFO's step f(v) = A v + C relu(B v) is positively
    homogeneous, so one step is exactly -alpha S(v) v (Euler) with S(v) = A + C D_v B, and S(0) = A drops the relu
    path; inside MD (md.kronecker='kfo_step') S(v) = J_g S_kfo(v), and the map's second-order terms leave a small
    residual."""
    from experiments.studies.step_factors import step_matrix, step_residual
    with jax.enable_x64(True):
        learner, batch, meta = _setup('metakfo', 'mlp')
        meta = dict(meta, geom=perturbed(jax.random.PRNGKey(6), meta['geom'], 0.3))
        v = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (ravel_pytree(meta['init'])[0].size,), jnp.float64))
        S, S0 = step_matrix(learner.geometry, meta, 0.01, at=v), step_matrix(learner.geometry, meta, 0.01)
        assert step_residual(learner.geometry, meta, 0.01, v, S) < 1e-12
        assert np.linalg.norm(S - S0) > 0.1 * np.linalg.norm(S)
        assert step_residual(learner.geometry, meta, 0.01, v, S0) > 1e-3   # the linearisation at 0 misses the relu path

        md_learner, _, md_meta = _setup('md', 'mlp', {'md.kronecker': 'kfo_step'})
        md_meta['geom']['kron'] = meta['geom']
        md_meta['init'] = meta['init']   # z_0; the monotone map at its initialisation is near the identity
        S_md = step_matrix(md_learner.geometry, md_meta, 0.01, at=v)
        loop = md_learner.geometry.inner(md_meta['geom'])
        z0 = ravel_pytree(md_meta['init'])[0]
        unravel = ravel_pytree(md_meta['init'])[1]
        J = np.asarray(jax.jacfwd(lambda z: ravel_pytree(loop.params_of(unravel(z)))[0])(z0))
        np.testing.assert_allclose(S_md, J @ S, rtol=1e-10, atol=1e-12)
        assert step_residual(md_learner.geometry, md_meta, 0.01, v, S_md) < 1e-2
