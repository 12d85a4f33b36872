"""Building an experiment from a config, the training loop and the final evaluation.

Data flow: config -> (TaskSource, Geometry, Model) -> MetaLearner -> jitted meta-step -> metrics,
results. On-device task samplers run ``train.steps_per_call`` meta-steps in one jitted ``lax.scan``
(sampling included); host samplers feed one jitted meta-step at a time.

With a workdir, ``train`` is resumable: the workdir holds the resolved config (config.json, checked by
``workdirs.prepare``: a run of another config is refused), checkpoints (md_meta.checkpoint) every
``train.checkpoint_every`` steps and at the end, metrics.jsonl, TensorBoard events (tb/) and
meta-validation on a fixed set of ``train.val_tasks`` 'val' tasks every ``train.eval_every`` steps.
Rerunning after a crash continues from the last good checkpoint, bitwise identical to an uninterrupted
run: the samplers are pure functions of (seed, step), the checkpoint holds the meta-parameters, the
optimizer state, the step and the non-finite counter, and fused chunks never cross a multiple of
``steps_per_call``, ``checkpoint_every`` or ``eval_every`` (so every resume point is a chunk boundary and
the chunking is the same with or without a resume).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from md_meta import checkpoint as checkpoint_lib
from md_meta import config as config_lib
from md_meta import distributed
from md_meta import evaluation, methods, tasks, workdirs
from md_meta.inner import InnerConfig
from md_meta.meta import MetaLearner, init_meta_params, make_evaluate, meta_update
from md_meta.networks import Model, make_model, model_from_module


class Experiment(NamedTuple):
    config: Any
    learner: MetaLearner
    optimizer: optax.GradientTransformation
    source: tasks.TaskSource


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite meta-updates."""


def make_optimizer(meta_cfg) -> optax.GradientTransformation:
    """Adam(lr), or SGD with Nesterov momentum 0.9, weight decay and x0.1 step decay (the reference's)."""
    if meta_cfg.optimizer == 'adam':
        return optax.adam(meta_cfg.lr)
    lr = meta_cfg.lr
    if meta_cfg.lr_decay_every:
        lr = optax.exponential_decay(meta_cfg.lr, meta_cfg.lr_decay_every, 0.1, staircase=True)
    return optax.chain(optax.add_decayed_weights(meta_cfg.weight_decay),
                       optax.sgd(lr, momentum=0.9, nesterov=True))


def build(config, source: tasks.TaskSource | None = None, model=None, loss=None) -> Experiment:
    """Validates the config (one-line ConfigError naming the field) and builds the experiment.

    Bring your own: ``source`` a ``tasks.TaskSource`` instead of config.task; ``model`` a Flax module
    (or ``networks.Model``) mapping a batch of one task's inputs to outputs, instead of config.model;
    ``loss`` 'mse', 'xent' or a callable (outputs, targets) -> scalar instead of the source's. Methods that
    insert layers into md-meta's own networks (tnet, mtnet, warpgrad) need config.model."""
    config_lib.validate(config, own_source=source is not None, own_model=model is not None)
    source = source if source is not None else tasks.make_source(config)
    geometry = methods.make_geometry(config)
    if model is None:
        model = make_model(config.model.name, transform=geometry.transform, conv_impl=config.model.conv_impl,
                           hidden=tuple(config.model.hidden), out=source.out_dim, num_classes=config.task.ways,
                           features=config.model.features, init=config.model.init)
    else:
        if geometry.transform != 'none':
            raise config_lib.ConfigError(
                f'config.method: {config.method!r} inserts layers into md-meta\'s networks (config.model); with '
                'your own model use maml, metasgd, metacurvature, metakfo, ecml or md')
        model = model if isinstance(model, Model) else model_from_module(model)
    if loss is not None:
        source = source._replace(loss=loss)
    inner = InnerConfig(config.inner.steps, config.inner.first_order, config.inner.unroll, config.inner.remat)
    eval_steps = config.inner.eval_steps if config.inner.eval_steps > 0 else config.inner.steps
    eval_inner = InnerConfig(eval_steps, True, config.inner.unroll, False)
    learner = MetaLearner(geometry, model, source.loss, inner, eval_inner, config.meta.task_batching,
                          config.meta.compute_dtype, config.meta.task_gradients, config.meta.task_chunk)
    return Experiment(config, learner, make_optimizer(config.meta), source)


def init_state(exp: Experiment):
    """(meta, opt_state) from config.seed."""
    key = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), 1000)
    meta = init_meta_params(exp.learner, key, jnp.asarray(exp.source.example_x))
    return meta, jax.jit(exp.optimizer.init)(meta)   # jitted: one compile, not one per leaf shape


