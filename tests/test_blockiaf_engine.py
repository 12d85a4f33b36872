"""The blockIAF's engine (md_meta.blockiaf_engine): its grouped products compute the per-leaf definition
(blockiaf.forward_per_leaf), values and gradients, at any md.group_cost_max; the merge plans, the factor norms,
pack / unpack."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_meta import blockiaf, blockiaf_engine
from md_meta import config as config_lib
from md_meta.networks import make_model
from tests.helpers import perturbed, random_like, tree_max_abs_diff
from tests.test_blockiaf import mlp_params


@pytest.mark.parametrize('net,monotone', [('mlp', False), ('cnn4', False), ('cnn4', True)])
def test_grouped_products_compute_the_per_leaf_map(net, monotone, monkeypatch):
    """forward (leaves of equal mode shape stacked, one batched product per layer and mode; the small layers
    as one kron matrix each; the links as one matrix) == forward_per_leaf (one product per leaf and mode),
    values and gradients w.r.t. theta and z, in float64, on a network whose leaves form groups of several sizes
    (CNN4: twelve 8-vectors, three 9x8x8 kernels, single leaves, all merged into padded groups of mixed mode
    counts, ``merge_plan``; the size limit of the matrices applied whole
    lowered so that the outer layers stay factored, as a 64-channel CNN4's do, and in one case the links stay
    one product per block, as ResNet-12's do). The MLP's blocks run in reverse order, so the merged links' rows
    (in the blocks' sorted names) are not in the blocks' order. Both sum in different orders (a kron matrix
    against its factors one mode at a time), so they agree to rounding: the grouped map eagerly (MLP) 9e-16,
    under jit <= 6e-16 of values up to 48 (measured). The monotone map applies the product of its factors'
    norms to each layer's output instead of normalising the factors: the same numbers up to rounding."""
    with jax.enable_x64(True):
        if net == 'mlp':
            model, x = make_model('mlp', hidden=(8, 8)), jnp.zeros((4, 1))
        else:
            model, x = make_model('cnn4', num_classes=5, features=8, conv_impl='patches'), jnp.zeros((2, 28, 28, 1))
            monkeypatch.setattr(blockiaf_engine, 'DENSE_LAYER_MAX', 128 if monotone else 4096)
        params = jax.jit(lambda x: jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                                          model.init(jax.random.PRNGKey(0), x)['params']))(x)
        blocks = tuple(reversed(blockiaf.default_blocks(params))) if net == 'mlp' else None
        spec = blockiaf.make_spec(params, blocks=blocks, scale='bounded', monotone=monotone)
        theta = perturbed(jax.random.PRNGKey(2), blockiaf.init(jax.random.PRNGKey(1), params, spec, head_init='learnable'),
                          0.3)
        z = random_like(jax.random.PRNGKey(5), params)
        if net == 'cnn4':   # both kinds of layer are in the program; the links merged (4096) or not (128)
            weights = jax.eval_shape(
                lambda th: blockiaf_engine.effective_packed(blockiaf_engine.pack(th, spec), monotone, 1.5), theta)
            assert {'dense' in p for group in weights['enc'] for p in group} == {True, False}
            assert ('links' in weights) != monotone
            packed = jax.eval_shape(lambda th: blockiaf_engine.pack(th, spec), theta)   # several mode shapes merged
            assert len(weights['enc']) < len(packed['enc']) and len(weights['dec']) < len(packed['dec'])
        phi = jax.jit(lambda t, zz: blockiaf_engine.forward(t, zz, spec))(theta, z)
        assert tree_max_abs_diff(phi, z) > 0.1   # far from the identity

        def loss(fn):
            return lambda th, zz: sum(jnp.sum(jnp.sin(l)) for l in jax.tree_util.tree_leaves(fn(th, zz, spec)))
        grouped, per_leaf = jax.value_and_grad(loss(blockiaf_engine.forward), (0, 1)), \
            jax.value_and_grad(loss(blockiaf.forward_per_leaf), (0, 1))
        reference = jax.jit(per_leaf)(theta, z)
        if net == 'mlp':   # the grouped map eagerly (op by op: slow on CNN4)
            assert tree_max_abs_diff(grouped(theta, z), reference) < 1e-14
        assert tree_max_abs_diff(jax.jit(grouped)(theta, z), reference) < 1e-12
        assert tree_max_abs_diff(jax.jit(lambda t, p: blockiaf.inverse(t, p, spec))(theta, phi), z) < 1e-12


def test_group_cost_max_changes_the_products_not_the_map():
    """group_cost_max (config md.group_cost_max) sets how far merge_plan merges: on an 8-channel CNN4, 1.5 gives
    2 encoder and 2 decoder groups, 20 one of each (everything zero-padded to the 9x8x8 kernels). Both compute
    the per-leaf map, in float64 under jit, values and gradients; weights made with one bound are refused by
    apply_packed under another (else the zip over groups would silently drop some), and a bound below 1 is
    refused by merge_plan and by the config's validation."""
    with jax.enable_x64(True):
        model = make_model('cnn4', num_classes=5, features=8, conv_impl='patches')
        params = jax.jit(lambda x: jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                                          model.init(jax.random.PRNGKey(0), x)['params']))(
            jnp.zeros((2, 28, 28, 1)))
        z = random_like(jax.random.PRNGKey(5), params)
        spec = blockiaf.make_spec(params, monotone=True)
        theta = perturbed(jax.random.PRNGKey(2), blockiaf.init(jax.random.PRNGKey(1), params, spec,
                                                               head_init='learnable'), 0.3)
        bounds = (1.5, 20.0)
        weights = {g: jax.jit(lambda th, g=g: blockiaf_engine.effective_packed(blockiaf_engine.pack(th, spec), True,
                                                                               g))(theta)
                   for g in bounds}
        assert [(len(weights[g]['enc']), len(weights[g]['dec'])) for g in bounds] == [(2, 2), (1, 1)]

        def loss(fn):
            return lambda th, zz: sum(jnp.sum(jnp.sin(l)) for l in jax.tree_util.tree_leaves(fn(th, zz)))
        reference = jax.jit(jax.value_and_grad(loss(lambda th, zz: blockiaf.forward_per_leaf(th, zz, spec)),
                                               (0, 1)))(theta, z)
        for g in bounds:
            grouped = jax.jit(jax.value_and_grad(loss(lambda th, zz: blockiaf_engine.forward(th, zz, spec, g)),
                                                 (0, 1)))(theta, z)
            assert tree_max_abs_diff(grouped, reference) < 1e-12
        with pytest.raises(ValueError, match='merged groups differ'):
            blockiaf_engine.apply_packed(weights[1.5], z, spec, 20.0)
    with pytest.raises(ValueError, match='group_cost_max must be >= 1'):
        blockiaf_engine.merge_plan([((64,), 12), ((9, 64, 64), 3)], 3, 0.5)
    config = config_lib.base_config()
    config.md.group_cost_max = 0.5
    with pytest.raises(config_lib.ConfigError, match='config.md.group_cost_max: must be a number >= 1'):
        config_lib.validate(config)


