"""Every loss geometry of the paper's Table 1 behind one interface (md_meta.methods).

(a) at initialisation every method that starts as GD reproduces MAML's inner trajectory exactly, on a
    tiny MLP and a tiny CNN4; (b) the second-order meta-gradient of a 2-step inner loop matches central
    finite differences in float64 for every method; (c) a few meta-steps lower the meta-loss and stay
    finite, on sinusoid and on a tiny convolutional 2-way episode.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from md_meta import config as config_lib
from md_meta import losses, methods
from md_meta.inner import InnerConfig, adapt
from md_meta.methods import anil
from md_meta.meta import MetaLearner, Task, init_meta_params, init_optimizer_state, make_meta_step, meta_loss
from md_meta.networks import make_model
from md_meta.tasks import sinusoid
from tests.helpers import perturbed, random_like, tiny_config, tree_max_abs_diff, tree_vdot

ALL = methods.names()
# every other method starts as MAML (mtnet: masks forced on); ANIL's inner loop moves the head alone
STARTS_AS_GD = [m for m in ALL if m not in ('maml', 'anil')]
# Methods that insert identity layers into the network (T = I, warps with W2 = 0): in exact arithmetic the
# same trajectory, but XLA may reassociate the extra matmuls (e.g. the conv kernel's gradient), so on the
# CNN they are compared to a few float32 ulps; every other method must match bitwise.
TRANSFORMED = ('tnet', 'mtnet', 'warpgrad')


def make_learner(method, net='mlp', steps=2, overrides=None):
    cfg = tiny_config(method, **{'inner.steps': steps, **(overrides or {})})
    config_lib.validate(cfg)
    geom = methods.make_geometry(cfg)
    if net == 'mlp':
        model, loss = make_model('mlp', layer=geom.layer, hidden=(6, 6)), 'mse'
    else:
        model, loss = make_model('cnn4', layer=geom.layer, conv_impl='patches', num_classes=2,
                                 features=4), 'xent'
    return MetaLearner(geom, model, loss, InnerConfig(steps), InnerConfig(steps, True))


def sinusoid_batch(key=0, tasks=2, shots=4):
    return sinusoid.sample(jax.random.PRNGKey(key), tasks, shots, shots)


def conv_batch(key=0, tasks=2, size=16):
    """Random 2-way 2-shot episodes of size x size grey images (16 -> 8 -> 4 -> 2 -> 1 after the pools)."""
    kx, kq = jax.random.split(jax.random.PRNGKey(key))
    y = jnp.tile(jnp.array([0, 1, 0, 1], jnp.int32), (tasks, 1))
    return Task(jax.random.normal(kx, (tasks, 4, size, size, 1)), y,
                jax.random.normal(kq, (tasks, 4, size, size, 1)), y)


def batch_for(net, **kw):
    return sinusoid_batch(**kw) if net == 'mlp' else conv_batch(**kw)


def trajectory(learner, meta, task, key):
    loss_fn = losses.get(learner.loss)
    loss = lambda phi: loss_fn(learner.model.apply({'params': phi, **meta['net']}, task.support_x), task.support_y)
    return adapt(learner.geometry.inner(meta['geom']), loss, meta['init'], key, learner.inner_config, final_stats=True)


@pytest.mark.parametrize('net', ['mlp', 'cnn'])
def test_methods_start_as_maml_trajectory(net):
    steps, key = 3, jax.random.PRNGKey(0)
    task = jax.tree_util.tree_map(lambda a: a[0], batch_for(net))
    ref_learner = make_learner('maml', net, steps)
    ref_meta = init_meta_params(ref_learner, key, task.support_x)
    ref_phi, ref_curves = jax.jit(lambda m: trajectory(ref_learner, m, task, key))(ref_meta)
    assert float(ref_curves['loss'][-1]) < float(ref_curves['loss'][0])
    for method in STARTS_AS_GD:
        learner = make_learner(method, net, steps, {'mtnet.init_logit': 50.0})
        meta = init_meta_params(learner, key, task.support_x)
        phi0 = jax.jit(lambda m: (lambda loop: loop.params_of(loop.start(m['init'], key)))(
            learner.geometry.inner(m['geom'])))(meta)   # eagerly, MD's map alone takes seconds
        assert tree_max_abs_diff(phi0, ref_meta['init']) == 0.0, method
        phi, curves = jax.jit(lambda m: trajectory(learner, m, task, key))(meta)
        # the same values up to rounding: a transformed network computes another product order, and XLA may
        # contract a multiply-add into an FMA in one program and not in the other (seen for Meta-SGD's per-element
        # step on CNN4 at LLVM opt level 0: 2e-9; for T-net's MLP under XLA:CPU's loop emitters: 1 ulp)
        rtol, atol = (2e-6, 1e-7) if net == 'cnn' else (1e-6, 1e-8)
        np.testing.assert_allclose(curves['loss'], ref_curves['loss'], rtol=rtol, err_msg=method)
        for a, b in zip(jax.tree_util.tree_leaves(phi), jax.tree_util.tree_leaves(ref_phi)):
            np.testing.assert_allclose(a, b, rtol=5 * rtol, atol=atol, err_msg=method)


def test_mtnet_masks_freeze_units():
    """With masks sampled at init_logit = 0 some output units are frozen: their parameters do not move."""
    learner = make_learner('mtnet', 'mlp', 2)
    task = jax.tree_util.tree_map(lambda a: a[0], sinusoid_batch())
    key = jax.random.PRNGKey(3)
    meta = init_meta_params(learner, key, task.support_x)
    phi, _ = trajectory(learner, meta, task, key)
    masks = learner.geometry.inner(meta['geom']).start(meta['init'], key)['mask']
    m = np.asarray(masks['layer_0'])
    assert set(np.unique(m)) <= {0.0, 1.0} and 0 < m.sum() < m.size
    moved = np.abs(np.asarray(phi['layer_0']['dense']['kernel'] - meta['init']['layer_0']['dense']['kernel'])).max(0)
    assert np.all(moved[m == 0] == 0) and np.all(moved[m == 1] > 0)


@pytest.mark.parametrize('net', ['mlp', 'cnn'])
def test_anil_adapts_the_head_alone(net):
    """ANIL's inner loop leaves every body leaf bitwise at its start and moves every head leaf (the last
    layer, layer_N); MAML from the same start moves the body too (so the check could fail)."""
    key = jax.random.PRNGKey(0)
    task = jax.tree_util.tree_map(lambda a: a[0], batch_for(net))
    out = {}
    for method in ('anil', 'maml'):
        learner = make_learner(method, net, 3, {'inner.step_size': 0.1 if net == 'cnn' else 0.01})
        meta = init_meta_params(learner, key, task.support_x)
        phi, curves = jax.jit(lambda m: trajectory(learner, m, task, key))(meta)
        out[method] = meta['init'], phi, curves
    start, phi, curves = out['anil']
    head = 'layer_2' if net == 'mlp' else 'layer_4'
    assert anil.head_of(start) == head
    for name in start:
        for a, b in zip(jax.tree_util.tree_leaves(start[name]), jax.tree_util.tree_leaves(phi[name])):
            a, b = np.asarray(a), np.asarray(b)
            if name == head:
                assert np.any(a != b), name
            else:
                assert np.array_equal(a, b), name
    assert float(curves['loss'][-1]) < float(curves['loss'][0])
    assert tree_max_abs_diff(out['maml'][1]['layer_0'], start['layer_0']) > 0.0   # MAML moves the body


@pytest.mark.parametrize('net', ['mlp', 'cnn'])
def test_anil_with_an_all_ones_mask_is_maml(net):
    """The masked step with m = 1 everywhere is MAML: the same inner trajectory and the same second-order
    meta-gradient, bitwise; with ANIL's mask the meta-gradient differs (the mask matters)."""
    key = jax.random.PRNGKey(0)
    batch = batch_for(net, tasks=2)
    maml_learner = make_learner('maml', net, 2, {'inner.step_size': 0.1})
    all_ones = methods.make_geometry(tiny_config('anil'))._replace(
        inner=anil.masked_gradient_descent(0.1, lambda phi: jax.tree_util.tree_map(lambda _: 1, phi)))
    ones_learner = maml_learner._replace(geometry=all_ones)
    anil_learner = make_learner('anil', net, 2, {'inner.step_size': 0.1})
    meta = init_meta_params(maml_learner, key, batch.support_x[0])
    task = jax.tree_util.tree_map(lambda a: a[0], batch)
    grads, trajectories = {}, {}
    for name, learner in (('maml', maml_learner), ('ones', ones_learner), ('anil', anil_learner)):
        trajectories[name] = jax.jit(lambda m: trajectory(learner, m, task, key))(meta)
        grads[name] = jax.jit(jax.grad(lambda m: meta_loss(learner, m, batch, key)[0]))(meta)
    assert tree_max_abs_diff(trajectories['ones'], trajectories['maml']) == 0.0
    assert tree_max_abs_diff(grads['ones'], grads['maml']) == 0.0
    assert tree_max_abs_diff(grads['anil'], grads['maml']) > 0.0


