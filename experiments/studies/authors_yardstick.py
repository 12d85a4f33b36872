r"""The authors' code as a same-machine yardstick: seconds per meta-step of their PyTorch MAML, Meta-SGD,
MetaCurvature and MD on random episodes of ``experiments.benchmark``'s shapes.

    python -m experiments.studies.authors_yardstick --reference_dir=PATH [--methods=maml,md] [--shapes=a,b,c]

Run it with a Python that has torch and torchmeta (``experiments.studies.crosscheck_reference`` says how to make one;
neither is an md-meta dependency). ``python -m experiments.benchmark --authors_code=PATH --authors_python=PY``
runs it in the same session and prints md-meta's speed-up beside each row.

What is timed: one meta-step as the body of the authors' ``MetaLearningAlgBase.train`` does it, calling their
code for everything that computes: ``meta_optimizer.zero_grad()``; for each task of the batch their
``adapt`` (K inner steps, second order), their base model on the query set, their cross-entropy / batch size,
``backward()``; then ``meta_optimizer.step()`` (their ``_get_meta_optimizer`` for MD: Adam on Omniglot, SGD
with Nesterov momentum on miniImageNet; Adam(1e-3) for the others, as their base class). Their models and
meta-models are built by their own ``_get_meta_model`` (so their initialisation); the episodes are the
benchmark's (``np.random.default_rng(step)``, the same arrays, NCHW). Their data loaders, logging and
meta-validation are not run. One warm-up step, then ``--repeats`` timed steps; the median is reported.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import types

from absl import app, flags

FLAGS = flags.FLAGS

# shape -> (data set, image size, channels, tasks, K, alpha), as experiments.benchmark.SHAPES / make_config
SHAPES = {'a': ('omniglot', 28, 1, 4, 5, 0.4), 'b': ('miniimagenet', 84, 3, 4, 5, 0.01),
          'c': ('omniglot', 28, 1, 32, 1, 0.4)}
WAYS, SHOTS, QUERY = 5, 1, 15
CLASSES = {'maml': ('src.maml', 'MAML'), 'metasgd': ('src.meta_sgd', 'MetaSGD'),
           'metacurvature': ('src.meta_curvature', 'MetaCurvature'), 'md': ('src.meta_mirror_descent',
                                                                           'MetaMirrorDescent')}


def episodes(step: int, shape: str):
    """The benchmark's random episode batch for ``step`` (``experiments.benchmark.synthetic_source``), NCHW."""
    import numpy as np
    _, size, ch, tasks, _, _ = SHAPES[shape]
    rng = np.random.default_rng(step)
    ns, nq = WAYS * SHOTS, WAYS * QUERY
    sx = rng.standard_normal((tasks, ns, size, size, ch), np.float32).transpose(0, 1, 4, 2, 3)
    qx = rng.standard_normal((tasks, nq, size, size, ch), np.float32).transpose(0, 1, 4, 2, 3)
    sy = np.tile(np.arange(WAYS, dtype=np.int64).repeat(SHOTS), (tasks, 1))
    qy = np.tile(np.arange(WAYS, dtype=np.int64).repeat(QUERY), (tasks, 1))
    return sx, sy, qx, qy


def time_method(reference_dir: str, method: str, shape: str, repeats: int) -> dict:
    import importlib

    from .authors_code import load_reference
    torch, models, *_ = load_reference(reference_dir)
    dataset, size, ch, tasks, steps, alpha = SHAPES[shape]
    module, name = CLASSES[method]
    cls = getattr(importlib.import_module(module), name)
    net = models.FourBlkCNNOmniglot if dataset == 'omniglot' else models.FourBlkCNN
    alg = cls.__new__(cls)
    alg.args = types.SimpleNamespace(task_iter=steps, task_lr=alpha, first_order=False, batch_size=tasks,
                                     dataset=dataset, meta_lr=1e-3, num_way=WAYS)
    alg._get_base_model = lambda: net(WAYS)
    alg._base_model = alg._get_base_model()
    alg._meta_model = alg._get_meta_model()
    alg._nll = torch.nn.CrossEntropyLoss()
    if method == 'md':
        optimizer, _ = alg._get_meta_optimizer()
    else:  # their base class's _get_meta_optimizer
        optimizer = torch.optim.Adam([{'params': m.parameters()} for m in alg._meta_model.values()], lr=1e-3)
    alg._base_model.train()
    for m in alg._meta_model.values():
        m.train()

    def meta_step(step):
        sx, sy, qx, qy = (torch.from_numpy(a) for a in episodes(step, shape))
        optimizer.zero_grad()
        for t in range(tasks):
            params = alg.adapt(sx[t], sy[t], first_order=False)
            loss = alg._nll(alg._base_model(qx[t], params=params), qy[t]) / tasks
            loss.backward()
        optimizer.step()

    meta_step(0)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        meta_step(i + 1)
        times.append(time.perf_counter() - t)
    return {'method': method, 'shape': shape, 'median_s': statistics.median(times), 'times': times,
            'threads': torch.get_num_threads(), 'torch': torch.__version__}


def main(argv):
    del argv
    from .authors_code import ReferenceUnavailable, load_reference
    try:
        torch = load_reference(FLAGS.reference_dir)[0]
    except ReferenceUnavailable as e:
        raise SystemExit(f'authors_yardstick: {e}')
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    for shape in FLAGS.shapes:
        for method in FLAGS.methods:
            if method not in CLASSES or shape not in SHAPES:
                raise SystemExit(f'unknown method {method!r} or shape {shape!r}: methods {tuple(CLASSES)}, '
                                 f'shapes {tuple(SHAPES)}')
            r = time_method(FLAGS.reference_dir, method, shape, FLAGS.repeats)
            print(json.dumps(r), flush=True)
            print(f"authors' {method} ({shape}): median {r['median_s']:.3f} s/step", file=sys.stderr, flush=True)


if __name__ == '__main__':
    flags.DEFINE_string('reference_dir', None, 'checkout of github.com/zhangyilang/MetaMirrorDescent')
    flags.DEFINE_list('methods', ['maml', 'metasgd', 'metacurvature', 'md'], 'the authors\' methods to time')
    flags.DEFINE_list('shapes', ['a', 'b', 'c'], "the benchmark's shapes (a, b, c)")
    flags.DEFINE_integer('repeats', 3, 'timed meta-steps (after one warm-up step)')
    flags.DEFINE_integer('threads', 0, 'torch threads (0: every core)')
    app.run(main)
