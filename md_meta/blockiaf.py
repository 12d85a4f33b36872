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

All functions are pure; ``spec`` is static (hashable) and the map parameters are a pytree.
"""
from __future__ import annotations

import itertools
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
    group_cost_max: how far storage groups of different mode shapes are merged into one zero-padded batched
      product (``merge_plan``): a merged group costs at most this many times its members' multiply-adds. How g
      is computed, not what: larger means fewer kernels for more FLOPs.
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
    group_cost_max: float = 1.5
    activation: str = 'relu'


ACTIVATIONS = ('relu', 'elu')


def _activation(spec: 'BlockIAFSpec'):
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
              group_cost_max: float = 1.5, activation: str = 'relu') -> BlockIAFSpec:
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
    if not group_cost_max >= 1.0:
        raise ValueError(f'group_cost_max must be >= 1 (1: merge only where padding costs nothing), '
                         f'got {group_cost_max}')
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
                        float(shift_lipschitz or 0.0), int(encoder_layers), float(group_cost_max), activation)


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


def _shrink_sequence(shape: tuple, layers: int) -> list:
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
    U -> U / max(1, ||U||_F) (Lip <= 1 each); otherwise theta itself (``effective_packed`` on the packed
    layout)."""
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
        seqs = [_shrink_sequence(mode_shape(l.shape), L) for l in leaves]
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


# ----------------------------------------------------------------------------- forward / inverse

def _sigma(a, spec: BlockIAFSpec):
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
            x = _activation(spec)(_kron_layer_apply(p, x))
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
        x = _activation(spec)(h[start:start + n].reshape(shape0))
        start += n
        for p in dec['trunk']:
            x = _activation(spec)(_kron_layer_apply(p, x))
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


def forward(theta: Params, z: Params, spec: BlockIAFSpec) -> Params:
    """phi = g(z), all blocks in parallel (each block reads the encodings of earlier blocks of z)."""
    return apply_packed(effective_packed(pack(theta, spec), spec.monotone, spec.group_cost_max), z, spec)


def forward_per_leaf(theta: Params, z: Params, spec: BlockIAFSpec) -> Params:
    """g(z) leaf by leaf, one small product per leaf, layer and mode: the definition ``forward`` computes
    with grouped products (the reference of the tests; ``inverse`` inverts it block by block)."""
    theta = effective_weights(theta, spec.monotone)
    blocks = spec.blocks
    encodings = [_encode(theta['enc'][b], z[b], spec) for b in blocks[:-1]]
    phi = {}
    for i, b in enumerate(blocks):
        a, mu = _block_scale_shift(theta, spec, i, encodings, z[b])
        phi[b] = jax.tree_util.tree_map(lambda zz, aa, mm: zz * _sigma(aa, spec) + mm, z[b], a, mu)
    return phi


# ----------------------------------------------------------------------------- grouped products
#
# The per-leaf map issues one small dot per leaf, layer and mode (hundreds on CNN4, each with its second-order
# backward), which makes the meta-step's program large (compile time) and, on accelerators, many small
# kernels. Leaves whose layers have the same factor shapes (CNN4: the 64-vectors of every block, the 64x64
# kernels of layers 1-3) run as one batched product per layer and mode: their factors are stored stacked
# (``pack``: MD meta-learns theta in this layout, so no stacking in the meta-step) and the leaves of z are
# stacked once per call. Storage groups of different shapes run as one where zero padding to a common shape
# costs little (``merge_plan``, applied by ``effective_packed``). The same sums as ``forward_per_leaf``, up to
# the order of float rounding.

def _groups(items) -> list:
    """[[member, ...], ...]: the members (block, leaf index) of equal key, in first-seen order. The key is
    the leaf's mode shape, which fixes the shapes of all its encoder / decoder layers."""
    out = {}
    for key, member in items:
        out.setdefault(key, []).append(member)
    return list(out.values())