def _step_key(config, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2000), step)


def make_train_chunk(exp: Experiment, num_steps: int):
    """jit: (meta, opt_state, step0) -> (meta, opt_state, metrics stacked over ``num_steps`` meta-steps),
    sampling each step's tasks on device from fold_in(train key, step)."""
    cfg, learner, source = exp.config, exp.learner, exp.source
    train_key = tasks.split_key(cfg.seed, 'train')
    shard = distributed.batch_constraint(cfg)  # identity with one device

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

    return distributed.jit_step(chunk, cfg, num_args=3)  # jax.jit(chunk, donate_argnums=(0, 1)) on one device


def make_host_step(exp: Experiment):
    """jit: (meta, opt_state, batch, step) -> one meta-step on a host-sampled batch (metrics with a
    leading axis of length 1, like a chunk)."""
    cfg = exp.config

    def step_fn(meta, opt_state, batch, step):
        meta, opt_state, m = meta_update(exp.learner, exp.optimizer, meta, opt_state, batch, _step_key(cfg, step))
        return meta, opt_state, jax.tree_util.tree_map(lambda x: x[None], m)

    return distributed.jit_step(step_fn, cfg, num_args=4, batch_argnum=2)  # plain jit on one device


def evaluate(exp: Experiment, meta, split: str = 'test', num_tasks: int | None = None,
             query: int | None = None, seed_offset: int = 0, eval_fn: Callable | None = None,
             shots: int | None = None) -> dict:
    """Adapts to ``num_tasks`` new tasks of ``split``; returns summaries (mean, 95% CI) of the query
    metrics and the mean inner-loop curves (support loss and gradient norm at k = 0..K). The tasks are a
    fixed set for a given (seed, split, seed_offset); pass ``eval_fn = make_evaluate(exp.learner)`` to
    reuse one compiled evaluator across calls. ``shots`` adapts on that many support examples (per
    class) instead of config.task.shots, e.g. to evaluate a 10-shot meta-training run at 5 and 20 shots."""
    cfg = exp.config
    source = exp.source
    if shots is not None and shots != cfg.task.shots:
        other = cfg.copy_and_resolve_references()
        other.task.shots = shots
        source = tasks.make_source(other)
    n = num_tasks or cfg.eval.num_tasks
    q = query or (cfg.eval.query if cfg.eval.query > 0 else cfg.task.query)
    bs = min(cfg.eval.batch_size, n)
    eval_fn = eval_fn or make_evaluate(exp.learner)
    per_task, curves = {}, {}
    try:
        for i in range(-(-n // bs)):
            batch = source.sample(10_000_000 * (1 + seed_offset) + i, bs, split, q)
            metrics, c = eval_fn(meta, batch, jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 7), i))
            for name, v in metrics.items():
                per_task.setdefault(name, []).append(np.asarray(v))
            for name, v in c.items():
                curves.setdefault(name, []).append(np.asarray(v))
    finally:
        if source is not exp.source:  # a source built here for other shots: stop its prefetch thread
            getattr(source.sample, 'close', lambda: None)()
    per_task = {k: np.concatenate(v)[:n] for k, v in per_task.items()}
    curves = {k: np.concatenate(v)[:n].mean(0).tolist() for k, v in curves.items()}
    return {'split': split, 'num_tasks': n, 'shots': shots or cfg.task.shots,
            'metrics': evaluation.summarize(per_task), 'curves': curves}


# ----------------------------------------------------------------------------- a run from its workdir
def load_run(workdir: str, which: str = 'best', warn: Callable = None):
    """(exp, meta, step) from a workdir's config.json and its best (or 'last') good checkpoint."""
    if which not in ('best', 'last'):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    exp = build(workdirs.load_config(workdir))
    template = init_state(exp)
    found = checkpoint_lib.Checkpointer(workdir, warn=warn).restore_latest(
        {'meta': template[0], 'opt_state': template[1]}, which=which)
    if found is None:
        raise FileNotFoundError(f'no readable checkpoint in {os.path.join(workdir, "checkpoints")}')
    step, state, _ = found
    return exp, state['meta'], step


# ----------------------------------------------------------------------------- training loop
def _fmt_time(s: float) -> str:
    if not np.isfinite(s):
        return '?'
    s = int(s)
    return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


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


