r"""Meta-step benchmark: time, FLOPs, throughput and memory of the trainer's own jitted meta-step.

    python -m experiments.benchmark --out_dir=/tmp/bench                 # table for every method, shapes a,b,c
    python -m experiments.benchmark --quick --out_dir=/tmp/bench         # fewer repeats, no curves
    python -m experiments.benchmark --methods=maml,md --shapes=a --curves=K,tasks --curve_shape=a
    python -m experiments.benchmark --methods=maml,metasgd,metacurvature,md --authors_code=PATH \
        --authors_python=/path/to/torch/venv/bin/python      # + the authors' code on the same episodes
    python -m experiments.benchmark --methods=maml,md --shapes=a --profile   # + time per op class vs roofline,
                                                                             #   launches per step

For every method in ``md_meta.methods.names()`` (or ``--methods``) and every shape
  (a) Omniglot 28x28x1, CNN4, 5-way 1-shot 15 query, 4 tasks, K=5, second order;
  (b) miniImageNet 84x84x3, same;
  (c) Omniglot 28x28x1, 32 tasks, K=1;
  (r) ResNet-12 on (b)'s shapes (not in the default --shapes: ~12M parameters);
  (s) the main job's step: sinusoid, 1-40-40-1 MLP, 25 tasks, K=1 (experiments/configs/sinusoid.py; not in
      the default --shapes);
it builds the experiment with ``md_meta.experiment.build`` (a ``base_config()`` config) and times
``md_meta.training.make_host_step`` -- the jitted meta-step the trainer runs -- on random episodes of
the right shapes (no dataset needed). Reported: compile time (tracing + lowering + XLA, each printed and in
``compile_phases_s``), the kernel count (``count_kernels``), median / min seconds per meta-step after
two warm-up steps (``block_until_ready``), XLA's FLOP count (``cost_analysis`` of the compiled step; XLA
counts a ``while`` body once, so when the inner loop is rolled or the tasks are mapped in chunks the
FLOPs are taken from a lowering of the same step fully unrolled with the tasks in one vmap), achieved GFLOP/s and % of ``--peak_gflops``, compiled memory (arguments + outputs +
temporaries - aliased) and the process's max RSS, and host episode-sampling time when
``md_meta.tasks.images`` and its data are available. Writes ``results.md``, ``results.json`` and, with
``--curves``, time/memory against K (1..50) and tasks per batch (1..64) as PNGs.
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

from .harness import run

import jax
import jax.numpy as jnp
import numpy as np

from md_meta import config as config_lib
from md_meta import experiment, methods, tasks, training
from md_meta.strategies import task_batching_for, task_gradients_for
from md_meta.tasks import Task

FLAGS = flags.FLAGS

SHAPES = {
    'a': dict(task='omniglot', size=28, channels=1, tasks=4, K=5),
    'b': dict(task='miniimagenet', size=84, channels=3, tasks=4, K=5),
    'c': dict(task='omniglot', size=28, channels=1, tasks=32, K=1),
    'r': dict(task='miniimagenet', size=84, channels=3, tasks=4, K=5, model='resnet12'),
    's': dict(task='sinusoid', tasks=25, K=1),
}
WAYS, SHOTS, QUERY = 5, 1, 15


def parse_value(s):
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {'true': True, 'false': False}.get(s.lower(), s)


def make_config(method: str, shape: str, K=None, num_tasks=None, overrides=()):
    s = SHAPES[shape]
    if s['task'] == 'sinusoid':   # the main job's config
        from .configs import sinusoid
        c = sinusoid.get_config()
    else:
        c = config_lib.base_config()
        c.task.name = s['task']
        c.task.ways, c.task.shots, c.task.query = WAYS, SHOTS, QUERY
        c.model.name = s.get('model', 'cnn4')
        c.inner.step_size = 0.4 if s['task'] == 'omniglot' else 0.01
        c.inner.first_order = False
    c.method = method
    c.inner.steps = K or s['K']
    c.meta.batch_size = num_tasks or s['tasks']
    for item in overrides:
        key, value = item.split('=', 1)
        node = c
        parts = key.split('.')
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = parse_value(value)
    return c


def synthetic_source(config) -> tasks.TaskSource:
    """Random episodes of the config's shapes (labels 0..N-1, each class equally often)."""
    s = 28 if config.task.name == 'omniglot' else 84
    ch = 1 if config.task.name == 'omniglot' else 3
    n = config.task.ways

    def sample(step, num_tasks, split, query):
        rng = np.random.default_rng(step)
        ns, nq = n * config.task.shots, n * query
        return Task(rng.standard_normal((num_tasks, ns, s, s, ch), np.float32),
                    np.tile(np.arange(n, dtype=np.int32).repeat(config.task.shots), (num_tasks, 1)),
                    rng.standard_normal((num_tasks, nq, s, s, ch), np.float32),
                    np.tile(np.arange(n, dtype=np.int32).repeat(query), (num_tasks, 1)))

    return tasks.TaskSource(config.task.name, 'xent', np.zeros((n * config.task.shots, s, s, ch), np.float32),
                            sample, None, n)


