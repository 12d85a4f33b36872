r"""The blockIAF ablation on sinusoid regression: forms and initialisations of MD beside MAML, MetaCurvature
and MetaKFO, with seeds, at equal budget.

    python -m experiments.studies.ablate_blockiaf --workdir=runs/ablate [--seeds=0,1,2] [--steps=5000] [--jobs=2]
        [--variants=maml,md-paper,...] [--out=docs/figures/blockiaf_ablation]

Every (variant, seed) is one ``python -m experiments.compare`` run (MAML's protocol: one run per shot count
K with K support and K query points, meta-batch 25, one inner step alpha = 0.01, Adam 1e-3, ``--steps``
meta-steps; MSE on ``--num_tasks`` new tasks), ``--config.seed=SEED`` and the variant's overrides, in
<workdir>/<variant>-s<seed> (resumable: a finished run with these settings is read back, not re-run; one with
other settings is refused). ``--earlier=T1.json,...`` takes the rows of variants measured before from tables this
command wrote (the same steps, test tasks and seeds; each row names its table), so one table can hold every
method without re-running them. The table gives, per variant and shot count, the mean over seeds of the test MSE
with a 95% interval over seeds (t quantile, n - 1 degrees of freedom), and is written as <out>.md, <out>.csv
and <out>.json, with a bar chart <out>.png.
"""
from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
from absl import flags

from ..harness import run
from md_meta.evaluation import seed_interval
from md_meta.workdirs import WorkdirError, config_from_dict, git_commit