class _Writers:
    """metrics.jsonl (+ TensorBoard events in tb/) of a workdir; on resume, records after the resume step
    are dropped from the JSON-lines log and TensorBoard is told to purge them."""

    def __init__(self, workdir: str | None, start_step: int, tensorboard: bool):
        self.file, self.tb = None, None
        if not workdir:
            return
        path = os.path.join(workdir, 'metrics.jsonl')
        if os.path.exists(path):
            kept = []
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line)['step'] <= start_step:
                            kept.append(line if line.endswith('\n') else line + '\n')
                    except (ValueError, KeyError):
                        pass  # a line cut by a kill
            workdirs.write_atomic(path, ''.join(kept))
        self.file = open(path, 'a')
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, 'tb'), purge_step=start_step,
                                        flush_secs=30)
            except ImportError:
                print("warning: tensorboardX is not installed, so no TensorBoard events (pip install 'md-meta[tensorboard]'; "
                      'or --config.train.tensorboard=False)', file=sys.stderr)

    def write(self, rec: dict, prefix: str = 'train/') -> None:
        if self.file:  # strict JSON: NaN and inf are written as null
            self.file.write(json.dumps({k: None if isinstance(v, float) and not np.isfinite(v) else v
                                        for k, v in rec.items()}) + '\n')
            self.file.flush()
        if self.tb:
            for k, v in rec.items():
                if k != 'step' and isinstance(v, (int, float)):
                    self.tb.add_scalar(k if '/' in k else prefix + k, v, rec['step'])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _last_checkpoint_note(ckpt) -> str:
    steps = ckpt.steps()
    return f' (last checkpoint {ckpt.path(steps[-1])})' if steps else ' (no checkpoint was written)'


def train(exp: Experiment, workdir: str | None = None, log: Callable = print, state=None, resume: bool = True,
          timings: dict | None = None):
    """Runs up to config.meta.steps meta-steps with progress, rate and ETA; returns (meta, opt_state,
    history). With a workdir (see the module docstring) it holds the workdir's lock, writes config.json
    (refusing a workdir of another run: md_meta.workdirs.prepare), checkpoints, meta-validates, writes
    metrics and, unless ``state`` is given or ``resume`` is False, resumes from the last good checkpoint.
    ``timings``, if given, receives the wall time and the harness overhead by kind, in seconds."""
    if not workdir or not distributed.is_main_process():
        return _train(exp, workdir, log, state, resume, timings)
    workdirs.make(workdir)
    with workdirs.lock(workdir):
        steps = checkpoint_lib.Checkpointer(workdir).steps()
        workdirs.prepare(exp.config, workdir, last_step=steps[-1] if steps else 0)
        return _train(exp, workdir, log, state, resume, timings)