def test_anil_head_is_the_last_layer_or_named():
    """The head of md-meta's networks is layer_N (layer_10 after layer_9; ResNet-12's classifier); Flax's
    names of one module class by their number; mixed names are refused in one line naming anil.head,
    unless anil.head names the entry."""
    leaf = jnp.zeros(1)
    assert anil.head_of({f'layer_{i}': leaf for i in range(11)}) == 'layer_10'
    assert anil.head_of({f'Dense_{i}': leaf for i in range(12)}) == 'Dense_11'
    v = jax.eval_shape(make_model('resnet12', num_classes=5, features=4).init, jax.random.PRNGKey(0),
                       jnp.ones((5, 16, 16, 3)))
    assert anil.head_of(v['params']) == 'layer_4' and v['params']['layer_4']['dense']['kernel'].shape[-1] == 5
    mixed = {'Conv_0': leaf, 'Conv_1': leaf, 'Dense_0': leaf}
    with pytest.raises(config_lib.ConfigError, match=r'^config\.anil\.head: cannot tell .*Dense_0'):
        anil.head_of(mixed)
    assert anil.head_of(mixed, 'Dense_0') == 'Dense_0'
    with pytest.raises(config_lib.ConfigError, match=r'^config\.anil\.head:'):
        anil.head_of(mixed, 'Dense_1')
    mask = anil.head_mask({'layer_0': {'w': leaf, 'b': leaf}, 'layer_1': {'w': leaf}})
    assert mask == {'layer_0': {'w': 0, 'b': 0}, 'layer_1': {'w': 1}}
    with pytest.raises(config_lib.ConfigError, match='anil.head'):
        config_lib.validate(tiny_config('anil', **{'anil.head': ''}))


