"""Evaluation on new tasks: mean +- 1.96 std / sqrt(n) (the 95% normal confidence interval)."""
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