def _train(exp: Experiment, workdir: str | None, log: Callable, state, resume: bool, timings: dict | None):
    cfg = exp.config
    distributed.validate(cfg)
    total = cfg.meta.steps
    fused = exp.source.device_sample is not None
    ckpt = checkpoint_lib.Checkpointer(workdir, keep=cfg.train.keep,
                                       warn=lambda s: log(s)) if workdir else None
    step, consecutive_bad, skipped_total = 0, 0, 0
    if state is not None:
        meta, opt_state = state
    else:
        meta, opt_state = init_state(exp)
        if ckpt and resume:
            had = ckpt.steps()
            found = ckpt.restore_latest({'meta': meta, 'opt_state': opt_state})
            if found is None and had:
                log(f'warning: no readable checkpoint is left in {ckpt.directory}; training restarts from step 0')
            if found is not None:
                step, restored, record = found
                meta, opt_state = restored['meta'], restored['opt_state']
                consecutive_bad = int(record.get('consecutive_nonfinite', 0))
                skipped_total = int(record.get('skipped_total', 0))
                log(f'resuming from {ckpt.path(step)} (step {step}/{total})')
    meta, opt_state = distributed.replicate((meta, opt_state), cfg)  # no-op on one device
    writers = _Writers(workdir if distributed.is_main_process() else None, step, cfg.train.tensorboard)
    ckpt_every, eval_every = cfg.train.checkpoint_every, cfg.train.eval_every
    eval_fn = make_evaluate(exp.learner) if eval_every and workdir is not None else None
    history, window, pending, last_val = [], [], [], None
    spent = {'checkpoints': 0.0, 'meta-validation': 0.0, 'logging': 0.0}   # harness overhead, seconds
    chunk_fns = {}
    host_step = None if fused else make_host_step(exp)
    start_step, t0, done0, compile_t = step, time.time(), step, None
    try:
        while step < total:
            end = chunk_end(cfg, step, total, fused)
            n = end - step
            if fused:
                if n not in chunk_fns:
                    chunk_fns[n] = make_train_chunk(exp, n)
                meta, opt_state, m = chunk_fns[n](meta, opt_state, distributed.step_scalar(step, cfg))
            else:
                batch = distributed.host_batch(exp.source, step, cfg.meta.batch_size, 'train', cfg.task.query, cfg)
                meta, opt_state, m = host_step(meta, opt_state, batch, distributed.step_scalar(step, cfg))
            m = jax.device_get(m)
            for i in range(n):
                step += 1
                s = int(m['skipped'][i])
                skipped_total += s
                consecutive_bad = consecutive_bad + 1 if s else 0
                window.append({k: v[i] for k, v in m.items()})
                if consecutive_bad >= cfg.train.max_nonfinite:
                    raise NonFiniteError(
                        f'method {cfg.method}: {consecutive_bad} consecutive non-finite meta-updates up to step '
                        f'{step} (first at step {step - consecutive_bad + 1}); training stopped, the parameters '
                        'are at their last finite value' + (_last_checkpoint_note(ckpt) if ckpt else ''))
                if step % cfg.train.log_every == 0 or step == total:
                    ok = [w for w in window if not w['skipped']] or window  # skipped updates report NaN
                    rec = {'step': step, **{k: float(np.mean([w[k] for w in ok])) for k in window[0]}}
                    rec['skipped'] = int(sum(w['skipped'] for w in window))
                    rec['skipped_total'] = skipped_total
                    window = []
                    history.append(rec)
                    t_log = time.time()
                    writers.write(rec)
                    spent['logging'] += time.time() - t_log
                    pending.append(rec)
            if compile_t is None:
                compile_t = time.time() - t0
                t0, done0 = time.time(), step
            at_ckpt = ckpt is not None and ((ckpt_every and step % ckpt_every == 0) or step == total)
            if eval_fn is not None and (step % eval_every == 0 or at_ckpt):
                t_val = time.time()
                r = evaluate(exp, distributed.to_local(meta), 'val', num_tasks=cfg.train.val_tasks, eval_fn=eval_fn)
                last_val = {k: v['mean'] for k, v in r['metrics'].items()}
                writers.write({'step': step, **{f'val/{k}': v for k, v in last_val.items()},
                               **{f'val/{k}_ci': v['ci'] for k, v in r['metrics'].items()}})
                spent['meta-validation'] += time.time() - t_val
            if at_ckpt:  # every process calls orbax's save; only process 0 writes files
                record = {'consecutive_nonfinite': consecutive_bad, 'skipped_total': skipped_total,
                          'val': last_val if eval_fn is not None else None, 'method': cfg.method}
                t_ck = time.time()
                try:
                    ckpt.save(step, {'meta': meta, 'opt_state': opt_state}, record)
                except checkpoint_lib.NonFiniteCheckpointError as e:
                    log(f'warning: {e}; keeping the previous checkpoint')
                spent['checkpoints'] += time.time() - t_ck
            t_log = time.time()
            rate = (step - done0) / max(time.time() - t0, 1e-9) if step > done0 else 0.0
            for rec in pending:  # the progress lines of this chunk
                rate_s = f' {rate:.1f} steps/s ETA {_fmt_time((total - rec["step"]) / rate)}' if rate > 0 else ''
                val_s = '' if last_val is None else ' val ' + ' '.join(f'{k} {v:.4f}' for k, v in last_val.items())
                skip_s = f' skipped {rec["skipped_total"]}' if rec['skipped_total'] else ''
                log(f'[{cfg.method}] step {rec["step"]}/{total} ({100 * rec["step"] / total:.0f}%) meta-loss '
                    f'{rec["meta_loss"]:.4f}{val_s}{skip_s}{rate_s}')
            pending = []
            spent['logging'] += time.time() - t_log
    finally:
        writers.close()
    if compile_t is not None and step > start_step:
        wall = time.time() - t0 + compile_t
        over = sum(spent.values())
        log(f'[{cfg.method}] {step - start_step} meta-steps in {wall:.1f} s (first chunk incl. compilation '
            f'{compile_t:.1f} s); harness overhead {over:.2f} s = {100 * over / wall:.1f}% ('
            + ', '.join(f'{k} {v:.2f} s' for k, v in spent.items()) + ')')
    if timings is not None:
        timings.update(spent, wall=time.time() - t0 + (compile_t or 0.0))
    return distributed.to_local(meta), distributed.to_local(opt_state), history


def result_table(rows: list) -> str:
    """Markdown table: method, shots, metric mean +- 95% CI."""
    lines = ['| method | shots | metric | mean +- 95% CI | tasks |', '| --- | --- | --- | --- | --- |']
    for r in rows:
        for name, s in r['metrics'].items():
            lines.append(f"| {r['method']} | {r['shots']} | {name} | {s['mean']:.4f} +- {s['ci']:.4f} | {s['n']} |")
    return '\n'.join(lines)
