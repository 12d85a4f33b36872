"""Meta-train one method on one task family, then evaluate on new tasks.

    python -m experiments.train [--config=experiments/configs/sinusoid.py] [--config.method=maml]
                                [--workdir=/tmp/md_meta/run]

The workdir holds config.json, checkpoints/, metrics.jsonl, tb/ (TensorBoard) and, at the end,
results.json/results.md (evaluation on config.eval.num_tasks test tasks, at each support size of
config.eval.shots; default: config.task.shots). Rerunning the same command
after a crash or kill -9 resumes from the last good checkpoint (bitwise identical to an uninterrupted
run); a workdir holding a run of another config is refused (exit status 2). Too many consecutive
non-finite meta-updates stop training with exit status 3.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'sinusoid.py')
_CONFIG = config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Directory for the resolved config, metrics and results '
                               '(default: runs/<config name>-<method>).')


def main(argv):
    del argv
    from experiments import prepare_process
    prepare_process()  # before any JAX computation
    config = _CONFIG.value
    from md_meta import training
    from md_meta import distributed
    from md_meta.config import ConfigError
    try:
        distributed.initialize_from_config(config)  # multi-process runs only (config.dist)
        exp = training.build(config)
        distributed.validate(config)  # the global batch must divide by the device count
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    workdir = _WORKDIR.value or os.path.join('runs', f'{config.task.name}-{config.method}')
    lead = distributed.is_main_process()  # only process 0 writes the workdir and prints
    try:
        if lead:
            training.prepare_workdir(config, workdir)
    except training.WorkdirMismatchError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    t0 = time.time()
    if lead:
        print(f'md-meta: {config.method} on {config.task.name} ({config.task.shots}-shot), '
              f'{config.meta.steps} meta-steps, workdir {workdir}{distributed.describe(config)}', flush=True)
    try:
        meta, _, _ = training.train(exp, workdir, log=(lambda s: print(s, flush=True)) if lead else (lambda s: None))
    except training.NonFiniteError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(3)
    train_s = time.time() - t0
    rows = [{'method': config.method, **training.evaluate(exp, meta, 'test', shots=shots)}
            for shots in (tuple(config.eval.shots) or (config.task.shots,))]
    getattr(exp.source.sample, 'close', lambda: None)()  # stops a host sampler's prefetch thread
    if not lead:
        return
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump({'method': config.method, 'train_shots': config.task.shots, 'results': rows,
                   'train_seconds': train_s, 'total_seconds': time.time() - t0}, f, indent=2)
    table = training.result_table(rows)
    with open(os.path.join(workdir, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    print(f'train {train_s:.1f} s, total {time.time() - t0:.1f} s; results in {workdir}')


if __name__ == '__main__':
    app.run(main)
