"""The speed switches change speed only: patches conv == lax conv (under vmap and second-order
differentiation), remat on/off and the unroll give the same meta-gradient, per-task and batched meta-gradients agree, and bf16/fp16 compute gives a meta-gradient close
to fp32's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_meta import methods
from md_meta.config import ConfigError, validate
from md_meta.inner import InnerConfig
from md_meta.meta import (MetaLearner, Task, chunk_size, init_meta_params, make_evaluate, meta_loss,
                          meta_value_and_grad, resolve_task_batching, resolve_task_gradients,
                          task_batching_for)
from md_meta.methods import tnet, warpgrad
from md_meta.networks import (ConvBlock, batch_stats, channel_sign, conv3x3_lax, conv3x3_patches, make_model,
                              max_pool_2x2, pool_bn_relu)

from tests.helpers import tiny_config, tree_max_abs_diff



def _cos(a, b):
    a = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(a)])
    b = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(b)])
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _rel(a, b):
    num = sum(float(jnp.sum(jnp.square(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    den = sum(float(jnp.sum(jnp.square(y))) for y in jax.tree_util.tree_leaves(b))
    return (num / den) ** 0.5


def _conv_inner_outer(conv):
    """A per-task MAML-like objective through one inner gradient step: second order in the kernel."""
    def outer(kernel, x, y):
        inner = lambda k: jnp.mean(jnp.square(jnp.tanh(conv(x, k)) - y))
        k1 = kernel - 0.5 * jax.grad(inner)(kernel)
        return jnp.mean(jnp.square(jnp.tanh(conv(x, k1)) - y))
    return outer


@pytest.mark.parametrize('cin,cout', [(3, 5), (1, 16)])  # both branches of feature_matmul's weight gradient
def test_patches_conv_matches_lax_under_vmap_and_second_order(cin, cout):
    kx, kk, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    tasks, n, h, w = 3, 4, 7, 9  # odd sizes exercise the padding
    x = jax.random.normal(kx, (tasks, n, h, w, cin))
    kernel = 0.3 * jax.random.normal(kk, (tasks, 3, 3, cin, cout))
    y = jax.random.normal(ky, (tasks, n, h, w, cout))
    out_p = jax.vmap(conv3x3_patches)(x, kernel)
    out_l = jax.vmap(conv3x3_lax)(x, kernel)
    np.testing.assert_allclose(out_p, out_l, rtol=1e-5, atol=1e-5)
    # the gradient of a loss through an inner gradient step (second order), w.r.t. kernel and inputs
    grad = lambda conv: jax.jit(jax.vmap(jax.grad(_conv_inner_outer(conv), argnums=(0, 1))))
    gp, gl = grad(conv3x3_patches)(kernel, x, y), grad(conv3x3_lax)(kernel, x, y)
    scale = max(1.0, max(float(jnp.max(jnp.abs(g))) for g in gl))
    assert tree_max_abs_diff(gp, gl) < 1e-5 * scale


@pytest.mark.parametrize('shape,ties', [((3, 6, 6, 4), False), ((2, 7, 5, 4), False), ((3, 6, 6, 4), True)])
def test_fused_bn_relu_pool_matches_plain_formula_to_second_order(shape, ties):
    """pool_bn_relu (pool first, closed-form backward), with a negative scale's sign moved onto x as
    NormReluPool does, == max_pool_2x2(relu(bn(x))) by autodiff: values, gradients and a Hessian-vector
    product, in float64, with negative scales, odd sizes and tied maxima (where JAX splits the gradient
    equally, and so must the closed form)."""
    def plain(x, s, b):
        mean, rstd = batch_stats(x, 1e-5)
        return max_pool_2x2(jax.nn.relu((x - mean) * rstd * s + b))

    with jax.enable_x64(True):
        k = jax.random.split(jax.random.PRNGKey(0), 6)
        x = jax.random.normal(k[0], shape, jnp.float64)
        if ties:
            x = jnp.round(2 * x) / 2
        s = jnp.array([1.0, -0.5, 0.7, -2.0], jnp.float64)
        b = 0.3 * jax.random.normal(k[1], (4,), jnp.float64)
        fused = lambda x, s, b: pool_bn_relu(channel_sign(s) * x, channel_sign(s) * s, b, 1e-5)
        np.testing.assert_array_equal(fused(x, s, b), plain(x, s, b))
        g = jax.random.normal(k[2], plain(x, s, b).shape, jnp.float64)
        loss = lambda f: (lambda *a: jnp.sum(f(*a) * g))
        g_plain, g_fused = jax.grad(loss(plain), (0, 1, 2))(x, s, b), jax.grad(loss(fused), (0, 1, 2))(x, s, b)
        assert tree_max_abs_diff(g_fused, g_plain) < 1e-12
        v = (jax.random.normal(k[3], x.shape, jnp.float64), jax.random.normal(k[4], (4,), jnp.float64),
             jax.random.normal(k[5], (4,), jnp.float64))
        hvp = lambda f: jax.grad(lambda *a: sum(jnp.vdot(gi, vi) for gi, vi in zip(jax.grad(loss(f), (0, 1, 2))(*a), v)),
                                 (0, 1, 2))(x, s, b)
        h_plain, h_fused = hvp(plain), hvp(fused)
        assert tree_max_abs_diff(h_fused, h_plain) < 1e-10 * max(1.0, max(float(jnp.max(jnp.abs(h))) for h in h_plain))
        per_task = jax.vmap(jax.grad(loss(fused)), in_axes=(0, None, None))(jnp.stack([x, 2 * x]), s, b)
        np.testing.assert_allclose(per_task[0], g_fused[0], atol=1e-12)


@pytest.mark.parametrize('transform', ['none', 'tnet', 'warpgrad'])
def test_conv_block_matches_its_definition(transform):
    layer = {'none': None, 'tnet': tnet.TLayer, 'warpgrad': warpgrad.WarpLayer}[transform]
    """ConvBlock (patches conv, fused pool_bn_relu, the norm's sign and T-net's T folded into the kernel, the
    conv bias left out as it cancels) == the block written out with lax.conv: conv -> + b -> [T] -> bn ->
    relu -> pool -> [warp], with random parameters, transforms and norm scales of both signs."""
    kx, kv, kt = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (4, 9, 9, 3))
    block = ConvBlock(8, 'patches', layer)
    variables = block.init(kv, x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.3 * jax.random.normal(kt, v.shape), variables)
    variables['params']['norm']['scale'] = variables['params']['norm']['scale'] * jnp.array([1, -1] * 4)
    variables['params']['bias'] = variables['params']['bias'] + 2.0
    p, warp = variables['params'], variables.get('warp', {}).get('transform', {})
    h = conv3x3_lax(x, p['kernel']) + p['bias']
    if transform == 'tnet':
        h = h @ warp['T']
    mean, rstd = batch_stats(h, 1e-5)
    h = max_pool_2x2(jax.nn.relu((h - mean) * rstd * p['norm']['scale'] + p['norm']['bias']))
    if transform == 'warpgrad':
        h = h + jax.nn.relu(h @ warp['w1'] + warp['b1']) @ warp['w2']
    np.testing.assert_allclose(block.apply(variables, x), h, rtol=1e-4, atol=1e-5)


def _image_learner(method='maml', *, conv_impl='patches', steps=2, remat=False, unroll=1, dtype='float32',
                   task_batching='vmap', task_chunk=1):
    c = tiny_config(method)
    c.inner.step_size = 0.1
    geometry = methods.make_geometry(c)
    model = make_model('cnn4', layer=geometry.layer, conv_impl=conv_impl, num_classes=3, features=8)
    inner = InnerConfig(steps, False, unroll, remat)
    return MetaLearner(geometry, model, 'xent', inner, inner, task_batching, dtype, task_chunk=task_chunk)


def _image_batch(tasks=2, ways=3, shots=1, query=2, size=16):
    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    lab = lambda k: jnp.tile(jnp.arange(ways).repeat(k), (tasks, 1))
    return Task(jax.random.normal(ks[0], (tasks, ways * shots, size, size, 1)), lab(shots),
                jax.random.normal(ks[1], (tasks, ways * query, size, size, 1)), lab(query))


def _meta_grad(learner, batch, meta=None):
    if meta is None:
        meta = init_meta_params(learner, jax.random.PRNGKey(0), batch.support_x[0])
    g = jax.jit(jax.grad(lambda m: meta_loss(learner, m, batch, jax.random.PRNGKey(2))[0]))(meta)
    return meta, g


def test_cnn4_patches_and_lax_same_meta_gradient():
    batch = _image_batch()
    meta, g_p = _meta_grad(_image_learner(conv_impl='patches'), batch)
    _, g_l = _meta_grad(_image_learner(conv_impl='lax'), batch, meta)
    assert _rel(g_p, g_l) < 1e-4


def test_remat_same_meta_gradient_cnn():
    batch = _image_batch()
    meta, g0 = _meta_grad(_image_learner(steps=3, remat=False), batch)
    _, g1 = _meta_grad(_image_learner(steps=3, remat=True), batch, meta)
    _, g2 = _meta_grad(_image_learner(steps=3, remat=True, unroll=3), batch, meta)
    assert _rel(g1, g0) < 1e-5 and _rel(g2, g0) < 1e-5


def test_remat_and_unroll_same_meta_gradient_md_mlp():
    from md_meta.training import build
    exp = build(tiny_config('md', **{'inner.steps': 4}))
    batch = exp.source.sample(0, 3, 'train', 4)
    base = exp.learner._replace(inner=exp.learner.inner._replace(remat=False, unroll=1))
    meta, g0 = _meta_grad(base, batch)
    for inner in (base.inner._replace(remat=True, unroll=2),):
        _, g = _meta_grad(base._replace(inner=inner), batch, meta)
        assert _rel(g, g0) < 1e-5, inner


def _value_and_grad_both_ways(learner, batch, meta):
    key = jax.random.PRNGKey(3)
    return [jax.jit(lambda m, tg=tg: meta_value_and_grad(learner._replace(task_gradients=tg), m, batch, key))(meta)
            for tg in ('batched', 'per_task')]


@pytest.mark.parametrize('method', ['md', 'mtnet', 'ecml'])  # blockIAF; per-task random masks; a penalty
def test_per_task_meta_gradient_matches_batched_mlp(method):
    """meta.task_gradients: mean_t grad L_t (per_task) == grad mean_t L_t (batched), value and metrics too."""
    from md_meta.training import build
    exp = build(tiny_config(method, **{'inner.steps': 2}))
    batch = jax.tree_util.tree_map(jnp.asarray, exp.source.sample(0, 3, 'train', 4))
    meta = init_meta_params(exp.learner, jax.random.PRNGKey(0), batch.support_x[0])
    ((l_b, m_b), g_b), ((l_p, m_p), g_p) = _value_and_grad_both_ways(exp.learner, batch, meta)
    np.testing.assert_allclose(l_p, l_b, rtol=1e-6)
    np.testing.assert_allclose(m_p['loss'], m_b['loss'], rtol=1e-6)
    # ECML's conditioning penalty amplifies float32 rounding: 5e-5 apart on one CPU (AVX-512 EPYC), against
    # 4e-13 in float64 there, so the two forms are the same function; the others agree to < 1e-5.
    assert _rel(g_p, g_b) < (2e-4 if method == 'ecml' else 1e-5)


@pytest.mark.parametrize('task_batching', ['vmap', 'map'])
def test_per_task_meta_gradient_matches_batched_cnn(task_batching):
    """The same on CNN4 with WarpGrad (meta-learned 'warp' collection in the network) under both batchings."""
    learner = _image_learner('warpgrad', task_batching=task_batching)
    batch = _image_batch()
    meta = init_meta_params(learner, jax.random.PRNGKey(0), batch.support_x[0])
    meta['net'] = jax.tree_util.tree_map(lambda w: w + 0.1, meta['net'])  # w2 = 0 at init: make the warp act
    ((l_b, m_b), g_b), ((l_p, m_p), g_p) = _value_and_grad_both_ways(learner, batch, meta)
    np.testing.assert_allclose(l_p, l_b, rtol=1e-6)
    np.testing.assert_allclose(m_p['accuracy'], m_b['accuracy'])
    assert _rel(g_p, g_b) < 1e-5


def test_task_map_matches_vmap_cnn():
    """meta.task_batching='map' (lax.map over vmapped chunks: 4 tasks in 2 chunks of 2, and in 4 chunks of 1)
    gives vmap's meta-loss, metrics and meta-gradient, with either task_gradients; the evaluation path too.
    (WarpGrad's 'net' collection under 'map': test_per_task_meta_gradient_matches_batched_cnn[map].)"""
    batch = _image_batch(tasks=4)
    learners = [_image_learner(task_batching=tb, task_chunk=ch)._replace(task_gradients=tg)
                for tb, ch, tg in (('vmap', 1, 'per_task'), ('map', 2, 'per_task'), ('map', 1, 'batched'))]
    meta = init_meta_params(learners[0], jax.random.PRNGKey(0), batch.support_x[0])
    key = jax.random.PRNGKey(3)
    (l_v, m_v), g_v = jax.jit(lambda m: meta_value_and_grad(learners[0], m, batch, key))(meta)
    for learner in learners[1:]:
        (l, m), g = jax.jit(lambda mm: meta_value_and_grad(learner, mm, batch, key))(meta)
        np.testing.assert_allclose(l, l_v, rtol=1e-6)
        np.testing.assert_allclose(m['accuracy'], m_v['accuracy'])
        assert _rel(g, g_v) < 1e-5, learner
    ev = [make_evaluate(learner)(meta, batch, key) for learner in learners[:2]]
    np.testing.assert_allclose(ev[1][0]['loss'], ev[0][0]['loss'], rtol=1e-5)
    np.testing.assert_allclose(ev[1][1]['loss'], ev[0][1]['loss'], rtol=1e-5)


def test_resolve_task_batching_and_config():
    single_cpu = jax.default_backend() == 'cpu' and jax.device_count() == 1
    assert resolve_task_batching('auto', images=True) == ('map' if single_cpu else 'vmap')
    assert resolve_task_batching('auto', images=False) == 'vmap'
    assert resolve_task_batching('map', images=False) == 'map'
    with pytest.raises(ValueError, match='task_batching'):
        resolve_task_batching('pmap', images=True)
    # equal chunks only (no remainder program): the largest divisor of the batch <= task_chunk
    assert [chunk_size(n, 2) for n in (1, 2, 3, 4, 32)] == [1, 2, 1, 2, 2]
    assert [chunk_size(n, 4) for n in (6, 7, 8, 3)] == [3, 1, 4, 3]
    with pytest.raises(ValueError, match='task_chunk'):
        chunk_size(4, 0)
    images, vectors = _image_batch(tasks=3), Task(*(jnp.zeros((25, 5, 1)),) * 4)
    assert task_batching_for(_image_learner(task_batching='map', task_chunk=2), images) == ('map', 1)
    assert task_batching_for(_image_learner(task_batching='auto', task_chunk=2), vectors) == ('vmap', None)
    for field, value in (('task_batching', 'pmap'), ('task_chunk', 0)):
        c = tiny_config('maml')
        c.meta[field] = value
        with pytest.raises(ConfigError, match=f'meta.{field}'):
            validate(c)


def test_resolve_task_gradients_and_config():
    assert resolve_task_gradients('auto') in ('per_task', 'batched')
    assert resolve_task_gradients('batched') == 'batched'
    with pytest.raises(ValueError, match='task_gradients'):
        resolve_task_gradients('sum')
    c = tiny_config('maml')
    c.meta.task_gradients = 'sum'
    with pytest.raises(ConfigError, match='meta.task_gradients'):
        validate(c)


def test_unroll_and_compute_dtype_config():
    c = tiny_config('maml')
    for bad in (0, -1):
        c.inner.unroll = bad
        with pytest.raises(ConfigError, match='inner.unroll'):
            validate(c)
    c.inner.unroll = 1
    c.meta.compute_dtype = 'int8'
    with pytest.raises(ConfigError, match='meta.compute_dtype'):
        validate(c)


def test_low_precision_meta_gradient_close_to_fp32():
    """meta.compute_dtype: the meta-gradient stays fp32 and close to the fp32 one. This second-order CNN4
    meta-gradient (random init, random images) is hypersensitive: merely rounding its inputs and
    parameters to bf16, then computing in fp32, already turns it to cosine ~0.8-0.89 with the exact one
    (measured; docs/benchmarks.md), so no bf16 scheme can reach 0.99 here. Hence: fp16 compute (10-bit
    mantissa) must reach 0.99, and bf16 compute must be as close as that quantization floor allows."""
    batch = _image_batch()
    meta, g32 = _meta_grad(_image_learner(steps=2), batch)
    _, g16 = _meta_grad(_image_learner(steps=2, dtype='float16'), batch, meta)
    _, gb16 = _meta_grad(_image_learner(steps=2, dtype='bfloat16'), batch, meta)
    for leaf in jax.tree_util.tree_leaves((g16, gb16)):
        assert leaf.dtype == jnp.float32  # fp32 meta-gradient (parameters stay fp32)
    assert _cos(g16, g32) > 0.99, _cos(g16, g32)
    to_bf16 = lambda t: jax.tree_util.tree_map(
        lambda a: a.astype(jnp.bfloat16).astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
    _, g_floor = _meta_grad(_image_learner(steps=2), to_bf16(batch), to_bf16(meta))
    floor = _cos(g_floor, g32)
    assert 0.5 < floor < 0.99  # the problem is as sensitive as stated (else tighten this test)
    assert _cos(gb16, g32) > floor - 0.05, (_cos(gb16, g32), floor)