def _plan(mode_shapes: dict, spec: BlockIAFSpec, part: str) -> list:
    """Groups of ``part`` ('enc': blocks but the last; 'dec': blocks but the first) from {block: [mode shape
    of each leaf]}; the same for theta (``pack``) and for z (``apply_packed``)."""
    blocks = spec.blocks[:-1] if part == 'enc' else spec.blocks[1:]
    return _groups((s, (b, j)) for b in blocks for j, s in enumerate(mode_shapes[b]))


def _theta_mode_shapes(theta, spec) -> dict:
    """{block: [mode shape of each leaf]} read off theta: the input modes of the encoders' first layers, and
    for the last block the output modes of its decoder heads."""
    shapes = {b: [tuple(u.shape[1] for u in layers[0]['u']) for layers in theta['enc'][b]] for b in spec.blocks[:-1]}
    last = spec.blocks[-1]
    if len(spec.blocks) == 1:  # one block: no encoder or decoder; its constant scale and shift give the shapes
        shapes[last] = [mode_shape(np.shape(l)) for l in _leaves(theta['first']['mu'])]
    else:
        shapes[last] = [tuple(u.shape[0] for u in d['mu']['u']) for d in theta['dec'][last]]
    return shapes


def _stack(trees):
    """The trees' leaves stacked: on the host where concrete (eagerly, ``jnp.stack`` compiles one kernel per
    shape: a second for a CNN4 map), traced otherwise."""
    def stack(*xs):
        if any(isinstance(x, jax.core.Tracer) for x in xs):
            return jnp.stack(xs)
        return jnp.asarray(np.stack([np.asarray(x) for x in xs]))
    return jax.tree_util.tree_map(stack, *trees)


def _decoder_layers(dec, monotone: bool) -> list:
    return list(dec['trunk']) + [dec['mu']] + ([] if monotone else [dec['a']])


def pack(theta: Params, spec: BlockIAFSpec) -> Params:
    """theta (``init``'s per-leaf layout) with the encoder and decoder layers of leaves of equal mode shape
    stacked per group, the layout ``apply_packed`` reads: a relayout of the same numbers (linear, so it maps
    gradients in the per-leaf layout to gradients in the packed one)."""
    shapes = _theta_mode_shapes(theta, spec)
    enc = [_stack([theta['enc'][b][j] for b, j in members]) for members in _plan(shapes, spec, 'enc')]
    dec = [_stack([_decoder_layers(theta['dec'][b][j], spec.monotone) for b, j in members])
           for members in _plan(shapes, spec, 'dec')]
    out = {'first': theta['first'], 'link': theta['link'], 'enc': enc, 'dec': dec}
    if spec.monotone:
        out['a'] = theta['a']
    return out


def unpack(packed: Params, spec: BlockIAFSpec, params: Params) -> Params:
    """The inverse of ``pack``: the per-leaf theta of a map stored packed (a trained MD's ``meta['geom']``),
    for ``forward_per_leaf``, ``inverse`` and ``md_meta.monotonicity``. ``params``: any pytree of the
    network's structure and shapes (``meta['init']``), which fixes the groups."""
    shapes = {b: [mode_shape(np.shape(l)) for l in _leaves(params[b])] for b in spec.blocks}
    plans = {part: _plan(shapes, spec, part) for part in ('enc', 'dec')}
    mismatch = ValueError('unpack: the packed map is not the map of this network and spec (its groups or '
                          'their mode shapes differ from those params give)')
    if any(len(packed[part]) != len(plans[part]) for part in ('enc', 'dec')):
        raise mismatch
    member = lambda stacked, i: jax.tree_util.tree_map(lambda x: x[i], stacked)
    theta = {'first': packed['first'], 'link': packed['link'],
             'enc': {b: [None] * len(shapes[b]) for b in spec.blocks[:-1]},
             'dec': {b: [None] * len(shapes[b]) for b in spec.blocks[1:]}}
    for stacked, members in zip(packed['enc'], plans['enc']):
        for i, (b, j) in enumerate(members):
            theta['enc'][b][j] = member(stacked, i)
    trunk = spec.encoder_layers - 1
    for stacked, members in zip(packed['dec'], plans['dec']):
        for i, (b, j) in enumerate(members):
            layers = member(stacked, i)
            theta['dec'][b][j] = {'trunk': layers[:trunk], 'mu': layers[trunk],
                                  **({} if spec.monotone else {'a': layers[trunk + 1]})}
    if spec.monotone:
        theta['a'] = packed['a']
    if len(spec.blocks) > 1 and _theta_mode_shapes(theta, spec) != shapes:
        raise mismatch
    return theta