COMMANDS = __package__.rpartition('.')[0]   # the commands' package: experiments, or md_meta_experiments installed
# name -> (method, config overrides, what it is)
VARIANTS = {
    'maml': ('maml', {}, 'MAML'),
    'anil': ('anil', {}, 'ANIL (only the last layer adapts: the control of any loss geometry)'),
    'metasgd': ('metasgd', {}, 'Meta-SGD (a learned diagonal step: what MD does on kernels with zero heads)'),
    'metacurvature': ('metacurvature', {}, 'MetaCurvature'),
    'metakfo': ('metakfo', {}, 'MetaKFO'),
    # the map alone (md.kronecker='none'): the paper's and the monotone forms
    'md-paper': ('md', {'md.kronecker': 'none', 'md.monotone': False, 'md.scale': 'exp', 'md.head_init': 'zero'},
                 "MD, the paper's / authors' form and init (exp scale, every head factor 0)"),
    'md-paper-learnable': ('md', {'md.kronecker': 'none', 'md.monotone': False, 'md.scale': 'exp',
                                  'md.head_init': 'learnable'},
                           "MD, the authors' form, only the last factor of each head 0"),
    'md-monotone': ('md', {'md.kronecker': 'none', 'md.head_init': 'zero'},
                    'MD, the monotone blockIAF alone (no Kronecker step), every head factor 0'),
    'md-monotone-learnable': ('md', {'md.kronecker': 'none', 'md.head_init': 'learnable'},
                              'MD, the monotone blockIAF alone, learnable heads'),
    'md-paper-bounded': ('md', {'md.kronecker': 'none', 'md.monotone': False, 'md.scale': 'bounded',
                                'md.head_init': 'zero'},
                         "MD, the authors' form with the paper's bounded scale (eq. 8a)"),
    'md-paper-bounded-smin001': ('md', {'md.kronecker': 'none', 'md.monotone': False, 'md.scale': 'bounded',
                                        'md.head_init': 'zero', 'md.s_min': 0.01},
                                 "MD, the authors' form with the bounded scale in [0.01, 2] (step factors as small "
                                 "as Meta-SGD's)"),
    'md-monotone-smin001': ('md', {'md.kronecker': 'none', 'md.head_init': 'zero', 'md.s_min': 0.01},
                            'MD, monotone blockIAF, scales in [0.01, 2] (its shift bound, set by the margin, 10x '
                            'smaller)'),
    'md-paper-enc1': ('md', {'md.kronecker': 'none', 'md.monotone': False, 'md.scale': 'exp', 'md.head_init': 'zero',
                             'md.encoder_layers': 1},
                      "MD, the authors' form and init, one-layer encoders and decoders"),
    'md-paper-learnable-enc1': ('md', {'md.kronecker': 'none', 'md.monotone': False, 'md.scale': 'exp',
                                       'md.head_init': 'learnable', 'md.encoder_layers': 1},
                                "MD, the authors' form, learnable heads, one-layer encoders and decoders"),
    'md-monotone-learnable-enc1': ('md', {'md.kronecker': 'none', 'md.head_init': 'learnable',
                                          'md.encoder_layers': 1},
                                   'MD, monotone blockIAF, learnable heads, one-layer encoders and decoders'),
    # a Kronecker matrix per tensor that mixes its entries (md.kronecker; md_meta/methods/md.py)
    'md-kron': ('md', {'md.kronecker': 'dual_step'},
                'MD, the default form: monotone blockIAF, Kronecker-preconditioned dual step z <- z - alpha K grad'),
    'md-kron-learnable-enc1': ('md', {'md.kronecker': 'dual_step', 'md.head_init': 'learnable',
                                      'md.encoder_layers': 1},
                               'MD, Kronecker dual step, learnable heads, one-layer encoders and decoders'),
    'md-sandwich': ('md', {'md.kronecker': 'sandwich'},
                    'MD, monotone map P g(P w) with P = K^(1/2) positive definite (Theorem 1 holds)'),
    'md-sandwich-learnable-enc1': ('md', {'md.kronecker': 'sandwich', 'md.head_init': 'learnable',
                                          'md.encoder_layers': 1},
                                   'MD, monotone sandwich P g(P w), learnable heads, one-layer encoders and decoders'),
    'md-primal': ('md', {'md.kronecker': 'none', 'md.start': 'primal'},
                  'MD, the monotone blockIAF alone, start phi_0 meta-learned, z_0 = g^-1(phi_0)'),
    'md-primal-learnable-enc1': ('md', {'md.kronecker': 'none', 'md.start': 'primal', 'md.head_init': 'learnable',
                                        'md.encoder_layers': 1},
                                 'MD, primal start, learnable heads, one-layer encoders and decoders'),
    'md-kron-primal-elu': ('md', {'md.kronecker': 'dual_step', 'md.start': 'primal', 'md.activation': 'elu',
                                  'md.head_init': 'learnable'},
                           'MD, Kronecker dual step, primal start, ELU codes and learnable heads (every parameter '
                           'learns)'),
    'md-kfo': ('md', {'md.kronecker': 'kfo_step'},
               "MD, monotone blockIAF, MetaKFO's nonlinear transformation as the dual step (no longer mirror descent)"),
    'md-sandwich-primal-elu': ('md', {'md.kronecker': 'sandwich', 'md.start': 'primal', 'md.activation': 'elu',
                                      'md.head_init': 'learnable'},
                               'MD, monotone sandwich, primal start, ELU codes and learnable heads'),
}
KRONECKER_GRID = ('maml', 'metasgd', 'metacurvature', 'metakfo', 'md-paper', 'md-monotone', 'md-kron',
                  'md-kron-learnable-enc1', 'md-sandwich', 'md-sandwich-learnable-enc1', 'md-primal',
                  'md-primal-learnable-enc1', 'md-kron-primal-elu', 'md-sandwich-primal-elu')
DEFAULT = ('maml', 'metasgd', 'metacurvature', 'metakfo', 'md-paper', 'md-paper-learnable', 'md-paper-bounded',
           'md-paper-enc1', 'md-paper-learnable-enc1', 'md-monotone', 'md-monotone-learnable',
           'md-monotone-learnable-enc1')

FLAGS = flags.FLAGS