@pytest.mark.parametrize('method', ALL)
def test_second_order_meta_gradient_matches_finite_differences(method):
    with jax.enable_x64(True):
        learner = make_learner(method, 'mlp', 2, {'ecml.penalty_weight': 1.0})
        batch = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), sinusoid_batch(tasks=2))
        meta = init_meta_params(learner, jax.random.PRNGKey(0), batch.support_x[0])
        meta = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), meta)
        # move away from the identity geometry so that every method-specific term matters
        meta = perturbed(jax.random.PRNGKey(9), meta, 0.1)
        v = random_like(jax.random.PRNGKey(2), meta)
        if method == 'mtnet':  # straight-through surrogate gradient for the mask logits: not a derivative
            v['geom'] = jax.tree_util.tree_map(jnp.zeros_like, v['geom'])
        key = jax.random.PRNGKey(1)
        eps = 1e-5
        f = lambda m: meta_loss(learner, m, batch, key)[0]

        @jax.jit  # one compilation: the analytic directional derivative and the two shifted losses
        def check(m):
            shift = lambda sgn: jax.tree_util.tree_map(lambda a, d: a + sgn * eps * d, m, v)
            return tree_vdot(jax.grad(f)(m), v), (f(shift(1.0)) - f(shift(-1.0))) / (2 * eps)

        an, fd = check(meta)
        assert np.isfinite(float(an))
        np.testing.assert_allclose(float(an), float(fd), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('net', ['mlp', 'cnn'])
@pytest.mark.parametrize('method', ALL)
def test_meta_steps_lower_meta_loss(method, net):
    learner = make_learner(method, net, 1, {'inner.step_size': 0.1 if net == 'cnn' else 0.01})
    batch = batch_for(net, tasks=3)
    key = jax.random.PRNGKey(0)
    meta = init_meta_params(learner, key, batch.support_x[0])
    opt = optax.adam(3e-3)
    opt_state = init_optimizer_state(opt, meta)
    step = make_meta_step(learner, opt)
    losses_ = []
    for _ in range(6):  # the reported meta-loss is that of the parameters before each update
        meta, opt_state, m = step(meta, opt_state, batch, key)
        losses_.append(float(m['meta_loss']))
        assert int(m['skipped']) == 0
    assert np.all(np.isfinite(losses_)), (method, net, losses_)
    assert losses_[-1] < losses_[0], (method, net, losses_)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(meta))


