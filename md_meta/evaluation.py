"""Evaluation on new tasks: mean +- 1.96 std / sqrt(n) (the 95% normal confidence interval); across
seeds: mean +- t_{0.975, n-1} std / sqrt(n) (``seed_interval``)."""
from __future__ import annotations

import numpy as np


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
