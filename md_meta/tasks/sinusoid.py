"""Sinusoid few-shot regression (Finn et al. 2017), sampled on device from an explicit PRNG key.

    A ~ U[0.1, 5], b ~ U[0, pi], x ~ U[-5, 5], y = A sin(x - b); K support and Q query points per task.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from md_meta.meta import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, jnp.pi)
X_RANGE = (-5.0, 5.0)


def sample(key: jax.Array, num_tasks: int, shots: int, query: int) -> Task:
    """A batch of tasks: support (T, K, 1), query (T, Q, 1), float32."""
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amp = jax.random.uniform(k_amp, (num_tasks, 1, 1), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
    phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), minval=PHASE[0], maxval=PHASE[1])
    x = jax.random.uniform(k_x, (num_tasks, shots + query, 1), minval=X_RANGE[0], maxval=X_RANGE[1])
    y = amp * jnp.sin(x - phase)
    return Task(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