def run_one(variant: str, seed: int) -> str:
    """Runs (or reads back) one compare run; returns its comparison.json path."""
    method, overrides, _ = VARIANTS[variant]
    sub = os.path.join(FLAGS.workdir, f'{variant}-s{seed}')
    result = os.path.join(sub, 'comparison.json')
    if os.path.exists(result):
        with open(result) as f:
            done = json.load(f)
        differs = _differs(done, method, seed, overrides)
        if differs:
            raise WorkdirError(f'{sub} holds a finished run with other settings ({differs}); '
                               'use another --workdir or delete that run')
        return result
    cmd = [sys.executable, '-m', f'{COMMANDS}.compare', f'--workdir={sub}', f'--methods={method}',
           f'--shots={",".join(FLAGS.shots)}', f'--steps={FLAGS.steps}', f'--num_tasks={FLAGS.num_tasks}',
           '--timing_steps=0', f'--config.seed={seed}'] + [f'--config.{k}={v}' for k, v in overrides.items()]
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, 'log.txt'), 'w') as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f'{variant} seed {seed} failed (exit {rc}); see {sub}/log.txt')
    return result


def _differs(done: dict, method: str, seed: int, overrides: dict) -> str:
    """'' if a finished run's comparison.json is the run asked for, else what differs."""
    config = config_from_dict(done['config'])   # fields an older run lacks take the value it computed with

    def get(path):
        node = config
        for key in path.split('.'):
            node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
        return node
    asked = {'methods': [method], 'shots': sorted(int(x) for x in FLAGS.shots), 'steps': FLAGS.steps,
             'num_tasks': FLAGS.num_tasks, 'seed': seed, **overrides}
    found = {'methods': done['methods'], 'shots': sorted(done['shots']), 'steps': done['steps'],
             'num_tasks': done['num_tasks'], 'seed': get('seed'), **{k: get(k) for k in overrides}}
    return ', '.join(f'{k} {found[k]!r}, asked {asked[k]!r}' for k in asked if found[k] != asked[k])


def earlier_rows(paths: list) -> dict:
    """{(variant, shots): row} from earlier tables of this command (``<out>.json``) made with this run's steps,
    number of test tasks and seeds; each row gains ``source`` (the table's path and, where recorded, commit). The
    first table holding a (variant, shots) wins; another holding different values for it is refused."""
    found = {}
    for path in paths:
        with open(path) as f:
            table = json.load(f)
        args = dict(a[2:].split('=', 1) for a in table['command'].split() if a.startswith('--') and '=' in a)
        default = lambda name: str(FLAGS[name].default) if name != 'seeds' else ','.join(FLAGS[name].default)
        setting = (int(table['steps']), int(args.get('num_tasks', default('num_tasks'))),
                   args.get('seeds', default('seeds')))
        asked = (FLAGS.steps, FLAGS.num_tasks, ','.join(FLAGS.seeds))
        if setting != asked:
            raise WorkdirError(f'--earlier: {path} was made with (steps, num_tasks, seeds) {setting}, '
                             f'this table asks {asked}')
        for row in table['rows']:
            key = (row['variant'], row['shots'])
            if key in found and found[key]['per_seed'] != row['per_seed']:
                raise WorkdirError(f'--earlier: {path} and {found[key]["source"]} differ on {key}')
            source = path + (f' ({table["commit"]})' if table.get('commit') else '')
            found.setdefault(key, dict(row, source=source))
    return found


def summarise(results: dict) -> list:
    """[{variant, shots, mean, ci, seeds, per_seed}] from {(variant, seed): comparison.json content}."""
    rows = []
    for variant in FLAGS.variants:
        for s in (int(x) for x in FLAGS.shots):
            vals = [r['mse'] for (v, _), res in sorted(results.items()) if v == variant
                    for r in res['results'] if r['shots'] == s]
            if not vals:
                continue
            n = len(vals)
            mean, ci = seed_interval(vals)
            rows.append({'variant': variant, 'shots': s, 'mean': mean, 'ci': ci, 'seeds': n,
                         'per_seed': vals})
    return rows


