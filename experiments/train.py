"""Meta-train one method on one task family, then evaluate on new tasks.

    python -m experiments.train [--config=experiments/configs/sinusoid.py] [--config.method=maml]
                                [--workdir=/tmp/md_meta/run]

The workdir holds config.json, checkpoints/, metrics.jsonl, tb/ (TensorBoard) and, at the end,
results.json/results.md (evaluation on config.eval.num_tasks test tasks, at each support size of
config.eval.shots; default: config.task.shots). Rerunning the same command
after a crash or kill -9 resumes from the last good checkpoint (bitwise identical to an uninterrupted
run); a workdir holding a run of another config, or one where another process is training (an
exclusive lock for the run's lifetime), or one trained on another data set (split.json), is refused (exit
status 2). Too many consecutive non-finite meta-updates stop training with exit status 3 and a record of the
stop in the workdir (stopped.json); Ctrl-C exits with 130 and the same command resumes;
SIGTERM or SIGHUP (a preemption) ends the current chunk, checkpoints at the step reached, prints
"preempted at step N; rerun the same command to resume" and exits with 128 + the signal's number.
results.json carries its provenance (md_meta.workdirs.provenance: version, commit, step, parameters
'final', the checkpoint's fingerprint).
"""
from __future__ import annotations

import os
import time

from absl import flags

from .harness import EXIT_INTERRUPTED, define_config_file, fail, run

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'sinusoid.py')


def default_workdir(config) -> str:
    """runs/<config file name>-<method>: distinct for every config file and method."""
    from ml_collections import config_flags
    try:
        name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS['config'])))[0]
    except Exception:  # noqa: BLE001 - a config given some other way
        name = config.task.name
    return os.path.join('runs', f'{name}-{config.method}')


def main(argv):
    del argv
    from .harness import prepare_process
    prepare_process()  # before any JAX computation
    config = _CONFIG.value
    from md_meta import checkpoint as checkpoint_lib
    from md_meta import distributed, evaluation, experiment, results, training, workdirs
    distributed.initialize_from_config(config)  # multi-process runs only (config.dist)
    # ConfigError (also for a global batch the devices cannot split) / DataError: one line, exit 2 (experiments.harness.run)
    exp = experiment.build(config)
    workdir = _WORKDIR.value or default_workdir(config)
    lead = distributed.is_main_process()  # only process 0 writes the workdir and prints
    # WorkdirBusyError / WorkdirMismatchError: one line, exit 2. Held over the evaluation after training too.
    with training.claim(exp, workdir):
        ckpt = checkpoint_lib.Checkpointer(workdir)
        t0 = time.time()
        if lead:
            print(f'md-meta: {config.method} on {config.task.name} ({config.task.shots}-shot), '
                  f'{config.meta.steps} meta-steps, workdir {workdir}{distributed.describe(exp.mesh)}', flush=True)
        log = (lambda s: print(s, flush=True)) if lead else (lambda s: None)
        try:
            meta, _, _ = training.train(exp, workdir, log=log, claimed=True)
        except training.NonFiniteError as e:
            fail(e, 3)
        except training.Preempted as e:   # SIGTERM / SIGHUP: a checkpoint at the step reached
            fail(e, e.status)
        except KeyboardInterrupt:
            steps = ckpt.steps()
            fail('interrupted; rerun the same command to resume from '
                 + (f'the checkpoint at step {steps[-1]}' if steps else 'step 0 (no checkpoint was written yet)'),
                 EXIT_INTERRUPTED)
        train_s = time.time() - t0
        rows = [{'method': config.method, **evaluation.evaluate(exp, meta, 'test', shots=shots)}
                for shots in (tuple(config.eval.shots) or (config.task.shots,))]
        getattr(exp.source.sample, 'close', lambda: None)()  # stops a host sampler's prefetch thread
        if not lead:
            return
        final = ckpt.record(config.meta.steps) or {}
        result = {**workdirs.provenance(config, config.meta.steps, 'final', final.get('fingerprint')),
                  'results': rows, 'train_seconds': train_s, 'total_seconds': time.time() - t0}
        workdirs.write_atomic(os.path.join(workdir, 'results.json'), workdirs.strict_json(result))
        table = results.result_table(rows)
        workdirs.write_atomic(os.path.join(workdir, 'results.md'), table + '\n')
    print(table)
    print(f'train {train_s:.1f} s, total {time.time() - t0:.1f} s; results in {workdir}')


if __name__ == '__main__':
    _CONFIG = define_config_file('config', DEFAULT_CONFIG, 'Experiment config file.')
    _WORKDIR = flags.DEFINE_string('workdir', '', 'Directory for the resolved config, metrics and results '
                                   '(default: runs/<config file name>-<method>).')
    run(main)