def test_merge_plan_partitions_the_groups_within_the_cost_bound():
    """merge_plan: every storage group in exactly one merged group, its modes in increasing positions of the
    merged shape and no larger there; a merged group's multiply-adds, zero padding included, within
    cost_max times its parts'. CNN4 (64 channels): the first kernel (9x1x64) and, in the decoders, the
    classifier's kernel (as 1x64x5) join the 9x64x64 kernels; the classifier's bias joins the 64-vectors."""
    cnn4_enc = [((64,), 12), ((9, 1, 64), 1), ((9, 64, 64), 3)]
    cnn4_dec = [((64,), 9), ((9, 64, 64), 3), ((5,), 1), ((64, 5), 1)]
    group = blockiaf_engine.MergedGroup
    assert blockiaf_engine.merge_plan(cnn4_enc, 3, 1.5) == [group((64,), ((0, (0,)),)),
                                                            group((9, 64, 64), ((1, (0, 1, 2)), (2, (0, 1, 2))))]
    assert blockiaf_engine.merge_plan(cnn4_dec, 3, 1.5) == [group((64,), ((0, (0,)), (2, (0,)))),
                                                            group((9, 64, 64), ((1, (0, 1, 2)), (3, (1, 2))))]
    rng = np.random.default_rng(0)
    for _ in range(20):
        groups = [(tuple(int(n) for n in rng.choice([1, 3, 9, 16, 64, 160], size=rng.integers(1, 4))),
                   int(rng.integers(1, 5))) for _ in range(rng.integers(1, 8))]
        cost_max = float(rng.choice([1.0, 1.5, 3.0]))
        plan = blockiaf_engine.merge_plan(groups, 3, cost_max)
        assert sorted(g for m in plan for g, _ in m.parts) == list(range(len(groups)))
        for m in plan:
            for g, slots in m.parts:
                shape = groups[g][0]
                assert len(slots) == len(shape) and list(slots) == sorted(set(slots))
                assert all(n <= m.shape[k] for k, n in zip(slots, shape))
            members = sum(groups[g][1] for g, _ in m.parts)
            parts = sum(groups[g][1] * blockiaf_engine._encoder_cost(groups[g][0], 3) for g, _ in m.parts)
            assert members * blockiaf_engine._encoder_cost(m.shape, 3) <= cost_max * parts


