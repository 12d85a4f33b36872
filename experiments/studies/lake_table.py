"""A table of errors on Lake-style one-shot runs from the evaluation.json files of
``experiments.evaluate --lake_runs``, one row per (variant, method), files named
``eval-<variant>-<method>[-seed<S>].json``:

  * error: with one seed, the mean over runs +- the 95% t-interval over runs; with several, the mean of the
    seeds' mean errors +- the t-interval over seeds (``md_meta.evaluation.seed_interval``);
  * minus the reference variant (same method, same seeds) and minus MAML (or ``--against``'s method; same variant
    and seeds): paired
    by run, which is exact because a seed's runs are the same for every model of that seed (built with
    --lake_build from config.seed); intervals as above, over runs with one seed, over seeds with several;
  * ``--pool_runs``: intervals over the runs of all seeds pooled, for effects within trained models (K or
    alpha at test) where the seeds' spread is not the question.

    python -m experiments.studies.lake_table --files='docs/figures/omniglot_lake_levers/eval-*.json' --reference=baseline
"""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
from absl import flags

from ..harness import fail, run
from md_meta.evaluation import seed_interval

NAME = re.compile(r'^eval-(?P<variant>.+?)-(?P<method>[a-z0-9_]+)(?:-seed(?P<seed>\d+))?\.json$')


def load(pattern: str) -> dict:
    """{(variant, method): {seed: (record, per-run errors in run order)}}."""
    out: dict = {}
    for path in sorted(glob.glob(pattern)):
        m = NAME.match(os.path.basename(path))
        if not m:
            raise ValueError(f'{path}: expected a name eval-<variant>-<method>[-seed<S>].json')
        with open(path) as f:
            record = json.load(f)
        if 'lake' not in record:
            raise ValueError(f'{path}: no Lake runs in this evaluation (experiments.evaluate --lake_runs)')
        runs = record['lake']['runs']
        seed = int(m['seed']) if m['seed'] is not None else int(record.get('seed', 0))
        out.setdefault((m['variant'], m['method']), {})[seed] = (record, np.array([runs[k] for k in sorted(runs)]))
    if not out:
        raise ValueError(f'{pattern}: no files')
    return out


def interval(per_seed: list, pool_runs: bool = False) -> tuple:
    """(mean, 95% half-width, 'runs' | 'seeds') of per-seed arrays of per-run values: over the runs of one
    seed, or of all seeds with ``pool_runs``, else over the seeds' means."""
    if len(per_seed) == 1 or pool_runs:
        v = np.concatenate(per_seed)
        return float(v.mean()), seed_interval(v)[1], 'runs'
    return (*seed_interval([v.mean() for v in per_seed]), 'seeds')


def paired(a: dict, b: dict, pool_runs: bool = False):
    """a - b over the seeds both have, paired by run; None if they share no seed."""
    seeds = sorted(set(a) & set(b))
    return interval([a[s][1] - b[s][1] for s in seeds], pool_runs) + (len(seeds),) if seeds else None


def rows(data: dict, reference: str, order=(), pool_runs: bool = False, against: str = 'maml') -> list:
    """One row per (variant, method): the error, and paired differences to the reference variant (same method)
    and to the method ``against`` (same variant), ``against`` first within each variant."""
    found = sorted({v for v, _ in data})
    order = list(order) or [reference] * (reference in found) + [v for v in found if v != reference]
    out = []
    for (variant, method), by_seed in sorted(data.items(), key=lambda kv: (
            order.index(kv[0][0]) if kv[0][0] in order else len(order), kv[0][0], kv[0][1] != against, kv[0][1])):
        first = by_seed[min(by_seed)][0]
        row = {'variant': variant, 'method': method, 'seeds': sorted(by_seed),
               'step': sorted({r['step'] for r, _ in by_seed.values()}),
               'eval_inner_steps': first.get('eval_inner_steps'),
               'eval_step_size': (first['eval_step_size'] if 'eval_step_size' in first    # older records:
                                  else first['config']['inner']['step_size']),                # the trained alpha
               'error': interval([e for _, e in by_seed.values()], pool_runs),
               'per_seed': [float(by_seed[s][1].mean()) for s in sorted(by_seed)],
               'minus_reference': None, 'minus_against': None}
        if reference and variant != reference and (reference, method) in data:
            row['minus_reference'] = paired(by_seed, data[(reference, method)], pool_runs)
        if method != against and (variant, against) in data:
            row['minus_against'] = paired(by_seed, data[(variant, against)], pool_runs)
        out.append(row)
    return out


