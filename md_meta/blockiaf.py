"""Blockwise inverse autoregressive flow (blockIAF): the inverse mirror map g = (grad h)^-1.

Equation (8) of the paper, for a parameter pytree whose top-level entries are the blocks B_1..B_B:

    phi_i = z_i * sigma(a_i) + mu_i,        (a_i, mu_i) = d_i(link_i([e_1(z_1), ..., e_{i-1}(z_{i-1})]))

Block 1 has learned constant (a_1, mu_1). Encoders e_j and decoders d_i are stacks of Kronecker-factored
("tensor mode product") layers: a leaf tensor viewed as an m-way array X is mapped to
X x_1 U_1 x_2 U_2 ... x_m U_m + b, i.e. a dense layer with weight U_m (x) ... (x) U_1 at O(sum n_k^2) cost.
As in the authors' code: each encoder layer halves every mode (floor, at least 1) and is followed by a ReLU;
the link is one dense layer; the decoder is ReLU, then layers doubling the modes back with ReLU in
between, then the two heads (a_i, mu_i). Factors and the link start as PyTorch's defaults, U(+-1/sqrt(fan_in)),
Kronecker-layer biases at zero.

The decoder heads start at zero, so g starts as the identity (sigma(0) = 1). ``head_init='zero'`` (the
paper's / authors' initialisation) zeroes every factor of each head: on a leaf with two or more modes (every
kernel) the gradient of each factor is a product of the other, zero, factors, so those factors never learn and
g on kernels stays phi = z * sigma(b_a) + b_mu with per-element constants. ``head_init='learnable'`` zeroes only
the last factor of each head and draws the others: g still starts as the identity, and every parameter of the
map receives a meta-gradient (the zero factor at once, the others after its first update).

Two variants (``BlockIAFSpec.monotone``):
* ``monotone=False``: the paper's / reference's form: scale and shift of block i both depend on z_<i.
  It is NOT monotone in general (see docs/monotonicity.md and ``md_meta.monotonicity``).
* ``monotone=True``: scales are learned per-element constants in [s_min, s_max]; only shifts are
  autoregressive, and every factor is normalised so Lip(mu_i) <= c (``shift_lipschitz``). Then
  (z - z')^T (g(z) - g(z')) >= (s_min - c sqrt(B - 1)) |z - z'|^2, the margin ``monotone_margin``.

This module is the map as the paper defines it, leaf by leaf (``forward_per_leaf``, ``inverse``) with its
certified constants; ``md_meta.blockiaf_engine`` computes the same g fast (its layers stacked and batched across
leaves), the form MD meta-learns and applies. All functions are pure; ``spec`` is static (hashable) and the map
parameters are a pytree.
"""
from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = Any


class BlockIAFSpec(NamedTuple):
    """Static structure of a blockIAF.

    blocks: top-level keys of the parameter pytree, in autoregressive order.
    scale: 'bounded' (sigma(a) = s_min + (s_max - s_min) * logistic(a + b0), paper eq. 8a) or 'exp'
      (sigma(a) = exp(a), the reference implementation; unbounded).
    monotone: the constrained variant (see module docstring).
    shift_lipschitz: c, the Lipschitz bound of each block's shift in monotone mode.
    encoder_layers: number of mode-product layers in each encoder and decoder.
    activation: the nonlinearity of the encoders, the link and the decoder trunks: 'relu' (the authors') or
      'elu' (x for x > 0, e^x - 1 otherwise: 1-Lipschitz like ReLU, so the monotone certificate holds, and 0 at
      0, so zero padding stays zero; its slope is never 0, so no code is dead at initialisation: with ReLU the
      1-number codes that floor halving leaves, and every code of a leaf at zero such as a bias, get no gradient).
    """
    blocks: tuple
    scale: str = 'bounded'
    s_min: float = 0.1
    s_max: float = 2.0
    monotone: bool = False
    shift_lipschitz: float = 0.0
    encoder_layers: int = 3
    activation: str = 'relu'


ACTIVATIONS = ('relu', 'elu')


