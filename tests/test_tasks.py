"""The sinusoid task family (md_meta.tasks.sinusoid)."""
import jax
import jax.numpy as jnp
import numpy as np

from md_meta.tasks import sinusoid


def _sine_residual(x, y, w):
    """Least-squares residual of y = c1 sin(w x) + c2 cos(w x), i.e. y = A sin(w x - b)."""
    basis = np.concatenate([np.sin(w * x), np.cos(w * x)], 1)
    coef = np.linalg.lstsq(basis, y, rcond=None)[0]
    return float(np.abs(basis @ coef - y).max())


def test_sinusoid_sampler():
    t = sinusoid.sample(jax.random.PRNGKey(0), 7, 5, 3)
    assert t.support_x.shape == (7, 5, 1) and t.query_y.shape == (7, 3, 1)
    assert float(jnp.abs(t.support_x).max()) <= 5.0
    assert float(jnp.abs(t.support_y).max()) <= 5.0
    t2 = sinusoid.sample(jax.random.PRNGKey(0), 7, 5, 3)
    np.testing.assert_array_equal(t.support_y, t2.support_y)
    t3 = sinusoid.sample(jax.random.PRNGKey(1), 7, 5, 3)
    assert float(jnp.abs(t3.support_y - t.support_y).max()) > 0  # another key, other tasks


def test_sinusoid_frequency():
    """Each task is A sin(w x - b) with w drawn from task.frequency (fixed w = 1 is MAML's family)."""
    for freq, w_true in (((1.0, 1.0), 1.0), ((2.0, 2.0), 2.0)):
        t = sinusoid.sample(jax.random.PRNGKey(3), 4, 8, 4, freq)
        for i in range(4):
            x = np.concatenate([t.support_x[i], t.query_x[i]]).astype(np.float64)
            y = np.concatenate([t.support_y[i], t.query_y[i]]).astype(np.float64)
            assert _sine_residual(x, y, w_true) < 1e-4
            assert _sine_residual(x, y, 3.0 - w_true) > 1e-2
    t = sinusoid.sample(jax.random.PRNGKey(3), 32, 8, 4, (0.8, 1.2))
    x, y = np.asarray(t.support_x, np.float64), np.asarray(t.support_y, np.float64)
    grid = np.linspace(0.8, 1.2, 401)
    best = [min(grid, key=lambda w: _sine_residual(x[i], y[i], w)) for i in range(32)]
    assert np.std(best) > 0.05 and min(best) >= 0.8 and max(best) <= 1.2