@pytest.mark.parametrize('method', ALL)
def test_config_switch_builds_every_method(method):
    """--config.method=NAME is the only switch: the trainer's build and init work for every method."""
    from md_meta import experiment
    exp = experiment.build(tiny_config(method))
    meta, _ = experiment.init_state(exp)
    assert set(meta) == {'init', 'geom', 'net'}
    assert (('warp' in meta['net']) == (exp.learner.geometry.layer is not None))


def test_each_method_section_of_the_config_is_its_modules():
    """base_config's method sections are the method modules' config_section(), in the registry's order, and
    a config.json written with the sections in another order (before they moved into the modules) reads back
    as the same run."""
    import json
    from md_meta import workdirs
    c = config_lib.base_config()
    sections = methods.config_sections()
    assert list(sections) == [m for m in ALL if m in ('md', 'mtnet', 'anil', 'ecml')]
    for name, section in sections.items():
        assert c[name].to_json() == section.to_json() == methods.module(name).config_section().to_json()
    d = json.loads(c.to_json())
    d = {k: d[k] for k in ('method', 'seed', 'task', 'model', 'inner', 'meta', 'md', 'mtnet', 'anil', 'ecml', 'eval',
                           'train', 'dist')}
    assert workdirs.config_differences(workdirs.config_from_dict(d), c) == []
    c.md.shift_lipschitz = 0.5   # a float field that defaults to None
    with pytest.raises(TypeError):
        c.md.shift_lipschitz = 'big'


def test_own_model_refusal_names_the_methods_that_insert_no_layer():
    import flax.linen as nn
    from md_meta import experiment

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x)

    fit = [m for m in ALL if m not in TRANSFORMED]
    with pytest.raises(config_lib.ConfigError, match=rf"'tnet' inserts layers .* \({', '.join(fit)}\)"):
        experiment.build(tiny_config('tnet'), model=Net())


def test_adding_a_method_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    """WORKSPACE.md's "How to add a method", followed literally for a throwaway method (sign descent with a
    meta-learned step size): a module with make(config) -> Geometry, its config section and its checks, and a
    line in methods._MODULES; the config, trainer, evaluator and results then take it like any other method."""
    pkg = tmp_path / 'throwaway_methods'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'signgd.py').write_text(
        '"""Sign descent: phi <- phi - exp(log_alpha) * sign(grad L(phi)); log_alpha is meta-learned."""\n'
        'import jax\n'
        'import jax.numpy as jnp\n'
        'import ml_collections\n'
        'from md_meta.geometry import Geometry, InnerLoop\n\n\n'
        'def make(config):\n'
        '    def inner(theta):\n'
        '        alpha = jnp.exp(theta["log_alpha"])\n'
        '        return InnerLoop(update=lambda phi, grad: jax.tree_util.tree_map(\n'
        '            lambda p, g: p - alpha * jnp.sign(g), phi, grad))\n'
        '    start = jnp.log(config.signgd.alpha)\n'
        '    return Geometry(init=lambda key, params: (params, {"log_alpha": start}), inner=inner)\n\n\n'
        'def config_section():\n'
        '    return ml_collections.ConfigDict({"alpha": 0.01})\n\n\n'
        'def validate(config, require):\n'
        '    require(config.signgd.alpha > 0, "signgd.alpha", "must be positive")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(methods._MODULES, 'signgd', 'throwaway_methods.signgd')
    from md_meta import evaluation, experiment, training
    c = tiny_config('signgd', **{'meta.steps': 30, 'meta.lr': 1e-2})
    config_lib.validate(c)
    with pytest.raises(config_lib.ConfigError, match='signgd.alpha: must be positive'):
        config_lib.validate(tiny_config('signgd', **{'signgd.alpha': 0.0}))
    exp = experiment.build(c)
    meta, _, hist = training.train(exp, str(tmp_path / 'run'), log=lambda s: None)
    assert float(meta['geom']['log_alpha']) != float(jnp.log(0.01))   # the step size is meta-learned
    assert all(np.isfinite(h['meta_loss']) for h in hist)
    r = evaluation.evaluate(exp, meta, 'test', num_tasks=20)
    assert np.isfinite(r['metrics']['loss']['mean'])
