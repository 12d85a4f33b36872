"""The maths of the core (blockIAF, scan inner loop, meta-step), each test able to fail."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from md_meta import blockiaf, training
from md_meta.geometry import InnerLoop, sgd_step
from md_meta.inner import InnerConfig, adapt
from md_meta.meta import init_meta_params, meta_loss, make_meta_step
from md_meta.networks import make_model
from md_meta.tasks import sinusoid
from tests.helpers import random_like, tiny_config, tree_max_abs_diff, tree_vdot


def mlp_params(key=0, hidden=(8, 8)):
    return make_model('mlp', hidden=hidden).init(jax.random.PRNGKey(key), jnp.zeros((4, 1)))['params']


def perturbed_theta(spec, params, scale=0.3, key=1):
    theta = blockiaf.init(jax.random.PRNGKey(key), params, spec)
    return jax.tree_util.tree_map(lambda t, n: t + n, theta, random_like(jax.random.PRNGKey(key + 1), theta, scale))


@pytest.mark.parametrize('scale,monotone', [('bounded', False), ('exp', False), ('bounded', True)])
def test_blockiaf_identity_at_init_and_exact_inverse(scale, monotone):
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), mlp_params())
        spec = blockiaf.make_spec(params, scale=scale, monotone=monotone)
        theta0 = blockiaf.init(jax.random.PRNGKey(0), params, spec)
        z = random_like(jax.random.PRNGKey(5), params)
        assert tree_max_abs_diff(blockiaf.forward(theta0, z, spec), z) == 0.0
        theta = perturbed_theta(spec, params)
        phi = blockiaf.forward(theta, z, spec)
        assert tree_max_abs_diff(phi, z) > 1e-2  # the perturbed map is not the identity
        assert tree_max_abs_diff(blockiaf.inverse(theta, phi, spec), z) < 1e-10
        # the weights computed once per adaptation (MD's inner(theta)) give the same map; monotone: every
        # factor Fro <= 1
        weights = blockiaf.effective_weights(theta, monotone)
        assert tree_max_abs_diff(blockiaf.apply_weights(weights, z, spec), phi) == 0.0
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
    phi = blockiaf.forward(theta, z, spec)
    first, last = spec.blocks[0], spec.blocks[-1]
    z_last = dict(z, **{last: jax.tree_util.tree_map(lambda x: x + 1.0, z[last])})
    phi2 = blockiaf.forward(theta, z_last, spec)
    for b in spec.blocks[:-1]:
        assert tree_max_abs_diff(phi2[b], phi[b]) == 0.0
    z_first = dict(z, **{first: jax.tree_util.tree_map(lambda x: x + 1.0, z[first])})
    phi3 = blockiaf.forward(theta, z_first, spec)
    assert tree_max_abs_diff(phi3[last], phi[last]) > 1e-4


def _learner(method, steps=2, first_order=False, hidden=(8, 8)):
    cfg = tiny_config(method, **{'inner.steps': steps, 'inner.first_order': first_order, 'model.hidden': hidden})
    return training.build(cfg)


def _batch(key=0, tasks=3, shots=4):
    return sinusoid.sample(jax.random.PRNGKey(key), tasks, shots, shots)


def test_md_with_identity_map_is_maml_trajectory_and_meta_gradient():
    maml, md = _learner('maml'), _learner('md')
    key = jax.random.PRNGKey(0)
    meta_maml = init_meta_params(maml.learner, key, jnp.zeros((4, 1)))
    meta_md = init_meta_params(md.learner, key, jnp.zeros((4, 1)))
    assert tree_max_abs_diff(meta_maml['init'], meta_md['init']) == 0.0
    batch = _batch()
    (l1, _), g1 = jax.value_and_grad(meta_loss, argnums=1, has_aux=True)(maml.learner, meta_maml, batch, key)
    (l2, _), g2 = jax.value_and_grad(meta_loss, argnums=1, has_aux=True)(md.learner, meta_md, batch, key)
    assert float(l1) == float(l2)
    # dphi/dz = I at the identity map, so the meta-gradient w.r.t. z0 equals MAML's w.r.t. phi0
    assert tree_max_abs_diff(g1['init'], g2['init']) < 1e-6
    # and the per-step support losses agree
    task = jax.tree_util.tree_map(lambda a: a[0], batch)
    curves = []
    for exp, meta in ((maml, meta_maml), (md, meta_md)):
        apply = lambda phi: exp.learner.model.apply({'params': phi}, task.support_x)
        loss = lambda phi: jnp.mean((apply(phi) - task.support_y) ** 2)
        phi, c = adapt(exp.learner.geometry.inner(meta['geom']), loss, meta['init'], key, exp.learner.inner, True)
        curves.append((phi, c))
    assert tree_max_abs_diff(curves[0][0], curves[1][0]) == 0.0
    np.testing.assert_array_equal(curves[0][1]['loss'], curves[1][1]['loss'])


def test_linear_mirror_map_is_preconditioned_gd():
    """g(z) = P z with P SPD: z <- z - a grad L(Pz) is phi <- phi - a P grad L(phi) (eq. 6 -> eq. 3)."""
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), mlp_params())
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        d = flat.size
        a = jax.random.normal(jax.random.PRNGKey(0), (d, d)) / np.sqrt(d)
        P = a @ a.T + 0.5 * jnp.eye(d)
        alpha, K = 0.05, 3
        loop = InnerLoop(update=lambda z, g: sgd_step(z, g, alpha),
                         params_of=lambda z: unravel(P @ jax.flatten_util.ravel_pytree(z)[0]))
        task = jax.tree_util.tree_map(lambda x: x[0].astype(jnp.float64), _batch())
        model = make_model('mlp', hidden=(8, 8))
        loss = lambda phi: jnp.mean((model.apply({'params': phi}, task.support_x) - task.support_y) ** 2)
        z0 = unravel(jnp.linalg.solve(P, flat))
        phi_md, _ = adapt(loop, loss, z0, jax.random.PRNGKey(0), InnerConfig(K))
        phi = flat
        for _ in range(K):
            phi = phi - alpha * P @ jax.flatten_util.ravel_pytree(jax.grad(loss)(unravel(phi)))[0]
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(phi_md)[0], phi, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('method', ['maml', 'md'])
def test_second_order_meta_gradient_matches_finite_differences(method):
    with jax.enable_x64(True):
        exp = _learner(method, steps=2, hidden=(6,))
        meta = init_meta_params(exp.learner, jax.random.PRNGKey(0), jnp.zeros((4, 1)))
        meta = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), meta)
        # move away from the identity map so that the MD-specific terms matter
        meta = jax.tree_util.tree_map(lambda t, n: t + n, meta, random_like(jax.random.PRNGKey(9), meta, 0.1))
        batch = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), _batch(tasks=2))
        key = jax.random.PRNGKey(1)
        f = lambda m: meta_loss(exp.learner, m, batch, key)[0]
        grad = jax.grad(f)(meta)
        v = random_like(jax.random.PRNGKey(2), meta)
        eps = 1e-5
        plus = jax.tree_util.tree_map(lambda m, d: m + eps * d, meta, v)
        minus = jax.tree_util.tree_map(lambda m, d: m - eps * d, meta, v)
        fd = (f(plus) - f(minus)) / (2 * eps)
        an = tree_vdot(grad, v)
        np.testing.assert_allclose(float(an), float(fd), rtol=1e-6)
        # first-order drops the second-order terms: it must differ from the full meta-gradient
        exp_fo = _learner(method, steps=2, first_order=True, hidden=(6,))
        g_fo = jax.grad(lambda m: meta_loss(exp_fo.learner, m, batch, key)[0])(meta)
        assert abs(float(tree_vdot(g_fo, v)) - float(an)) > 1e-8


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
                fwd = jax.jit(lambda z: blockiaf.forward(theta, z, spec))
                for pair in range(20):
                    z = random_like(jax.random.PRNGKey(100 * seed + pair), params, 2.0)
                    zp = random_like(jax.random.PRNGKey(100 * seed + pair + 50), params, 2.0)
                    dz = jax.tree_util.tree_map(jnp.subtract, z, zp)
                    gap = tree_vdot(dz, jax.tree_util.tree_map(jnp.subtract, fwd(z), fwd(zp)))
                    norm2 = tree_vdot(dz, dz)
                    assert gap >= blockiaf.monotone_margin(spec) * norm2 - 1e-9


def test_meta_step_traces_once_and_learns():
    exp = _learner('md', steps=1)
    traces = []
    geom = exp.learner.geometry
    def counted_inner(theta):
        loop = geom.inner(theta)
        return loop._replace(update=lambda z, g: (traces.append(1), loop.update(z, g))[1])
    counted = geom._replace(inner=counted_inner)
    learner = exp.learner._replace(geometry=counted)
    meta = init_meta_params(learner, jax.random.PRNGKey(0), jnp.zeros((4, 1)))
    opt = optax.adam(1e-2)
    opt_state = opt.init(meta)
    step = make_meta_step(learner, opt)
    held_out = _batch(key=999, tasks=50)
    before = float(meta_loss(learner, meta, held_out, jax.random.PRNGKey(0))[0])
    for i in range(40):
        meta, opt_state, m = step(meta, opt_state, _batch(key=i, tasks=10), jax.random.PRNGKey(i))
        if i == 0:
            n_after_first = len(traces)
    assert len(traces) == n_after_first and step._cache_size() == 1
    after = float(meta_loss(learner, meta, held_out, jax.random.PRNGKey(0))[0])
    assert after < 0.9 * before, (before, after)


def test_sinusoid_sampler():
    t = sinusoid.sample(jax.random.PRNGKey(0), 7, 5, 3)
    assert t.support_x.shape == (7, 5, 1) and t.query_y.shape == (7, 3, 1)
    assert float(jnp.abs(t.support_x).max()) <= 5.0
    assert float(jnp.abs(t.support_y).max()) <= 5.0
    t2 = sinusoid.sample(jax.random.PRNGKey(0), 7, 5, 3)
    np.testing.assert_array_equal(t.support_y, t2.support_y)
    t3 = sinusoid.sample(jax.random.PRNGKey(1), 7, 5, 3)
    assert float(jnp.abs(t3.support_y - t.support_y).max()) > 0  # another key, other tasks


def _sine_residual(x, y, w):
    """Least-squares residual of y = c1 sin(w x) + c2 cos(w x), i.e. y = A sin(w x - b)."""
    basis = np.concatenate([np.sin(w * x), np.cos(w * x)], 1)
    coef = np.linalg.lstsq(basis, y, rcond=None)[0]
    return float(np.abs(basis @ coef - y).max())


def test_sinusoid_frequency():
    """Each task is A sin(w x - b) with w drawn from task.frequency (fixed w = 1 is MAML's family)."""
    for freq, w_true in (((1.0, 1.0), 1.0), ((2.0, 2.0), 2.0)):
        t = sinusoid.sample(jax.random.PRNGKey(3), 4, 8, 4, freq)
        for i in range(4):
            x = np.concatenate([t.support_x[i], t.query_x[i]]).astype(np.float64)
            y = np.concatenate([t.support_y[i], t.query_y[i]]).astype(np.float64)
            assert _sine_residual(x, y, w_true) < 1e-4
            assert _sine_residual(x, y, 3.0 - w_true) > 1e-2
    t = sinusoid.sample(jax.random.PRNGKey(3), 32, 8, 4, (0.8, 1.2))
    x, y = np.asarray(t.support_x, np.float64), np.asarray(t.support_y, np.float64)
    grid = np.linspace(0.8, 1.2, 401)
    best = [min(grid, key=lambda w: _sine_residual(x[i], y[i], w)) for i in range(32)]
    assert np.std(best) > 0.05 and min(best) >= 0.8 and max(best) <= 1.2


def _numpy_one_step_mse(init, task, alpha):
    """Per-task query MSE after one GD step on the support MSE of a ReLU MLP, back-propagated by hand
    in float64 (independent of JAX's autodiff)."""
    n = len(init)
    W = [np.asarray(init[f'layer_{i}']['dense']['kernel'], np.float64) for i in range(n)]
    b = [np.asarray(init[f'layer_{i}']['dense']['bias'], np.float64) for i in range(n)]
    out = []
    for x, y, xq, yq in zip(*(np.asarray(a, np.float64) for a in task)):
        hs, pre = [x], []
        for i in range(n):
            pre.append(hs[-1] @ W[i] + b[i])
            hs.append(np.maximum(pre[-1], 0) if i < n - 1 else pre[-1])
        d = 2 * (hs[-1] - y) / y.size
        gW, gb = [None] * n, [None] * n
        for i in reversed(range(n)):
            gW[i], gb[i] = hs[i].T @ d, d.sum(0)
            d = (d @ W[i].T) * (pre[i - 1] > 0) if i else None
        h = xq
        for i in range(n):
            h = h @ (W[i] - alpha * gW[i]) + (b[i] - alpha * gb[i])
            h = np.maximum(h, 0) if i < n - 1 else h
        out.append(np.mean((h - yq) ** 2))
    return np.array(out)


def test_maml_evaluation_matches_hand_written_numpy():
    """training.evaluate (here at another support size than meta-training's) equals a hand-written
    float64 one-step GD adaptation on the same tasks: the reported sinusoid MSE is what it claims."""
    exp = training.build(tiny_config('maml', **{'eval.num_tasks': 12, 'eval.batch_size': 12}))
    meta, _ = training.init_state(exp)
    meta = dict(meta, init=random_like(jax.random.PRNGKey(5), meta['init'], 0.5))
    r = training.evaluate(exp, meta, 'test', shots=6)
    assert r['shots'] == 6 and r['metrics']['loss']['n'] == 12
    other = exp.config.copy_and_resolve_references()
    other.task.shots = 6
    from md_meta import tasks
    task = tasks.make_source(other).sample(10_000_000, 12, 'test', exp.config.task.query)
    assert task.support_x.shape == (12, 6, 1)
    mse = _numpy_one_step_mse(meta['init'], task, exp.config.inner.step_size)
    np.testing.assert_allclose(r['metrics']['loss']['mean'], mse.mean(), rtol=1e-5)


def run_cli(args, root, timeout=300):
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([sys.executable, '-m', 'experiments.train', *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('flag,field', [
    ('--config.method=nope', 'config.method'),
    ('--config.task.shots=0', 'config.task.shots'),
    ('--config.inner.steps=-1', 'config.inner.steps'),
    ('--config.inner.step_size=-0.1', 'config.inner.step_size'),
])
def test_cli_rejects_invalid_config_before_compiling(flag, field, root, tmp_path):
    r = run_cli([flag, f'--workdir={tmp_path}/w'], root, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(err) == 1 and field in err[0], r.stderr
    assert not os.path.exists(os.path.join(tmp_path, 'w', 'metrics.jsonl'))


def test_cli_runs_end_to_end(root, tmp_path):
    wd = str(tmp_path / 'run')
    r = run_cli(['--config.meta.steps=30', '--config.train.log_every=10', '--config.train.steps_per_call=10', '--config.eval.num_tasks=50',
                 '--config.eval.batch_size=50', f'--workdir={wd}'], root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'ETA' in r.stdout and '| md | 10 | loss |' in r.stdout
    res = json.load(open(os.path.join(wd, 'results.json')))['results'][0]
    assert res['shots'] == 10 and res['metrics']['loss']['n'] == 50 and np.isfinite(res['metrics']['loss']['mean'])
    assert os.path.exists(os.path.join(wd, 'config.json'))


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
        g = jax.grad(loss)(blockiaf.forward(m['theta'], m['z'], spec), xs, ys)
        z1 = jax.tree_util.tree_map(lambda z, d: z - 0.1 * d, m['z'], g)
        return loss(blockiaf.forward(m['theta'], z1, spec), xq, yq)

    opt = optax.adam(1e-2)
    updates, _ = opt.update(jax.grad(query_loss)(meta), opt.init(meta))
    grad = jax.grad(query_loss)(optax.apply_updates(meta, updates))
    return {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grad['theta'])}


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


def test_cnn4_torch_init_is_pytorch_default():
    """model.init='torch' (the paper's authors' CNN4): every conv and dense weight and bias ~ U(+-1/sqrt(fan_in))
    (fan_in = 9 cin for a 3x3 conv), batch norm at scale 1, offset 0."""
    params = make_model('cnn4', init='torch', conv_impl='patches').init(
        jax.random.PRNGKey(0), jnp.zeros((5, 28, 28, 1)))['params']
    for name, fan_in, layer in [('layer_0', 9, params['layer_0']), ('layer_1', 576, params['layer_1']),
                                ('layer_4', 64, params['layer_4']['dense'])]:
        for leaf in ('kernel', 'bias'):
            a = np.abs(np.asarray(layer[leaf]))
            assert 0.5 / np.sqrt(fan_in) < a.max() <= 1 / np.sqrt(fan_in), (name, leaf, a.max())
    assert np.all(np.asarray(params['layer_2']['norm']['scale']) == 1)
    assert np.all(np.asarray(params['layer_2']['norm']['bias']) == 0)
    with pytest.raises(Exception, match='model.init'):
        training.build(tiny_config('maml', **{'model.init': 'torch'}))  # the sinusoid MLP has no 'torch' init


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
