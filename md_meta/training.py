"""Building an experiment from a config, the training loop and the final evaluation.

Data flow: config -> (TaskSource, Geometry, Model) -> MetaLearner -> jitted meta-step -> metrics,
results. On-device task samplers run ``train.steps_per_call`` meta-steps in one jitted ``lax.scan``
(sampling included); host samplers feed one jitted meta-step at a time.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from md_meta import config as config_lib
from md_meta import evaluation, methods, tasks
from md_meta.inner import InnerConfig
from md_meta.meta import MetaLearner, init_meta_params, make_evaluate, meta_update
from md_meta.networks import make_model


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


def build(config) -> Experiment:
    """Validates the config (one-line ConfigError naming the field) and builds the experiment."""
    config_lib.validate(config)
    source = tasks.make_source(config)
    geometry = methods.make_geometry(config)
    model = make_model(config.model.name, transform=geometry.transform, conv_impl=config.model.conv_impl,
                       hidden=tuple(config.model.hidden), out=source.out_dim, num_classes=config.task.ways,
                       features=config.model.features)
    inner = InnerConfig(config.inner.steps, config.inner.first_order, config.inner.unroll, config.inner.remat)
    eval_steps = config.inner.eval_steps if config.inner.eval_steps > 0 else config.inner.steps
    eval_inner = InnerConfig(eval_steps, True, config.inner.unroll, False)
    learner = MetaLearner(geometry, model, source.loss, inner, eval_inner, config.meta.task_batching)
    return Experiment(config, learner, make_optimizer(config.meta), source)


def init_state(exp: Experiment):
    """(meta, opt_state) from config.seed."""
    key = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), 1000)
    meta = init_meta_params(exp.learner, key, jnp.asarray(exp.source.example_x))
    return meta, exp.optimizer.init(meta)


def _step_key(config, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2000), step)


def make_train_chunk(exp: Experiment, num_steps: int):
    """jit: (meta, opt_state, step0) -> (meta, opt_state, metrics stacked over ``num_steps`` meta-steps),
    sampling each step's tasks on device from fold_in(train key, step)."""
    cfg, learner, source = exp.config, exp.learner, exp.source
    train_key = tasks.split_key(cfg.seed, 'train')

    def chunk(meta, opt_state, step0):
        def body(carry, i):
            meta, opt_state = carry
            step = step0 + i
            batch = source.device_sample(jax.random.fold_in(train_key, step), cfg.meta.batch_size, 'train',
                                         cfg.task.query)
            meta, opt_state, m = meta_update(learner, exp.optimizer, meta, opt_state, batch, _step_key(cfg, step))
            return (meta, opt_state), m
        (meta, opt_state), metrics = jax.lax.scan(body, (meta, opt_state), jnp.arange(num_steps))
        return meta, opt_state, metrics

    return jax.jit(chunk, donate_argnums=(0, 1))


def make_host_step(exp: Experiment):
    """jit: (meta, opt_state, batch, step) -> one meta-step on a host-sampled batch (metrics with a
    leading axis of length 1, like a chunk)."""
    cfg = exp.config

    def step_fn(meta, opt_state, batch, step):
        meta, opt_state, m = meta_update(exp.learner, exp.optimizer, meta, opt_state, batch, _step_key(cfg, step))
        return meta, opt_state, jax.tree_util.tree_map(lambda x: x[None], m)

    return jax.jit(step_fn, donate_argnums=(0, 1))


