"""The paper's Fig. 1: convergence of the inner loop on new tasks, one curve per method.

    python -m experiments.plot_convergence --workdirs=runs/a,runs/b [--num_tasks=1000]
                                           [--out=convergence.png] [--checkpoint=best|last]

For each workdir (experiments.train) it takes, at each inner step k = 0..K, (a) the support loss
L(phi_k; D_trn) and (b) its gradient norm |grad L(phi_k; D_trn)|_2, averaged over --num_tasks new 'test'
tasks: from the run's evaluation.json / results.json when one holds exactly that (same checkpoint, same
number of tasks, not stale), else by loading the checkpoint and adapting with the evaluation inner loop
(--recompute forces this).
Writes a PNG with the two panels (matplotlib, Agg) and the numbers as CSV next to it
(columns: label, method, workdir, k, support_loss, grad_norm).
"""
from __future__ import annotations

import csv
import os
import sys

from absl import flags

from .harness import run
from md_meta.results import curves_for


def labels_for(runs: list) -> list:
    methods = [r['method'] for r in runs]
    return [r['method'] if methods.count(r['method']) == 1 else f"{r['method']} ({os.path.basename(os.path.normpath(r['workdir']))})"
            for r in runs]


def write_csv(path: str, runs: list) -> None:
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['label', 'method', 'workdir', 'k', 'support_loss', 'grad_norm'])
        for label, r in zip(labels_for(runs), runs):
            for k, (l, g) in enumerate(zip(r['loss'], r['grad_norm'])):
                w.writerow([label, r['method'], r['workdir'], k, repr(float(l)), repr(float(g))])


def plot(path: str, runs: list, log_y: bool = True) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in zip(labels_for(runs), runs):
        ks = list(range(len(r['loss'])))
        axes[0].plot(ks, r['loss'], marker='o', label=label)
        axes[1].plot(ks, r['grad_norm'], marker='o', label=label)
    n = runs[0]['num_tasks'] if runs else 0
    axes[0].set_title(f'(a) support loss, mean over {n} new tasks')
    axes[0].set_ylabel(r'$\mathcal{L}(\phi^{(k)}; \mathcal{D}^{trn})$')
    axes[1].set_title('(b) gradient norm')
    axes[1].set_ylabel(r'$\|\nabla \mathcal{L}(\phi^{(k)}; \mathcal{D}^{trn})\|_2$')
    for ax in axes:
        ax.set_xlabel('inner step k')
        if log_y:
            ax.set_yscale('log')
        ax.grid(alpha=0.3)
        ax.legend()
        if runs:
            ax.set_xticks(range(max(len(r['loss']) for r in runs)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    from .harness import prepare_process
    prepare_process()  # before any JAX computation
    if not _WORKDIRS.value:
        print('error: --workdirs is required (comma-separated)', file=sys.stderr)
        sys.exit(2)
    runs = []
    for wd in _WORKDIRS.value:
        try:
            runs.append(curves_for(wd, _NUM_TASKS.value, _CHECKPOINT.value, _RECOMPUTE.value))
            print(f"{wd}: {runs[-1]['source']} curves, step {runs[-1]['step']}", file=sys.stderr)
        except FileNotFoundError as e:
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)
    out = _OUT.value
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    plot(out, runs, _LOG_Y.value)
    csv_path = os.path.splitext(out)[0] + '.csv'
    write_csv(csv_path, runs)
    print(f'wrote {out} and {csv_path}')


if __name__ == '__main__':
    _WORKDIRS = flags.DEFINE_list('workdirs', [], 'Comma-separated workdirs of training runs.')
    _NUM_TASKS = flags.DEFINE_integer('num_tasks', 1000, 'New test tasks to average over (the paper: 1000).')
    _OUT = flags.DEFINE_string('out', 'convergence.png', 'Output PNG; the CSV goes beside it (.csv).')
    _CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'last'], 'Which checkpoint of each run.')
    _LOG_Y = flags.DEFINE_bool('log_y', True, 'Logarithmic y axes.')
    _RECOMPUTE = flags.DEFINE_bool('recompute', False, 'Evaluate again even where a results file of the run holds '
                                   'the curves (same checkpoint, same number of tasks, not stale).')
    run(main)