def build(config):
    """``experiment.build`` with random episodes of the config's shapes as the task source (sinusoid: its own
    tasks, drawn on the device)."""
    if config.task.name == 'sinusoid':
        return experiment.build(config)
    return experiment.build(config, source=synthetic_source(config))


def count_kernels(compiled) -> int:
    """Fusions and custom calls in the optimised HLO of a compiled step: on an accelerator each is (at
    least) one kernel launch per execution (a while loop's body counted once). A proxy for launch-bound
    steps that CPU can measure."""
    text = compiled.as_text()
    return len(re.findall(r'= \S+ fusion\(', text)) + len(re.findall(r'= \S+ custom-call\(', text))


def _cost(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get('flops', float('nan')))


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return {}
    if m is None:
        return {}
    out = {k: int(getattr(m, f'{k}_size_in_bytes', 0)) for k in ('argument', 'output', 'temp', 'alias')}
    out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
    return out


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(config, repeats: int, count_flops: bool = True, profile_peak_gflops: float = 0.0) -> dict:
    """Compile and time the trainer's meta-step for ``config``; with ``profile_peak_gflops`` > 0 also its
    time per op class (``experiments.studies.profile_step.profile``)."""
    exp = build(config)
    meta, opt_state = experiment.init_state(exp)
    batch = jax.tree_util.tree_map(jnp.asarray, exp.source.sample(0, config.meta.batch_size, 'train',
                                                                  config.task.query))
    step_fn = training.make_host_step(exp)
    step0 = jnp.asarray(0, jnp.int32)
    t0 = time.perf_counter()
    traced = step_fn.trace(meta, opt_state, batch, step0)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    compile_s = t3 - t0   # tracing + lowering + XLA, each also reported (``compile_phases_s``)
    compile_phases_s = {'trace': t1 - t0, 'lower': t2 - t1, 'xla': t3 - t2}
    kernels = count_kernels(compiled)
    flops = _cost(compiled)
    flops_rolled = False
    learner = exp.learner
    unroll = learner.inner_config.unroll
    task_batching, task_chunk = task_batching_for(learner, batch)
    rolled = unroll < learner.inner_config.steps or task_batching == 'map'
    flops_rolled = rolled and not count_flops   # a loop body counted once: not the step's FLOPs
    if count_flops and rolled:
        # XLA counts a while loop's body once: count the FLOPs of the same step with the inner loop fully
        # unrolled and the tasks in one vmap.
        c2 = config.copy_and_resolve_references()
        c2.inner.unroll = c2.inner.steps
        c2.meta.task_batching = 'vmap'
        e2 = build(c2)
        flops = _cost(training.make_host_step(e2).lower(meta, opt_state, batch, step0).compile())
    mem = _memory(compiled)
    times, finite, extra = [], None, {}
    if repeats:   # --repeats=0: compile only
        for _ in range(2):  # warm-up; with --host_memory=retain the first steps of a new shape may grow the heap
            meta, opt_state, m = compiled(meta, opt_state, batch, step0)
            jax.block_until_ready((meta, opt_state, m))
        for i in range(repeats):
            t = time.perf_counter()
            meta, opt_state, m = compiled(meta, opt_state, batch, jnp.asarray(i + 1, jnp.int32))
            jax.block_until_ready((meta, opt_state, m))
            times.append(time.perf_counter() - t)
        finite = bool(np.isfinite(float(m['meta_loss'][0])))
        if profile_peak_gflops > 0:
            from .studies import profile_step
            extra['profile'] = profile_step.profile(compiled, (meta, opt_state, batch, step0), repeats,
                                                    profile_peak_gflops)
    med = statistics.median(times) if times else None
    return dict(**extra, compile_s=compile_s, compile_phases_s=compile_phases_s, kernels=kernels,
                flops_rolled=flops_rolled, median_s=med,
                min_s=min(times) if times else None, times=times, flops=flops,
                gflops_per_s=flops / med / 1e9 if med and flops == flops else float('nan'), memory=mem,
                max_rss_mb=max_rss_mb(), inner_unroll=unroll,
                task_batching=task_batching,
                task_chunk=task_chunk,
                task_gradients=task_gradients_for(learner, batch),
                finite=finite)