def nonlinearity(spec: 'BlockIAFSpec'):
    """The encoders', the link's and the decoder trunks' nonlinearity (``spec.activation``)."""
    return jax.nn.elu if spec.activation == 'elu' else jax.nn.relu


def default_blocks(params: Params) -> tuple:
    """One block per top-level entry (one per network layer), in the network's order whatever the dict's key
    order: md-meta's networks name their layers ``layer_0, layer_1, ...`` (ordered by the number, so
    ``layer_10`` follows ``layer_9``); other names (a Flax module's ``Conv_0, Conv_1, Dense_0``) in sorted
    order, the order JAX gives a traced dict's keys. Only the keys are read."""
    keys = list(params.keys())
    if keys and all(re.fullmatch(r'layer_\d+', k) for k in keys):
        return tuple(sorted(keys, key=lambda k: int(k[len('layer_'):])))
    return tuple(sorted(keys))


def make_spec(params: Params, *, blocks: Sequence[str] | None = None, scale: str = 'bounded',
              s_min: float = 0.1, s_max: float = 2.0, monotone: bool = False,
              shift_lipschitz: float | None = None, encoder_layers: int = 3,
              activation: str = 'relu') -> BlockIAFSpec:
    """Builds and validates a spec; in monotone mode ``shift_lipschitz=None`` picks s_min / (2 sqrt(B-1))."""
    blocks = tuple(blocks) if blocks is not None else default_blocks(params)
    missing = [b for b in blocks if b not in params]
    if missing or sorted(blocks) != sorted(params.keys()):
        raise ValueError(f'blockIAF blocks {blocks} must be a permutation of the parameter pytree keys '
                         f'{tuple(params.keys())}')
    if scale not in ('bounded', 'exp'):
        raise ValueError(f"blockIAF scale must be 'bounded' or 'exp', got {scale!r}")
    if scale == 'bounded' and not 0.0 <= s_min < 1.0 < s_max:
        raise ValueError(f'bounded scale needs 0 <= s_min < 1 < s_max (identity at start), got {s_min}, {s_max}')
    if encoder_layers < 1:
        raise ValueError(f'encoder_layers must be >= 1, got {encoder_layers}')
    if activation not in ACTIVATIONS:
        raise ValueError(f'blockIAF activation must be one of {ACTIVATIONS}, got {activation!r}')
    if monotone:
        if scale != 'bounded' or s_min <= 0:
            raise ValueError('the monotone blockIAF needs scale="bounded" with s_min > 0')
        nb = len(blocks)
        if shift_lipschitz is None:
            shift_lipschitz = s_min / (2.0 * math.sqrt(max(nb - 1, 1)))
        if shift_lipschitz < 0:
            raise ValueError(f'shift_lipschitz must be >= 0 (a Lipschitz bound), got {shift_lipschitz}')
        if s_min - shift_lipschitz * math.sqrt(max(nb - 1, 0)) <= 0:
            raise ValueError(f'shift_lipschitz={shift_lipschitz} leaves no monotonicity margin: need '
                             f'c * sqrt(B-1) < s_min = {s_min} with B = {nb}')
    return BlockIAFSpec(blocks, scale, float(s_min), float(s_max), bool(monotone),
                        float(shift_lipschitz or 0.0), int(encoder_layers), activation)


def monotone_margin(spec: BlockIAFSpec) -> float:
    """C_mono = s_min - c sqrt(B-1): (z-z')^T (g(z)-g(z')) >= C_mono |z-z'|^2 for the monotone map."""
    if not spec.monotone:
        raise ValueError('only the monotone blockIAF has a certified margin')
    return spec.s_min - spec.shift_lipschitz * math.sqrt(len(spec.blocks) - 1)


def lipschitz_bound(spec: BlockIAFSpec) -> float:
    """M >= ||dg/dz||_2 for the monotone map: s_max + c sqrt(B-1)."""
    return spec.s_max + spec.shift_lipschitz * math.sqrt(len(spec.blocks) - 1)


def inverse_strong_monotonicity(spec: BlockIAFSpec) -> float:
    """C of eq. (10): (phi-phi')^T (g^-1(phi) - g^-1(phi')) >= (C_mono / M^2) |phi - phi'|^2."""
    return monotone_margin(spec) / lipschitz_bound(spec) ** 2


