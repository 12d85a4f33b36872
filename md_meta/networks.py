"""Task networks as Flax modules, and the functional ``Model`` wrapper the meta-learner uses.

Every network names its top-level layers so that they are the blocks of the blockIAF and the
units of layer-wise methods: ``layer_0, layer_1, ...`` in network order.

A method may insert a meta-learned layer (``Geometry.layer``, a Flax module class whose variables live in
the collection ``'warp'``, which the inner loop never adapts) into these networks. Its class attribute
``where`` says where:
  * ``'linear'``: after every layer's linear part (dense or convolution, the classifier included), before
    batch norm; the module must be linear on the last axis, so a network may apply it to a convolution's
    kernel instead of its output (T-net / MT-net's T, ``md_meta.methods.tnet``);
  * ``'block'``: after every hidden layer's output (dense: before its ReLU; conv nets: after the block's
    pooling), not after the classifier (WarpGrad's warp, ``md_meta.methods.warpgrad``).

Batch norm normalises with the statistics of the examples it is given (no running averages): those of the
whole batch, or, with ``apply(variables, x, stats_from=n)``, those of the first n rows alone for every row, so
that the outputs of the rows after n do not depend on one another (``md_meta.meta.query_outputs``:
the support set's statistics for the query, ``config.model.norm_stats='support'``).

Convolutions have two formulations (``conv_impl``): ``'lax'`` (``lax.conv_general_dilated``) and
``'patches'`` (3x3 patches by slicing + one matmul, which vmaps to a batched GEMM rather than a
grouped convolution). ``'auto'`` picks patches on CPU and GPU, where it was measured faster under vmap
(CNN4 MAML, docs/benchmarks.md: ~30x on XLA:CPU; 2.4x on an H200 in fp32, 8.8x in bf16), and lax on TPU
(not measured there; its convolution units want lax.conv).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'lax', 'patches')
MODELS = ('mlp', 'cnn4', 'resnet12')
NORM_STATS = ('batch', 'support')   # config.model.norm_stats: md_meta.meta.query_outputs
INITS = ('xavier', 'torch')


class Model(NamedTuple):
    """init(key, x) -> variables {'params': ..., maybe 'warp': ...}; apply(variables, x) -> outputs
    (md-meta's networks also take ``stats_from=n``: batch norm on the first n rows' statistics)."""
    init: Callable
    apply: Callable
    module: nn.Module


def resolve_conv_impl(conv_impl: str) -> str:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
    if conv_impl == 'auto':
        return 'lax' if jax.default_backend() == 'tpu' else 'patches'
    return conv_impl


@jax.custom_vjp
def feature_matmul(cols: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """y = cols @ w for cols [..., k] (patches or features), w [k, c]; the same maths as ``@`` with the
    weight gradient dw = sum_n cols_n^T dy_n written with cols on the left unless it is the wider one.

    XLA:CPU lays the left operand of that contraction out transposed. JAX's own rule puts dy on the left,
    and dy is usually a fused expression (the backward of the next layer), so its transposed copy is
    computed with a strided write: on CNN4's first layer (k = 9, c = 64) that copy was the most expensive
    op of a meta-step, and on a WarpGrad warp layer (k = c = 64) the second most. cols is the forward's
    input (the patches, or a block's output), cheaper to lay out again, and in the first layer 7x
    narrower. The rule reaches every order: the forward rule and the input gradient dy w^T are
    ``feature_matmul`` again, so a meta-gradient that differentiates the inner gradient (second order)
    meets this rule and not JAX's default (which brought that strided copy back: 12% of a MAML step on
    ``experiments.benchmark``'s shape (a)). Reverse mode only (``custom_vjp``)."""
    return cols @ w


def _feature_matmul_fwd(cols, w):
    return feature_matmul(cols, w), (cols, w)


def _feature_matmul_bwd(res, dy):
    cols, w = res
    k, c = w.shape
    cols2, dy2 = cols.reshape(-1, k), dy.reshape(-1, c)
    if k <= c:
        dw = jnp.einsum('nk,nc->kc', cols2, dy2)
    else:
        dw = jnp.einsum('nc,nk->ck', dy2, cols2).T
    return feature_matmul(dy, w.T), dw


feature_matmul.defvjp(_feature_matmul_fwd, _feature_matmul_bwd)


def conv3x3_patches(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """'SAME' 3x3 convolution (NHWC, HWIO) as im2col by 9 shifted slices + one matmul."""
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=-1)
    return feature_matmul(cols, kernel.reshape(kh * kw * c, -1))


def conv3x3_lax(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2/stride-2 max pool by reshape (floor on odd sizes, like PyTorch's MaxPool2d(2))."""
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _at(layer, where: str):
    """The inserted layer's module if it goes ``where`` ('linear' | 'block'), else None."""
    return layer(name='transform') if layer is not None and layer.where == where else None


def _linear_only(layer):
    """The layer for the classifier: 'linear' layers go after every layer, 'block' ones not after the last."""
    return layer if layer is not None and layer.where == 'linear' else None


def torch_uniform(fan_in: int):
    """PyTorch's default for conv and linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Dense(nn.Module):
    """Dense layer (+ the method's inserted layer, either kind). weight_init: 'xavier' (Flax's default, lecun-normal
    weights, zero bias) or 'torch' (PyTorch's nn.Linear default, ``torch_uniform``)."""
    features: int
    layer: Optional[Any] = None
    weight_init: str = 'xavier'

    @nn.compact
    def __call__(self, x):
        if self.weight_init == 'torch':
            u = torch_uniform(x.shape[-1])
            x = nn.Dense(self.features, kernel_init=u, bias_init=u, name='dense')(x)
        else:
            x = nn.Dense(self.features, name='dense')(x)
        return self.layer(name='transform')(x) if self.layer is not None else x


class MLP(nn.Module):
    """Fully connected ReLU network: in -> hidden... -> out (sinusoid: 1-40-40-1)."""
    hidden: Sequence[int] = (40, 40)
    out: int = 1
    layer: Optional[Any] = None

    @nn.compact
    def __call__(self, x, stats_from: Optional[int] = None):
        del stats_from   # no batch norm: every row's output depends on that row alone
        for i, h in enumerate(self.hidden):
            x = jax.nn.relu(Dense(h, self.layer, name=f'layer_{i}')(x))
        return Dense(self.out, _linear_only(self.layer), name=f'layer_{len(self.hidden)}')(x)


def batch_stats(x: jnp.ndarray, eps: float, stats_from: Optional[int] = None):
    """Per-channel mean and 1 / sqrt(var + eps) over every axis but the last (two passes), of the first
    ``stats_from`` rows (examples) of x, or of all of them (None)."""
    axes = tuple(range(x.ndim - 1))
    x = x if stats_from is None else x[:stats_from]
    mean = x.mean(axes)
    return mean, jax.lax.rsqrt(jnp.square(x - mean).mean(axes) + eps)


def channel_sign(scale: jnp.ndarray) -> jnp.ndarray:
    """s = sign(scale) per channel, with s = 1 at 0 (a constant for differentiation)."""
    return jnp.where(scale >= 0, 1, -1).astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def pool_bn_relu(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
    """max_pool_2x2(relu(bn(x))) for scale >= 0 (any sign: ``NormReluPool``), computed as
    relu(bn(max_pool_2x2(x))): bn and relu are non-decreasing per channel for scale >= 0, and so is float
    rounding, so pooling first gives the same floats. The backward rule is the closed form
        dx = route(dp) - sum(dp) / N - rstd * sum(dp * xhat_p) * (x - mean) / N,
        dp = relu'(z) dout * scale * rstd,  xhat_p = (max_pool_2x2(x) - mean) * rstd,
    where route sends dp to the window's maxima, split equally between ties (JAX's rule for max), so
    the full-resolution activations are read three times forward and twice backward instead of once per
    elementwise op and its gradient (CNN4's layer-1 activations dominate a meta-step's memory traffic).
    The rule is plain jnp, so it differentiates again (second-order MAML). At scale = 0 exactly, a kink
    of the function in scale, its gradient w.r.t. scale is a different subgradient from autodiff's."""
    return _pool_bn_relu_fwd(x, scale, bias, eps)[0]


def _pool_bn_relu_fwd(x, scale, bias, eps):
    mean, rstd = batch_stats(x, eps)
    pooled = max_pool_2x2(x)
    out = jax.nn.relu((pooled - mean) * rstd * scale + bias)
    return out, (x, scale, bias, mean, rstd, pooled)


def _pool_bn_relu_bwd(eps, res, dout):
    del eps
    x, scale, bias, mean, rstd, pooled = res
    n, h, w, c = x.shape
    q_axes = (0, 1, 2)
    xhat = (pooled - mean) * rstd
    dz = jnp.where(xhat * scale + bias > 0, dout, jnp.zeros_like(dout))
    dp = dz * scale * rstd
    size = n * h * w
    shift = -dp.sum(q_axes) / size
    slope = -rstd * (dp * xhat).sum(q_axes) / size
    h2, w2 = h // 2, w // 2
    window = x[:, :2 * h2, :2 * w2, :].reshape(n, h2, 2, w2, 2, c)
    count = sum((window[:, :, a, :, b, :] == pooled).astype(x.dtype) for a in (0, 1) for b in (0, 1))
    is_max = window == pooled[:, :, None, :, None, :]
    routed = jnp.where(is_max, (dp / count)[:, :, None, :, None, :], 0).reshape(n, 2 * h2, 2 * w2, c)
    routed = jnp.pad(routed, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))
    # slope * x + (shift - slope * mean), not slope * (x - mean): the forward's variance pass also forms
    # x - mean, and XLA would share it, writing a full-resolution x - mean that neither pass needs.
    dx = routed + slope * x + (shift - slope * mean)
    return dx, (dz * xhat).sum(q_axes), dz.sum(q_axes)


pool_bn_relu.defvjp(_pool_bn_relu_fwd, _pool_bn_relu_bwd)


class BatchNormCurrent(nn.Module):
    """Batch norm on the current batch's statistics (no running averages); scale/offset are params:
    bn(x) = (x - mean) / sqrt(var + eps) * scale + bias, mean and var over every axis but the last."""
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, stats_from: Optional[int] = None):
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,))
        bias = self.param('bias', nn.initializers.zeros, (c,))
        mean, rstd = batch_stats(x, self.eps, stats_from)
        return (x - mean) * rstd * scale + bias


class NormReluPool(nn.Module):
    """max_pool_2x2(relu(bn(y))) with ``BatchNormCurrent``'s parameters, y given by its producer:
    ``signed_y(s) = s y`` for s = ``channel_sign(scale)``, so that a linear producer folds s into its
    weights. Why s: ``pool_bn_relu`` needs scale >= 0, and bn with scale on y equals bn with scale s on s y
    (the statistics negate exactly with y), with s scale >= 0; folding s into a convolution's kernel
    (conv(x, W) s = conv(x, W s)) saves the pass over the full-resolution map that s y would cost.
    ``stats_from``: the statistics of the first rows alone (``batch_stats``), by plain autodiff (the fused
    rule's backward assumes the statistics of every row)."""
    features: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, signed_y: Callable[[jnp.ndarray], jnp.ndarray], stats_from: Optional[int] = None):
        scale = self.param('scale', nn.initializers.ones, (self.features,))
        bias = self.param('bias', nn.initializers.zeros, (self.features,))
        s = channel_sign(scale)
        if stats_from is None:
            return pool_bn_relu(signed_y(s), s * scale, bias, self.eps)
        y = signed_y(s)
        mean, rstd = batch_stats(y, self.eps, stats_from)   # pooling first is exact as in pool_bn_relu
        return jax.nn.relu((max_pool_2x2(y) - mean) * rstd * (s * scale) + bias)


