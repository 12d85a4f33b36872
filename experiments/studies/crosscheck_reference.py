r"""Cross-check md-meta's MD, MetaCurvature and Meta-SGD against the authors' PyTorch code.

    python -m experiments.studies.crosscheck_reference --reference_dir=PATH [--seeds=0,1,2] [--out=crosscheck.json]

PATH is a checkout of github.com/zhangyilang/MetaMirrorDescent (never part of md-meta). Run it with a Python
that has torch and torchmeta (neither is an md-meta dependency; a separate environment, e.g. a venv created
with --system-site-packages beside md-meta's, ``pip install torch`` and ``pip install --no-deps torchmeta``).
Only torchmeta's ``modules`` and ``utils.gradient_based`` are loaded (its package root imports torchvision
and the data sets, which the comparison does not use), and only the authors' models and meta-models: their
training base class (data loaders) is replaced by a bare ``args`` holder, so their ``adapt`` runs unchanged.

For the authors' CNN4 for Omniglot (28x28x1, N-way), each method and each seed it draws one random, non-identity
set of meta-parameters on the authors' side (every factor, also those the authors start at zero; batch-norm scales
and offsets, including a negative scale), copies it into md-meta's layout (Flax kernels, reversed tensor modes,
leaves in pytree order; a permutation, so gradients convert the same way) and compares on a random episode
(and, for the training path, a second one), in float32 and float64:

* MD: g(z0); g^-1(phi) (the authors have no inverse: md-meta's z = g^-1(phi) is fed to the authors' g, which
  must return phi); phi_K after K inner steps; the second-order meta-gradient of the query loss w.r.t. z0 and
  every blockIAF parameter;
* MetaCurvature and Meta-SGD: phi_K and the meta-gradient w.r.t. phi_0 and the method's parameters;
* every method, the training path: the mean query loss of a batch of two tasks (this episode and a second one)
  and its second-order meta-gradient through ``md_meta.meta.meta_value_and_grad`` (``inner.remat=True``, K + 1
  scan bodies for K > 1, the configuration's task batching and conv implementation), against the authors'
  ``adapt`` on each task, losses averaged ('meta_step_*').

Each comparison reports max |md-meta - authors| / max |authors| over the leaves of that quantity (a leaf's scale
floored at 1e-3 x the quantity's largest leaf; a NaN or an inf anywhere, on either side, fails) and, in the
JSON (``--out``), the error of every leaf by name; leaves exactly zero in both codes ('zero_on_both_sides': their
agreement proves nothing) or in one ('zero_on_one_side': measured against the floor) are listed. ``--seeds``
runs one comparison per seed (parameters and episodes drawn anew). It passes below ``--rtol`` in float64; in
float32, where both codes' second-order meta-gradients lose digits, below 1.5x the sum of the two codes' own
float32 errors (each measured against the other code in float64), see ``run``. md-meta runs ``md.monotone=False, md.scale='exp'``: the authors' form.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import sys
import types
from collections import OrderedDict

from absl import app, flags

from .authors_code import ReferenceUnavailable, load_reference  # noqa: F401 (re-exported)

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- layouts

def network_names():
    """(torch name, md-meta path) of every CNN4 parameter, in the authors' order."""
    out = []
    for i in range(4):
        out += [(f'features.{i}.0.weight', (f'layer_{i}', 'kernel')), (f'features.{i}.0.bias', (f'layer_{i}', 'bias')),
                (f'features.{i}.1.weight', (f'layer_{i}', 'norm', 'scale')),
                (f'features.{i}.1.bias', (f'layer_{i}', 'norm', 'bias'))]
    out += [('classifier.weight', ('layer_4', 'dense', 'kernel')), ('classifier.bias', ('layer_4', 'dense', 'bias'))]
    return out


def to_md_tensor(t):
    """An authors' parameter tensor -> md-meta's layout: conv (O, I, kh, kw) -> (kh, kw, I, O), dense (O, I) -> (I, O)."""
    import numpy as np
    a = t.detach().cpu().numpy()
    if a.ndim == 4:
        return np.transpose(a, (2, 3, 1, 0))
    if a.ndim == 2:
        return a.T
    return a


