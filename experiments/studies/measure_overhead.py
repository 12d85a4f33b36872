"""Overhead of the harness (checkpoints, meta-validation, metrics/TensorBoard/console logging) as a share
of training time at the config's intervals, in one process.

    python -m experiments.studies.measure_overhead [--config=experiments/configs/sinusoid.py] [--repeats=2]

Alternates runs without a workdir (console progress only, no checkpoints, no meta-validation, no files)
and with a fresh workdir (everything on), same config and seed, and reports both wall times (compilation
included, each run compiles afresh) and the time measured inside the loop for each harness part.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from absl import flags

from ..harness import define_config_file, run

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'sinusoid.py')


def main(argv):
    del argv
    from ..harness import prepare_process
    prepare_process(compilation_cache=False)  # before any JAX computation; times compilation
    from md_meta import experiment, training
    config = _CONFIG.value
    exp = experiment.build(config)
    rows = []
    for r in range(_REPEATS.value):
        for with_harness in (False, True):
            wd = tempfile.mkdtemp(prefix='md_meta_overhead_') if with_harness else None
            t0, timings = time.time(), {}
            training.train(exp, wd, log=lambda s: None, timings=timings)
            wall = time.time() - t0
            rows.append({'repeat': r, 'harness': with_harness, 'wall_s': wall, **timings})
            if wd:
                shutil.rmtree(wd)
            print(json.dumps(rows[-1]), flush=True)
    off = [x['wall_s'] for x in rows if not x['harness']]
    on = [x for x in rows if x['harness']]
    on_wall = [x['wall_s'] for x in on]
    parts = {k: sum(x[k] for x in on) / len(on) for k in ('checkpoints', 'meta-validation', 'logging')}
    mean_on = sum(on_wall) / len(on_wall)
    print(f'{config.method} on {config.task.name}, {config.meta.steps} meta-steps, checkpoint_every '
          f'{config.train.checkpoint_every}, eval_every {config.train.eval_every} ({config.train.val_tasks} val tasks), '
          f'log_every {config.train.log_every}')
    print(f'wall without harness: {", ".join(f"{w:.1f}" for w in off)} s; with: '
          f'{", ".join(f"{w:.1f}" for w in on_wall)} s')
    print('measured inside the loop (mean of the runs with harness): '
          + ', '.join(f'{k} {v:.2f} s ({100 * v / mean_on:.1f}%)' for k, v in parts.items())
          + f'; total {sum(parts.values()):.2f} s = {100 * sum(parts.values()) / mean_on:.1f}% of {mean_on:.1f} s')


if __name__ == '__main__':
    _CONFIG = define_config_file('config', DEFAULT_CONFIG, 'Experiment config file.')
    _REPEATS = flags.DEFINE_integer('repeats', 2, 'Pairs of (without, with) runs.')
    run(main)
