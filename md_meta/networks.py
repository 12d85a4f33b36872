"""Task networks as Flax modules, and the functional ``Model`` wrapper the meta-learner uses.

Every network names its top-level layers so that they are the blocks of the blockIAF and the
units of layer-wise methods: ``layer_0, layer_1, ...`` in network order.

Layer transforms (meta-learned, never adapted in the inner loop) live in the Flax collection
``'warp'``, so the inner loop adapts ``'params'`` only:
  * ``'tnet'``: a linear map T (identity at start) after each layer (T-net / MT-net, Lee & Choi 2018);
  * ``'warpgrad'``: a residual warp layer h + W2 relu(W1 h) (W2 = 0 at start) after each hidden layer
    (WarpGrad, Flennerhag et al. 2020).

Convolutions have two formulations (``conv_impl``): ``'lax'`` (``lax.conv_general_dilated``) and
``'patches'`` (3x3 patches by slicing + one matmul, which vmaps to a batched GEMM rather than a
grouped convolution). ``'auto'`` picks patches on CPU and GPU, where it was measured faster under vmap
(CNN4 MAML, docs/benchmarks.md: ~30x on XLA:CPU; 2.4x on an H200 in fp32, 8.8x in bf16), and lax on TPU
(not measured there; its convolution units want lax.conv).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_TRANSFORMS = ('none', 'tnet', 'warpgrad')
CONV_IMPLS = ('auto', 'lax', 'patches')


class Model(NamedTuple):
    """init(key, x) -> variables {'params': ..., maybe 'warp': ...}; apply(variables, x) -> outputs."""
    init: Callable
    apply: Callable
    module: nn.Module


def resolve_conv_impl(conv_impl: str) -> str:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
    if conv_impl == 'auto':
        return 'lax' if jax.default_backend() == 'tpu' else 'patches'
    return conv_impl


def conv3x3_patches(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """'SAME' 3x3 convolution (NHWC, HWIO) as im2col by 9 shifted slices + one matmul."""
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=-1)
    return cols @ kernel.reshape(kh * kw * c, -1)


def conv3x3_lax(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2/stride-2 max pool by reshape (floor on odd sizes, like PyTorch's MaxPool2d(2))."""
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LayerTransform(nn.Module):
    """Meta-learned transform on the last axis, held in the 'warp' collection (identity at start)."""
    kind: str

    @nn.compact
    def __call__(self, h):
        c = h.shape[-1]
        if self.kind == 'tnet':
            t = self.variable('warp', 'T', lambda: jnp.eye(c, dtype=h.dtype)).value
            return h @ t
        if self.kind == 'warpgrad':
            w1 = self.variable('warp', 'w1', lambda: jax.random.normal(self.make_rng('params'), (c, c), h.dtype)
                               / jnp.sqrt(c)).value
            b1 = self.variable('warp', 'b1', lambda: jnp.zeros((c,), h.dtype)).value
            w2 = self.variable('warp', 'w2', lambda: jnp.zeros((c, c), h.dtype)).value
            return h + jax.nn.relu(h @ w1 + b1) @ w2
        return h


class Dense(nn.Module):
    features: int
    transform: str = 'none'

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, name='dense')(x)
        return LayerTransform(self.transform, name='transform')(x)


class MLP(nn.Module):
    """Fully connected ReLU network: in -> hidden... -> out (sinusoid: 1-40-40-1)."""
    hidden: Sequence[int] = (40, 40)
    out: int = 1
    transform: str = 'none'

    @nn.compact
    def __call__(self, x):
        for i, h in enumerate(self.hidden):
            x = jax.nn.relu(Dense(h, self.transform, name=f'layer_{i}')(x))
        tr = 'tnet' if self.transform == 'tnet' else 'none'
        return Dense(self.out, tr, name=f'layer_{len(self.hidden)}')(x)


class BatchNormCurrent(nn.Module):
    """Batch norm on the current batch's statistics (no running averages); scale/offset are params."""
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,))
        bias = self.param('bias', nn.initializers.zeros, (c,))
        axes = tuple(range(x.ndim - 1))
        mean = x.mean(axes)
        var = jnp.square(x - mean).mean(axes)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class ConvBlock(nn.Module):
    """3x3 conv (64) -> [transform] -> batch norm (current batch) -> ReLU -> 2x2 max pool."""
    features: int = 64
    conv_impl: str = 'patches'
    transform: str = 'none'

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param('kernel', nn.initializers.xavier_uniform(), (3, 3, cin, self.features))
        bias = self.param('bias', nn.initializers.zeros, (self.features,))
        conv = conv3x3_patches if self.conv_impl == 'patches' else conv3x3_lax
        x = conv(x, kernel) + bias
        x = LayerTransform(self.transform, name='transform')(x)
        x = BatchNormCurrent(name='norm')(x)
        return max_pool_2x2(jax.nn.relu(x))


