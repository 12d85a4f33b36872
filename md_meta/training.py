"""The training loop: meta-steps of an ``Experiment`` (md_meta.experiment) with progress, metrics,
meta-validation and checkpoints.

On-device task samplers run ``train.steps_per_call`` meta-steps in one jitted ``lax.scan`` (sampling
included); host samplers feed one jitted meta-step at a time.

With a workdir, ``train`` is resumable: the workdir holds the resolved config (config.json, checked by
``workdirs.prepare``: a run of another config is refused), split.json for image tasks (the data's split and
fingerprint, ``workdirs.check_data``: a changed data set is refused), checkpoints (md_meta.checkpoint) every
``train.checkpoint_every`` steps and at the end, metrics.jsonl, TensorBoard events (tb/) and
meta-validation on a fixed set of ``train.val_tasks`` 'val' tasks every ``train.eval_every`` steps.
Rerunning after a crash continues from the last good checkpoint, bitwise identical to an uninterrupted
run: the samplers are pure functions of (seed, step), the checkpoint holds the meta-parameters, the
optimizer state, the step and the non-finite counter, and fused chunks never cross a multiple of
``steps_per_call``, ``checkpoint_every`` or ``eval_every`` (so every resume point is a chunk boundary and
the chunking is the same with or without a resume). SIGTERM or SIGHUP (a preemption) ends training at the end
of the chunk it arrives in, with a checkpoint there (``Preempted``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from md_meta import checkpoint as checkpoint_lib
from md_meta import distributed, evaluation, experiment, metric_writers, tasks, workdirs
from md_meta.meta import make_evaluate, meta_update


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite meta-updates, the last at meta-step ``step``. With a workdir the stop is
    also recorded in its ``STOPPED`` file (removed when the run starts again)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


STOPPED = 'stopped.json'   # {'reason', 'step', 'message'} of a run that training stopped (NonFiniteError)


class Preempted(KeyboardInterrupt):
    """SIGTERM or SIGHUP stopped training after the chunk it arrived in, with a checkpoint at ``step``; the
    same command resumes there. ``status`` is the conventional exit status, 128 + the signal's number. A
    KeyboardInterrupt, so that it passes through ``except Exception`` like Ctrl-C."""

    def __init__(self, step: int, signum: int):
        super().__init__(f'preempted at step {step}; rerun the same command to resume')
        self.step, self.signum, self.status = step, signum, 128 + signum


def _step_key(config, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2000), step)


def make_train_chunk(exp: experiment.Experiment, num_steps: int):
    """jit: (meta, opt_state, step0) -> (meta, opt_state, metrics stacked over ``num_steps`` meta-steps),
    sampling each step's tasks on device from fold_in(train key, step)."""
    cfg, learner, source = exp.config, exp.learner, exp.source
    train_key = tasks.split_key(cfg.seed, 'train')
    shard = distributed.batch_constraint(exp.mesh)  # identity with one device

    def chunk(meta, opt_state, step0):
        def body(carry, i):
            meta, opt_state = carry
            step = step0 + i
            batch = source.device_sample(jax.random.fold_in(train_key, step), cfg.meta.batch_size, 'train',
                                         cfg.task.query)
            batch = shard(batch)
            meta, opt_state, m = meta_update(learner, exp.optimizer, meta, opt_state, batch, _step_key(cfg, step))
            return (meta, opt_state), m
        (meta, opt_state), metrics = jax.lax.scan(body, (meta, opt_state), jnp.arange(num_steps))
        return meta, opt_state, metrics

    return distributed.jit_step(chunk, exp.mesh, num_args=3)  # jax.jit(chunk, donate_argnums=(0, 1)) on one device


def make_host_step(exp: experiment.Experiment):
    """jit: (meta, opt_state, batch, step) -> one meta-step on a host-sampled batch (metrics with a
    leading axis of length 1, like a chunk)."""
    cfg = exp.config

    def step_fn(meta, opt_state, batch, step):
        meta, opt_state, m = meta_update(exp.learner, exp.optimizer, meta, opt_state, batch, _step_key(cfg, step))
        return meta, opt_state, jax.tree_util.tree_map(lambda x: x[None], m)

    return distributed.jit_step(step_fn, exp.mesh, num_args=4, batch_argnum=2)  # plain jit on one device


