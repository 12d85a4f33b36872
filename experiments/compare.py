"""The sinusoid comparison of the loss geometries of the paper's Table 1, in one command.

    python -m experiments.compare --workdir=runs/compare [--methods=maml,metasgd,...] [--shots=5,10,20]
                                  [--steps=70000] [--num_tasks=600] [--config.meta.lr=...]
    python -m experiments.compare --config=experiments/configs/sinusoid_mtnet.py --train_shots=10 \
                                  --steps=60000 --workdir=runs/compare-mtnet

For every method and shot count it meta-trains on sinusoid regression with MAML's protocol (1-40-40-1
ReLU MLP, one inner step alpha = 0.01, meta-batch 25, Adam 1e-3; ``--steps`` meta-steps, 70000 in the
protocol; K support and K query points) through ``md_meta.training`` (each run resumable in
<workdir>/<method>-<shots>shot); with ``--train_shots=N`` it meta-trains each method once, N-shot with
the config's query size, and evaluates that run at every ``--shots`` (MT-net's protocol,
docs/sinusoid.md). It evaluates the MSE on ``--num_tasks`` new tasks (mean +- 95% CI) and writes <workdir>/comparison.md and
comparison.json: the MSE table with the published figures beside ours, and a table of the number of
meta-parameters and the meta-step time of every method relative to MAML (one jitted meta-step on the
same 10-shot batch, median of ``--timing_steps``).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import flags

from .harness import define_config_file, run

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'sinusoid.py')

# Mean test MSE at 5/10/20 shots, as quoted by MT-net (Lee & Choi 2018) and MetaCurvature (Park & Oliva 2019);
# docs/sinusoid.md on the protocol behind them.
PUBLISHED = {
    'maml': {5: 0.686, 10: 0.435, 20: 0.228},
    'metasgd': {5: 0.482, 10: 0.258, 20: 0.127},
    'metacurvature': {5: 0.41, 10: 0.20},
}


def run_config(base, method: str, shots: int, steps: int, num_tasks: int, query_equals_shots: bool = True):
    cfg = base.copy_and_resolve_references()
    cfg.method = method
    cfg.task.shots = shots
    if query_equals_shots:
        cfg.task.query = shots  # MAML's protocol: K support and K query points per task
    cfg.meta.steps = steps
    cfg.eval.num_tasks = num_tasks
    cfg.eval.batch_size = min(cfg.eval.batch_size, num_tasks)
    if num_tasks % cfg.eval.batch_size:
        cfg.eval.batch_size = num_tasks
    cfg.train.log_every = min(cfg.train.log_every, steps)
    return cfg


def count_params(tree) -> int:
    import jax
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def time_meta_step(exp, n: int) -> float:
    """Median seconds of one jitted meta-step (after compilation) on one fixed batch."""
    import jax
    from md_meta import experiment
    from md_meta.meta import make_meta_step
    meta, opt_state = experiment.init_state(exp)
    step = make_meta_step(exp.learner, exp.optimizer)
    batch = exp.source.sample(0, exp.config.meta.batch_size, 'train', exp.config.task.query)
    key = jax.random.PRNGKey(0)
    meta, opt_state, m = step(meta, opt_state, batch, key)
    jax.block_until_ready(m)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        meta, opt_state, m = step(meta, opt_state, batch, key)
        jax.block_until_ready((meta, m))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _fmt(x, ci=None):
    if x is None:
        return '-'
    return f'{x:.3f} +- {ci:.3f}' if ci is not None else f'{x:.3f}'


def markdown(rows: list, cost: list, shots: list, command: str, wall: float, steps: int, num_tasks: int,
             base=None) -> str:
    by = {(r['method'], r['shots']): r for r in rows}
    methods = list(dict.fromkeys(r['method'] for r in rows))
    train_shots = sorted({r['train_shots'] for r in rows})
    if base is None:
        protocol = ''
    elif len(train_shots) == 1 and len(shots) > 1:
        protocol = (f'One {train_shots[0]}-shot run per method ({base.task.query} query points, meta-batch '
                    f'{base.meta.batch_size}), evaluated at each shot count with {base.task.query} query points.')
    else:
        protocol = (f'One run per method and shot count K (K support and K query points, meta-batch '
                    f'{base.meta.batch_size}).')
    out = ['# Sinusoid regression: loss geometries compared', '',
           f'Command: `{command}`  ', f'Wall time: {wall:.0f} s; {steps} meta-steps per run; MSE on {num_tasks} '
           'new tasks, mean +- 95% CI (1.96 std / sqrt(n)); published figures in brackets. ' + protocol, '',
           '| method | ' + ' | '.join(f'{s}-shot' for s in shots) + ' |',
           '| --- |' + ' --- |' * len(shots)]
    for m in methods:
        cells = []
        for s in shots:
            r = by.get((m, s))
            cell = _fmt(r['mse'], r['mse_ci']) if r else '-'
            pub = PUBLISHED.get(m, {}).get(s)
            cells.append(cell + (f' [{pub}]' if pub is not None else ''))
        out.append(f'| {m} | ' + ' | '.join(cells) + ' |')
    out += ['', 'Published: as quoted by MT-net (Lee & Choi 2018) and MetaCurvature (Park & Oliva 2019); they were '
            'measured under MT-net\'s settings (meta-batch 4, 60000 steps, 10 query points), see docs/sinusoid.md.',
            '', 'Training seconds per run (min-max over its runs): ' + ', '.join(
                '{} {:.0f}-{:.0f}'.format(m, *(f([r['train_seconds'] for r in rows if r['method'] == m])
                                               for f in (min, max))) for m in methods)]
    if cost:
        ref = next((c for c in cost if c['method'] == 'maml'), None)
        out += ['', f'## Cost (10-shot batch, meta-batch {cost[0]["batch_size"]}, one jitted second-order meta-step)',
                '', '| method | meta-parameters | x MAML | meta-step (ms) | x MAML |', '| --- | --- | --- | --- | --- |']
        for c in cost:
            pr = f'{c["params"] / ref["params"]:.2f}' if ref else '-'
            tr = f'{c["step_s"] / ref["step_s"]:.2f}' if ref and c.get('step_s') else '-'
            ms = f'{1e3 * c["step_s"]:.2f}' if c.get('step_s') else '-'
            out.append(f'| {c["method"]} | {c["params"]} | {pr} | {ms} | {tr} |')
    return '\n'.join(out) + '\n'


def main(argv):
    del argv
    from .harness import prepare_process
    prepare_process()  # before any JAX computation
    from md_meta import methods as methods_lib
    from md_meta import evaluation, experiment, training, workdirs
    from md_meta.config import ConfigError
    base = _CONFIG.value
    names = _METHODS.value or list(methods_lib.names())
    unknown = [m for m in names if m not in methods_lib.names()]
    if unknown:
        print(f'error: unknown methods {unknown}; choose from {methods_lib.names()}', file=sys.stderr)
        sys.exit(2)
    shots = [int(s) for s in _SHOTS.value]
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    command = 'python -m experiments.compare ' + ' '.join(sys.argv[1:])
    t_start = time.time()
    rows, cost = [], []
    log = lambda s: print(s, flush=True)
    train_shots = _TRAIN_SHOTS.value
    runs = [(ts, (ts,)) for ts in shots] if train_shots <= 0 else [(train_shots, tuple(shots))]
    try:
        for ts, eval_shots in runs:
            for m in names:
                cfg = run_config(base, m, ts, _STEPS.value, _NUM_TASKS.value, query_equals_shots=train_shots <= 0)
                exp = experiment.build(cfg)
                sub = os.path.join(workdir, f'{m}-{ts}shot')
                workdirs.prepare(cfg, sub)
                t0 = time.time()
                meta, _, _ = training.train(exp, sub, log=log)
                train_s = time.time() - t0
                for s in eval_shots:
                    result = evaluation.evaluate(exp, meta, 'test', num_tasks=_NUM_TASKS.value, shots=s)
                    mse = result['metrics']['loss']
                    row = {'method': m, 'shots': s, 'train_shots': ts, 'mse': mse['mean'], 'mse_ci': mse['ci'],
                           'num_tasks': mse['n'], 'published': PUBLISHED.get(m, {}).get(s),
                           'train_seconds': train_s, 'curves': result['curves'], 'workdir': sub}
                    rows.append(row)
                    log(f'== {m} {s}-shot (trained {ts}-shot): MSE {mse["mean"]:.4f} +- {mse["ci"]:.4f} '
                        f'({train_s:.0f} s)')
        if _TIMING_STEPS.value > 0:
            ts = 10 if 10 in shots else shots[0]
            for m in names:
                exp = experiment.build(run_config(base, m, ts, _STEPS.value, _NUM_TASKS.value))
                meta, _ = experiment.init_state(exp)
                c = {'method': m, 'shots': ts, 'batch_size': exp.config.meta.batch_size, 'params': count_params(meta),
                     'step_s': time_meta_step(exp, _TIMING_STEPS.value)}
                cost.append(c)
                log(f'== {m}: {c["params"]} meta-parameters, meta-step {1e3 * c["step_s"]:.2f} ms')
    except (ConfigError, workdirs.WorkdirMismatchError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except training.NonFiniteError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(3)
    wall = time.time() - t_start
    md = markdown(rows, cost, shots, command, wall, _STEPS.value, _NUM_TASKS.value, base)
    with open(os.path.join(workdir, 'comparison.md'), 'w') as f:
        f.write(md)
    with open(os.path.join(workdir, 'comparison.json'), 'w') as f:
        json.dump({'command': command, 'wall_seconds': wall, 'steps': _STEPS.value, 'num_tasks': _NUM_TASKS.value,
                   'shots': shots, 'methods': names, 'results': rows, 'cost': cost,
                   'config': json.loads(base.to_json())}, f, indent=2)
    print(md)


if __name__ == '__main__':
    _CONFIG = define_config_file('config', DEFAULT_CONFIG, 'Base config (sinusoid, MAML protocol).')
    _WORKDIR = flags.DEFINE_string('workdir', 'runs/compare', 'Output directory (one sub-directory per run).')
    _METHODS = flags.DEFINE_list('methods', [], 'Methods to compare (default: all registered methods).')
    _SHOTS = flags.DEFINE_list('shots', ['5', '10', '20'], 'Shot counts.')
    _STEPS = flags.DEFINE_integer('steps', 70000, 'Meta-steps per run (MAML protocol: 70000).')
    _NUM_TASKS = flags.DEFINE_integer('num_tasks', 600, 'New test tasks per evaluation (MAML protocol: 600).')
    _TIMING_STEPS = flags.DEFINE_integer('timing_steps', 50, 'Timed meta-steps per method (0: no timing table).')
    _TRAIN_SHOTS = flags.DEFINE_integer('train_shots', 0, '0: one run per method and shot count (K support, K query); '
                                        'N > 0: one N-shot run per method (config query size), evaluated at every --shots.')
    run(main)