class CNN4(nn.Module):
    """The 4-block CNN of few-shot learning (Vinyals et al. 2016; MAML): NHWC input, N logits."""
    num_classes: int = 5
    features: int = 64
    conv_impl: str = 'patches'
    transform: str = 'none'

    @nn.compact
    def __call__(self, x):
        for i in range(4):
            x = ConvBlock(self.features, self.conv_impl, self.transform, name=f'layer_{i}')(x)
        x = x.reshape(x.shape[0], -1)
        tr = 'tnet' if self.transform == 'tnet' else 'none'
        return Dense(self.num_classes, tr, name='layer_4')(x)


def _model_from_module(module: nn.Module) -> Model:
    def init(key, x):
        variables = module.init({'params': key}, x)
        return jax.tree_util.tree_map(lambda v: v, dict(variables))

    def apply(variables, x):
        return module.apply(variables, x)

    return Model(init, apply, module)


def make_model(name: str, *, transform: str = 'none', conv_impl: str = 'auto', hidden=(40, 40),
               out: int = 1, num_classes: int = 5, features: int = 64) -> Model:
    """The model registry: 'mlp', 'cnn4' or 'resnet12' (``features`` = its first width)."""
    if transform not in LAYER_TRANSFORMS:
        raise ValueError(f'transform must be one of {LAYER_TRANSFORMS}, got {transform!r}')
    if name == 'mlp':
        return _model_from_module(MLP(tuple(hidden), out, transform))
    if name == 'cnn4':
        return _model_from_module(CNN4(num_classes, features, resolve_conv_impl(conv_impl), transform))
    if name == 'resnet12':
        return _model_from_module(ResNet12(num_classes, resnet12_widths(features), resolve_conv_impl(conv_impl),
                                           transform))
    raise ValueError(f"model must be 'mlp', 'cnn4' or 'resnet12', got {name!r}")


# ----------------------------------------------------------------------------- ResNet-12
def resnet12_widths(features: int = 64) -> tuple:
    """The widths of the four residual blocks: 64-160-320-640 for features=64, scaled alike otherwise."""
    return tuple(max(1, int(round(features * r))) for r in (1.0, 2.5, 5.0, 10.0))


class ResBlock12(nn.Module):
    """One ResNet-12 block: 3 x [3x3 conv (no bias) -> batch norm (current batch)], leaky ReLU (0.1)
    between them, a 1x1 conv + batch norm shortcut, the sum -> leaky ReLU -> [transform] -> 2x2 max pool."""
    features: int
    conv_impl: str = 'patches'
    transform: str = 'none'

    @nn.compact
    def __call__(self, x):
        conv = conv3x3_patches if self.conv_impl == 'patches' else conv3x3_lax
        init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
        h = x
        for j in range(3):
            kernel = self.param(f'conv{j}', init, (3, 3, h.shape[-1], self.features))
            h = BatchNormCurrent(name=f'norm{j}')(conv(h, kernel))
            if j < 2:
                h = jax.nn.leaky_relu(h, 0.1)
        cin = x.shape[-1]
        short = self.param('shortcut', init, (1, 1, cin, self.features))
        s = BatchNormCurrent(name='norm_shortcut')(x @ short.reshape(cin, self.features))
        h = jax.nn.leaky_relu(h + s, 0.1)
        h = LayerTransform(self.transform, name='transform')(h)
        return max_pool_2x2(h)


class ResNet12(nn.Module):
    """The ResNet-12 of few-shot learning (TADAM, MetaOptNet): four residual blocks (``widths``, default
    64-160-320-640), global average pooling, a linear classifier. Top-level layers ``layer_0..layer_4``
    (the blocks of the blockIAF); batch norm on the current batch like CNN4."""
    num_classes: int = 5
    widths: Sequence[int] = (64, 160, 320, 640)
    conv_impl: str = 'patches'
    transform: str = 'none'

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = ResBlock12(w, self.conv_impl, self.transform, name=f'layer_{i}')(x)
        x = x.mean(axis=(1, 2))
        tr = 'tnet' if self.transform == 'tnet' else 'none'
        return Dense(self.num_classes, tr, name=f'layer_{len(self.widths)}')(x)
