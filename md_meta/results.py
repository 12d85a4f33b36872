"""Results files of runs (results.json of experiments.train, evaluation.json of experiments.evaluate), read
without re-running anything already measured, and checked against the run's current state: a result
whose checkpoint fingerprint (md_meta.workdirs.provenance) is no longer the run's best/last/final one is
stale. ``result_table``: the Markdown table of result records (results.md)."""
from __future__ import annotations

import json
import os
import sys

from md_meta import checkpoint as checkpoint_lib
from md_meta import workdirs as workdirs_lib


def current_fingerprint(workdir: str, parameters: str, planned: int):
    """The fingerprint of the checkpoint that a result of ``parameters`` ('best', 'last', 'final') would
    come from now, or None."""
    ck = checkpoint_lib.Checkpointer(workdir)
    step = planned if parameters == 'final' else ck.step_of(parameters) if parameters in ('best', 'last') else None
    return (ck.record(step) or {}).get('fingerprint') if step is not None else None


def malformed(r) -> str:
    """'' for a result record ({'method', 'shots', 'num_tasks', 'metrics': {name: {'mean', 'ci', 'n'}}}), else
    what is wrong with it (a file of other JSON: a list, an empty object, a run with no results)."""
    if not isinstance(r, dict):
        return f'holds a JSON {type(r).__name__}, not a result'
    missing = [k for k in ('method', 'shots', 'num_tasks', 'metrics') if k not in r]
    if missing:
        return 'holds no result' if not r else f'is not a result (no {", ".join(missing)})'
    metrics = r['metrics']
    if not isinstance(metrics, dict) or not metrics or not all(
            isinstance(m, dict) and {'mean', 'ci', 'n'} <= set(m) for m in metrics.values()):
        return "is not a result (its 'metrics' are not {name: {mean, ci, n}})"
    return ''


def load(workdirs, warn=lambda s: print(s, file=sys.stderr)) -> list:
    """The results of each workdir: evaluation.json (experiments.evaluate), else the train-time results.json.
    A result whose checkpoint is no longer the run's best/last/final one (stale), or an unreadable file,
    is skipped with a warning; 'status' marks unfinished runs and runs still training."""
    out = []
    for wd in workdirs:
        r = None
        for name in ('evaluation.json', 'results.json'):
            path = os.path.join(wd, name)
            if not os.path.exists(path):
                continue
            try:
                with open(path, 'rb') as f:
                    r = json.loads(f.read().decode('utf-8'))
            except (OSError, ValueError) as e:
                warn(f'warning: {path} is unreadable ({e}); skipped')
                r = None
                break
            if name == 'results.json' and isinstance(r, dict):  # one record per evaluated support size
                rows = [dict(row, **{k: v for k, v in r.items() if k != 'results'})
                        for row in r.get('results') or [] if isinstance(row, dict)]
                r = next((row for row in rows if row.get('shots') == r.get('train_shots')), rows[0] if rows else {})
            problem = malformed(r)
            if problem:
                warn(f'warning: {path} {problem}; skipped')
                r = None
            break
        if r is None:
            if not any(os.path.exists(os.path.join(wd, n)) for n in ('evaluation.json', 'results.json')):
                warn(f'warning: no evaluation.json or results.json in {wd} (run python -m experiments.evaluate '
                     f'--workdir={wd}); skipped')
            continue
        if 'checkpoint_fingerprint' in r and r['checkpoint_fingerprint']:
            now = current_fingerprint(wd, r.get('parameters'), r.get('planned_steps'))
            if now != r['checkpoint_fingerprint']:
                warn(f"warning: {path} is stale: it was computed from the {r['parameters']} checkpoint at step "
                     f"{r['step']}, which is no longer the run's {r['parameters']} one; rerun python -m "
                     f'experiments.evaluate --workdir={wd}; skipped')
                continue
        else:
            warn(f'warning: {path} has no provenance (written by an older md-meta); shown as is')
        pid = workdirs_lib.holder(wd)
        r['status'] = 'training' if pid is not None else ('unfinished' if r.get('finished') is False else '')
        r['workdir'] = wd
        out.append(r)
    return out


def stored_curves(workdir: str, num_tasks: int, which: str):
    """The curves of a results file that already measured them: evaluation.json of the same checkpoint
    choice, or (``which='last'``, finished runs) train's results.json, on ``num_tasks`` tasks and still
    describing the run's current checkpoint (experiments.report.load's staleness check); else None."""
    records = load([workdir], warn=lambda s: None)
    if not records:
        return None
    r = records[0]
    same = r.get('parameters') == which or (which == 'last' and r.get('parameters') == 'final')
    if not same or r.get('num_tasks') != num_tasks or 'curves' not in r or r.get('status'):
        return None
    return {'method': r['method'], 'workdir': workdir, 'step': r['step'], 'num_tasks': r['num_tasks'],
            'loss': r['curves']['loss'], 'grad_norm': r['curves']['grad_norm'], 'source': 'stored'}


def curves_for(workdir: str, num_tasks: int, which: str = 'best', recompute: bool = False) -> dict:
    """{'method', 'workdir', 'loss': [K+1], 'grad_norm': [K+1]} averaged over ``num_tasks`` test tasks: read
    from the run's results when they hold exactly that (``stored_curves``), else computed."""
    stored = None if recompute else stored_curves(workdir, num_tasks, which)
    if stored is not None:
        return stored
    from md_meta import evaluation
    exp, meta, step = evaluation.load_run(workdir, which, warn=lambda s: print(s, file=sys.stderr))
    r = evaluation.evaluate(exp, meta, 'test', num_tasks=num_tasks)
    return {'method': exp.config.method, 'workdir': workdir, 'step': step, 'num_tasks': r['num_tasks'],
            'loss': r['curves']['loss'], 'grad_norm': r['curves']['grad_norm'], 'source': 'computed'}


def result_table(rows: list) -> str:
    """Markdown table: method, shots, metric mean +- 95% CI."""
    lines = ['| method | shots | metric | mean +- 95% CI | tasks |', '| --- | --- | --- | --- | --- |']
    for r in rows:
        for name, s in r['metrics'].items():
            lines.append(f"| {r['method']} | {r['shots']} | {name} | {s['mean']:.4f} +- {s['ci']:.4f} | {s['n']} |")
    return '\n'.join(lines)
