"""The paper's Table 1: collect evaluation results of many runs into a Markdown table.

    python -m experiments.report --workdirs=runs/a,runs/b,... [--out=table.md]

Reads <workdir>/evaluation.json (experiments.evaluate), or else results.json (experiments.train), of each
run, without re-evaluating anything; one row per (task, ways, method, setting) with the method's lower-level
optimizer and loss-geometry model, and one column per number of shots (the paper's 1-shot and 5-shot):
accuracy in % +- the 95% CI (loss for regression), with the meta-step it comes from and 'unfinished' or
'training' where that applies. Every run given is shown: runs that differ only in their seed share a cell,
the mean over seeds +- the t-interval (md_meta.evaluation.seed_interval) with the seed count and the seeds;
runs of one method that differ in anything else (steps, step reached, a hyperparameter, the checkpoint
evaluated, the test tasks) get rows of their own, labelled by what differs, so the table does not depend on
the order of --workdirs. A result whose checkpoint is no longer the run's best/last/final one (the run went
on after it was evaluated), or an unreadable file, is skipped with a warning.
"""
from __future__ import annotations

import json
import sys

from absl import flags

from .harness import run
from md_meta import methods
from md_meta.evaluation import seed_interval
from md_meta.results import load
from md_meta.workdirs import NON_COMPUTE_FIELDS, flatten


# method name -> (lower-level optimizer, loss-geometry model), as in the paper's Table 1
ORDER = list(methods.names())
# config fields that do not tell two runs' results apart (bookkeeping); meta.steps does
_BOOKKEEPING = tuple(f for f in NON_COMPUTE_FIELDS if f != 'meta.steps') + ('seed', 'task.shots')


def setting(r: dict) -> dict:
    """What a result depends on besides its seed: the run's config (less bookkeeping), the trained support
    size where it is not the evaluated one, and the evaluation (checkpoint, its step, test tasks, inner loop)."""
    config = flatten(r.get('config') or {})
    out = {k: json.dumps(v, sort_keys=True) for k, v in config.items()
           if not any(k == f or (f.endswith('.') and k.startswith(f)) for f in _BOOKKEEPING)}
    trained = config.get('task.shots', r.get('train_shots', r['shots']))
    if trained != r['shots']:
        out['trained'] = f'{trained}-shot'
    for k in ('parameters', 'step', 'num_tasks', 'eval_inner_steps', 'eval_step_size'):
        if k in r:
            out[k] = json.dumps(r[k])
    return out


def _labels(records: list) -> list:
    """Per record, the fields where its setting differs from the others' of its (task, ways, method)."""
    settings = [setting(r) for r in records]
    group = lambda r: (r.get('task', ''), r.get('ways', ''), r['method'])
    labels = []
    for r, s in zip(records, settings):
        others = [t for q, t in zip(records, settings) if group(q) == group(r)]
        varying = sorted(k for k in set().union(*others) if len({t.get(k) for t in others}) > 1)
        labels.append(', '.join(f'{k}={s.get(k, "-")}' for k in varying))
    return labels


def _metric(r: dict):
    """(name, value) of the reported metric: accuracy where there is one, else the loss (None for NaN)."""
    name = 'accuracy' if 'accuracy' in r['metrics'] else 'loss'
    return name, r['metrics'][name]['mean']


def _fmt(name: str, mean, ci) -> str:
    num = lambda x, k: 'nan' if x is None or x != x else f'{x:.{k}f}'
    if name == 'accuracy':
        return f"{num(None if mean is None else 100 * mean, 2)} +- {num(None if ci is None else 100 * ci, 2)}%"
    return f'loss {num(mean, 4)} +- {num(ci, 4)}'


def _cell(runs: list) -> str:
    """One run: its mean +- 95% CI over test tasks; several seeds of one setting: the mean over seeds +- the
    t-interval, the seed count and the seeds."""
    r = runs[0]
    name, _ = _metric(r)
    if len(runs) == 1:
        s = _fmt(name, r['metrics'][name]['mean'], r['metrics'][name]['ci'])
    else:
        values = [_metric(q)[1] for q in runs]
        mean, ci = seed_interval([float('nan') if v is None else v for v in values])
        seeds = ', '.join(str(q.get('seed', '?')) for q in runs)
        s = _fmt(name, mean, ci) + f' over {len(runs)} seeds ({seeds})'
    statuses = sorted({q.get('status') for q in runs if q.get('status')})
    if 'step' in r:
        s += f" (step {r['step']}" + (f"/{r['planned_steps']}" if 'planned_steps' in r else '') + \
             (f", {', '.join(statuses)})" if statuses else ')')
    return s


def table(records: list, warn=lambda s: print(s, file=sys.stderr)) -> str:
    """Markdown: one row per (task, ways, method, setting), one column per shots value; every record is in
    one cell, seeds of one setting together (``_cell``)."""
    shots = sorted({r['shots'] for r in records}) or [1, 5]
    rows = {}
    for r, label in zip(records, _labels(records)):
        key = (r.get('task', ''), r.get('ways', ''), r['method'], label)
        rows.setdefault(key, {}).setdefault(r['shots'], []).append(r)
    for cells in rows.values():
        for runs in cells.values():
            runs.sort(key=lambda q: (not isinstance(q.get('seed'), int), str(q.get('seed')).zfill(12),
                                     q.get('workdir', '')))
            seeds = [q.get('seed') for q in runs]
            if len(set(map(str, seeds))) < len(seeds):
                warn('warning: runs of one setting share a seed (' + ', '.join(
                    f"{q.get('workdir', '?')}: seed {q.get('seed')}" for q in runs) + '); each counts as a seed')
    labelled = any(k[3] for k in rows)
    head = ['method', 'lower-level optimizer', 'loss-geometry model', 'task'] + (['setting'] if labelled else [])
    head += [f'{s}-shot' for s in shots]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    order = lambda k: (k[0], str(k[1]), ORDER.index(k[2]) if k[2] in ORDER else len(ORDER), k[2], k[3])
    for key in sorted(rows, key=order):
        task, ways, method, label = key
        opt, geom = methods.describe(method)
        any_r = next(iter(rows[key].values()))[0]
        task_s = f'{task} {ways}-way' if 'accuracy' in any_r['metrics'] else task
        cells = [_cell(rows[key][s]) if s in rows[key] else '-' for s in shots]
        lines.append('| ' + ' | '.join([method, opt, geom, task_s] + ([label] if labelled else []) + cells) + ' |')
    n = sorted({r['num_tasks'] for r in records})
    lines.append('')
    lines.append(f'Mean +- 1.96 std/sqrt(N) over N = {", ".join(map(str, n))} new test tasks; a cell over several '
                 'seeds: their mean +- t_0.975 std/sqrt(n) over the n seeds.')
    return '\n'.join(lines)


def main(argv):
    del argv
    from .harness import prepare_process
    prepare_process()  # before any JAX computation
    if not _WORKDIRS.value:
        print('error: --workdirs is required (comma-separated)', file=sys.stderr)
        sys.exit(2)
    records = load(_WORKDIRS.value)
    if not records:
        print('error: no readable results (evaluation.json or results.json) in the given workdirs', file=sys.stderr)
        sys.exit(2)
    md = table(records)
    print(md)
    if _OUT.value:
        with open(_OUT.value, 'w') as f:
            f.write(md + '\n')


if __name__ == '__main__':
    _WORKDIRS = flags.DEFINE_list('workdirs', [], 'Comma-separated workdirs of evaluated runs.')
    _OUT = flags.DEFINE_string('out', '', 'Also write the table to this file.')
    run(main)
