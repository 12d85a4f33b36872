"""The scan inner loop (md_meta.inner) against special cases: MD with the identity map is MAML, a linear
mirror map is preconditioned GD."""
import jax
import jax.numpy as jnp
import numpy as np

from md_meta import experiment
from md_meta.geometry import InnerLoop, sgd_step
from md_meta.inner import InnerConfig, adapt
from md_meta.meta import init_meta_params, meta_loss
from md_meta.networks import make_model
from md_meta.tasks import sinusoid
from tests.helpers import tiny_config, tree_max_abs_diff


def mlp_params(key=0, hidden=(8, 8)):
    return make_model('mlp', hidden=hidden).init(jax.random.PRNGKey(key), jnp.zeros((4, 1)))['params']


def _learner(method, steps=2, first_order=False, hidden=(8, 8)):
    cfg = tiny_config(method, **{'inner.steps': steps, 'inner.first_order': first_order, 'model.hidden': hidden})
    return experiment.build(cfg)


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
        phi, c = adapt(exp.learner.geometry.inner(meta['geom']), loss, meta['init'], key, exp.learner.inner_config, True)
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


def test_computed_params_run_k_plus_one_bodies_and_select_runs_k():
    """A loop whose phi is computed from the state (here phi = 2 z) scans K + 1 bodies, the last only computing
    phi_K: the same phi_K and K losses as the unrolled definition, with or without the final stats. A loop
    whose phi only selects from the state scans K bodies. K = 1 runs no loop, with the unrolled definition's
    meta-gradient and stats; at K = 2 the meta-gradient through the bodies is the unrolled one's."""
    steps, alpha = 3, 0.1
    params = mlp_params()
    x = jnp.linspace(-1.0, 1.0, 8)[:, None]
    model = make_model('mlp', hidden=(8, 8))
    loss = lambda phi: jnp.mean((model.apply({'params': phi}, x) - jnp.sin(3 * x)) ** 2)
    double = InnerLoop(update=lambda z, g: sgd_step(z, g, alpha), params_of=lambda z: jax.tree_util.tree_map(
        lambda a: 2.0 * a, z))
    z, want = params, []
    for _ in range(steps):   # the definition, unrolled in Python
        phi = double.params_of(z)
        want.append(float(loss(phi)))
        z = double.update(z, jax.grad(loss)(phi))
    key, cfg = jax.random.PRNGKey(0), InnerConfig(steps)
    for final_stats in (False, True):
        phi, curves = jax.jit(lambda p: adapt(double, loss, p, key, cfg, final_stats))(params)
        assert tree_max_abs_diff(phi, double.params_of(z)) < 1e-6
        np.testing.assert_allclose(curves['loss'][:steps], want, rtol=1e-5)
        assert curves['loss'].shape == (steps + final_stats,)
    scans = lambda loop, cfg=cfg: [e.params['length'] for e in jax.make_jaxpr(
        lambda p: adapt(loop, loss, p, key, cfg))(params).eqns if e.primitive.name == 'scan']
    assert scans(double) == [steps + 1]
    assert scans(InnerLoop(update=double.update)) == [steps]
    # K = 1: one step, no loop, for both kinds; its meta-gradient and stats are the unrolled definition's
    one = InnerConfig(1, remat=True)
    assert scans(double, one) == [] and scans(InnerLoop(update=double.update), one) == []
    unrolled = lambda p: loss(double.params_of(double.update(p, jax.grad(loss)(double.params_of(p)))))
    one_step = lambda p: loss(adapt(double, loss, p, key, one)[0])
    assert tree_max_abs_diff(jax.grad(one_step)(params), jax.grad(unrolled)(params)) < 1e-5
    phi, curves = adapt(double, loss, params, key, one, final_stats=True)
    np.testing.assert_allclose(curves['loss'], [want[0], float(loss(phi))], rtol=1e-5)
    # K = 2: the meta-gradient through the K + 1 bodies (and their cond), with and without remat
    step_once = lambda p: double.update(p, jax.grad(loss)(double.params_of(p)))
    unrolled2 = lambda p: loss(double.params_of(step_once(step_once(p))))
    for remat in (False, True):
        two = lambda p: loss(adapt(double, loss, p, key, InnerConfig(2, remat=remat))[0])
        assert tree_max_abs_diff(jax.grad(two)(params), jax.grad(unrolled2)(params)) < 1e-5