class ConvBlock(nn.Module):
    """3x3 conv (64) -> ['linear' layer] -> batch norm (current batch) -> ReLU -> 2x2 max pool -> ['block' layer],
    computed as ``pool_bn_relu(conv(x, W s), s scale, bias)`` with s = sign(scale) (``NormReluPool``)."""
    features: int = 64
    conv_impl: str = 'patches'
    layer: Optional[Any] = None
    weight_init: str = 'xavier'   # 'xavier' (MAML's code: xavier-uniform kernel, zero bias) | 'torch' (``torch_uniform``)

    @nn.compact
    def __call__(self, x, stats_from: Optional[int] = None):
        cin = x.shape[-1]
        torch_init = torch_uniform(9 * cin)
        kernel = self.param('kernel', torch_init if self.weight_init == 'torch' else nn.initializers.xavier_uniform(),
                            (3, 3, cin, self.features))
        # The conv bias b is a parameter (as in the reference's CNN4) but is not added: a per-channel constant
        # cancels in batch norm (the mean shifts by b, the variance does not change), so
        # bn(conv(x, W) + b) = bn(conv(x, W)) and b's gradient is 0. Adding it cost a full-resolution pass.
        self.param('bias', torch_init if self.weight_init == 'torch' else nn.initializers.zeros, (self.features,))
        conv = conv3x3_patches if self.conv_impl == 'patches' else conv3x3_lax
        linear = _at(self.layer, 'linear')
        if linear is not None:
            # a linear map T on the channels: conv(x, W) T = conv(x, W T), so it is applied to the kernel
            # (a 64x64 product) instead of to every pixel of the feature map.
            kernel = linear(kernel.reshape(-1, self.features)).reshape(kernel.shape)
        # = max_pool_2x2(relu(bn(conv(x, W)))), the norm's sign s folded into the kernel: conv(x, W s)
        x = NormReluPool(self.features, name='norm')(lambda s: conv(x, kernel * s), stats_from)
        block = _at(self.layer, 'block')
        return block(x) if block is not None else x