def evaluate(exp: Experiment, meta, split: str = 'test', num_tasks: int | None = None,
             query: int | None = None, seed_offset: int = 0) -> dict:
    """Adapts to ``num_tasks`` new tasks of ``split``; returns summaries (mean, 95% CI) of the query
    metrics and the mean inner-loop curves (support loss and gradient norm at k = 0..K)."""
    cfg = exp.config
    n = num_tasks or cfg.eval.num_tasks
    q = query or (cfg.eval.query if cfg.eval.query > 0 else cfg.task.query)
    bs = min(cfg.eval.batch_size, n)
    eval_fn = make_evaluate(exp.learner)
    per_task, curves = {}, {}
    for i in range(-(-n // bs)):
        batch = exp.source.sample(10_000_000 * (1 + seed_offset) + i, bs, split, q)
        metrics, c = eval_fn(meta, batch, jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 7), i))
        for name, v in metrics.items():
            per_task.setdefault(name, []).append(np.asarray(v))
        for name, v in c.items():
            curves.setdefault(name, []).append(np.asarray(v))
    per_task = {k: np.concatenate(v)[:n] for k, v in per_task.items()}
    curves = {k: np.concatenate(v)[:n].mean(0).tolist() for k, v in curves.items()}
    return {'split': split, 'num_tasks': n, 'metrics': evaluation.summarize(per_task), 'curves': curves}


def _fmt_time(s: float) -> str:
    s = int(s)
    return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def train(exp: Experiment, workdir: str | None = None, log: Callable = print, state=None):
    """Runs config.meta.steps meta-steps with progress and ETA; returns (meta, opt_state, history)."""
    cfg = exp.config
    meta, opt_state = state if state is not None else init_state(exp)
    total = cfg.meta.steps
    history = []
    metrics_file = open(os.path.join(workdir, 'metrics.jsonl'), 'a') if workdir else None
    fused = exp.source.device_sample is not None
    chunk = min(cfg.train.steps_per_call if fused else 1, cfg.train.log_every)
    chunk_fns = {}
    host_step = None if fused else make_host_step(exp)
    step, t0, consecutive_bad, last_log = 0, time.time(), 0, 0
    compile_t = None
    while step < total:
        n = min(chunk, total - step)
        if fused:
            if n not in chunk_fns:
                chunk_fns[n] = make_train_chunk(exp, n)
            meta, opt_state, m = chunk_fns[n](meta, opt_state, jnp.asarray(step, jnp.int32))
        else:
            batch = exp.source.sample(step, cfg.meta.batch_size, 'train', cfg.task.query)
            meta, opt_state, m = host_step(meta, opt_state, batch, jnp.asarray(step, jnp.int32))
        m = jax.device_get(m)
        for s in m['skipped']:
            consecutive_bad = consecutive_bad + 1 if s else 0
            if consecutive_bad >= cfg.train.max_nonfinite:
                raise NonFiniteError(f'method {cfg.method}: {consecutive_bad} consecutive non-finite meta-updates '
                                     f'up to step {step + 1}; parameters were left at their last finite value')
            step += 1
        if compile_t is None:
            compile_t = time.time() - t0
            t0, done0 = time.time(), step
        if step - last_log >= cfg.train.log_every or step == total:
            last_log = step
            rec = {'step': step, **{k: float(np.mean(v)) for k, v in m.items()}}
            history.append(rec)
            if metrics_file:
                metrics_file.write(json.dumps(rec) + '\n')
                metrics_file.flush()
            rate = (step - done0) / max(time.time() - t0, 1e-9)
            eta = (total - step) / rate if rate > 0 else float('nan')
            log(f'[{cfg.method}] step {step}/{total} ({100 * step / total:.0f}%) meta-loss {rec["meta_loss"]:.4f} '
                f'{rate:.1f} steps/s ETA {_fmt_time(eta)}')
    if metrics_file:
        metrics_file.close()
    return meta, opt_state, history


def result_table(rows: list) -> str:
    """Markdown table: method, shots, metric mean +- 95% CI."""
    lines = ['| method | shots | metric | mean +- 95% CI | tasks |', '| --- | --- | --- | --- | --- |']
    for r in rows:
        for name, s in r['metrics'].items():
            lines.append(f"| {r['method']} | {r['shots']} | {name} | {s['mean']:.4f} +- {s['ci']:.4f} | {s['n']} |")
    return '\n'.join(lines)
