"""The blockIAF computed fast: g of ``md_meta.blockiaf`` with its layers batched across leaves.

``blockiaf.forward_per_leaf`` is the definition of g (eq. 8): one small product per leaf, layer and mode
(hundreds on CNN4, each with its second-order backward), which makes the meta-step's program large (compile time)
and, on accelerators, many small kernels. This module computes the same map with fewer, larger products:

* ``pack``: the encoder / decoder layers of leaves of equal mode shape (CNN4: the 64-vectors of every block, the
  64x64 kernels of layers 1-3) stacked per storage group, the layout MD meta-learns theta in (so no stacking in
  the meta-step); ``unpack`` is its inverse;
* ``effective_packed``: everything that depends on theta alone, once per adaptation (the monotone map's factor
  norms as one segment sum, storage groups merged where zero padding costs little (``merge_plan``, bounded by
  ``group_cost_max``, config ``md.group_cost_max``), small layers and the links as whole matrices);
* ``apply_packed``: phi = g(z) from those weights, one batched product per merged group, layer and mode, the
  leaves of z stacked once per call; ``forward`` = both from theta.

The same sums as ``blockiaf.forward_per_leaf``, up to the order of float rounding, at any ``group_cost_max``
(tests/test_blockiaf_engine.py compares them). ``group_cost_max`` says how g is computed, not what g is: larger
means fewer kernels for more FLOPs.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from md_meta.blockiaf import BlockIAFSpec, Params, encoder_shapes, mode_shape, nonlinearity, sigma


def forward(theta: Params, z: Params, spec: BlockIAFSpec, group_cost_max: float = 1.5) -> Params:
    """phi = g(z) from theta in ``blockiaf.init``'s layout, all blocks in parallel (each block reads the
    encodings of earlier blocks of z): ``blockiaf.forward_per_leaf`` up to float rounding, at any
    ``group_cost_max`` (the default: md.group_cost_max's)."""
    return apply_packed(effective_packed(pack(theta, spec), spec.monotone, group_cost_max), z, spec, group_cost_max)


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
        shapes[last] = [mode_shape(np.shape(l)) for l in jax.tree_util.tree_leaves(theta['first']['mu'])]
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
    for ``blockiaf.forward_per_leaf``, ``blockiaf.inverse`` and ``md_meta.monotonicity``. ``params``: any pytree of the
    network's structure and shapes (``meta['init']``), which fixes the groups."""
    shapes = {b: [mode_shape(np.shape(l)) for l in jax.tree_util.tree_leaves(params[b])] for b in spec.blocks}
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
    seq = encoder_shapes(shape, layers)
    return sum(_layer_cost(a, b) for a, b in zip(seq[:-1], seq[1:]))


def merge_plan(groups: Sequence[tuple], layers: int, cost_max: float) -> list:
    """[MergedGroup, ...] from the storage groups [(mode shape, members), ...] of an encoder (decoder) of
    ``layers`` layers: greedily, the pair whose merge adds the fewest multiply-adds first, while a merged group
    costs at most ``cost_max`` (``group_cost_max``, >= 1) times its parts (``_encoder_cost``: zero padding
    is paid for in full, a padded layer may lose its kron matrix). A group of fewer modes goes into the order-preserving positions of
    the other's that cost least (CNN4's encoders: the first kernel, 9x1x64, with the 9x64x64 kernels; its
    decoders: the classifier's bias, 5, with the 64-vectors). Deterministic: ``effective_packed`` plans from
    theta's shapes, ``apply_packed`` from z's, and both get the same plan."""
    if not cost_max >= 1.0:
        raise ValueError(f'group_cost_max must be >= 1 (1: merge only where padding costs nothing), got {cost_max}')
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
    ``monotone`` as in the spec and ``group_cost_max`` as given to ``apply_packed``:

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


def apply_packed(weights: Params, z: Params, spec: BlockIAFSpec, group_cost_max: float) -> Params:
    """phi = g(z) from ``weights = effective_packed(pack(theta, spec), spec.monotone, group_cost_max)``:
    equal to ``blockiaf.forward_per_leaf(theta, z, spec)`` up to float rounding. Encoders and decoders run per
    merged group (``merge_plan`` with ``group_cost_max``) on the members stacked and zero-padded to the group's
    shape; where the links are one matrix (``effective_packed``) it reads the code stacks and writes the decoder
    stacks, its columns and rows gathered into their order (``_links_indices``: a gather of the weights alone,
    which JAX hoists out of the inner loop)."""
    blocks, w = spec.blocks, weights
    template = {b: jax.tree_util.tree_leaves(z[b]) for b in blocks}
    shapes = {b: [mode_shape(leaf.shape) for leaf in leaves] for b, leaves in template.items()}
    depth = spec.encoder_layers
    enc_groups = _merged_members(shapes, spec, 'enc', group_cost_max)
    dec_groups = _merged_members(shapes, spec, 'dec', group_cost_max)
    planned = lambda groups, layer: [(sum(len(m) for m, _ in parts),) + tuple(padded[layer])
                                     for parts, padded in groups]
    made = lambda part: [tuple(np.shape(layers[0]['b'])) for layers in w[part]]
    if made('enc') != planned(enc_groups, 1) or made('dec') != planned(dec_groups, depth - 1):
        raise ValueError('apply_packed: the weights are not effective_packed(..., spec.monotone, group_cost_max) '
                         'of a map of this network (their merged groups differ from the plan of z and spec)')
    act = nonlinearity(spec)
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
            sizes = [math.prod(encoder_shapes(s, depth)[-1]) for s in shapes[b]]
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
        phi[b] = jax.tree_util.tree_map(lambda zz, aa, mm: zz * sigma(aa, spec) + mm, z[b], a, mu)
    return phi


def _merged_members(shapes: dict, spec: BlockIAFSpec, part: str, group_cost_max: float) -> list:
    """Per merged group of ``part`` (``merge_plan``): (its parts, in stacking order, each ([(block, leaf
    index), ...], the members' mode shapes through the encoder's layers in the group's M modes), the group's
    mode shapes through the layers)."""
    plan = _plan(shapes, spec, part)
    depth = spec.encoder_layers
    out = []
    for m in merge_plan([(shapes[b][j], len(members)) for members in plan for b, j in members[:1]], depth,
                        group_cost_max):
        parts = []
        for g, slots in m.parts:
            b, j = plan[g][0]
            parts.append((plan[g], [_embed(s, slots, len(m.shape)) for s in encoder_shapes(shapes[b][j], depth)]))
        out.append((parts, encoder_shapes(m.shape, depth)))
    return out


def _links_indices(shapes: dict, spec: BlockIAFSpec, enc_groups: list, dec_groups: list) -> tuple:
    """Static (cols, rows) that gather the merged links (``effective_packed``) into the order of the stacks:
    cols[k] = the column (the position in the blocks' concatenated encodings) that reads entry k of the code
    stacks raveled, rows[k] = the row (blocks in sorted names) that writes entry k of the decoder stacks
    raveled; padding entries index the extra last column / row, of zeros."""
    depth = spec.encoder_layers
    size = lambda s: int(np.prod(encoder_shapes(s, depth)[-1]))
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

