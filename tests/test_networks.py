"""The task networks (md_meta.networks): initialisers, the patches convolution, the fused batch-norm block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_meta import experiment
from md_meta.methods import tnet, warpgrad
from md_meta.networks import (ConvBlock, batch_stats, channel_sign, conv3x3_lax, conv3x3_patches, make_model,
                              max_pool_2x2, pool_bn_relu)
from tests.helpers import image_batch, image_learner, meta_grad, tiny_config, tree_max_abs_diff


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
        experiment.build(tiny_config('maml', **{'model.init': 'torch'}))  # the sinusoid MLP has no 'torch' init


def _rel(a, b):
    """|a - b| / |b| over every leaf, on the host."""
    flat = lambda t: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(t)])
    return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


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
    scale = max(1.0, max(float(np.max(np.abs(g))) for g in gl))
    assert tree_max_abs_diff(gp, gl) < 1e-5 * scale


@pytest.mark.parametrize('shape,ties', [((3, 6, 6, 4), False), ((2, 7, 5, 4), False), ((3, 6, 6, 4), True)])
def test_fused_pool_bn_relu_matches_plain_formula_to_second_order(shape, ties):
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
        assert tree_max_abs_diff(h_fused, h_plain) < 1e-10 * max(1.0, max(float(np.max(np.abs(h))) for h in h_plain))
        per_task = jax.vmap(jax.grad(loss(fused)), in_axes=(0, None, None))(jnp.stack([x, 2 * x]), s, b)
        np.testing.assert_allclose(per_task[0], g_fused[0], atol=1e-12)


@pytest.mark.parametrize('method', ['maml', 'tnet', 'warpgrad'])
def test_conv_block_matches_its_definition(method):
    """ConvBlock (patches conv, fused pool_bn_relu, the norm's sign and T-net's T folded into the kernel, the
    conv bias left out as it cancels) == the block written out with lax.conv: conv -> + b -> [T] -> bn ->
    relu -> pool -> [warp], with random parameters, inserted layers and norm scales of both signs."""
    layer = {'maml': None, 'tnet': tnet.TLayer, 'warpgrad': warpgrad.WarpLayer}[method]
    kx, kv, kt = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (4, 9, 9, 3))
    block = ConvBlock(8, 'patches', layer)
    variables = block.init(kv, x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.3 * jax.random.normal(kt, v.shape), variables)
    variables['params']['norm']['scale'] = variables['params']['norm']['scale'] * jnp.array([1, -1] * 4)
    variables['params']['bias'] = variables['params']['bias'] + 2.0
    p, warp = variables['params'], variables.get('warp', {}).get('transform', {})
    h = conv3x3_lax(x, p['kernel']) + p['bias']
    if method == 'tnet':
        h = h @ warp['T']
    mean, rstd = batch_stats(h, 1e-5)
    h = max_pool_2x2(jax.nn.relu((h - mean) * rstd * p['norm']['scale'] + p['norm']['bias']))
    if method == 'warpgrad':
        h = h + jax.nn.relu(h @ warp['w1'] + warp['b1']) @ warp['w2']
    np.testing.assert_allclose(block.apply(variables, x), h, rtol=1e-4, atol=1e-5)


def test_cnn4_patches_and_lax_same_meta_gradient():
    batch = image_batch()
    meta, g_p = meta_grad(image_learner(conv_impl='patches'), batch)
    _, g_l = meta_grad(image_learner(conv_impl='lax'), batch, meta)
    assert _rel(g_p, g_l) < 1e-4


def test_feature_matmul_is_the_matmul_to_third_order():
    """feature_matmul's rule (used again inside its own forward and backward) == cols @ w: a third-order
    reverse-mode derivative of a scalar, for both branches of the weight gradient (k <= c, k > c)."""
    from md_meta.networks import feature_matmul
    with jax.enable_x64(True):
        for k, c in ((2, 5), (6, 3)):
            kc, kw = jax.random.split(jax.random.PRNGKey(k))
            cols = jax.random.normal(kc, (4, 7, k), jnp.float64)
            w = jax.random.normal(kw, (k, c), jnp.float64)

            def third(mm):
                f = lambda cols, w: jnp.sum(jnp.tanh(mm(cols, w)) ** 3)
                g = lambda cols, w: jnp.sum(jnp.sin(jax.grad(f, (0, 1))(cols, w)[1]))
                h = lambda cols, w: jnp.sum(jax.grad(g, (0, 1))(cols, w)[0] ** 2)
                return jax.grad(h, (0, 1))(cols, w)

            assert tree_max_abs_diff(third(feature_matmul), third(lambda a, b: a @ b)) < 1e-10
