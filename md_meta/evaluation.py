"""Evaluation on new tasks: adapting a meta-trained learner to a fixed set of tasks of a split (``evaluate``),
a run read back from its workdir for that (``load_run``), and the intervals reported: per task, mean +- 1.96
std / sqrt(n) (the 95% normal confidence interval); across seeds, mean +- t_{0.975, n-1} std / sqrt(n)
(``seed_interval``)."""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np

from md_meta import checkpoint as checkpoint_lib
from md_meta import config as config_lib
from md_meta import methods, tasks, workdirs
from md_meta.experiment import Experiment, build_on_one_device, init_state
from md_meta.meta import make_evaluate


def mean_ci(values) -> tuple:
    """(mean, 1.96 * std / sqrt(n)) with the population std (ddof=0), as MAML's evaluation reports."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError('mean_ci of an empty set of tasks')
    return float(v.mean()), float(1.96 * v.std() / np.sqrt(v.size))


def summarize(per_task: dict) -> dict:
    """{metric: per-task values} -> {metric: {'mean', 'ci', 'n'}}."""
    out = {}
    for name, vals in per_task.items():
        m, ci = mean_ci(vals)
        out[name] = {'mean': m, 'ci': ci, 'n': int(np.asarray(vals).size)}
    return out


# two-sided 95% t quantiles by number of values n (n - 1 degrees of freedom)
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262, 11: 2.228,
       12: 2.201, 13: 2.179, 14: 2.160, 15: 2.145, 16: 2.131, 20: 2.093, 21: 2.086, 31: 2.042}


def seed_interval(values) -> tuple:
    """(mean, t_{0.975, n-1} * std_{ddof=1} / sqrt(n)) over independent runs (seeds); the interval is nan
    for one run. Beyond the tabulated n the next smaller tabulated quantile is used (conservative)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError('seed_interval of no runs')
    if v.size == 1:
        return float(v[0]), float('nan')
    t = T95[max(n for n in T95 if n <= v.size)]
    return float(v.mean()), float(t * v.std(ddof=1) / np.sqrt(v.size))


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
            'metrics': summarize(per_task), 'curves': curves}


EVAL_OVERRIDES = ('inner.eval_steps', 'inner.step_size', 'model.norm_stats')


def load_run(workdir: str, which: str = 'best', warn: Callable = None, overrides: dict | None = None):
    """(exp, meta, step) from a workdir's config.json and its best (or 'last') good checkpoint. The
    experiment is for evaluation, on one device (``exp.mesh`` None): the devices the run was trained on
    need not fit this machine. ``overrides``: {field: value} of EVAL_OVERRIDES, the inner loop at test (K,
    alpha) or batch norm's statistics for the query changed without retraining."""
    if which not in ('best', 'last'):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    config = workdirs.load_config(workdir)
    for field, value in (overrides or {}).items():
        if field not in EVAL_OVERRIDES:
            raise ValueError(f'{field}: not a field evaluation may override (only {EVAL_OVERRIDES})')
        if field == 'inner.step_size' and methods.learns_step_sizes(config):
            raise config_lib.ConfigError(f'inner.step_size: {config.method} learns its inner step sizes; alpha at '
                                         'test cannot change them (it only initialised them)')
        group, name = field.split('.')
        config[group][name] = value
    exp = build_on_one_device(config)
    if exp.source.split_record is not None:   # the data the run was trained on (recorded at its first run)
        workdirs.check_data(workdir, exp.source.split_record(), write=False)
    template = init_state(exp)
    found = checkpoint_lib.Checkpointer(workdir, warn=warn).restore_latest(
        {'meta': template[0], 'opt_state': template[1]}, which=which)
    if found is None:
        raise FileNotFoundError(f'no readable checkpoint in {os.path.join(workdir, "checkpoints")}')
    step, state, _ = found
    return exp, state['meta'], step
