"""A seeded grid of finished runs as one table and three figures (mean over seeds, 95% t-interval).

    python -m experiments.studies.summarise_runs --root=runs/omniglot_paper --out=docs/figures/omniglot_paper

Every sub-directory of ``--root`` named ``<variant>-<N>shot-seed<S>`` is one run of experiments.train. From
each it reads results.json (test metrics of the final parameters on eval.num_tasks new tasks, and the
inner-loop curves: support loss and gradient norm at k = 0..K averaged over those tasks), metrics.jsonl
(meta-validation accuracy by meta-step) and config.json. It writes

  <out>.md / .csv / .json       test accuracy per variant and shot count: mean over seeds +- t-interval,
                                every seed's value, and the meta-steps of the runs;
  <out>_bars.png                every variant side by side (mean, t-interval, each seed);
  <out>_val.png                 meta-validation accuracy against meta-step, mean over seeds (shaded: min-max);
  <out>_convergence.png / .csv  the paper's Fig. 1: support loss and gradient norm at k = 0..K on new tasks,
                                mean over seeds.
A run without results.json (unfinished, still training, or stopped: its stopped.json) is listed with its last step
and left out.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
from absl import flags

from ..harness import run

from md_meta.evaluation import seed_interval


NAME = re.compile(r'^(?P<variant>.+)-(?P<shots>\d+)shot-seed(?P<seed>\d+)$')


def read_jsonl(path: str) -> list:
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a kill: the rest is still read
    return out


def load_runs(root: str, metric: str) -> tuple:
    """([finished run dicts], [unfinished (name, last step, planned, why: '' or the stop training recorded)])."""
    runs, unfinished = [], []
    for name in sorted(os.listdir(root)):
        m = NAME.match(name)
        wd = os.path.join(root, name)
        if not m or not os.path.isdir(wd):
            continue
        with open(os.path.join(wd, 'config.json')) as f:
            cfg = json.load(f)
        planned = int(cfg['meta']['steps'])
        log = read_jsonl(os.path.join(wd, 'metrics.jsonl'))
        last = max((r['step'] for r in log), default=0)
        res_path = os.path.join(wd, 'results.json')
        if not os.path.exists(res_path):
            why = ''
            if os.path.exists(os.path.join(wd, 'stopped.json')):   # md_meta.training.STOPPED
                with open(os.path.join(wd, 'stopped.json')) as f:
                    stop = json.load(f)
                last, why = max(last, stop['step'] or 0), f"stopped: {stop['reason']}"
            unfinished.append((name, last, planned, why))
            continue
        with open(res_path) as f:
            res = json.load(f)
        test = next(r for r in res['results'] if r['shots'] == int(m['shots']))
        val = sorted((r['step'], r[f'val/{metric}']) for r in log if f'val/{metric}' in r)
        runs.append({'name': name, 'variant': m['variant'], 'shots': int(m['shots']), 'seed': int(m['seed']),
                     'method': cfg['method'], 'steps': last, 'planned': planned,
                     'test': test['metrics'][metric]['mean'], 'test_ci': test['metrics'][metric]['ci'],
                     'tasks': test['num_tasks'], 'curves': test.get('curves', {}), 'val': val,
                     'commit': (res.get('git_commit') or '')[:7]})
    return runs, unfinished


def summarise(runs: list, variants: list) -> list:
    rows = []
    for v in variants:
        for s in sorted({r['shots'] for r in runs}):
            cell = sorted((r for r in runs if r['variant'] == v and r['shots'] == s), key=lambda r: r['seed'])
            if not cell:
                continue
            mean, ci = seed_interval([r['test'] for r in cell])
            rows.append({'variant': v, 'shots': s, 'mean': mean, 'ci': ci, 'seeds': [r['seed'] for r in cell],
                         'per_seed': [r['test'] for r in cell], 'steps': sorted({r['steps'] for r in cell}),
                         'tasks': sorted({r['tasks'] for r in cell}), 'method': cell[0]['method'],
                         'commits': sorted({r['commit'] for r in cell if r['commit']})})
    return rows


def git_commit(path: str) -> str:
    try:
        return subprocess.run(['git', '-C', path, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def _other_commits(rows: list, commit: str) -> str:
    """' (variant: its runs' commits; ...)' for the variants whose results.json record another commit than
    ``commit``, '' if none."""
    other = {}
    for r in rows:
        found = [c for c in r.get('commits', []) if not commit.startswith(c) and not c.startswith(commit)]
        if found:
            other.setdefault(r['variant'], set()).update(found)
    return ' (' + '; '.join(f'{v}: {", ".join(sorted(cs))}' for v, cs in other.items()) + ')' if other else ''


def markdown(rows: list, unfinished: list, metric: str, commit: str) -> str:
    pct = metric == 'accuracy'
    f = (lambda x: f'{100 * x:.2f}') if pct else (lambda x: f'{x:.4f}')
    shots = sorted({r['shots'] for r in rows})
    by = {(r['variant'], r['shots']): r for r in rows}
    variants = list(dict.fromkeys(r['variant'] for r in rows))
    unit = ' (%)' if pct else ''
    out = ['| variant | ' + ' | '.join(f'{s}-shot {metric}{unit}' for s in shots) + ' | per seed | meta-steps |',
           '| --- |' + ' --- |' * len(shots) + ' --- | --- |']
    for v in variants:
        cells, seeds, steps = [], [], set()
        for s in shots:
            r = by.get((v, s))
            if r is None:
                cells.append('-')
                continue
            ci = '' if np.isnan(r['ci']) else f' +- {f(r["ci"])}'
            cells.append(f'{f(r["mean"])}{ci} ({len(r["seeds"])})')
            seeds.append(f'{s}-shot: ' + ', '.join(f(x) for x in r['per_seed']))
            steps.update(r['steps'])
        out.append(f'| {v} | ' + ' | '.join(cells) + f' | {"; ".join(seeds)} | {", ".join(map(str, sorted(steps)))} |')
    tasks = sorted({t for r in rows for t in r['tasks']})
    out += ['', f'Mean over seeds (their number in brackets) of the test {metric} of the final parameters on '
            f'{", ".join(map(str, tasks))} new tasks per run, +- the 95% t-interval over seeds; runs from commit {commit}'
            + _other_commits(rows, commit) + '.']
    if unfinished:
        out += ['', 'Not finished (left out): ' + ', '.join(f'{n} at step {s}/{p}' + (f' ({why})' if why else '')
                                                             for n, s, p, why in unfinished) + '.']
    return '\n'.join(out) + '\n'


def _plt():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print('matplotlib is not installed: no figures', file=sys.stderr)
        return None


def plot_bars(rows: list, path: str, metric: str) -> None:
    """Every variant side by side: the mean over seeds with its 95% t-interval as a bar, each seed as a dot, one
    panel per shot count."""
    plt = _plt()
    if plt is None:
        return
    shots = sorted({r['shots'] for r in rows})
    fig, axes = plt.subplots(1, len(shots), figsize=(1.2 + 0.9 * len({r['variant'] for r in rows}) * len(shots), 3.6),
                             squeeze=False)
    for ax, s in zip(axes[0], shots):
        cell = [r for r in rows if r['shots'] == s]
        xs = np.arange(len(cell))
        means = [100 * r['mean'] if metric == 'accuracy' else r['mean'] for r in cell]
        cis = [0.0 if np.isnan(r['ci']) else (100 * r['ci'] if metric == 'accuracy' else r['ci']) for r in cell]
        ax.bar(xs, means, yerr=cis, capsize=3, color='#9ecae1')
        for x, r in zip(xs, cell):
            vals = [100 * v if metric == 'accuracy' else v for v in r['per_seed']]
            ax.plot([x] * len(vals), vals, 'k.', ms=4)
        lo = min(min(100 * v if metric == 'accuracy' else v for v in r['per_seed']) for r in cell)
        ax.set_ylim(bottom=max(0.0, lo - 5) if metric == 'accuracy' else 0.0)
        ax.set_xticks(xs)
        ax.set_xticklabels([r['variant'] for r in cell], rotation=30, ha='right', fontsize=8)
        ax.set_ylabel(f'test {metric}' + (' (%)' if metric == 'accuracy' else ''))
        ax.set_title(f'{s}-shot: mean over seeds, 95% t-interval; dots: seeds', fontsize=9)
        ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_validation(runs: list, variants: list, path: str, metric: str) -> None:
    plt = _plt()
    if plt is None:
        return
    shots = sorted({r['shots'] for r in runs})
    fig, axes = plt.subplots(1, len(shots), figsize=(4.6 * len(shots), 3.4), squeeze=False)
    for ax, s in zip(axes[0], shots):
        for v in variants:
            cell = [r for r in runs if r['variant'] == v and r['shots'] == s and r['val']]
            if not cell:
                continue
            steps = sorted(set.intersection(*[{st for st, _ in r['val']} for r in cell]))
            vals = np.array([[dict(r['val'])[st] for st in steps] for r in cell])
            line, = ax.plot(steps, vals.mean(0), marker='.', label=f'{v} ({len(cell)})')
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
        ax.set_title(f'{s}-shot: meta-validation')
        ax.set_xlabel('meta-step')
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def convergence(runs: list, variants: list) -> list:
    """[{variant, shots, k, support_loss, grad_norm, seeds}]: Fig. 1's curves averaged over seeds."""
    out = []
    for v in variants:
        for s in sorted({r['shots'] for r in runs}):
            cell = [r for r in runs if r['variant'] == v and r['shots'] == s and r['curves']]
            if not cell:
                continue
            loss = np.mean([r['curves']['loss'] for r in cell], axis=0)
            grad = np.mean([r['curves']['grad_norm'] for r in cell], axis=0)
            out += [{'variant': v, 'shots': s, 'k': k, 'support_loss': float(loss[k]), 'grad_norm': float(grad[k]),
                     'seeds': len(cell)} for k in range(len(loss))]
    return out