def host_sampling_time(config, repeats: int = 5):
    """(median seconds, note): the host episode sampler (``md_meta.data.episodes.EpisodeSampler``, without
    its prefetch thread, which would hide the cost) drawing one meta-batch of ``config``'s shape. It
    samples from the real data under ``--data_dir`` when it loads, else from a synthetic pool of the same
    image shape (the cost depends on the shapes, not on the pixels); the note says which. Sinusoid tasks
    are drawn on the device, inside the step: (None, note)."""
    if config.task.name == 'sinusoid':
        return None, 'drawn on the device'
    from md_meta.data import episodes
    from md_meta.tasks import images
    config = config.copy_and_resolve_references()
    config.task.data_dir = FLAGS.data_dir or config.task.data_dir
    try:
        pools, note = images.load_pools(config), f'data: {config.task.data_dir}'
    except Exception as e:  # noqa: BLE001 -- data absent: a synthetic pool of the same shapes
        s = 28 if config.task.name == 'omniglot' else 84
        ch = 1 if config.task.name == 'omniglot' else 3
        rng = np.random.default_rng(0)
        pools = {split: episodes.pool_from_classes(
            rng.integers(0, 256, (64, 20, s, s, ch), dtype=np.uint8), [f'c{i}' for i in range(64)], 'synthetic')
            for split in ('train', 'val', 'test')}
        note = f'synthetic pool ({type(e).__name__})'
    sampler = episodes.EpisodeSampler(pools, config.task.ways, config.task.shots, config.seed,
                                      augment=config.task.augment)   # its warps are part of the host's cost
    ts = []
    for i in range(repeats):
        t = time.perf_counter()
        sampler.sample(i, config.meta.batch_size, 'train', config.task.query)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), note


def fmt_mb(b):
    return f'{b / 2**20:.0f}' if b else '?'


def _s(seconds) -> str:
    return '-' if seconds is None else f'{seconds:.3f}'


