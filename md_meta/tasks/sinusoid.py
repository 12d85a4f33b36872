"""Sinusoid few-shot regression (Finn et al. 2017), sampled on device from an explicit PRNG key.

    A ~ U[0.1, 5], b ~ U[0, pi], w ~ U[frequency], x ~ U[-5, 5], y = A sin(w x - b);
    K support and Q query points per task.

MAML's family has w = 1 (frequency=(1, 1), the default). Meta-SGD (Li et al. 2017, sec. 4.1) and MT-net
(Lee & Choi 2018), whose tables report the MAML sinusoid figures usually quoted, draw w ~ U[0.8, 1.2].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from md_meta.tasks import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, jnp.pi)
X_RANGE = (-5.0, 5.0)


def sample(key: jax.Array, num_tasks: int, shots: int, query: int,
           frequency: tuple = (1.0, 1.0)) -> Task:
    """A batch of tasks: support (T, K, 1), query (T, Q, 1), float32."""
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    lo, hi = frequency
    freq = lo if lo == hi else jax.random.uniform(jax.random.fold_in(key, 3), (num_tasks, 1, 1), minval=lo, maxval=hi)
    amp = jax.random.uniform(k_amp, (num_tasks, 1, 1), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
    phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), minval=PHASE[0], maxval=PHASE[1])
    x = jax.random.uniform(k_x, (num_tasks, shots + query, 1), minval=X_RANGE[0], maxval=X_RANGE[1])
    y = amp * jnp.sin(freq * x - phase)
    return Task(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
