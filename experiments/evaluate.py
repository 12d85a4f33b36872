"""Evaluate a trained run on new test tasks: mean +- 1.96 std / sqrt(N) of query accuracy and loss.

    python -m experiments.evaluate --workdir=runs/omniglot-md [--num_tasks=1000] [--checkpoint=best|last]
                                   [--lake_runs=DIR [--lake_build=20]]

Loads <workdir>/config.json and the best (by meta-validation; 'last' for the newest) good checkpoint,
adapts to --num_tasks new tasks of the 'test' split with the evaluation inner loop and writes
<workdir>/evaluation.json: per-metric {'mean', 'ci', 'n'}, the mean inner-loop curves (support loss and
gradient norm at k = 0..K, as in Fig. 1), the checkpoint step and the settings. --lake_runs runs Lake's
20-way one-shot Omniglot evaluation (md_meta.data.lake) on the runs in DIR as well (the run must be
20-way); with --lake_build=N and no runs in DIR yet, it first writes N runs in the official layout from
the run's held-out 'test' characters (two different drawers per character).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import flags

from .harness import fail, run


def evaluate_workdir(workdir: str, num_tasks: int = 1000, which: str = 'best', batch_size: int = 0,
                     seed_offset: int = 0, lake_runs: str = '', log=print, lake_build: int = 0,
                     on_result=lambda record: None, lake_within_alphabet: bool = False,
                     overrides: dict | None = None) -> dict:
    """Evaluates a workdir's checkpoint; returns the record also written to <workdir>/evaluation.json
    (md_meta.workdirs.provenance first: step, planned steps, which parameters, checkpoint fingerprint).
    Warns when training is still running there or the run is unfinished. OSError when the workdir is
    not writable (``on_result`` has the record by then). ``overrides``: the inner loop at test
    (md_meta.evaluation.load_run), recorded in the result."""
    from md_meta import checkpoint as checkpoint_lib
    from md_meta import evaluation, workdirs
    pid = workdirs.holder(workdir)
    exp, meta, step = evaluation.load_run(workdir, which, warn=log, overrides=overrides)
    cfg = exp.config
    if pid is not None:
        log(f'warning: training is still running in {workdir} (pid {pid}); evaluating its {which} checkpoint '
            f'at step {step} of {cfg.meta.steps}')
    ckpt = checkpoint_lib.Checkpointer(workdir)
    reached = max(ckpt.steps(), default=step)   # a finished run's best checkpoint may be an earlier one
    if pid is None and reached < cfg.meta.steps:
        log(f'warning: {workdir} is unfinished: trained to step {reached} of {cfg.meta.steps} (its {which} '
            f'checkpoint is at step {step})')
    if batch_size:
        cfg.eval.batch_size = batch_size
    t0 = time.time()
    result = evaluation.evaluate(exp, meta, 'test', num_tasks=num_tasks, seed_offset=seed_offset)
    fp = (ckpt.record(step) or {}).get('fingerprint')
    record = {**workdirs.provenance(cfg, step, which, fp, trained_to=reached), 'checkpoint': which,
              'shots': cfg.task.shots,
              'seed_offset': seed_offset, 'eval_inner_steps': exp.learner.eval_inner_config.steps,
              'eval_step_size': cfg.inner.step_size, **result,
              'seconds': time.time() - t0}
    if lake_runs:
        record['lake'] = _lake(exp, meta, lake_runs, lake_build, log, lake_within_alphabet)
    on_result(record)
    workdirs.write_atomic(os.path.join(workdir, 'evaluation.json'), workdirs.strict_json(record))
    return record


def _lake(exp, meta, runs_dir: str, build: int = 0, log=print, within_alphabet: bool = False):
    """Lake's 20-way one-shot runs: md_meta.data.lake (imported lazily; needs a 20-way run)."""
    try:
        from md_meta.data import lake
    except ImportError as e:
        raise SystemExit(f'error: --lake_runs needs md_meta.data.lake, which is not available ({e})')
    size = int(exp.source.example_x.shape[1]) if np.ndim(exp.source.example_x) == 4 else 28
    try:
        has_runs = os.path.isdir(runs_dir) and any(d.startswith('run') for d in os.listdir(runs_dir))
        if build > 0 and not has_runs:
            if exp.config.task.name != 'omniglot':
                raise SystemExit('error: --lake_build needs an Omniglot run')
            from md_meta.tasks import images
            lake.build_runs(images.load_pools(exp.config)['test'], runs_dir, num_runs=build, seed=exp.config.seed,
                            within_alphabet=within_alphabet)
            log(f'built {build} one-shot runs from the held-out test characters in {runs_dir}')
        return lake.evaluate_runs(runs_dir, lake.model_classifier(exp, meta), size=size)
    except (ValueError, OSError) as e:   # DataError is a ValueError/OSError subclass or reported as such
        raise SystemExit(f'error: --lake_runs={runs_dir}: {e}')