def plot_convergence(rows: list, path: str) -> None:
    plt = _plt()
    if plt is None or not rows:
        return
    shots = sorted({r['shots'] for r in rows})
    fig, axes = plt.subplots(len(shots), 2, figsize=(9, 3.3 * len(shots)), squeeze=False)
    for i, s in enumerate(shots):
        for v in dict.fromkeys(r['variant'] for r in rows):
            pts = [r for r in rows if r['variant'] == v and r['shots'] == s]
            if not pts:
                continue
            ks = [r['k'] for r in pts]
            axes[i][0].plot(ks, [r['support_loss'] for r in pts], marker='o', ms=3, label=v)
            axes[i][1].plot(ks, [r['grad_norm'] for r in pts], marker='o', ms=3, label=v)
        for j, what in enumerate(('support loss L(phi_k)', 'gradient norm |grad L(phi_k)|')):
            ax = axes[i][j]
            ax.set_yscale('log')
            ax.set_xlabel('inner step k')
            ax.set_title(f'{s}-shot: {what}')
            ax.grid(alpha=0.3, which='both')
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    if not _ROOT.value or not _OUT.value:
        sys.exit('summarise_runs: --root and --out are required')
    if not os.path.isdir(_ROOT.value):
        sys.exit(f'summarise_runs: {_ROOT.value}: no such directory')
    runs, unfinished = load_runs(_ROOT.value, _METRIC.value)
    if not runs:
        sys.exit(f'summarise_runs: no finished run (<variant>-<N>shot-seed<S> with results.json) in {_ROOT.value}')
    found = sorted({r['variant'] for r in runs})
    variants = [v for v in _VARIANTS.value if v in found] + [v for v in found if v not in _VARIANTS.value]
    rows = summarise(runs, variants)
    commit = _COMMIT.value or git_commit(_ROOT.value)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    text = markdown(rows, unfinished, _METRIC.value, commit)
    with open(_OUT.value + '.md', 'w') as f:
        f.write(text)
    with open(_OUT.value + '.json', 'w') as f:
        json.dump({'metric': _METRIC.value, 'commit': commit,
                   'rows': [dict(r, ci=None if np.isnan(r['ci']) else r['ci']) for r in rows],  # strict JSON
                   'runs': [{k: v for k, v in r.items() if k != 'curves'} for r in runs],
                   'unfinished': unfinished}, f, indent=1)
    with open(_OUT.value + '.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['variant', 'shots', 'seed', 'method', 'steps', _METRIC.value, 'ci_tasks', 'tasks'])
        for r in runs:
            w.writerow([r['variant'], r['shots'], r['seed'], r['method'], r['steps'], r['test'], r['test_ci'], r['tasks']])
    conv = convergence(runs, variants)
    with open(_OUT.value + '_convergence.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, ['variant', 'shots', 'k', 'support_loss', 'grad_norm', 'seeds'])
        w.writeheader()
        w.writerows(conv)
    plot_bars(rows, _OUT.value + '_bars.png', _METRIC.value)
    plot_validation(runs, variants, _OUT.value + '_val.png', _METRIC.value)
    plot_convergence(conv, _OUT.value + '_convergence.png')
    print(text, end='')
    print(f'wrote {_OUT.value}.md/.csv/.json, {_OUT.value}_bars.png, {_OUT.value}_val.png, '
          f'{_OUT.value}_convergence.png/.csv')


if __name__ == '__main__':
    _ROOT = flags.DEFINE_string('root', None, 'Folder of run workdirs named <variant>-<N>shot-seed<S>.')
    _OUT = flags.DEFINE_string('out', None, 'Output prefix (writes <out>.md, .csv, .json, _val.png, _convergence.*).')
    _VARIANTS = flags.DEFINE_list('variants', [], 'Row order (default: sorted variant names found).')
    _METRIC = flags.DEFINE_string('metric', 'accuracy', 'Test metric of results.json to tabulate.')
    _COMMIT = flags.DEFINE_string('commit', '', 'The commit of the code that produced the runs (default: the git '
                                  'commit of the checkout holding --root).')
    run(main)