def table(rows, peak):
    lines = ['| method | shape | tasks | K | compile s | kernels | median s/step | min s/step | GFLOP/step | GFLOP/s | '
             '% peak | compiled MiB | max RSS MiB | host sample s |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        host = '-' if r.get('host_sample_s') is None else f"{r['host_sample_s']:.3f}"
        rolled = r.get('flops_rolled', False) or r['median_s'] is None   # no honest FLOP rate
        gflop = '-' if rolled else f"{r['flops'] / 1e9:.2f}"
        rate = '-' if rolled else f"{r['gflops_per_s']:.1f}"
        pct = '-' if rolled else f"{100 * r['gflops_per_s'] / peak:.0f}"
        lines.append(
            f"| {r['method']} | {r['shape']} | {r['tasks']} | {r['K']} | {r['compile_s']:.1f} | {r.get('kernels', '?')} | "
            f"{_s(r['median_s'])} | {_s(r['min_s'])} | {gflop} | {rate} | {pct} | "
            f"{fmt_mb(r['memory'].get('peak', 0))} | {r['max_rss_mb']:.0f} | {host} |")
    return '\n'.join(lines)


AUTHORS_METHODS, AUTHORS_SHAPES = ('maml', 'metasgd', 'metacurvature', 'md'), ('a', 'b', 'c')


def authors_times(reference_dir: str, python: str, method_list, shapes, repeats: int) -> list:
    """The authors' seconds per meta-step (``experiments.studies.authors_yardstick``, run by ``python`` in a
    subprocess, one row per JSON line) for the methods and shapes they have."""
    ms = [m for m in method_list if m in AUTHORS_METHODS]
    ss = [s for s in shapes if s in AUTHORS_SHAPES]
    if not ms or not ss:
        return []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the folder that holds this package
    cmd = [python, '-m', f'{__package__}.studies.authors_yardstick', f'--reference_dir={reference_dir}',
           f"--methods={','.join(ms)}", f"--shapes={','.join(ss)}", f'--repeats={repeats}']
    print('authors\' code:', ' '.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode != 0:
        print(f"authors' code: exit status {proc.returncode} (see its messages above)", flush=True)
    return rows


def authors_table(rows, authors) -> str:
    """md-meta's and the authors' median seconds per meta-step, same machine and episodes, and the ratio."""
    by = {(r['method'], r['shape']): r for r in rows}
    lines = ["| method | shape | authors' s/step | md-meta s/step | md-meta speed-up |", '| --- | --- | --- | --- | --- |']
    for a in authors:
        r = by.get((a['method'], a['shape']))
        ours = f"{r['median_s']:.3f}" if r else '-'
        speed = f"{a['median_s'] / r['median_s']:.2f}x" if r else '-'
        lines.append(f"| {a['method']} | {a['shape']} | {a['median_s']:.3f} | {ours} | {speed} |")
    return ("Against the authors' code (experiments.studies.authors_yardstick, same episodes, this machine). The "
            "authors time their own settings (their MD is the unconstrained form with exp scales; `--set` does not "
            "reach them); for md-meta's MD in that form run with "
            "`--set=md.monotone=False,md.scale=exp,md.kronecker=none`.\n\n"
            + '\n'.join(lines))


def plot_curve(points, x_key, path, title):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib not installed: no plot', file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in sorted({p['label'] for p in points}):
        ps = sorted((p for p in points if p['label'] == label), key=lambda p: p[x_key])
        xs = [p[x_key] for p in ps]
        axes[0].plot(xs, [p['median_s'] for p in ps], 'o-', label=label)
        axes[1].plot(xs, [p['memory'].get('peak', 0) / 2**20 for p in ps], 'o-', label=label)
    axes[0].set_ylabel('s / meta-step (median)')
    axes[1].set_ylabel('compiled peak memory (MiB)')
    for ax in axes:
        ax.set_xlabel(x_key)
        ax.set_xscale('log')
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    from .harness import prepare_process
    prepare_process(compilation_cache=False)  # before any JAX computation; times compilation
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    repeats = 2 if FLAGS.quick else FLAGS.repeats
    method_list = FLAGS.methods or list(methods.names())
    print(f'jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()} '
          f'cpus {os.cpu_count()} load {os.getloadavg()} host_memory {FLAGS.host_memory}', flush=True)
    results = {'jax': jax.__version__, 'backend': jax.default_backend(), 'device': str(jax.devices()[0]),
               'loadavg_start': os.getloadavg(), 'argv': sys.argv, 'peak_gflops': FLAGS.peak_gflops,
               'host_memory': FLAGS.host_memory,
               'rows': [], 'curves': {}}
    out_json = os.path.join(FLAGS.out_dir, 'results.json')

    def save():
        results['loadavg_end'] = os.getloadavg()
        with open(out_json, 'w') as f:
            json.dump(results, f, indent=1)

    host_cache = {}
    for shape in FLAGS.shapes:
        for method in method_list:
            cfg = make_config(method, shape, overrides=FLAGS.set)
            try:
                r = measure(cfg, repeats, FLAGS.flops, FLAGS.peak_gflops if FLAGS.profile else 0.0)
            except Exception as e:  # noqa: BLE001 -- a method that cannot run this shape
                print(f'{method} ({shape}): FAILED {type(e).__name__}: {e}', flush=True)
                results['rows'].append({'method': method, 'shape': shape, 'error': f'{type(e).__name__}: {e}'})
                continue
            if shape not in host_cache:
                host_cache[shape] = host_sampling_time(cfg)
            r.update(method=method, shape=shape, tasks=cfg.meta.batch_size, K=cfg.inner.steps,
                     host_sample_s=host_cache[shape][0], host_sample_note=host_cache[shape][1])
            results['rows'].append(r)
            flops = '' if r['flops_rolled'] or r['median_s'] is None else \
                f"{r['flops'] / 1e9:.2f} GFLOP {r['gflops_per_s']:.1f} GFLOP/s "
            launches = f"launches {r['profile']['launches']} " if 'profile' in r else ''
            phases = ' + '.join(f"{k} {v:.1f}" for k, v in r['compile_phases_s'].items())
            print(f"{method} ({shape}): compile {r['compile_s']:.1f}s ({phases}) kernels {r['kernels']} {launches}median {_s(r['median_s'])}s "
                  f"min {_s(r['min_s'])}s {flops}mem {fmt_mb(r['memory'].get('peak', 0))} MiB", flush=True)
            save()
    ok_rows = [r for r in results['rows'] if 'error' not in r]
    md = [f"# md-meta benchmark\n\n`{' '.join(sys.argv)}`\n\njax {jax.__version__}, backend "
          f"{results['backend']}, host memory {FLAGS.host_memory}, load average at start {results['loadavg_start']}\n", table(ok_rows, FLAGS.peak_gflops)]
    # MD / MAML ratios within this run
    by = {(r['method'], r['shape']): r for r in ok_rows}
    ratio = lambda m, s, k: by[(m, s)][k] / by[('maml', s)][k]
    ratios = [f"- shape ({s}): {m} / maml = " + (f"{ratio(m, s, 'median_s'):.2f} time, " if repeats else '')
              + f"{ratio(m, s, 'compile_s'):.2f} compile, {ratio(m, s, 'kernels'):.2f} kernels"
              + (f", {by[(m, s)]['profile']['launches'] / by[('maml', s)]['profile']['launches']:.2f} launches per step"
                 if 'profile' in by[(m, s)] and 'profile' in by[('maml', s)] else '')
              for s in FLAGS.shapes for m in method_list if m != 'maml' and (m, s) in by and ('maml', s) in by]
    if ratios:
        md.append('\nRelative to MAML (same run):\n\n' + '\n'.join(ratios))
    if FLAGS.profile:
        from .studies import profile_step
        md.append('\n## Time per op class (experiments.studies.profile_step)\n\n' + '\n\n'.join(
            profile_step.table(r['method'], r['shape'], r['profile']) for r in ok_rows if 'profile' in r))
    if FLAGS.authors_code and repeats:
        results['authors'] = authors_times(FLAGS.authors_code, FLAGS.authors_python or sys.executable,
                                           method_list, FLAGS.shapes, repeats)
        md.append('\n' + authors_table(ok_rows, results['authors']))
        save()

    quick = FLAGS.quick
    for curve in FLAGS.curves:
        points = []
        if curve == 'K':
            values = [int(v) for v in FLAGS.curve_K]
            if quick:
                values = [v for v in values if v <= 10]
            variants = [(' no remat', ['inner.remat=false'])] + ([(' remat', ['inner.remat=true'])] if FLAGS.curve_remat else [])
        elif curve == 'tasks':
            values = [int(v) for v in FLAGS.curve_tasks]
            if quick:
                values = [v for v in values if v <= 16]
            variants = [('', [])]
        else:
            raise app.UsageError(f'unknown curve {curve!r}')
        for method in FLAGS.curve_methods:
            for suffix, extra in variants:
                for v in values:
                    kw = {'K': v} if curve == 'K' else {'num_tasks': v}
                    cfg = make_config(method, FLAGS.curve_shape, overrides=list(FLAGS.set) + extra, **kw)
                    try:
                        r = measure(cfg, max(1, repeats // 2), count_flops=False)
                    except Exception as e:  # noqa: BLE001
                        print(f'curve {curve} {method}{suffix} {v}: FAILED {e}', flush=True)
                        continue
                    r.update(label=method + suffix, K=cfg.inner.steps, tasks=cfg.meta.batch_size)
                    points.append(r)
                    print(f"curve {curve} {method}{suffix} {v}: median {r['median_s']:.3f}s compiled mem "
                          f"{fmt_mb(r['memory'].get('peak', 0))} MiB compile {r['compile_s']:.1f}s", flush=True)
                    results['curves'][curve] = points
                    save()
        x_key = 'K' if curve == 'K' else 'tasks'
        png = os.path.join(FLAGS.out_dir, f'scaling_{curve}.png')
        plot_curve(points, x_key, png, f'shape ({FLAGS.curve_shape}): time and memory vs {x_key}')
        lines = [f'\n## Scaling with {x_key} (shape {FLAGS.curve_shape})\n', f'![]({os.path.basename(png)})\n',
                 f'| method | {x_key} | median s/step | compiled MiB | compile s |', '| --- | --- | --- | --- | --- |']
        lines += [f"| {p['label']} | {p[x_key]} | {p['median_s']:.3f} | {fmt_mb(p['memory'].get('peak', 0))} | "
                  f"{p['compile_s']:.1f} |" for p in points]
        md.append('\n'.join(lines))
    save()
    md.append(f"\nload average at end {results['loadavg_end']}\n")
    with open(os.path.join(FLAGS.out_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    print('\n'.join(md))


if __name__ == '__main__':
    flags.DEFINE_list('methods', [], 'methods to benchmark (default: every registered method)')
    flags.DEFINE_list('shapes', ['a', 'b', 'c'], 'shapes to benchmark: a, b, c, r, s')
    flags.DEFINE_integer('repeats', 5, 'timed meta-steps per configuration (after two warm-up steps); 0: compile '
                         'only (compile time, kernels, memory)')
    flags.DEFINE_bool('quick', False, 'quick mode: 2 repeats, short curves')
    flags.DEFINE_string('out_dir', 'benchmark_results', 'where results.md/json and the PNGs go')
    flags.DEFINE_float('peak_gflops', 157.0, 'machine fp32 peak for the % column (2 Zen3 cores: 157)')
    flags.DEFINE_list('curves', [], "scaling curves to run: 'K' (inner steps 1..50), 'tasks' (1..64)")
    flags.DEFINE_list('curve_methods', ['maml', 'md'], 'methods for the scaling curves')
    flags.DEFINE_string('curve_shape', 'a', 'base shape of the scaling curves')
    flags.DEFINE_list('curve_K', ['1', '2', '5', '10', '20', '50'], 'K values of the K curve')
    flags.DEFINE_list('curve_tasks', ['1', '4', '16', '32', '64'], 'task counts of the tasks curve')
    flags.DEFINE_bool('curve_remat', True, 'run the K curve with inner.remat=True beside inner.remat=False')
    flags.DEFINE_list('set', [], 'config overrides for every run, e.g. inner.unroll=5,meta.task_batching=vmap')
    flags.DEFINE_string('data_dir', '', 'task.data_dir for the host episode-sampling time (skipped without data)')
    flags.DEFINE_bool('flops', True, 'count FLOPs (compiles a fully unrolled copy of the step when needed)')
    flags.DEFINE_string('authors_code', '', "checkout of github.com/zhangyilang/MetaMirrorDescent: also time the authors' "
                        'MAML, Meta-SGD, MetaCurvature and MD on the same episodes '
                        "(experiments.studies.authors_yardstick) and print md-meta's speed-up")
    flags.DEFINE_string('authors_python', '', "a Python with torch and torchmeta for --authors_code (default: this one)")
    flags.DEFINE_bool('profile', False, 'also profile each step: time per op class against its roofline, and '
                      'launches per step (experiments.studies.profile_step)')
    run(main)