@contextlib.contextmanager
def claim(exp: experiment.Experiment, workdir: str | None):
    """``with training.claim(exp, workdir): ...``: the workdir held for a run by the process that writes it
    (process 0; a no-op on the others and without a workdir): its lock and config.json (``workdirs.claim``:
    a run of another config, or one still training, is refused) and split.json for image tasks
    (``workdirs.check_data``: the data set of the run's first start, or refused)."""
    if not (workdir and distributed.is_main_process()):
        yield
        return
    with workdirs.claim(exp.config, workdir):
        if exp.source.split_record is not None:
            workdirs.check_data(workdir, exp.source.split_record())
        yield


def train(exp: experiment.Experiment, workdir: str | None = None, log: Callable = print, state=None,
          resume: bool = True, timings: dict | None = None, writers: Sequence = (), claimed: bool = False):
    """Runs up to config.meta.steps meta-steps with progress, rate and ETA; returns (meta, opt_state,
    history). With a workdir (see the module docstring) it holds the workdir's ``claim`` for the run,
    checkpoints, meta-validates, writes metrics and, unless ``state`` is given or ``resume`` is False, resumes
    from the last good checkpoint. ``claimed``: the caller holds ``claim(exp, workdir)`` already, to keep the
    workdir over what follows training (experiments.train's evaluation). ``timings``, if given, receives the
    wall time and the harness overhead by kind, in seconds."""
    with contextlib.nullcontext() if claimed else claim(exp, workdir):
        return _train(exp, workdir, log, state, resume, timings, writers)


def _train(exp: experiment.Experiment, workdir: str | None, log: Callable, state, resume: bool,
           timings: dict | None, extra_writers: Sequence = ()):
    """The loop: a chunk of meta-steps (the pure step), its per-step bookkeeping (non-finite count,
    metrics), then the periodic actions due at the chunk's end (validate, checkpoint, report progress)."""
    cfg, total = exp.config, exp.config.meta.steps
    ckpt = checkpoint_lib.Checkpointer(workdir, keep=cfg.train.keep, warn=lambda s: log(s)) if workdir else None
    step, (meta, opt_state), record = _initial_state(exp, ckpt, state, resume, log)
    meta, opt_state = distributed.replicate((meta, opt_state), exp.mesh)  # no-op on one device
    overhead = _Overhead()
    writers = _Writers(metric_writers.for_workdir(workdir, step, cfg.train.tensorboard, extra_writers, log)
                       if distributed.is_main_process() else [])
    nonfinite = _NonFiniteCounter(cfg, ckpt, record)
    metrics = _MetricLog(cfg, writers, overhead)
    validation = _Validation(exp, writers, enabled=workdir is not None)
    checkpoints = _Checkpoints(cfg, ckpt, log)
    run_steps = _StepRunner(exp)
    progress = _Progress(cfg, step, log)
    preemption = _Preemption(enabled=ckpt is not None)   # without a workdir there is nothing to save
    writes = workdir and distributed.is_main_process()
    if writes and os.path.exists(os.path.join(workdir, STOPPED)):   # an earlier stop: this run starts again
        os.remove(os.path.join(workdir, STOPPED))
    try:
        preemption.install()
        while step < total:
            end = chunk_end(cfg, step, total, run_steps.fused)
            meta, opt_state, m = run_steps(meta, opt_state, step, end)
            m = jax.device_get(m)
            for i, s in enumerate(range(step + 1, end + 1)):
                nonfinite.count(s, int(m['skipped'][i]))
                metrics.add(s, {k: v[i] for k, v in m.items()}, nonfinite.total)
            step = end
            progress.chunk_done(step)
            at_ckpt = checkpoints.due(step)
            if validation.due(step, at_ckpt):
                with overhead('meta-validation'):
                    validation(step, meta)
            if at_ckpt:  # every process calls orbax's save; only process 0 writes files
                with overhead('checkpoints'):
                    checkpoints(step, meta, opt_state,
                                {**nonfinite.record(), 'val': validation.last, 'method': cfg.method})
            with overhead('logging'):
                progress.report(step, metrics.take_pending(), validation.last)
            signum = preemption.requested()
            if signum:   # a checkpoint at this step (unless just made), then stop
                if not at_ckpt:
                    with overhead('checkpoints'):   # no validation: a preempted job has seconds left
                        checkpoints(step, meta, opt_state, {**nonfinite.record(), 'val': None, 'method': cfg.method})
                steps = ckpt.steps()
                raise Preempted(steps[-1] if steps else 0, signum)
    except NonFiniteError as e:
        if writes:
            workdirs.write_atomic(os.path.join(workdir, STOPPED), workdirs.strict_json(
                {'reason': 'non-finite meta-updates', 'step': e.step, 'message': str(e)}))
        raise
    finally:
        preemption.restore()
        writers.close()
    progress.summary(step, overhead)
    if timings is not None:
        timings.update(overhead, wall=progress.wall())
    return distributed.to_local(meta), distributed.to_local(opt_state), metrics.history