DENSE_LAYER_MAX = 1 << 17   # entries of a matrix that g applies whole (``effective_packed``)
SEGMENT_CONSTANT_MAX = 1 << 22   # entries whose matrix ids ``_inverse_norms`` holds as a constant of the program


class MergedGroup(NamedTuple):
    """Storage groups run as one batched product, zero-padded to ``shape`` (M modes): ``parts`` = ((storage
    group index, slots), ...), slots the positions of that group's modes among the M (the others size 1)."""
    shape: tuple
    parts: tuple


def _embed(shape: tuple, slots: tuple, modes: int) -> tuple:
    """``shape`` with size-1 modes inserted at the positions not in ``slots``."""
    out = [1] * modes
    for k, n in zip(slots, shape):
        out[k] = n
    return tuple(out)


def _layer_cost(n_in: tuple, n_out: tuple) -> int:
    """Multiply-adds of one layer of one member, as ``effective_packed`` / ``_batched_layer`` apply it: its kron
    matrix where that has at most ``DENSE_LAYER_MAX`` entries (two or more modes), else mode by mode."""
    if len(n_in) > 1 and math.prod(n_in) * math.prod(n_out) <= DENSE_LAYER_MAX:
        return math.prod(n_in) * math.prod(n_out)
    return sum(math.prod(n_out[:k + 1]) * math.prod(n_in[k:]) for k in range(len(n_in)))


def _encoder_cost(shape: tuple, layers: int) -> int:
    """Multiply-adds of the encoder of one member of mode shape ``shape`` (the decoder mirrors it)."""
    seq = _shrink_sequence(shape, layers)
    return sum(_layer_cost(a, b) for a, b in zip(seq[:-1], seq[1:]))


def merge_plan(groups: Sequence[tuple], layers: int, cost_max: float) -> list:
    """[MergedGroup, ...] from the storage groups [(mode shape, members), ...] of an encoder (decoder) of
    ``layers`` layers: greedily, the pair whose merge adds the fewest multiply-adds first, while a merged group
    costs at most ``cost_max`` (``BlockIAFSpec.group_cost_max``) times its parts (``_encoder_cost``: zero padding
    is paid for in full, a padded layer may lose its kron matrix). A group of fewer modes goes into the order-preserving positions of
    the other's that cost least (CNN4's encoders: the first kernel, 9x1x64, with the 9x64x64 kernels; its
    decoders: the classifier's bias, 5, with the 64-vectors). Deterministic: ``effective_packed`` plans from
    theta's shapes, ``apply_packed`` from z's, and both get the same plan."""
    cost = lambda shape, n: n * _encoder_cost(shape, layers)
    merged = [(tuple(s), n, cost(s, n), ((i, tuple(range(len(s)))),)) for i, (s, n) in enumerate(groups)]

    def merge(a, b):
        hi, lo = (a, b) if len(a[0]) >= len(b[0]) else (b, a)
        modes, n = len(hi[0]), a[1] + b[1]
        best = None
        for comb in itertools.combinations(range(modes), len(lo[0])):
            shape = tuple(max(x, y) for x, y in zip(hi[0], _embed(lo[0], comb, modes)))
            if best is None or cost(shape, n) < cost(best[0], n):
                best = shape, comb
        shape, comb = best
        parts = hi[3] + tuple((g, tuple(comb[k] for k in slots)) for g, slots in lo[3])
        return shape, n, a[2] + b[2], tuple(sorted(parts))

    while True:
        options = []
        for i, j in itertools.combinations(range(len(merged)), 2):
            m = merge(merged[i], merged[j])
            padded = cost(m[0], m[1])
            if padded <= cost_max * m[2]:
                options.append((padded - cost(*merged[i][:2]) - cost(*merged[j][:2]), i, j, m))
        if not options:
            break
        _, i, j, m = min(options, key=lambda o: o[:3])
        merged = [x for k, x in enumerate(merged) if k not in (i, j)] + [m]
    merged.sort(key=lambda m: m[3][0][0])
    return [MergedGroup(m[0], m[3]) for m in merged]


