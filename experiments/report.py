"""The paper's Table 1: collect evaluation results of many runs into a Markdown table.

    python -m experiments.report --workdirs=runs/a,runs/b,... [--out=table.md]

Reads <workdir>/evaluation.json (experiments.evaluate), or else results.json (experiments.train), of each
run, without re-evaluating anything; one row per (task, ways, method) with the method's lower-level
optimizer and loss-geometry model, and one column per number of shots (the paper's 1-shot and 5-shot):
accuracy in % +- the 95% CI (loss for regression), with the meta-step it comes from and 'unfinished' or
'training' where that applies. A result whose checkpoint is no longer the run's best/last/final one
(the run went on after it was evaluated), or an unreadable file, is skipped with a warning.
"""
from __future__ import annotations

import sys

from absl import flags

from experiments import run
from md_meta import methods
from md_meta.results import load


# method name -> (lower-level optimizer, loss-geometry model), as in the paper's Table 1
ORDER = list(methods.names())


def _cell(r: dict) -> str:
    m = r['metrics']
    if 'accuracy' in m:
        s = f"{100 * m['accuracy']['mean']:.2f} +- {100 * m['accuracy']['ci']:.2f}%"
    else:
        s = f"loss {m['loss']['mean']:.4f} +- {m['loss']['ci']:.4f}"
    if 'step' in r:
        s += f" (step {r['step']}" + (f"/{r['planned_steps']}" if 'planned_steps' in r else '') + \
             (f", {r['status']})" if r.get('status') else ')')
    return s


def table(records: list) -> str:
    """Markdown: one row per (task, ways, method), one column per shots value."""
    shots = sorted({r['shots'] for r in records}) or [1, 5]
    rows = {}
    for r in records:
        key = (r.get('task', ''), r.get('ways', ''), r['method'])
        rows.setdefault(key, {})[r['shots']] = r
    head = ['method', 'lower-level optimizer', 'loss-geometry model', 'task']
    head += [f'{s}-shot' for s in shots]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    order = lambda k: (k[0], str(k[1]), ORDER.index(k[2]) if k[2] in ORDER else len(ORDER), k[2])
    for key in sorted(rows, key=order):
        task, ways, method = key
        opt, geom = methods.describe(method)
        any_r = next(iter(rows[key].values()))
        task_s = f'{task} {ways}-way' if 'accuracy' in any_r['metrics'] else task
        cells = [_cell(rows[key][s]) if s in rows[key] else '-' for s in shots]
        lines.append('| ' + ' | '.join([method, opt, geom, task_s] + cells) + ' |')
    n = sorted({r['num_tasks'] for r in records})
    lines.append('')
    lines.append(f'Mean +- 1.96 std/sqrt(N) over N = {", ".join(map(str, n))} new test tasks.')
    return '\n'.join(lines)


def main(argv):
    del argv
    from experiments import prepare_process
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