class CNN4(nn.Module):
    """The 4-block CNN of few-shot learning (Vinyals et al. 2016; MAML): NHWC input, N logits."""
    num_classes: int = 5
    features: int = 64
    conv_impl: str = 'patches'
    layer: Optional[Any] = None
    weight_init: str = 'xavier'   # 'torch': PyTorch's defaults, as the paper's authors' CNN4

    @nn.compact
    def __call__(self, x, stats_from: Optional[int] = None):
        for i in range(4):
            x = ConvBlock(self.features, self.conv_impl, self.layer, self.weight_init, name=f'layer_{i}')(x, stats_from)
        x = x.reshape(x.shape[0], -1)
        return Dense(self.num_classes, _linear_only(self.layer), self.weight_init, name='layer_4')(x)


def model_from_module(module: nn.Module) -> Model:
    """A Model of any Flax module: init(key, x) -> variables, apply(variables, x) -> outputs."""
    def init(key, x):
        variables = module.init({'params': key}, x)
        return jax.tree_util.tree_map(lambda v: v, dict(variables))

    def apply(variables, x, **kwargs):
        return module.apply(variables, x, **kwargs)

    return Model(init, apply, module)


def make_model(name: str, *, layer=None, conv_impl: str = 'auto', hidden=(40, 40),
               out: int = 1, num_classes: int = 5, features: int = 64, init: str = 'xavier') -> Model:
    """The model registry: 'mlp', 'cnn4' or 'resnet12' (``features`` = its first width). ``layer``: the
    method's inserted layer (``Geometry.layer``) or None. ``init`` (CNN4 and ResNet-12): 'xavier' (the Flax /
    paper defaults) or 'torch' (PyTorch's defaults, as the paper's authors)."""
    if layer is not None and getattr(layer, 'where', None) not in ('linear', 'block'):
        raise ValueError(f"layer must be a Flax module class with where = 'linear' or 'block', got {layer!r}")
    if init not in INITS:
        raise ValueError(f'init must be one of {INITS}, got {init!r}')
    if name == 'mlp':
        return model_from_module(MLP(tuple(hidden), out, layer))
    if name == 'cnn4':
        return model_from_module(CNN4(num_classes, features, resolve_conv_impl(conv_impl), layer, init))
    if name == 'resnet12':
        return model_from_module(ResNet12(num_classes, resnet12_widths(features), resolve_conv_impl(conv_impl),
                                           layer, init))
    raise ValueError(f'model must be one of {MODELS}, got {name!r}')