def _pad_to(x: jnp.ndarray, shape: tuple) -> jnp.ndarray:
    """x zero-padded at the end of each axis to ``shape``."""
    return jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, shape)]) if x.shape != tuple(shape) else x


def _merged_layer(layers: list, slots: list) -> dict:
    """One layer of a merged group from that layer of each part (stacked factors (G, n'_k, n_k) of its modes,
    bias (G, *n'), optional scale (G,)): each mode's factors zero-padded to the largest and concatenated, a
    part's missing modes a 1x1 factor of 1 (the identity on a size-1 mode), the biases padded with zeros. On
    inputs zero outside each member's own modes, the outputs are each member's layer, zero outside it."""
    if len(layers) == 1 and slots[0] == tuple(range(len(layers[0]['u']))):
        return layers[0]
    modes = max(len(p['u']) for p in layers)
    factors = [[p['u'][s.index(k)] if k in s else jnp.ones((p['b'].shape[0], 1, 1), p['b'].dtype)
                for k in range(modes)] for p, s in zip(layers, slots)]
    out = {'u': []}
    for k in range(modes):
        size = (max(f[k].shape[1] for f in factors), max(f[k].shape[2] for f in factors))
        out['u'].append(jnp.concatenate([_pad_to(f[k], (f[k].shape[0],) + size) for f in factors]))
    out_shape = tuple(u.shape[1] for u in out['u'])
    out['b'] = jnp.concatenate([_pad_to(p['b'].reshape(p['b'].shape[:1] + _embed(p['b'].shape[1:], s, modes)),
                                        p['b'].shape[:1] + out_shape) for p, s in zip(layers, slots)])
    if 'scale' in layers[0]:
        out['scale'] = jnp.concatenate([p['scale'] for p in layers])
    return out


def _storage_shapes(packed: Params, part: str) -> list:
    """[(mode shape, members), ...] of the storage groups of ``part``, read off their factors (the encoders'
    input modes, the decoder heads' output modes)."""
    if part == 'enc':
        return [(tuple(u.shape[2] for u in group[0]['u']), group[0]['b'].shape[0]) for group in packed['enc']]
    return [(tuple(u.shape[1] for u in group[-1]['u']), group[-1]['b'].shape[0]) for group in packed['dec']]


def _merged(packed: Params, part: str, cost_max: float) -> list:
    """The layers of ``part`` per merged group (``merge_plan``)."""
    groups = packed[part]
    layers = len(packed['enc'][0]) if packed['enc'] else 1
    return [[_merged_layer([groups[g][l] for g, _ in m.parts], [s for _, s in m.parts])
             for l in range(len(groups[m.parts[0][0]]))]
            for m in merge_plan(_storage_shapes(packed, part), layers, cost_max)]