def view_perm(torch_view):
    """Indices p such that md-meta's flattened view (the modes reversed) = the authors' flattened view[p]."""
    import numpy as np
    n = int(np.prod(torch_view))
    return np.arange(n).reshape(torch_view).transpose(tuple(reversed(range(len(torch_view))))).reshape(-1)


def set_path(tree, path, value):
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def md_blocks():
    """Per block (md-meta layer name): md-meta leaf paths in pytree order and the authors' names in theirs."""
    names = network_names()
    blocks = OrderedDict()
    for tname, path in names:
        blocks.setdefault(path[0], []).append((tname, path))
    out = OrderedDict()
    for b, items in blocks.items():
        md_order = sorted(items, key=lambda it: it[1])  # dict pytrees flatten in sorted-key order
        out[b] = {'torch': [t for t, _ in items], 'md': [t for t, _ in md_order], 'path': dict(items)}
    return out


# ----------------------------------------------------------------------------- random non-identity parameters

def randomise_network(torch, model, gen):
    """Default conv/linear init (already there), conv biases, batch-norm scales (one negative) and offsets."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('1.weight'):  # batch-norm scale
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                p[0] = -0.7
            elif name.endswith('bias'):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def randomise_all(torch, module, gen, scale_heads=0.5):
    """Every parameter of a meta-model drawn: factors U(+-c/sqrt(fan_in)), vectors 0.1 N(0, 1)."""
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.dim() >= 2:
                bound = scale_heads / p.shape[1] ** 0.5
                p.copy_((torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 - 1) * bound)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ----------------------------------------------------------------------------- authors' meta-models -> md-meta

def kron_layer_to_md(layer):
    """The authors' KronLinear (factors per mode in their order, bias in their view) -> md-meta's layer."""
    import numpy as np
    factors = [w.detach().cpu().numpy() for w in layer.weights][::-1]
    bias = layer.bias.detach().cpu().numpy()
    return {'u': factors, 'b': np.transpose(bias, tuple(reversed(range(bias.ndim))))}


def kron_layers(seq):
    return [m for m in seq if type(m).__name__ == 'KronLinear']


def blockiaf_to_md(iaf, params_md):
    """The authors' BlockIAF (one block per layer: 4 tensors per conv layer, 2 for the classifier) -> md-meta's
    theta (``md_meta.blockiaf.init``'s structure, scale='exp', monotone=False)."""
    import numpy as np
    blocks = md_blocks()
    names = list(blocks)
    layer = lambda n: n.replace('.', '_')
    theta = {'first': {}, 'enc': {}, 'link': {}, 'dec': {}}
    # block 1: HadamardLinear over the authors' concatenation of the block's tensors
    b0 = blocks[names[0]]
    hada = iaf.blk_IARs[iaf._layers2blk(tuple(layer(t) for t in b0['torch']))]
    logw, bias = hada.log_weight.detach().cpu().numpy(), hada.bias.detach().cpu().numpy()
    a_tree = _copy_struct(params_md[names[0]])
    mu_tree = _copy_struct(params_md[names[0]])
    start = 0
    for tname in b0['torch']:
        path = b0['path'][tname][1:]
        shape_md = get_path(params_md[names[0]], path).shape
        tshape = _torch_shape(shape_md)
        n = int(np.prod(tshape))
        set_path(a_tree, path, _md_from_torch_flat(logw[start:start + n], tshape))
        set_path(mu_tree, path, _md_from_torch_flat(bias[start:start + n], tshape))
        start += n
    theta['first'] = {'a': a_tree, 'mu': mu_tree}

    # encodings: per block, the md-meta order of the concatenated encodings as indices into the authors'
    enc_perm, enc_sizes = [], []
    offset = 0
    for b in names[:-1]:
        blk = blocks[b]
        torch_segments, start = {}, 0
        enc_layers = []
        for tname in blk['torch']:
            enc = iaf.layer_encoders[layer(tname)]
            n = int(enc.out_features)
            torch_segments[tname] = (start, n)
            start += n
        for tname in blk['md']:
            enc = iaf.layer_encoders[layer(tname)]
            kls = kron_layers(enc.mlp)
            enc_layers.append([kron_layer_to_md(k) for k in kls])
            s, n = torch_segments[tname]
            out_view = tuple(int(x) for x in kls[-1].out_size)
            enc_perm.append(offset + s + view_perm(out_view))
        theta['enc'][b] = enc_layers
        offset += start
        enc_sizes.append(start)
    enc_perm = np.concatenate(enc_perm)

    for i, b in enumerate(names[1:], start=1):
        blk = blocks[b]
        link = iaf.blk_IARs[iaf._layers2blk(tuple(layer(t) for t in blk['torch']))]
        d_in = sum(enc_sizes[:i])
        in_perm = enc_perm[:d_in]
        segs, start = {}, 0
        for tname in blk['torch']:
            dec = iaf.layer_decoders[layer(tname)]
            n = int(dec.in_features)
            segs[tname] = (start, n, tuple(int(x) for x in dec.in_size))
            start += n
        out_perm, decs = [], []
        for tname in blk['md']:
            s, n, in_view = segs[tname]
            out_perm.append(s + view_perm(in_view))
            dec = iaf.layer_decoders[layer(tname)]
            trunk = [kron_layer_to_md(k) for k in kron_layers(dec.mlp)]
            decs.append({'trunk': trunk, 'a': kron_layer_to_md(dec.log_scale[0]), 'mu': kron_layer_to_md(dec.shift[0])})
        out_perm = np.concatenate(out_perm)
        w, bb = link.weight.detach().cpu().numpy(), link.bias.detach().cpu().numpy()
        theta['link'][b] = {'w': w[out_perm][:, in_perm], 'b': bb[out_perm]}
        theta['dec'][b] = decs
    return theta


def _copy_struct(tree):
    return {k: _copy_struct(v) if isinstance(v, dict) else None for k, v in tree.items()}


def _torch_shape(shape_md):
    if len(shape_md) == 4:
        kh, kw, i, o = shape_md
        return (o, i, kh, kw)
    return tuple(reversed(shape_md))


def _md_from_torch_flat(vec, tshape):
    import numpy as np
    a = vec.reshape(tshape)
    return np.transpose(a, (2, 3, 1, 0)) if a.ndim == 4 else a.T if a.ndim == 2 else a


def network_to_md(named, template):
    out = _copy_struct(template)
    for tname, path in network_names():
        set_path(out, path, to_md_tensor(named[tname]))
    return out


def network_to_torch(tree, torch, dtype):
    import numpy as np
    out = OrderedDict()
    for tname, path in network_names():
        a = np.asarray(get_path(tree, path))
        a = np.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 else a.T if a.ndim == 2 else a
        out[tname] = torch.tensor(np.ascontiguousarray(a), dtype=dtype)
    return out


def metacurvature_to_md(mc_module, template):
    """The authors' LayerWiseKronLinear -> md-meta's {'factors': ...}: conv M0 (O), M1 (I), M2 (kh*kw) act as
    G x_O M0^T x_I M1 x_f M2^T, i.e. md-meta's [M_f, M_in, M_out] = [M2^T, M1, M0^T]; dense M_a @ G @ M_b is
    md-meta's [M_in, M_out] = [M_b^T, M_a]."""
    ws = [w.detach().cpu().numpy() for w in mc_module.mc_weight]
    out, k = _copy_struct(template), 0
    for tname, path in network_names():
        nd = len(get_path(template, path).shape)
        if nd == 1:
            set_path(out, path, ws[k]); k += 1
        elif nd == 2:
            set_path(out, path, [ws[k + 1].T, ws[k]]); k += 2
        else:
            set_path(out, path, [ws[k + 2].T, ws[k + 1], ws[k].T]); k += 3
    return out


def metasgd_to_md(log_lr, template):
    named = OrderedDict((t, log_lr[t.replace('.', '_')]) for t, _ in network_names())
    return network_to_md(named, template)


# ----------------------------------------------------------------------------- the comparison

def _leaf_names(tree):
    import jax
    return [jax.tree_util.keystr(path) or '(scalar)' for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def leaf_errors(md_tree, ref_tree):
    """Per leaf of the quantity, in md-meta's pytree order: {leaf name: {'error', 'max_abs_md', 'max_abs_ref'}},
    error = max |a - b| / max(max |b|, 1e-3 x the largest max |b| over the finite leaves). A leaf with a NaN or
    an inf on either side has error inf (and so fails every tolerance)."""
    import jax
    import numpy as np
    a = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(md_tree)]
    b = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(ref_tree)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise AssertionError(f'structures differ: {[x.shape for x in a]} vs {[y.shape for y in b]}')
    finite = [bool(np.all(np.isfinite(x)) and np.all(np.isfinite(y))) for x, y in zip(a, b)]
    peak = lambda v: float(np.max(np.abs(v))) if v.size else 0.0
    top = max([peak(y) for y, f in zip(b, finite) if f], default=0.0)
    out = {}
    for name, x, y, f in zip(_leaf_names(md_tree), a, b, finite):
        error = (peak(x - y) / max(peak(y), 1e-3 * top, 1e-30)) if f else float('inf')
        out[name] = {'error': error, 'max_abs_md': peak(x) if f else float('nan'),
                     'max_abs_ref': peak(y) if f else float('nan')}
    return out


def zero_on_both_sides(table):
    """The leaves of a ``leaf_errors`` table that are exactly zero in both codes: their agreement proves nothing."""
    return [n for n, r in table.items() if r['max_abs_md'] == 0.0 and r['max_abs_ref'] == 0.0]


def zero_on_one_side(table):
    """The leaves exactly zero in one code and not in the other: their error is measured against the floor
    (1e-3 x the largest leaf), so it says only that the other code's entries are small."""
    return [n for n, r in table.items() if (r['max_abs_md'] == 0.0) != (r['max_abs_ref'] == 0.0)]


def rel_error(md_tree, ref_tree):
    """max over leaves of max |a - b| / max |b|, with a leaf's scale floored at 1e-3 x the largest leaf's; inf
    if any leaf on either side holds a NaN or an inf."""
    return max(r['error'] for r in leaf_errors(md_tree, ref_tree).values())


def compare(reference_dir, method, dtype_name, *, md_dtype=None, ways=5, shots=1, query=15, steps=5,
            step_size=0.01, seed=0, task_batching='auto', task_gradients='auto'):
    """({quantity: relative error}, {quantity: ``leaf_errors`` table}, the meta-step's modes) for one method, the
    authors' code in ``dtype_name`` and md-meta in ``md_dtype`` (default: the same); see the module docstring."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    torch, models, ref_md, ref_mc, ref_msgd = load_reference(reference_dir)
    from md_meta import blockiaf, blockiaf_engine, losses, methods, networks, strategies
    from md_meta.config import base_config
    from md_meta import meta as meta_lib
    from md_meta.inner import InnerConfig, adapt
    from md_meta.tasks import Task

    tdtype = torch.float64 if dtype_name == 'float64' else torch.float32
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    md_dtype = md_dtype or dtype_name
    with jax.enable_x64(md_dtype == 'float64'):  # md-meta in float32 runs without x64: nothing upcasts
        jdtype = jnp.float64 if md_dtype == 'float64' else jnp.float32
        rng = np.random.default_rng(seed)
        xs = rng.random((ways * shots, 1, 28, 28))
        xq = rng.random((ways * query, 1, 28, 28))
        ys, yq = np.repeat(np.arange(ways), shots), np.repeat(np.arange(ways), query)
        txs, txq = torch.tensor(xs, dtype=tdtype), torch.tensor(xq, dtype=tdtype)
        tys, tyq = torch.tensor(ys), torch.tensor(yq)
        jxs, jxq = jnp.asarray(xs.transpose(0, 2, 3, 1), jdtype), jnp.asarray(xq.transpose(0, 2, 3, 1), jdtype)
        jys, jyq = jnp.asarray(ys), jnp.asarray(yq)
        xs2, xq2 = rng.random((ways * shots, 1, 28, 28)), rng.random((ways * query, 1, 28, 28))  # a second task
        txs2, txq2 = torch.tensor(xs2, dtype=tdtype), torch.tensor(xq2, dtype=tdtype)
        jxs2, jxq2 = jnp.asarray(xs2.transpose(0, 2, 3, 1), jdtype), jnp.asarray(xq2.transpose(0, 2, 3, 1), jdtype)

        # the authors' side, drawn in float64 whatever the precision (the same problem in every run), then cast
        base = models.FourBlkCNNOmniglot(ways).to(torch.float64)
        init = models.FourBlkCNNOmniglot(ways).to(torch.float64)
        randomise_network(torch, init, gen)
        args = types.SimpleNamespace(task_iter=steps, task_lr=step_size)
        alg_cls = {'md': ref_md.MetaMirrorDescent, 'metacurvature': ref_mc.MetaCurvature,
                   'metasgd': ref_msgd.MetaSGD}[method]
        alg = alg_cls.__new__(alg_cls)
        alg.args, alg._base_model, alg._nll = args, base, torch.nn.CrossEntropyLoss()
        if method == 'md':
            extra = ref_md.BlockIAF(base.meta_named_parameters()).to(torch.float64)
            alg._meta_model = {'init': init, 'inverse_mirror_map': extra}
        elif method == 'metacurvature':
            extra = ref_mc.LayerWiseKronLinear(base.parameters()).to(torch.float64)
            alg._meta_model = {'init': init, 'MC': extra}
        else:
            import math
            extra = torch.nn.ParameterDict({n.replace('.', '_'): torch.nn.Parameter(
                torch.zeros_like(p) + math.log(step_size)) for n, p in base.named_parameters()}).to(torch.float64)
            alg._meta_model = {'init': init, 'log_lr': extra}
        if method == 'metacurvature':  # identity + noise: non-identity, well conditioned
            with torch.no_grad():
                for w in extra.mc_weight:
                    n = w.shape[0]
                    w.add_(0.3 * torch.randn(w.shape, generator=gen, dtype=torch.float64) / n ** 0.5)
        elif method == 'metasgd':
            with torch.no_grad():
                for p in extra.values():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        else:
            randomise_all(torch, extra, gen)

        for module in (base, init, extra):
            module.to(tdtype)
        meta_params = list(init.parameters()) + list(extra.parameters())
        n_init = len(list(init.parameters()))
        init_names = [n for n, _ in init.named_parameters()]
        phi_ref = alg.adapt(txs, tys, first_order=False)
        loss_ref = alg._nll(base(txq, params=phi_ref), tyq)
        grads_ref = torch.autograd.grad(loss_ref, meta_params)
        # the training path: the mean query loss of a batch of tasks (this episode and a second one)
        step_losses_ref = [alg._nll(base(q, params=alg.adapt(s, sy, first_order=False)), qy)
                           for s, sy, q, qy in ((txs, tys, txq, tyq), (txs2, tys, txq2, tyq))]
        step_loss_ref = sum(step_losses_ref) / len(step_losses_ref)
        step_grads_ref = torch.autograd.grad(step_loss_ref, meta_params)

        # md-meta's side
        cfg = base_config()
        cfg.method, cfg.inner.step_size = method, step_size
        cfg.md.monotone, cfg.md.scale, cfg.md.kronecker = False, 'exp', 'none'
        model = networks.make_model('cnn4', num_classes=ways, features=64, conv_impl='patches')
        template = model.init(jax.random.PRNGKey(0), jxs)['params']
        geometry = methods.make_geometry(cfg)
        cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jdtype), t)
        z0 = cast(network_to_md(OrderedDict(init.named_parameters()), template))
        if method == 'md':  # md-meta meta-learns the map's weights in the packed layout (blockiaf_engine.pack)
            spec = blockiaf.make_spec(template, scale='exp', monotone=False)
            theta = cast(blockiaf_to_md(extra, template))
            geom = blockiaf_engine.pack(theta, spec)
        elif method == 'metacurvature':
            geom = {'factors': cast(metacurvature_to_md(extra, template))}
        else:
            geom = {'log_lr': cast(metasgd_to_md(extra, template))}
        apply = lambda phi, x: model.apply({'params': phi}, x)
        support_loss = lambda phi: losses.xent(apply(phi, jxs), jys)

        def query_loss(meta):
            phi, _ = adapt(geometry.inner(meta['geom']), support_loss, meta['init'], jax.random.PRNGKey(0),
                           InnerConfig(steps=steps))
            return losses.xent(apply(phi, jxq), jyq), phi

        (loss_md, phi_md), grads_md = jax.jit(jax.value_and_grad(query_loss, has_aux=True))(
            {'init': z0, 'geom': geom})

        # the training path: md_meta.meta.meta_value_and_grad on a batch of the two tasks, with the training
        # configuration's model, inner loop (remat; K + 1 scan bodies for K > 1) and task batching
        train_model = networks.make_model('cnn4', num_classes=ways, features=64, conv_impl=cfg.model.conv_impl,
                                          init=cfg.model.init)
        variables = dict(train_model.init(jax.random.PRNGKey(0), jxs))
        variables.pop('params')
        inner_cfg = InnerConfig(steps, False, cfg.inner.unroll, True)
        learner = meta_lib.MetaLearner(geometry, train_model, 'xent', inner_cfg, inner_cfg._replace(first_order=True),
                                       task_batching, 'float32', task_gradients, cfg.meta.task_chunk)
        batch = Task(jnp.stack([jxs, jxs2]), jnp.stack([jys, jys]), jnp.stack([jxq, jxq2]), jnp.stack([jyq, jyq]))
        (step_loss_md, _), step_grads_md = jax.jit(functools.partial(meta_lib.meta_value_and_grad, learner))(
            {'init': z0, 'geom': geom, 'net': variables}, batch, jax.random.PRNGKey(0))
        modes = {'tasks': 2, 'task_batching': list(strategies.task_batching_for(learner, batch)),
                 'task_gradients': strategies.task_gradients_for(learner, batch), 'remat': True,
                 'conv_impl': networks.resolve_conv_impl(cfg.model.conv_impl)}

        def grad_tree(grads, p_to_md):  # the authors' gradients in md-meta's layout (the same permutation)
            holder = copy.deepcopy(extra)
            with torch.no_grad():
                for p, g in zip(holder.parameters(), grads):
                    p.copy_(g)
            return p_to_md(holder)

        if method == 'md':
            geom_md = lambda g: g
            geom_ref = lambda m: blockiaf_engine.pack(blockiaf_to_md(m, template), spec)
        else:
            key = 'factors' if method == 'metacurvature' else 'log_lr'
            geom_md = lambda g: g[key]
            geom_ref = (lambda m: metacurvature_to_md(m, template)) if method == 'metacurvature' else (
                lambda m: metasgd_to_md(m, template))
        result, tables = {}, {}

        def check(quantity, md_tree, ref_tree):
            tables[quantity] = leaf_errors(md_tree, ref_tree)
            result[quantity] = max(r['error'] for r in tables[quantity].values())

        check('query_loss', float(loss_md), loss_ref.item())
        check('phi_K', phi_md, network_to_md(phi_ref, template))
        check('meta_grad_init', grads_md['init'],
              network_to_md(OrderedDict(zip(init_names, grads_ref[:n_init])), template))
        check('meta_grad_geom', geom_md(grads_md['geom']), grad_tree(grads_ref[n_init:], geom_ref))
        if method == 'md':
            named = OrderedDict(init.named_parameters())
            g_ref = extra(named)
            check('g(z)', blockiaf_engine.forward(theta, z0, spec), network_to_md(g_ref, template))
            result['g(z)-z'] = rel_error(network_to_md(g_ref, template), z0)  # how far from the identity
            phi_any = jax.tree_util.tree_map(lambda a: a + 0.05, z0)
            z_md = blockiaf.inverse(theta, phi_any, spec)
            back = extra(network_to_torch(z_md, torch, tdtype))
            check('g_ref(g^-1(phi))', network_to_md(back, template), phi_any)
        check('meta_step_loss', float(step_loss_md), step_loss_ref.item())
        check('meta_step_grad_init', step_grads_md['init'],
              network_to_md(OrderedDict(zip(init_names, step_grads_ref[:n_init])), template))
        check('meta_step_grad_geom', geom_md(step_grads_md['geom']), grad_tree(step_grads_ref[n_init:], geom_ref))
    return result, tables, modes


def passes(error, limit):
    """A comparison passes when its error is finite and at most ``limit`` (NaN and inf fail, whatever the limit)."""
    return math.isfinite(error) and error <= limit


def run(reference_dir, methods, dtypes, rtol=1e-9, rtol32=2e-3, seeds=(0,), **kw):
    """({seed: {'results': {method: {dtype: {quantity: error}}}, 'leaves': the same with a ``leaf_errors``
    table per quantity, 'zero_on_both_sides' and 'zero_on_one_side': {method: {dtype: {quantity: [leaf]}}},
    'meta_step': {method: modes}, 'pass': bool}}, whether every compared quantity of every seed is within tolerance).

    float64: every error <= rtol. float32: second-order meta-gradients through K batch-normalised steps lose
    digits in float32 in both codes alike, so each side's own float32 error is measured too (that side in
    float32, the other in float64: 'md-meta float32' and 'authors float32'; the same parameters in every run),
    and a float32 difference passes when <= max(rtol32, 1.5 x the sum of the two own errors): agreement down to
    float32's noise floor (the two codes agree to 1e-11 in float64, so the sum bounds it up to that). A NaN or
    an inf anywhere fails. Leaves that are exactly zero in both codes are listed ('zero_on_both_sides'): their
    agreement proves nothing."""
    report, ok = {}, True

    def show(seed, m, d, r, tables):
        print(f'seed {seed} {m:14s} {d:27s} ' + '  '.join(f'{k} {v:.1e}' for k, v in r.items()), flush=True)
        for q, t in tables.items():
            for what, leaves in (('zero on both sides', zero_on_both_sides(t)),
                                 ('zero on one side', zero_on_one_side(t))):
                if leaves:
                    print(f'    {q}: {what}: {", ".join(leaves)}', flush=True)

    for seed in seeds:
        out = {'results': {}, 'leaves': {}, 'zero_on_both_sides': {}, 'zero_on_one_side': {}, 'meta_step': {}}
        seed_ok = True

        def record(m, d, r, tables):
            show(seed, m, d, r, tables)
            out['results'].setdefault(m, {})[d] = r
            out['leaves'].setdefault(m, {})[d] = tables
            for key, flag in (('zero_on_both_sides', zero_on_both_sides), ('zero_on_one_side', zero_on_one_side)):
                leaves = {q: flag(t) for q, t in tables.items()}
                out[key].setdefault(m, {})[d] = {q: z for q, z in leaves.items() if z}

        for m in methods:
            for d in dtypes:
                r, tables, out['meta_step'][m] = compare(reference_dir, m, d, seed=seed, **kw)
                record(m, d, r, tables)
                if d == 'float64':
                    seed_ok &= all(passes(v, rtol) for k, v in r.items() if k != 'g(z)-z')
                    continue
                own_md, t_md, _ = compare(reference_dir, m, 'float64', md_dtype='float32', seed=seed, **kw)
                own_ref, t_ref, _ = compare(reference_dir, m, 'float32', md_dtype='float64', seed=seed, **kw)
                record(m, 'md-meta float32 vs float64', own_md, t_md)
                record(m, 'authors float32 vs float64', own_ref, t_ref)
                seed_ok &= all(passes(v, max(rtol32, 1.5 * (own_md[k] + own_ref[k])))
                               for k, v in r.items() if k != 'g(z)-z')
        out['pass'] = bool(seed_ok)
        report[str(seed)] = out
        ok &= seed_ok
    return report, bool(ok)


def versions():
    """The versions of the libraries the comparison ran with."""
    import importlib.metadata
    out = {}
    for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'numpy', 'torchmeta'):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv):
    del argv
    from ..harness import prepare_process
    prepare_process()  # before any JAX computation
    from md_meta.workdirs import git_commit
    commit = git_commit()  # before the run: what was compared
    try:
        report, ok = run(FLAGS.reference_dir, FLAGS.methods, FLAGS.dtypes, FLAGS.rtol, FLAGS.rtol32,
                         seeds=[int(s) for s in FLAGS.seeds], ways=FLAGS.ways, shots=FLAGS.shots,
                         query=FLAGS.query, steps=FLAGS.steps, step_size=FLAGS.step_size,
                         task_batching=FLAGS.task_batching, task_gradients=FLAGS.task_gradients)
    except ReferenceUnavailable as e:
        sys.exit(f'crosscheck_reference: {e}')
    print(f'tolerance: {FLAGS.rtol:.0e} (float64); float32: max({FLAGS.rtol32:.0e}, 1.5 x the sum of the two sides\' own float32 errors)')
    print('PASS: md-meta agrees with the authors\' code' if ok else 'FAIL: see the errors above the tolerance')
    if FLAGS.out:
        with open(FLAGS.out, 'w') as f:
            json.dump({'pass': ok, 'md_meta_commit': commit, 'versions': versions(), 'settings': {
                'ways': FLAGS.ways, 'shots': FLAGS.shots, 'query': FLAGS.query, 'steps': FLAGS.steps,
                'step_size': FLAGS.step_size, 'seeds': [int(s) for s in FLAGS.seeds], 'dtypes': FLAGS.dtypes,
                'rtol': FLAGS.rtol, 'rtol32': FLAGS.rtol32, 'task_batching': FLAGS.task_batching,
                'task_gradients': FLAGS.task_gradients}, 'seeds': report}, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    flags.DEFINE_string('reference_dir', None, 'checkout of github.com/zhangyilang/MetaMirrorDescent')
    flags.DEFINE_integer('ways', 5, 'N (classes per task)')
    flags.DEFINE_integer('shots', 1, 'support examples per class')
    flags.DEFINE_integer('query', 15, 'query examples per class')
    flags.DEFINE_integer('steps', 5, 'K, inner steps')
    flags.DEFINE_float('step_size', 0.01, 'alpha, the inner step size')
    flags.DEFINE_list('seeds', ['0'], 'seeds of the random parameters and episodes, one comparison each')
    flags.DEFINE_string('task_batching', 'auto', 'md_meta.strategies task_batching of the meta-step comparison')
    flags.DEFINE_string('task_gradients', 'auto', 'md_meta.strategies task_gradients of the meta-step comparison')
    flags.DEFINE_list('methods', ['md', 'metacurvature', 'metasgd'], 'methods to compare')
    flags.DEFINE_list('dtypes', ['float64', 'float32'], 'precisions to compare in')
    flags.DEFINE_float('rtol', 1e-9, 'tolerance in float64')
    flags.DEFINE_float('rtol32', 2e-3, 'tolerance in float32 (or 1.5x the float32 noise floor, see run)')
    flags.DEFINE_string('out', '', 'optional JSON file for the results')
    from ..harness import define_process_flags
    define_process_flags()  # main() calls prepare_process
    app.run(main)