def format_record(r: dict) -> str:
    planned = f"/{r['planned_steps']}" if 'planned_steps' in r else ''
    unfinished = ' (unfinished)' if r.get('finished') is False else ''
    lines = [f"{r['method']} on {r['task']} ({r['shots']}-shot), checkpoint {r['checkpoint']} at step "
             f"{r['step']}{planned}{unfinished}, {r['num_tasks']} test tasks:"]
    for name, s in r['metrics'].items():
        scale, unit = (100.0, '%') if name == 'accuracy' else (1.0, '')
        num = lambda x: 'nan' if x is None else f'{scale * x:.4f}{unit}'   # NaN is stored as null
        lines.append(f"  {name}: {num(s['mean'])} +- {num(s['ci'])} (95% CI, n={s['n']})")
    if 'lake' in r:
        lk = r['lake']
        lines.append(f"  Lake one-shot runs: mean error {lk['mean_error']:.2f}% over {lk['num_runs']} runs")
    return '\n'.join(lines)


def main(argv):
    del argv
    from .harness import prepare_process
    prepare_process()  # before any JAX computation
    if not _WORKDIR.value:
        fail('--workdir is required')
    if _NUM_TASKS.value <= 0:
        fail(f'--num_tasks must be positive, got {_NUM_TASKS.value}')
    if _EVAL_STEPS.value < 0 or not _EVAL_STEP_SIZE.value >= 0:
        fail(f'--eval_steps and --eval_step_size must be >= 0, got {_EVAL_STEPS.value}, {_EVAL_STEP_SIZE.value}')
    overrides = {k: v for k, v in (('inner.eval_steps', _EVAL_STEPS.value), ('inner.step_size', _EVAL_STEP_SIZE.value),
                                   ('model.norm_stats', _NORM_STATS.value)) if v}
    records = []
    log = lambda s: print(s, file=sys.stderr, flush=True)
    try:
        r = evaluate_workdir(_WORKDIR.value, _NUM_TASKS.value, _CHECKPOINT.value, _BATCH.value,
                             _SEED_OFFSET.value, _LAKE.value, log=log, lake_build=_LAKE_BUILD.value,
                             on_result=records.append, lake_within_alphabet=_LAKE_WITHIN.value,
                             overrides=overrides)
    except FileNotFoundError as e:
        fail(e)
    except OSError as e:
        if not records:
            raise
        print(format_record(records[0]))
        fail(f'cannot write {os.path.join(_WORKDIR.value, "evaluation.json")} ({e.strerror}); the result is printed '
             'above')
    print(format_record(r))
    print(f"wrote {os.path.join(_WORKDIR.value, 'evaluation.json')}")


if __name__ == '__main__':
    _WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a training run (experiments.train).')
    _NUM_TASKS = flags.DEFINE_integer('num_tasks', 1000, 'Number of new test tasks (the paper: 1000).')
    _CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'last'],
                                    'Which checkpoint: best by meta-validation, or the last one.')
    _BATCH = flags.DEFINE_integer('batch_size', 0, 'Tasks per jitted evaluation call (0: config.eval.batch_size).')
    _SEED_OFFSET = flags.DEFINE_integer('seed_offset', 0, 'Picks another fixed set of test tasks.')
    _LAKE = flags.DEFINE_string('lake_runs', '', "Directory of Lake's one-shot runs (run01..run20) to evaluate too.")
    _LAKE_BUILD = flags.DEFINE_integer('lake_build', 0, "If > 0 and --lake_runs holds no runs: build this many runs "
                                       "there from the workdir's held-out test characters first.")
    _EVAL_STEPS = flags.DEFINE_integer('eval_steps', 0, 'Inner steps K at test (0: config.inner.eval_steps of the run).')
    _EVAL_STEP_SIZE = flags.DEFINE_float('eval_step_size', 0.0, 'Inner step size alpha at test (0: the one trained '
                                         'with); refused for methods that learn their step sizes (Meta-SGD).')
    _NORM_STATS = flags.DEFINE_enum('norm_stats', '', ['', 'batch', 'support'],
                                    "Batch norm's statistics for query predictions ('': the run's model.norm_stats): "
                                    "'batch' (the query batch's) or 'support' (the support set's alone).")
    _LAKE_WITHIN = flags.DEFINE_bool('lake_within_alphabet', False, "With --lake_build: each run's 20 characters from "
                                     "one held-out alphabet (the official runs' layout; task.split='minimal_alphabet').")
    run(main)