# ----------------------------------------------------------------------------- ResNet-12
def resnet12_widths(features: int = 64) -> tuple:
    """The widths of the four residual blocks: 64-160-320-640 for features=64, scaled alike otherwise."""
    return tuple(max(1, int(round(features * r))) for r in (1.0, 2.5, 5.0, 10.0))


class ResBlock12(nn.Module):
    """One ResNet-12 block: 3 x [3x3 conv (no bias) -> batch norm (current batch)], leaky ReLU (0.1)
    between them, a 1x1 conv + batch norm shortcut, the sum -> leaky ReLU -> ['linear' layer] -> 2x2 max pool
    -> ['block' layer]."""
    features: int
    conv_impl: str = 'patches'
    layer: Optional[Any] = None
    weight_init: str = 'xavier'   # 'xavier': He-normal convs (the ResNet-12 papers) | 'torch': ``torch_uniform``

    @nn.compact
    def __call__(self, x, stats_from: Optional[int] = None):
        conv = conv3x3_patches if self.conv_impl == 'patches' else conv3x3_lax
        he = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
        init = lambda fan_in: torch_uniform(fan_in) if self.weight_init == 'torch' else he
        h = x
        for j in range(3):
            kernel = self.param(f'conv{j}', init(9 * h.shape[-1]), (3, 3, h.shape[-1], self.features))
            h = BatchNormCurrent(name=f'norm{j}')(conv(h, kernel), stats_from)
            if j < 2:
                h = jax.nn.leaky_relu(h, 0.1)
        cin = x.shape[-1]
        short = self.param('shortcut', init(cin), (1, 1, cin, self.features))
        s = BatchNormCurrent(name='norm_shortcut')(x @ short.reshape(cin, self.features), stats_from)
        h = jax.nn.leaky_relu(h + s, 0.1)
        linear, block = _at(self.layer, 'linear'), _at(self.layer, 'block')
        if linear is not None:
            h = linear(h)
        h = max_pool_2x2(h)
        return block(h) if block is not None else h


class ResNet12(nn.Module):
    """The ResNet-12 of few-shot learning (TADAM, MetaOptNet): four residual blocks (``widths``, default
    64-160-320-640), global average pooling, a linear classifier. Top-level layers ``layer_0..layer_4``
    (the blocks of the blockIAF); batch norm on the current batch like CNN4."""
    num_classes: int = 5
    widths: Sequence[int] = (64, 160, 320, 640)
    conv_impl: str = 'patches'
    layer: Optional[Any] = None
    weight_init: str = 'xavier'

    @nn.compact
    def __call__(self, x, stats_from: Optional[int] = None):
        for i, w in enumerate(self.widths):
            x = ResBlock12(w, self.conv_impl, self.layer, self.weight_init, name=f'layer_{i}')(x, stats_from)
        x = x.mean(axis=(1, 2))
        return Dense(self.num_classes, _linear_only(self.layer), self.weight_init, name=f'layer_{len(self.widths)}')(x)