# ----------------------------------------------------------------------------- tensor views

def mode_shape(shape: tuple) -> tuple:
    """The multi-way view of a leaf: conv kernels (kh, kw, cin, cout) -> (kh*kw, cin, cout); scalars -> (1,)."""
    if len(shape) == 0:
        return (1,)
    if len(shape) == 4:
        return (shape[0] * shape[1],) + tuple(shape[2:])
    return tuple(shape)


def encoder_shapes(shape: tuple, layers: int) -> list:
    """Mode shapes after 0..layers encoder layers: each mode halves (floor, at least 1; the authors' rule)."""
    seq = [tuple(shape)]
    for _ in range(layers):
        seq.append(tuple(max(1, n // 2) for n in seq[-1]))
    return seq


def mode_product(x: jnp.ndarray, factors: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """X x_1 U_1 ... x_m U_m with U_k of shape (n'_k, n_k): a linear layer with weight kron(U_m, ..., U_1).

    Each product contracts the leading mode and appends the new one last, so after m products the modes
    are back in order with no transposes (one dot_general per mode)."""
    for u in factors:
        x = jnp.tensordot(x, u, axes=(0, 1))
    return x


class _Uniform:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default for linear layers, the authors' init), every
    tensor cut from one ``jax.random.uniform`` draw: on CPU each distinct shape drawn eagerly compiles its
    own kernel (~0.3 s), so one draw keeps a blockIAF's init to one compile. With ``key=None`` it only
    counts the numbers needed (a first pass)."""

    def __init__(self, key=None, total: int = 0):
        self.count = 0
        self.dtype = jax.dtypes.canonicalize_dtype(np.float64)   # float32, or float64 under jax_enable_x64
        self.buffer = None
        if key is not None:
            draw = jax.random.uniform(key, (max(total, 1),), self.dtype, -1.0, 1.0)
            # on the host when concrete; kept as a traced array under jit / vmap (e.g. a vmap over keys)
            self.buffer = draw if isinstance(draw, jax.core.Tracer) else np.asarray(draw)

    def __call__(self, shape, fan_in):
        n = int(np.prod(shape))
        start, self.count = self.count, self.count + n
        if self.buffer is None:
            return None
        return self.buffer[start:start + n].reshape(shape) / self.dtype.type(math.sqrt(fan_in))


def _kron_layer_init(uniform, in_shape, out_shape, zero_factors=()):
    """Factors U_k (out_k, in_k) ~ U(+-1/sqrt(in_k)) except those in ``zero_factors`` (0); bias 0."""
    factors = [np.zeros((o, i), uniform.dtype) if k in zero_factors else uniform((o, i), i)
               for k, (o, i) in enumerate(zip(out_shape, in_shape))]
    return {'u': factors, 'b': np.zeros(out_shape, uniform.dtype)}


HEAD_INITS = ('zero', 'learnable')


def _normalised(u: jnp.ndarray) -> jnp.ndarray:
    """u / max(1, ||u||_F): spectral norm <= Frobenius norm <= 1 (smooth, NaN-free at u = 0)."""
    fro = jnp.sqrt(jnp.sum(u * u) + 1e-12)
    return u / jnp.maximum(1.0, fro)


def _kron_layer_apply(p, x):
    return mode_product(x, p['u']) + p['b']


def effective_weights(theta: Params, monotone: bool) -> Params:
    """The weights g applies: in monotone mode (``spec.monotone``) every Kronecker factor and link matrix
    U -> U / max(1, ||U||_F) (Lip <= 1 each); otherwise theta itself (``blockiaf_engine.effective_packed``
    on the packed layout)."""
    if not monotone:
        return theta
    layer = lambda p: dict(p, u=[_normalised(u) for u in p['u']])
    out = dict(theta)
    out['enc'] = {b: [[layer(p) for p in layers] for layers in enc] for b, enc in theta['enc'].items()}
    out['link'] = {b: dict(l, w=_normalised(l['w'])) for b, l in theta['link'].items()}
    out['dec'] = {b: [{k: [layer(p) for p in v] if k == 'trunk' else layer(v) for k, v in d.items()} for d in dec]
                  for b, dec in theta['dec'].items()}
    return out


# ----------------------------------------------------------------------------- init

def _leaves(block_params):
    return jax.tree_util.tree_leaves(block_params)


def init(key: jax.Array, params: Params, spec: BlockIAFSpec, head_init: str = 'zero') -> Params:
    """Map parameters theta_g for the parameter pytree ``params``; g starts as the identity.
    ``head_init``: 'zero' (every factor of each decoder head 0, the paper's / authors') or 'learnable' (only
    the last factor of each head 0), see the module docstring. Built on the host from one random draw."""
    if head_init not in HEAD_INITS:
        raise ValueError(f'head_init must be one of {HEAD_INITS}, got {head_init!r}')
    counter = _Uniform()
    _build(params, spec, head_init, counter)
    theta = _build(params, spec, head_init, _Uniform(key, counter.count))
    return jax.tree_util.tree_map(jnp.asarray, theta)


def _build(params: Params, spec: BlockIAFSpec, head_init: str, uniform: _Uniform) -> Params:
    blocks = spec.blocks
    nb = len(blocks)
    L = spec.encoder_layers
    zeros_like = lambda t: jax.tree_util.tree_map(lambda l: np.zeros(np.shape(l), l.dtype), t)
    theta = {'first': {'a': zeros_like(params[blocks[0]]), 'mu': zeros_like(params[blocks[0]])},
             'enc': {}, 'link': {}, 'dec': {}}
    if spec.monotone:
        theta['a'] = {b: zeros_like(params[b]) for b in blocks[1:]}
    enc_dims = []
    for i, b in enumerate(blocks):
        leaves = _leaves(params[b])
        seqs = [encoder_shapes(mode_shape(l.shape), L) for l in leaves]
        if i < nb - 1:
            theta['enc'][b] = [[_kron_layer_init(uniform, s[l], s[l + 1]) for l in range(L)] for s in seqs]
            enc_dims.append(sum(int(np.prod(s[-1])) for s in seqs))
        if i == 0:
            continue
        d_in = sum(enc_dims[:i])
        d_out = sum(int(np.prod(s[-1])) for s in seqs)
        theta['link'][b] = {'w': uniform((d_out, d_in), d_in), 'b': uniform((d_out,), d_in)}
        heads = ('mu',) if spec.monotone else ('a', 'mu')
        dec = []
        for s in seqs:
            trunk = [_kron_layer_init(uniform, s[L - l], s[L - l - 1]) for l in range(L - 1)]
            modes = len(s[0])
            zero = range(modes) if head_init == 'zero' else (modes - 1,)
            dec.append({'trunk': trunk, **{h: _kron_layer_init(uniform, s[1], s[0], zero_factors=zero)
                                          for h in heads}})
        theta['dec'][b] = dec
    return theta


# ----------------------------------------------------------------------------- g and its inverse

def sigma(a, spec: BlockIAFSpec):
    """The scale of eq. (8a) from its logits a (``spec.scale``), 1 at a = 0."""
    if spec.scale == 'exp':
        return jnp.exp(a)
    lo, hi = spec.s_min, spec.s_max
    b0 = math.log((1.0 - lo) / (hi - 1.0))  # logistic(b0) = (1 - lo) / (hi - lo)
    # = lo + (hi - lo) * logistic(a + b0), written so that sigma(0) == 1 exactly
    b0 = jnp.asarray(b0, a.dtype)
    return 1.0 + (hi - lo) * (jax.nn.sigmoid(a + b0) - jax.nn.sigmoid(b0))


def _encode(theta_enc_block, z_block, spec):
    outs = []
    for layers, leaf in zip(theta_enc_block, _leaves(z_block)):
        x = leaf.reshape(mode_shape(leaf.shape))
        for p in layers:
            x = nonlinearity(spec)(_kron_layer_apply(p, x))
        outs.append(x.reshape(-1))
    return jnp.concatenate(outs)


def _decode(theta, b, encodings, block_template, spec):
    """(a_i, mu_i) pytrees shaped like block b, from the encodings of earlier blocks."""
    link = theta['link'][b]
    h = jnp.concatenate(encodings)
    h = link['w'] @ h + link['b']
    leaves, treedef = jax.tree_util.tree_flatten(block_template)
    a_out, mu_out, start = [], [], 0
    for dec, leaf in zip(theta['dec'][b], leaves):
        shape0 = _decoder_input_shape(dec)
        n = int(np.prod(shape0))
        x = nonlinearity(spec)(h[start:start + n].reshape(shape0))
        start += n
        for p in dec['trunk']:
            x = nonlinearity(spec)(_kron_layer_apply(p, x))
        mu_out.append(_kron_layer_apply(dec['mu'], x).reshape(leaf.shape))
        if not spec.monotone:
            a_out.append(_kron_layer_apply(dec['a'], x).reshape(leaf.shape))
    mu = jax.tree_util.tree_unflatten(treedef, mu_out)
    a = None if spec.monotone else jax.tree_util.tree_unflatten(treedef, a_out)
    return a, mu


def _decoder_input_shape(dec):
    first = dec['trunk'][0] if dec['trunk'] else dec['mu']
    return tuple(u.shape[1] for u in first['u'])


def _block_scale_shift(theta, spec, i, encodings, template):
    b = spec.blocks[i]
    if i == 0:
        return theta['first']['a'], theta['first']['mu']
    a, mu = _decode(theta, b, encodings[:i], template, spec)
    if spec.monotone:
        a = theta['a'][b]
        mu = jax.tree_util.tree_map(lambda m: spec.shift_lipschitz * m, mu)
    return a, mu


def scales_and_shifts(theta: Params, z: Params, spec: BlockIAFSpec) -> tuple:
    """(sigma, mu) at z, each a pytree shaped like z: g(z) = z * sigma + mu entry by entry (eq. 8), with
    sigma = sigma(a_i(z_<i)) and mu = mu_i(z_<i) of each entry's block i. sigma is the diagonal of dg/dz (its
    other entries, the shifts' and scales' dependence on earlier blocks, lie between blocks): the factor by which
    one MD step moves that entry, phi_1 - phi_0 = -alpha sigma grad to first order within a block."""
    theta = effective_weights(theta, spec.monotone)
    blocks = spec.blocks
    encodings = [_encode(theta['enc'][b], z[b], spec) for b in blocks[:-1]]
    scales, shifts = {}, {}
    for i, b in enumerate(blocks):
        a, mu = _block_scale_shift(theta, spec, i, encodings, z[b])
        scales[b] = jax.tree_util.tree_map(lambda zz, aa: jnp.broadcast_to(sigma(aa, spec), jnp.shape(zz)), z[b], a)
        shifts[b] = mu
    return scales, shifts


def forward_per_leaf(theta: Params, z: Params, spec: BlockIAFSpec) -> Params:
    """g(z) = z * sigma + mu leaf by leaf (``scales_and_shifts``), one small product per leaf, layer and mode:
    the definition that ``blockiaf_engine.forward`` computes with grouped products (the reference of the tests;
    ``inverse`` inverts it block by block)."""
    scales, shifts = scales_and_shifts(theta, z, spec)
    return jax.tree_util.tree_map(lambda zz, s, mm: zz * s + mm, z, scales, shifts)


def inverse(theta: Params, phi: Params, spec: BlockIAFSpec) -> Params:
    """z = g^-1(phi), block by block: z_i = (phi_i - mu_i(z_<i)) / sigma(a_i(z_<i))."""
    theta = effective_weights(theta, spec.monotone)
    blocks = spec.blocks
    z, encodings = {}, []
    for i, b in enumerate(blocks):
        a, mu = _block_scale_shift(theta, spec, i, encodings, phi[b])
        z[b] = jax.tree_util.tree_map(lambda pp, aa, mm: (pp - mm) / sigma(aa, spec), phi[b], a, mu)
        if i < len(blocks) - 1:
            encodings.append(_encode(theta['enc'][b], z[b], spec))
    return z


def num_parameters(theta: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(theta))