def markdown(table: list, reference: str, pool_runs: bool = False, against: str = 'maml') -> str:
    def fmt(c, seeds):
        if c is None:
            return '-'
        return f'{c[0]:+.2f} +- {c[1]:.2f}' + ('' if c[3] == len(seeds) else f' ({c[3]} seed{"s" * (c[3] > 1)})')
    lines = [f'| variant | method | seeds | checkpoint step | K, alpha at test | error (%) | minus {reference or "reference"} '
             f'(paired) | minus {"MAML" if against == "maml" else against} (paired) |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in table:
        e = r['error']
        lines.append(f"| {r['variant']} | {r['method']} | {','.join(map(str, r['seeds']))} | "
                     f"{','.join(map(str, r['step']))} | {r['eval_inner_steps']}, {r['eval_step_size']:g} | "
                     f"{e[0]:.2f} +- {e[1]:.2f} | {fmt(r['minus_reference'], r['seeds'])} | {fmt(r['minus_against'], r['seeds'])} |")
    lines.append('')
    over = 'the runs of all seeds pooled' if pool_runs else 'the runs (one seed) or over seeds (several)'
    lines.append(f'Intervals: 95% t-intervals over {over}; a paired difference over fewer seeds than its row names '
                 'them. Checkpoint step: the best by meta-validation.')
    return '\n'.join(lines) + '\n'


def plot(table: list, path: str, mark: float | None = None) -> None:
    """One panel per variant, every method side by side: the error with its 95% interval as a bar, each seed's
    mean error as a dot, ``mark`` (e.g. a published error to pass) as a dashed line."""
    from .summarise_runs import _plt
    plt = _plt()
    if plt is None:
        return
    variants = list(dict.fromkeys(r['variant'] for r in table))
    width = max(len([r for r in table if r['variant'] == v]) for v in variants)
    fig, axes = plt.subplots(1, len(variants), figsize=(1.5 + 0.8 * width * len(variants), 3.6), squeeze=False,
                             sharey=True)
    for ax, v in zip(axes[0], variants):
        cell = [r for r in table if r['variant'] == v]
        xs = np.arange(len(cell))
        ax.bar(xs, [r['error'][0] for r in cell], yerr=[r['error'][1] for r in cell], capsize=3, color='#9ecae1')
        for x, r in zip(xs, cell):
            ax.plot([x] * len(r['per_seed']), r['per_seed'], 'k.', ms=4)
        if mark is not None:
            ax.axhline(mark, ls='--', color='#d62728', lw=1, label=f'{mark:g}%')
            ax.legend(fontsize=8, loc='upper right')
        ax.set_xticks(xs)
        ax.set_xticklabels([r['method'] for r in cell], rotation=30, ha='right', fontsize=8)
        k = cell[0]['eval_inner_steps']
        ax.set_title(f'{v} (K = {k} at test)', fontsize=9)
        ax.grid(axis='y', alpha=0.3)
    axes[0][0].set_ylabel("error on Lake-style runs (%)")
    over = ' or '.join(sorted({r['error'][2] for r in table}))
    fig.suptitle(f'mean error with its 95% t-interval over {over}; dots: each seed', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    if not _FILES.value:
        fail('--files is required')
    try:
        table = rows(load(_FILES.value), _REFERENCE.value, _VARIANTS.value, _POOL.value, _AGAINST.value)
    except (ValueError, OSError, KeyError) as e:
        fail(e)
    text = markdown(table, _REFERENCE.value, _POOL.value, _AGAINST.value)
    print(text, end='')
    if _OUT.value:
        with open(_OUT.value + '.md', 'w') as f:
            f.write(text)
        with open(_OUT.value + '.json', 'w') as f:
            json.dump(table, f, indent=1)
            f.write('\n')
        plot(table, _OUT.value + '.png', _MARK.value)


if __name__ == '__main__':   # flags only when run: the functions above import into tests and notebooks
    _FILES = flags.DEFINE_string('files', None, 'Glob of evaluation.json copies named eval-<variant>-<method>[-seed<S>].json.')
    _REFERENCE = flags.DEFINE_string('reference', '', 'Variant whose errors the others are compared with (paired).')
    _OUT = flags.DEFINE_string('out', '', 'Also write the table to <out>.md, the numbers to <out>.json and a bar '
                               'chart to <out>.png.')
    _MARK = flags.DEFINE_float('mark', None, "An error (%) to draw across the chart, e.g. 13.5 (Lake 2015's ConvNet).")
    _POOL = flags.DEFINE_bool('pool_runs', False, 'With several seeds: intervals over all their runs pooled (the '
                              'variation of runs given the trained models) instead of over seeds.')
    _AGAINST = flags.DEFINE_string('against', 'maml', 'Method the others are compared with in each variant (paired).')
    _VARIANTS = flags.DEFINE_list('variants', [], 'Row order (default: the reference, then the others sorted).')
    run(main)