def effective_packed(packed: Params, monotone: bool, group_cost_max: float) -> Params:
    """The weights ``apply_packed`` reads, a function of theta alone, computed once per adaptation (outside
    the inner loop's scan, so that each application of g inside it is fewer and larger products);
    ``monotone`` and ``group_cost_max`` as in the spec that ``apply_packed`` is given:

    * in monotone mode each layer gains ``scale`` = prod_k 1 / max(1, ||U_k||_F) per group member (the link:
      one scalar), applied to the layer's product (X x_1 c_1 U_1 ... x_m c_m U_m = (prod c_k) X x_1 U_1 ...
      x_m U_m), so that the normalised factors are never materialised; all the norms are one segment sum;
    * storage groups of different mode shapes whose zero padding costs little run as one group
      (``merge_plan`` with ``group_cost_max``: at 1.5, CNN4's encoders in two groups instead of three, its
      decoders in two instead of four);
    * a layer of two or more modes whose matrix kron(U_m, ..., U_1) has at most ``DENSE_LAYER_MAX`` entries
      per member becomes that matrix (times its scale): one product instead of one per mode (CNN4: the
      smaller encoder and decoder layers; the 9x64x64 kernels' outer layers stay factored);
    * the links of blocks 1..B-1 become one matrix ``links`` over the concatenated encodings of blocks
      0..B-2 (the row block of block i, in the blocks' sorted names: link i times its scale, zero over the
      encodings of blocks >= i), one product for all blocks, where that matrix has at most ``DENSE_LAYER_MAX``
      entries too (CNN4; not ResNet-12, whose links would grow 5x with the zeros).
    """
    links = sorted(packed['link'])   # rows in the blocks' sorted names, the order ``apply_packed`` slices
    if monotone:
        layers = [p for group in packed['enc'] + packed['dec'] for p in group]
        norms = iter(_inverse_norms([u for p in layers for u in p['u']] + [packed['link'][b]['w'][None] for b in links]))
        scales = iter([math.prod(next(norms) for _ in p['u']) for p in layers])
        scaled = lambda group: [dict(p, scale=next(scales)) for p in group]
        packed = dict(packed, enc=[scaled(group) for group in packed['enc']],
                      dec=[scaled(group) for group in packed['dec']],
                      link={b: dict(packed['link'][b], scale=next(norms)[0]) for b in links})
    layer = lambda p: _dense_layer(p) if len(p['u']) > 1 and _dense_size(p) <= DENSE_LAYER_MAX else p
    out = dict(packed, enc=[[layer(p) for p in group] for group in _merged(packed, 'enc', group_cost_max)],
               dec=[[layer(p) for p in group] for group in _merged(packed, 'dec', group_cost_max)])
    if links:
        d_in = max(packed['link'][b]['w'].shape[1] for b in links)
        d_out = sum(packed['link'][b]['w'].shape[0] for b in links)
        if d_in * d_out <= DENSE_LAYER_MAX:
            rows = [_scaled(packed['link'][b]['w'], packed['link'][b]) for b in links]
            out['link'] = {}
            out['links'] = {'w': jnp.concatenate([jnp.pad(w, ((0, 0), (0, d_in - w.shape[1]))) for w in rows]),
                            'b': jnp.concatenate([packed['link'][b]['b'] for b in links])}
    return out


def _scaled(w, p):
    return w * p['scale'].reshape((-1,) + (1,) * (w.ndim - 1)) if 'scale' in p else w


def _dense_size(p) -> int:
    return math.prod(u.shape[1] * u.shape[2] for u in p['u'])


def _dense_layer(p):
    """kron(U_m, ..., U_1) of each member (times its scale), (G, prod n'_k, prod n_k), rows and columns in
    the modes' order: W[(i'_1..i'_m), (i_1..i_m)] = prod_k U_k[i'_k, i_k]."""
    w = p['u'][0]
    for u in p['u'][1:]:
        g, (a_out, a_in), (b_out, b_in) = w.shape[0], w.shape[1:], u.shape[1:]
        w = (w[:, :, None, :, None] * u[:, None, :, None, :]).reshape(g, a_out * b_out, a_in * b_in)
    return {'dense': _scaled(w, p), 'b': p['b']}


