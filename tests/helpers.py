"""Small shared builders for tests."""
import jax
import jax.numpy as jnp
import numpy as np

from md_meta import methods
from md_meta.config import base_config
from md_meta.inner import InnerConfig
from md_meta.meta import MetaLearner, init_meta_params, meta_loss
from md_meta.networks import make_model
from md_meta.tasks import Task


def tiny_config(method='maml', **overrides):
    """A sinusoid config with tiny shapes; overrides as dotted keys, e.g. {'inner.steps': 2}."""
    c = base_config()
    c.method = method
    c.task.shots = 4
    c.task.query = 4
    c.model.hidden = (8, 8)
    c.meta.batch_size = 3
    c.meta.steps = 10
    c.eval.num_tasks = 20
    c.eval.batch_size = 10
    c.train.log_every = 5
    c.train.steps_per_call = 5
    for k, v in overrides.items():
        node = c
        *path, last = k.split('.')
        for p in path:
            node = node[p]
        node[last] = v
    return c


def tree_max_abs_diff(a, b):
    """max |a - b| over every leaf, on the host (eagerly, each leaf shape would compile its own kernels)."""
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def random_like(key, tree, scale=1.0):
    """N(0, scale^2) leaves shaped like ``tree``'s, cut from one draw: drawn leaf by leaf, eagerly or under
    jit, a tree of many shapes costs one compiled kernel per shape (a minute for a float64 blockIAF)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [int(np.prod(np.shape(l))) for l in leaves]
    flat = scale * jax.random.normal(key, (max(sum(sizes), 1),), jnp.result_type(*leaves))
    if not isinstance(flat, jax.core.Tracer):
        flat = np.asarray(flat)   # cut on the host: no kernel per shape
    starts = np.cumsum([0] + sizes)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[a:b].reshape(np.shape(l)), l.dtype)
                                                  for a, b, l in zip(starts[:-1], starts[1:], leaves)])


def perturbed(key, tree, scale):
    """tree + random_like(key, tree, scale), added on the host (no kernel per leaf shape)."""
    noise = random_like(key, tree, scale)
    return jax.tree_util.tree_map(lambda t, n: jnp.asarray(np.asarray(t) + np.asarray(n)), tree, noise)


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def nan_build(config, at, count):
    """``experiment.build(config)`` whose task source serves NaN query inputs to the meta-steps
    [at, at + count) (0-based), so that those meta-updates are non-finite; sampled on the host, one
    meta-step per call (``nan_build(c, 0, 0)`` is the same run without NaN)."""
    from md_meta import experiment, tasks
    source = tasks.make_source(config)

    def sample(step, num_tasks, split, query):
        batch = source.sample(step, num_tasks, split, query)
        if split == 'train' and at <= step < at + count:
            batch = batch._replace(query_x=jnp.full_like(batch.query_x, jnp.nan))
        return batch
    return experiment.build(config, source=source._replace(sample=sample, device_sample=None))


# Small CNN4 learners and episodes for the equivalence tests (tests/test_networks.py, tests/test_meta.py).
def image_learner(method='maml', *, conv_impl='patches', steps=2, remat=False, unroll=1, dtype='float32',
                   task_batching='vmap', task_chunk=1):
    c = tiny_config(method)
    c.inner.step_size = 0.1
    geometry = methods.make_geometry(c)
    model = make_model('cnn4', layer=geometry.layer, conv_impl=conv_impl, num_classes=3, features=8)
    inner = InnerConfig(steps, False, unroll, remat)
    return MetaLearner(geometry, model, 'xent', inner, inner, task_batching, dtype, task_chunk=task_chunk)


def image_batch(tasks=2, ways=3, shots=1, query=2, size=16):
    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    lab = lambda k: jnp.tile(jnp.arange(ways).repeat(k), (tasks, 1))
    return Task(jax.random.normal(ks[0], (tasks, ways * shots, size, size, 1)), lab(shots),
                jax.random.normal(ks[1], (tasks, ways * query, size, size, 1)), lab(query))


def meta_grad(learner, batch, meta=None):
    if meta is None:
        meta = init_meta_params(learner, jax.random.PRNGKey(0), batch.support_x[0])
    g = jax.jit(jax.grad(lambda m: meta_loss(learner, m, batch, jax.random.PRNGKey(2))[0]))(meta)
    return meta, g


# CIFAR-100's superclasses (coarse labels, in the archive's order) and their fine classes: the official table
CIFAR100_SUPERCLASSES = {
    'aquatic_mammals': ('beaver', 'dolphin', 'otter', 'seal', 'whale'),
    'fish': ('aquarium_fish', 'flatfish', 'ray', 'shark', 'trout'),
    'flowers': ('orchid', 'poppy', 'rose', 'sunflower', 'tulip'),
    'food_containers': ('bottle', 'bowl', 'can', 'cup', 'plate'),
    'fruit_and_vegetables': ('apple', 'mushroom', 'orange', 'pear', 'sweet_pepper'),
    'household_electrical_devices': ('clock', 'keyboard', 'lamp', 'telephone', 'television'),
    'household_furniture': ('bed', 'chair', 'couch', 'table', 'wardrobe'),
    'insects': ('bee', 'beetle', 'butterfly', 'caterpillar', 'cockroach'),
    'large_carnivores': ('bear', 'leopard', 'lion', 'tiger', 'wolf'),
    'large_man-made_outdoor_things': ('bridge', 'castle', 'house', 'road', 'skyscraper'),
    'large_natural_outdoor_scenes': ('cloud', 'forest', 'mountain', 'plain', 'sea'),
    'large_omnivores_and_herbivores': ('camel', 'cattle', 'chimpanzee', 'elephant', 'kangaroo'),
    'medium_mammals': ('fox', 'porcupine', 'possum', 'raccoon', 'skunk'),
    'non-insect_invertebrates': ('crab', 'lobster', 'snail', 'spider', 'worm'),
    'people': ('baby', 'boy', 'girl', 'man', 'woman'),
    'reptiles': ('crocodile', 'dinosaur', 'lizard', 'snake', 'turtle'),
    'small_mammals': ('hamster', 'mouse', 'rabbit', 'shrew', 'squirrel'),
    'trees': ('maple_tree', 'oak_tree', 'palm_tree', 'pine_tree', 'willow_tree'),
    'vehicles_1': ('bicycle', 'bus', 'motorcycle', 'pickup_truck', 'train'),
    'vehicles_2': ('lawn_mower', 'rocket', 'streetcar', 'tank', 'tractor'),
}


def write_cifar100_archive(dest, train_per_class=2, test_per_class=1, seed=0, coarse_names=None):
    """A small cifar-100-python.tar.gz in the official layout (cifar-100-python/{train,test,meta} pickles; keys
    and names as bytes, the form the real archive's Python 2 strings take under encoding='bytes'; the reader
    takes str or bytes): every fine class with a few images whose red plane is the fine label, green plane
    random, blue plane 7 y + x (row y, column x). ``coarse_names``: meta's superclass names (default the
    official ones). Returns its path."""
    import io
    import os
    import pickle
    import tarfile
    fine_names = sorted(n for names in CIFAR100_SUPERCLASSES.values() for n in names)
    coarse_names = list(coarse_names or CIFAR100_SUPERCLASSES)
    coarse_of = {n: list(CIFAR100_SUPERCLASSES).index(s) for s, ns in CIFAR100_SUPERCLASSES.items() for n in ns}
    rng = np.random.default_rng(seed)
    yx = np.add.outer(7 * np.arange(32), np.arange(32)).astype(np.uint8)

    def batch(per_class):
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        img = np.empty((len(fine), 3, 32, 32), np.uint8)
        img[:, 0] = fine[:, None, None]
        img[:, 1] = rng.integers(0, 256, (len(fine), 32, 32))
        img[:, 2] = yx
        return {b'data': img.reshape(len(fine), 3072), b'fine_labels': fine.tolist(),
                b'coarse_labels': [coarse_of[fine_names[f]] for f in fine], b'batch_label': b'fake'}

    parts = {'train': batch(train_per_class), 'test': batch(test_per_class),
             'meta': {b'fine_label_names': [n.encode() for n in fine_names],
                      b'coarse_label_names': [n.encode() for n in coarse_names]}}
    path = os.path.join(str(dest), 'cifar-100-python.tar.gz')
    with tarfile.open(path, 'w:gz') as tar:
        for name, obj in parts.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f'cifar-100-python/{name}')
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path