def paired(rows: list, reference: str) -> list:
    """[{variant, shots, diff, ci, ahead, seeds}]: per variant and shot count, the MSE minus the reference's,
    paired by seed (mean +- the t-interval over seeds; negative: better than the reference), and in how many seeds
    the variant's MSE is below the reference's. Rows' per_seed lists are in seed order (``summarise``)."""
    ref = {r['shots']: r['per_seed'] for r in rows if r['variant'] == reference}
    out = []
    for r in rows:
        if r['variant'] == reference or r['shots'] not in ref or len(ref[r['shots']]) != len(r['per_seed']):
            continue
        d = np.asarray(r['per_seed']) - np.asarray(ref[r['shots']])
        mean, ci = seed_interval(d)
        out.append({'variant': r['variant'], 'reference': reference, 'shots': r['shots'], 'diff': mean, 'ci': ci,
                    'ahead': int(np.sum(d < 0)), 'seeds': int(d.size)})
    return out


def paired_markdown(pairs: list, reference: str) -> str:
    shots = [int(x) for x in FLAGS.shots]
    by = {(p['variant'], p['shots']): p for p in pairs if p['reference'] == reference}
    out = ['| variant | ' + ' | '.join(f'{s}-shot: MSE - {reference} (seeds ahead)' for s in shots) + ' |',
           '| --- |' + ' --- |' * len(shots)]
    for v in FLAGS.variants:
        if v == reference or not any((v, s) in by for s in shots):
            continue
        cells = [f'{by[(v, s)]["diff"]:+.3f} +- {by[(v, s)]["ci"]:.3f} ({by[(v, s)]["ahead"]}/{by[(v, s)]["seeds"]})'
                 if (v, s) in by else '-' for s in shots]
        out.append(f'| {v} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(out) + '\n'


def markdown(rows: list, command: str) -> str:
    shots = [int(x) for x in FLAGS.shots]
    by = {(r['variant'], r['shots']): r for r in rows}
    out = ['| variant | ' + ' | '.join(f'{s}-shot MSE' for s in shots) + ' | what it is |',
           '| --- |' + ' --- |' * len(shots) + ' --- |']
    for v in FLAGS.variants:
        cells = []
        for s in shots:
            r = by.get((v, s))
            cells.append(f'{r["mean"]:.3f} +- {r["ci"]:.3f}' if r else '-')
        out.append(f'| {v} | ' + ' | '.join(cells) + f' | {VARIANTS[v][2]} |')
    n = max((r['seeds'] for r in rows), default=0)
    out += ['', f'Mean over {n} seeds of the test MSE ({FLAGS.num_tasks} new tasks each), +- the 95% interval over seeds '
            f'(t, {n - 1} d.o.f.); {FLAGS.steps} meta-steps per run. Command: `{command}`']
    sources = {}   # each earlier table, with the variants read from it, in row order
    for r in rows:
        if 'source' in r and r['variant'] not in sources.setdefault(r['source'], []):
            sources[r['source']].append(r['variant'])
    if sources:
        out += ['', 'Rows read from earlier tables of this command: ' +
                '; '.join(f'{src}: {", ".join(vs)}' for src, vs in sources.items()) + '.']
    return '\n'.join(out) + '\n'


def plot(rows: list, path: str) -> None:
    """Grouped bars: test MSE per variant at each shot count, 95% intervals over seeds as error bars."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no plot', file=sys.stderr)
        return
    shots = [int(x) for x in FLAGS.shots]
    variants = [v for v in FLAGS.variants if any(r['variant'] == v for r in rows)]
    by = {(r['variant'], r['shots']): r for r in rows}
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(variants), 3.6))
    width = 0.8 / len(shots)
    for j, s in enumerate(shots):
        xs = [i + (j - (len(shots) - 1) / 2) * width for i in range(len(variants))]
        ys = [by[(v, s)]['mean'] if (v, s) in by else np.nan for v in variants]
        es = [by[(v, s)]['ci'] if (v, s) in by else 0.0 for v in variants]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=f'{s}-shot')
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=25, ha='right', fontsize=8)
    ax.set_ylabel('test MSE (mean over seeds, 95% CI)')
    ax.set_title(f'Sinusoid, {FLAGS.steps} meta-steps per run', fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f'ablate_blockiaf: unknown variants {unknown}; choose from {sorted(VARIANTS)}')
    earlier = earlier_rows(FLAGS.earlier)
    measured = {v for v in FLAGS.variants if all((v, int(s)) in earlier for s in FLAGS.shots)}
    jobs = [(v, int(s)) for s in FLAGS.seeds for v in FLAGS.variants if v not in measured]
    results = {}
    with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
        futures = {pool.submit(run_one, v, s): (v, s) for v, s in jobs}
        for i, f in enumerate(concurrent.futures.as_completed(futures), 1):
            v, s = futures[f]
            with open(f.result()) as fh:
                results[(v, s)] = json.load(fh)
            mse = ', '.join(f'{r["shots"]}-shot {r["mse"]:.3f}' for r in results[(v, s)]['results'])
            print(f'[{i}/{len(jobs)}] {v} seed {s}: {mse}', flush=True)
    rows = summarise(results) + [earlier[(v, int(s))] for v in FLAGS.variants if v in measured for s in FLAGS.shots]
    rows.sort(key=lambda r: (FLAGS.variants.index(r['variant']), r['shots']))
    command = 'python -m experiments.studies.ablate_blockiaf ' + ' '.join(sys.argv[1:])
    out = FLAGS.out or os.path.join(FLAGS.workdir, 'ablation')
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    references = [v for v in FLAGS.paired_against if any(r['variant'] == v for r in rows)]
    pairs = [p for ref in references for p in paired(rows, ref)]
    table = markdown(rows, command) + ''.join(
        f'\nPaired by seed against {ref}: mean difference of the test MSE +- the 95% t-interval over seeds '
        f'(negative: lower MSE than {ref}), and the seeds in which the variant is ahead.\n\n' + paired_markdown(pairs, ref)
        for ref in references)
    with open(out + '.md', 'w') as f:
        f.write(table)
    with open(out + '.json', 'w') as f:
        json.dump({'command': command, 'steps': FLAGS.steps, 'commit': git_commit(), 'rows': rows, 'paired': pairs},
                  f, indent=1)
    with open(out + '.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['variant', 'shots', 'mean_mse', 'ci95', 'seeds', 'per_seed'])
        for r in rows:
            w.writerow([r['variant'], r['shots'], f'{r["mean"]:.5f}', f'{r["ci"]:.5f}', r['seeds'],
                        ' '.join(f'{x:.5f}' for x in r['per_seed'])])
    plot(rows, out + '.png')
    print(table)


if __name__ == '__main__':
    flags.DEFINE_string('workdir', 'runs/ablate', 'one sub-directory per (variant, seed)')
    flags.DEFINE_list('variants', list(DEFAULT), f'from {sorted(VARIANTS)}')
    flags.DEFINE_list('seeds', ['0', '1', '2'], 'config.seed of each run')
    flags.DEFINE_list('shots', ['5', '10', '20'], 'shot counts (one training run each)')
    flags.DEFINE_integer('steps', 5000, 'meta-steps per run (the same for every variant)')
    flags.DEFINE_integer('num_tasks', 600, 'new test tasks per evaluation')
    flags.DEFINE_integer('jobs', 1, 'runs in parallel (each a process)')
    flags.DEFINE_list('earlier', [], 'tables (<out>.json) of this command holding rows of variants measured before, '
                      'at these steps, test tasks and seeds: those variants are read from them, not run')
    flags.DEFINE_string('out', '', 'path prefix of the table files (default: <workdir>/ablation)')
    flags.DEFINE_list('paired_against', ['metacurvature', 'metakfo'], 'variants every other one is compared with, '
                      'paired by seed (those present)')
    run(main)