@pytest.mark.parametrize('constant_max', [1 << 22, 0])
def test_inverse_norms_are_each_matrix_norm(constant_max, monkeypatch):
    """_inverse_norms: 1 / max(1, ||U_g||_F) for every matrix of every stack, whether the ids of the entries'
    matrices are a constant of the program or made by iotas in it (``SEGMENT_CONSTANT_MAX``), under jit."""
    monkeypatch.setattr(blockiaf_engine, 'SEGMENT_CONSTANT_MAX', constant_max)
    rng = np.random.default_rng(0)
    stacks = [rng.normal(size=s).astype(np.float32) * c for s, c in
              [((3, 4, 5), 0.1), ((1, 7, 2), 1.0), ((2, 1, 1), 3.0), ((4, 6, 6), 0.3)]]
    got = jax.jit(lambda s: blockiaf_engine._inverse_norms(s))([jnp.asarray(u) for u in stacks])   # a trace per case
    for g, u in zip(got, stacks):
        want = 1.0 / np.maximum(1.0, np.sqrt((u.astype(np.float64) ** 2).sum(axis=(1, 2))))
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5)
    assert min(float(g.min()) for g in got) < 1.0 and max(float(g.max()) for g in got) == 1.0   # both sides of max


@pytest.mark.parametrize('monotone', [False, True])
def test_unpack_inverts_pack(monotone):
    """unpack(pack(theta)) is theta, leaf for leaf and bit for bit (CNN4: leaves of several mode shapes per
    block, groups of members from several blocks; and a one-block MLP), so a trained map's per-leaf tools
    (``monotonicity``, ``forward_per_leaf``) read meta['geom']; a map of another network is refused."""
    model = make_model('cnn4', num_classes=5, features=8, conv_impl='patches')
    cnn = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))['params']
    for params in (cnn, {'layer_0': mlp_params()['layer_0']}):
        spec = blockiaf.make_spec(params, monotone=monotone)
        theta = perturbed(jax.random.PRNGKey(2), blockiaf.init(jax.random.PRNGKey(1), params, spec), 0.3)
        back = blockiaf_engine.unpack(blockiaf_engine.pack(theta, spec), spec, params)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(theta)
        assert tree_max_abs_diff(back, theta) == 0.0
    spec = blockiaf.make_spec(cnn, monotone=monotone)
    packed = blockiaf_engine.pack(blockiaf.init(jax.random.PRNGKey(1), cnn, spec), spec)
    wider = make_model('cnn4', num_classes=5, features=16, conv_impl='patches')   # the same groups, other shapes
    for other in (wider.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))['params'],
                  dict(cnn, layer_0={'w': jnp.zeros((3, 3, 1, 4))})):          # other groups
        with pytest.raises(ValueError, match='not the map of this network'):
            blockiaf_engine.unpack(packed, spec, other)