def chunk_end(cfg, step: int, total: int, fused: bool) -> int:
    """The end of the chunk starting at ``step``: the next multiple of steps_per_call (fused samplers; 1
    otherwise), checkpoint_every or eval_every, or ``total``. A pure function of ``step``, so a resumed run
    (which starts at a checkpoint, itself a chunk end) is chunked like an uninterrupted one."""
    ends = [total]
    for every in (cfg.train.steps_per_call if fused else 1, cfg.train.checkpoint_every,
                  cfg.train.eval_every):
        if every and every > 0:
            ends.append((step // every + 1) * every)
    return min(ends)


def _initial_state(exp: experiment.Experiment, ckpt, state, resume: bool, log: Callable):
    """(step, (meta, opt_state), checkpoint record): ``state``, the last good checkpoint, or init_state."""
    if state is not None:
        meta, opt_state = state
        return 0, (meta, opt_state), {}
    meta, opt_state = experiment.init_state(exp)
    if ckpt is None or not resume:
        return 0, (meta, opt_state), {}
    had = ckpt.steps()
    found = ckpt.restore_latest({'meta': meta, 'opt_state': opt_state})
    if found is None:
        if had:
            log(f'warning: no readable checkpoint is left in {ckpt.directory}; training restarts from step 0')
        return 0, (meta, opt_state), {}
    step, restored, record = found
    log(f'resuming from {ckpt.path(step)} (step {step}/{exp.config.meta.steps})')
    return step, (restored['meta'], restored['opt_state']), record


class _Preemption:
    """SIGTERM and SIGHUP (what SLURM, Kubernetes and TPU VMs send before a kill) noted by a handler and acted
    on at the end of the chunk they arrive in: a checkpoint there, then ``Preempted``. Installed in the main
    thread over default handlers only (a SIGHUP ignored under nohup stays ignored); on a multi-process run every
    process stops at the same step (``requested``: the signal any process received, gathered from all)."""

    SIGNALS = ('SIGTERM', 'SIGHUP')

    def __init__(self, enabled: bool):
        self.enabled, self.signum, self.previous = enabled, 0, {}

    def install(self) -> None:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                self.previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def requested(self) -> int:
        """The signal received (0: none), the same on every process."""
        if not self.enabled:
            return 0
        if jax.process_count() > 1:   # a collective per chunk, only where there are several processes
            from jax.experimental import multihost_utils
            return int(np.max(multihost_utils.process_allgather(np.asarray(self.signum, np.int32))))
        return self.signum


class _StepRunner:
    """Runs the meta-steps [step, end): a fused chunk (compiled once per length) or one host-sampled step."""

    def __init__(self, exp: experiment.Experiment):
        self.exp = exp
        self.fused = exp.source.device_sample is not None
        self.chunks = {}
        self.host_step = None if self.fused else make_host_step(exp)

    def __call__(self, meta, opt_state, step: int, end: int):
        """(meta, opt_state, metrics stacked over the steps)."""
        exp = self.exp
        if self.fused:
            n = end - step
            if n not in self.chunks:
                self.chunks[n] = make_train_chunk(exp, n)
            return self.chunks[n](meta, opt_state, distributed.step_scalar(step, exp.mesh))
        cfg = exp.config
        batch = distributed.host_batch(exp.source, step, cfg.meta.batch_size, 'train', cfg.task.query, exp.mesh)
        return self.host_step(meta, opt_state, batch, distributed.step_scalar(step, exp.mesh))


class _Overhead(dict):
    """Harness overhead by kind, in seconds: ``with overhead(kind):`` adds the block's wall time."""

    def __init__(self):
        super().__init__({'checkpoints': 0.0, 'meta-validation': 0.0, 'logging': 0.0})

    @contextlib.contextmanager
    def __call__(self, kind: str):
        t = time.time()
        yield
        self[kind] += time.time() - t


def _last_checkpoint_note(ckpt) -> str:
    """' (last checkpoint PATH)' or ' (no checkpoint was written)', for the non-finite stop."""
    steps = ckpt.steps()
    return f' (last checkpoint {ckpt.path(steps[-1])})' if steps else ' (no checkpoint was written)'


class _NonFiniteCounter:
    """Counts skipped (non-finite) meta-updates; NonFiniteError after train.max_nonfinite in a row."""

    def __init__(self, cfg, ckpt, record: dict):
        self.cfg, self.ckpt = cfg, ckpt
        self.consecutive = int(record.get('consecutive_nonfinite', 0))
        self.total = int(record.get('skipped_total', 0))

    def count(self, step: int, skipped: int) -> None:
        """Counts meta-step ``step`` (1-based), skipped or not."""
        self.total += skipped
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.consecutive >= self.cfg.train.max_nonfinite:
            raise NonFiniteError(
                f'method {self.cfg.method}: {self.consecutive} consecutive non-finite meta-updates up to step '
                f'{step} (first at step {step - self.consecutive + 1}); training stopped, the parameters '
                'are at their last finite value' + (_last_checkpoint_note(self.ckpt) if self.ckpt else ''), step)

    def record(self) -> dict:
        """The counts a checkpoint keeps, so that a resumed run counts on."""
        return {'consecutive_nonfinite': self.consecutive, 'skipped_total': self.total}


class _Writers:
    """Every writer of a run (``md_meta.metric_writers``), written to as one."""

    def __init__(self, writers: list):
        self.writers = writers

    def write(self, rec: dict) -> None:
        scalars = metric_writers.finite_or_none({k: v for k, v in rec.items() if k != 'step'})
        for w in self.writers:
            w.write_scalars(int(rec['step']), scalars)

    def close(self) -> None:
        for w in self.writers:
            w.close()


class _MetricLog:
    """Per-step metrics averaged over train.log_every steps: the history, the writers, the progress lines."""

    def __init__(self, cfg, writers: _Writers, overhead: _Overhead):
        self.every, self.total = cfg.train.log_every, cfg.meta.steps
        self.writers, self.overhead = writers, overhead
        self.window, self.history, self.pending = [], [], []

    def add(self, step: int, metrics: dict, skipped_total: int) -> None:
        """Adds meta-step ``step``'s metrics; at a logging step, writes the window's record."""
        self.window.append(metrics)
        if step % self.every == 0 or step == self.total:
            ok = [w for w in self.window if not w['skipped']] or self.window  # skipped updates report NaN
            rec = {'step': step, **{k: float(np.mean([w[k] for w in ok])) for k in self.window[0]}}
            rec['skipped'] = int(sum(w['skipped'] for w in self.window))
            rec['skipped_total'] = skipped_total
            self.window = []
            self.history.append(rec)
            with self.overhead('logging'):
                self.writers.write(rec)
            self.pending.append(rec)

    def take_pending(self) -> list:
        """The records written since the last call (the progress lines to print)."""
        pending, self.pending = self.pending, []
        return pending


class _Validation:
    """Meta-validation on the fixed set of train.val_tasks 'val' tasks, written to the metrics."""

    def __init__(self, exp: experiment.Experiment, writers: _Writers, enabled: bool):
        self.exp, self.writers = exp, writers
        self.every = exp.config.train.eval_every if enabled else 0
        self.eval_fn = make_evaluate(exp.learner) if self.every else None   # compiled once
        self.last = None   # the means of the latest validation

    def due(self, step: int, at_checkpoint: bool) -> bool:
        """Every train.eval_every steps and at every checkpoint (whose record keeps the validation)."""
        return bool(self.every) and (step % self.every == 0 or at_checkpoint)

    def __call__(self, step: int, meta) -> None:
        """Validates ``meta`` and writes the means and CIs as val/* at ``step``."""
        r = evaluation.evaluate(self.exp, distributed.to_local(meta), 'val',
                                num_tasks=self.exp.config.train.val_tasks, eval_fn=self.eval_fn)
        self.last = {k: v['mean'] for k, v in r['metrics'].items()}
        self.writers.write({'step': step, **{f'val/{k}': v for k, v in self.last.items()},
                            **{f'val/{k}_ci': v['ci'] for k, v in r['metrics'].items()}})


class _Checkpoints:
    """Checkpoints every train.checkpoint_every steps and at the end; a non-finite state is not saved."""

    def __init__(self, cfg, ckpt, log: Callable):
        self.every, self.total, self.ckpt, self.log = cfg.train.checkpoint_every, cfg.meta.steps, ckpt, log

    def due(self, step: int) -> bool:
        """At multiples of train.checkpoint_every and at the last step (never without a workdir)."""
        return self.ckpt is not None and (bool(self.every and step % self.every == 0) or step == self.total)

    def __call__(self, step: int, meta, opt_state, record: dict) -> None:
        """Saves; a non-finite state keeps the previous checkpoint, with a warning."""
        try:
            self.ckpt.save(step, {'meta': meta, 'opt_state': opt_state}, record)
        except checkpoint_lib.NonFiniteCheckpointError as e:
            self.log(f'warning: {e}; keeping the previous checkpoint')


def _fmt_time(s: float) -> str:
    """h:mm:ss, or '?' for an unknown time."""
    if not np.isfinite(s):
        return '?'
    s = int(s)
    return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


class _Progress:
    """Progress lines with rate and ETA (timed from the end of the first, compiling chunk) and the summary."""

    def __init__(self, cfg, start_step: int, log: Callable):
        self.method, self.total, self.log = cfg.method, cfg.meta.steps, log
        self.start_step, self.done0 = start_step, start_step
        self.t0, self.compile_t = time.time(), None

    def chunk_done(self, step: int) -> None:
        """Called at the end of every chunk; the rate is measured from the end of the first."""
        if self.compile_t is None:  # the first chunk, its compilation included
            self.compile_t = time.time() - self.t0
            self.t0, self.done0 = time.time(), step

    def report(self, step: int, records: list, last_val: dict | None) -> None:
        """One line per record: step, meta-loss, the last validation, skipped updates, rate and ETA."""
        rate = (step - self.done0) / max(time.time() - self.t0, 1e-9) if step > self.done0 else 0.0
        for rec in records:
            rate_s = f' {rate:.1f} steps/s ETA {_fmt_time((self.total - rec["step"]) / rate)}' if rate > 0 else ''
            val_s = '' if last_val is None else ' val ' + ' '.join(f'{k} {v:.4f}' for k, v in last_val.items())
            skip_s = f' skipped {rec["skipped_total"]}' if rec['skipped_total'] else ''
            self.log(f'[{self.method}] step {rec["step"]}/{self.total} ({100 * rec["step"] / self.total:.0f}%) '
                     f'meta-loss {rec["meta_loss"]:.4f}{val_s}{skip_s}{rate_s}')

    def wall(self) -> float:
        """Seconds since the start, compilation included."""
        return time.time() - self.t0 + (self.compile_t or 0.0)

    def summary(self, step: int, overhead: _Overhead) -> None:
        """The final line: meta-steps, wall time, compilation time and the harness overhead by kind."""
        if self.compile_t is None or step <= self.start_step:
            return
        wall, over = self.wall(), sum(overhead.values())
        self.log(f'[{self.method}] {step - self.start_step} meta-steps in {wall:.1f} s (first chunk incl. '
                 f'compilation {self.compile_t:.1f} s); harness overhead {over:.2f} s = {100 * over / wall:.1f}% ('
                 + ', '.join(f'{k} {v:.2f} s' for k, v in overhead.items()) + ')')