def _inverse_norms(stacks: list) -> list:
    """[1 / max(1, ||U||_F) of each matrix of the stack, shape (G,)] for stacks (G, n', n): all the norms as
    one segment sum (a few kernels, not a few per factor). The ids of the entries' matrices are a constant of the
    program up to ``SEGMENT_CONSTANT_MAX`` entries and made by iotas above it, where a constant of one id per
    entry slows tracing, lowering and XLA more than the iotas' kernels cost (docs/benchmarks.md, "The norms'
    segment ids in the program")."""
    if not stacks:
        return []
    sizes = [int(np.prod(u.shape[1:])) for u in stacks]
    counts = [u.shape[0] for u in stacks]
    flat = jnp.concatenate([u.reshape(-1) for u in stacks])
    if flat.size <= SEGMENT_CONSTANT_MAX:   # the ids as a constant of the program (CNN4: 0.5 MiB)
        segments = np.repeat(np.arange(sum(counts)), np.repeat(sizes, counts))
    else:   # made by iotas in the program, a few more kernels (ResNet-12: a constant would be 578 MiB)
        starts = np.cumsum([0] + counts)[:-1]
        segments = jnp.concatenate([(jax.lax.broadcasted_iota(jnp.int32, u.shape, 0) + int(s)).reshape(-1)
                                    for u, s in zip(stacks, starts)])
    sq = jax.ops.segment_sum(flat * flat, segments, num_segments=sum(counts), indices_are_sorted=True)
    inv = 1.0 / jnp.maximum(1.0, jnp.sqrt(sq + 1e-12))
    offsets = np.cumsum([0] + counts)
    return [inv[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _batched_layer(p, x):
    """X x_1 U_1 ... x_m U_m (times ``p['scale']`` where present) + b for a stack of G tensors X (G, n_1..n_m)
    and factors U_k (G, n'_k, n_k): one batched dot_general per mode, contracting the leading mode and
    appending the new one last (as ``mode_product``); a layer made dense by ``effective_packed``: one batched
    product of its matrix with X raveled."""
    if 'dense' in p:
        y = jax.lax.dot_general(p['dense'], x.reshape(x.shape[0], -1), (((2,), (1,)), ((0,), (0,))))
        return y.reshape(p['b'].shape) + p['b']
    for u in p['u']:
        x = jax.lax.dot_general(x, u, (((1,), (2,)), ((0,), (0,))))
    if 'scale' in p:
        x = x * p['scale'].reshape((-1,) + (1,) * (x.ndim - 1))
    return x + p['b']


def apply_packed(weights: Params, z: Params, spec: BlockIAFSpec) -> Params:
    """phi = g(z) from ``weights = effective_packed(pack(theta, spec), spec.monotone, spec.group_cost_max)``:
    equal to ``forward_per_leaf(theta, z, spec)`` up to float rounding. Encoders and decoders run per merged group
    (``merge_plan``) on the members stacked and zero-padded to the group's shape; where the links are one matrix
    (``effective_packed``) it reads the code stacks and writes the decoder stacks, its columns and rows gathered
    into their order (``_links_indices``: a gather of the weights alone, which JAX hoists out of the inner loop)."""
    blocks, w = spec.blocks, weights
    template = {b: _leaves(z[b]) for b in blocks}
    shapes = {b: [mode_shape(leaf.shape) for leaf in leaves] for b, leaves in template.items()}
    depth = spec.encoder_layers
    enc_groups, dec_groups = _merged_members(shapes, spec, 'enc'), _merged_members(shapes, spec, 'dec')
    planned = lambda groups, layer: [(sum(len(m) for m, _ in parts),) + tuple(padded[layer])
                                     for parts, padded in groups]
    made = lambda part: [tuple(np.shape(layers[0]['b'])) for layers in w[part]]
    if made('enc') != planned(enc_groups, 1) or made('dec') != planned(dec_groups, depth - 1):
        raise ValueError('apply_packed: the weights are not effective_packed(..., spec.monotone, spec.group_cost_max) '
                         'of a map of this network (their merged groups differ from the plan of z and spec)')
    act = _activation(spec)
    codes = []   # encoders: every leaf of every block but the last
    for layers, (parts, padded) in zip(w['enc'], enc_groups):
        x = _stack_padded(parts, lambda m: template[m[0]][m[1]], 0, padded[0])
        for p in layers:
            x = act(_batched_layer(p, x))
        codes.append(x)
    if 'links' in w:   # links: block i reads the encodings of blocks < i
        cols, rows = _links_indices(shapes, spec, enc_groups, dec_groups)
        link_w = jnp.pad(w['links']['w'], ((0, 1), (0, 1)))[rows][:, cols]   # padding: a zero row / column
        link_b = jnp.pad(w['links']['b'], (0, 1))[rows]
        h = act(link_w @ jnp.concatenate([x.reshape(-1) for x in codes]) + link_b)
        sizes = [sum(len(m) for m, _ in parts) * math.prod(padded[depth]) for parts, padded in dec_groups]
        dec_in = [x.reshape((-1,) + padded[depth]) for x, (_, padded) in
                  zip(jnp.split(h, np.cumsum(sizes)[:-1]), dec_groups)]
    else:
        code = {}
        for x, (parts, _) in zip(codes, enc_groups):
            code.update(_unstack_padded(x, parts, depth))
        encodings = [jnp.concatenate([code[(b, j)] for j in range(len(template[b]))]) for b in blocks[:-1]]
        inputs = {}
        for b in blocks[1:]:
            link = w['link'][b]
            h = link['w'] @ jnp.concatenate(encodings[:blocks.index(b)])
            h = act((h * link['scale'] if 'scale' in link else h) + link['b'])
            sizes = [math.prod(_shrink_sequence(s, depth)[-1]) for s in shapes[b]]
            inputs.update({(b, j): x for j, x in enumerate(jnp.split(h, np.cumsum(sizes)[:-1]))})
        dec_in = [_stack_padded(parts, inputs.get, depth, padded[depth]) for parts, padded in dec_groups]
    heads = {}   # decoders: every leaf of every block but the first
    for layers, (parts, _), x in zip(w['dec'], dec_groups, dec_in):
        for p in layers[:depth - 1]:
            x = act(_batched_layer(p, x))
        outs = [_unstack_padded(_batched_layer(p, x), parts, 0) for p in layers[depth - 1:]]   # mu, then a
        for members, _ in parts:
            for b, j in members:
                heads[(b, j)] = [o[(b, j)].reshape(template[b][j].shape) for o in outs]
    phi = {}
    for i, b in enumerate(blocks):
        treedef = jax.tree_util.tree_structure(z[b])
        if i == 0:
            a, mu = w['first']['a'], w['first']['mu']
        else:
            mu = jax.tree_util.tree_unflatten(treedef, [heads[(b, j)][0] for j in range(len(template[b]))])
            if spec.monotone:
                a = w['a'][b]
                mu = jax.tree_util.tree_map(lambda m: spec.shift_lipschitz * m, mu)
            else:
                a = jax.tree_util.tree_unflatten(treedef, [heads[(b, j)][1] for j in range(len(template[b]))])
        phi[b] = jax.tree_util.tree_map(lambda zz, aa, mm: zz * _sigma(aa, spec) + mm, z[b], a, mu)
    return phi


def _merged_members(shapes: dict, spec: BlockIAFSpec, part: str) -> list:
    """Per merged group of ``part`` (``merge_plan``): (its parts, in stacking order, each ([(block, leaf
    index), ...], the members' mode shapes through the encoder's layers in the group's M modes), the group's
    mode shapes through the layers)."""
    plan = _plan(shapes, spec, part)
    depth = spec.encoder_layers
    out = []
    for m in merge_plan([(shapes[b][j], len(members)) for members in plan for b, j in members[:1]], depth,
                        spec.group_cost_max):
        parts = []
        for g, slots in m.parts:
            b, j = plan[g][0]
            parts.append((plan[g], [_embed(s, slots, len(m.shape)) for s in _shrink_sequence(shapes[b][j], depth)]))
        out.append((parts, _shrink_sequence(m.shape, depth)))
    return out


def _links_indices(shapes: dict, spec: BlockIAFSpec, enc_groups: list, dec_groups: list) -> tuple:
    """Static (cols, rows) that gather the merged links (``effective_packed``) into the order of the stacks:
    cols[k] = the column (the position in the blocks' concatenated encodings) that reads entry k of the code
    stacks raveled, rows[k] = the row (blocks in sorted names) that writes entry k of the decoder stacks
    raveled; padding entries index the extra last column / row, of zeros."""
    depth = spec.encoder_layers
    size = lambda s: int(np.prod(_shrink_sequence(s, depth)[-1]))
    def offsets(blocks):
        out, start = {}, 0
        for b in blocks:
            for j, s in enumerate(shapes[b]):
                out[(b, j)] = start
                start += size(s)
        return out, start
    def index(groups, offs, total, layer):
        idx = []
        for parts, padded in groups:
            for members, seq in parts:
                real = np.zeros(padded[layer], bool)
                real[tuple(slice(0, n) for n in seq[layer])] = True
                pos = np.full(padded[layer], total)
                pos[real] = np.arange(real.sum())
                for m in members:
                    idx.append(np.where(real, pos + offs[m], total).reshape(-1))
        return np.concatenate(idx)
    enc_off, enc_total = offsets(spec.blocks[:-1])
    dec_off, dec_total = offsets(sorted(spec.blocks[1:]))
    return index(enc_groups, enc_off, enc_total, depth), index(dec_groups, dec_off, dec_total, depth)


def _stack_padded(parts: list, leaf, layer: int, padded: tuple) -> jnp.ndarray:
    """The members' tensors at ``layer`` (``leaf(member)``, any shape of that many entries) stacked, each
    part's stack zero-padded to ``padded`` once: (G, *padded)."""
    return jnp.concatenate([_pad_to(jnp.stack([leaf(m).reshape(-1) for m in members]).reshape((len(members),) + seq[layer]),
                                    (len(members),) + tuple(padded)) for members, seq in parts])


def _unstack_padded(x: jnp.ndarray, parts: list, layer: int) -> dict:
    """{member: its entries of the stack x (G, *padded) at ``layer``, the real region, raveled}."""
    out, start = {}, 0
    for members, seq in parts:
        real = x[(slice(start, start + len(members)),) + tuple(slice(0, n) for n in seq[layer])]
        real = real.reshape(len(members), -1)
        for g, m in enumerate(members):
            out[m] = real[g]
        start += len(members)
    return out


def inverse(theta: Params, phi: Params, spec: BlockIAFSpec) -> Params:
    """z = g^-1(phi), block by block: z_i = (phi_i - mu_i(z_<i)) / sigma(a_i(z_<i))."""
    theta = effective_weights(theta, spec.monotone)
    blocks = spec.blocks
    z, encodings = {}, []
    for i, b in enumerate(blocks):
        a, mu = _block_scale_shift(theta, spec, i, encodings, phi[b])
        z[b] = jax.tree_util.tree_map(lambda pp, aa, mm: (pp - mm) / _sigma(aa, spec), phi[b], a, mu)
        if i < len(blocks) - 1:
            encodings.append(_encode(theta['enc'][b], z[b], spec))
    return z


def num_parameters(theta: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(theta))
