"""Theorem 1 in code: searching for violations of (9) and measuring monotonicity of a (trained) blockIAF.

The normalised monotonicity gap of g between two points is

    gap(z, z') = (z - z')^T (g(z) - g(z')) / |z - z'|^2,

(9) says gap > 0 for every pair; the strong form says gap >= C_mono > 0. See docs/monotonicity.md for
the argument (the constrained map ``monotone=True`` is certified, the paper/reference form is not).

* ``falsify``: random restarts plus gradient descent (optax Adam) on gap over the pair (z, z') and,
  optionally, over the map parameters theta; returns the smallest gap found and the counterexample.
* ``sym_jacobian_lambda_min``: the smallest eigenvalue of (J + J^T) / 2 at a point by Lanczos with
  jvp / vjp (matrix-free, O(d) memory per Lanczos vector; never a dense d x d matrix).
* ``empirical_gap``: gap over random pairs around a point.
* ``diagnose``: both, at points sampled around a point (e.g. a trained dual initialisation z0).

Everything works on parameter pytrees; ``spec`` is a static ``blockiaf.BlockIAFSpec``; g is computed by
``blockiaf_engine.forward``. For certified
checks use float64 (``with jax.enable_x64(True):`` and float64 inputs).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from md_meta import blockiaf, blockiaf_engine

Params = Any


# ----------------------------------------------------------------------------- the gap

def gap(theta: Params, z: Params, z_prime: Params, spec: blockiaf.BlockIAFSpec) -> jnp.ndarray:
    """(z - z')^T (g(z) - g(z')) / |z - z'|^2 (pytrees z, z' of the same structure)."""
    dz, _ = ravel_pytree(jax.tree_util.tree_map(jnp.subtract, z, z_prime))
    dg, _ = ravel_pytree(jax.tree_util.tree_map(jnp.subtract, blockiaf_engine.forward(theta, z, spec),
                                                blockiaf_engine.forward(theta, z_prime, spec)))
    return jnp.vdot(dz, dg) / (jnp.vdot(dz, dz) + jnp.finfo(dz.dtype).tiny)


def certificate(spec: blockiaf.BlockIAFSpec) -> dict:
    """The constants of docs/monotonicity.md for a monotone spec: C_mono (margin of (9)), M (Lipschitz
    bound of g) and C = C_mono / M^2 (eq. (10) for g^-1)."""
    return {'C_mono': blockiaf.monotone_margin(spec), 'M': blockiaf.lipschitz_bound(spec),
            'C': blockiaf.inverse_strong_monotonicity(spec)}


# ----------------------------------------------------------------------------- falsification harness

class Counterexample(NamedTuple):
    gap: float          # smallest normalised gap found (re-evaluated at the returned point)
    theta: Params       # map parameters at which it was found
    z: Params
    z_prime: Params
    restart: int        # which restart found it
    per_restart: np.ndarray  # best gap of each restart


def _perturb(key, tree, scale):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [l + scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def _clip_around(tree, center, bound):
    if bound is None:
        return tree
    return jax.tree_util.tree_map(lambda t, c: c + jnp.clip(t - c, -bound, bound), tree, center)


def _adam_search(objective: Callable, x0, steps: int, lr: float, project: Callable = lambda x: x):
    """(smallest finite objective seen, its argument) over ``steps`` Adam steps from x0 (projected after each
    step; non-finite gradients count as 0), the last iterate included."""
    opt = optax.adam(lr)
    dtype = jax.tree_util.tree_leaves(x0)[-1].dtype

    def body(carry, _):
        x, opt_state, best_val, best_x = carry
        val, grads = jax.value_and_grad(objective)(x)
        better = jnp.isfinite(val) & (val < best_val)
        best_val = jnp.where(better, val, best_val)
        best_x = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), x, best_x)
        grads = jax.tree_util.tree_map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grads)
        updates, opt_state = opt.update(grads, opt_state, x)
        return (project(optax.apply_updates(x, updates)), opt_state, best_val, best_x), None

    (x, _, best_val, best_x), _ = jax.lax.scan(body, (x0, opt.init(x0), jnp.asarray(jnp.inf, dtype), x0), None,
                                               length=steps)
    last = objective(x)
    better = jnp.isfinite(last) & (last < best_val)
    return jnp.where(better, last, best_val), jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), x, best_x)


@partial(jax.jit, static_argnames=('spec', 'steps', 'lr', 'optimize_theta', 'theta_noise', 'z_scale',
                                   'theta_box', 'z_box'))
def _falsify_run(keys, params, theta, center, *, spec, steps, lr, optimize_theta, theta_noise, z_scale,
                 theta_box, z_box):
    dtype = jax.tree_util.tree_leaves(params)[0].dtype

    def one_restart(k):
        k_init, k_noise, k_z1, k_z2 = jax.random.split(k, 4)
        th0 = theta if theta is not None else blockiaf.init(k_init, params, spec)
        th0 = jax.tree_util.tree_map(lambda x: x.astype(dtype), th0)
        th0 = _perturb(k_noise, th0, theta_noise)
        zeros = (jax.tree_util.tree_map(jnp.zeros_like, params) if center is None
                 else jax.tree_util.tree_map(lambda c: jnp.asarray(c, dtype), center))
        z0 = _clip_around(_perturb(k_z1, zeros, z_scale), zeros, z_box)  # 'zeros' is the center
        z1 = _clip_around(_perturb(k_z2, zeros, z_scale), zeros, z_box)
        x0 = (th0, z0, z1)

        def objective(x):
            th, za, zb = x
            if not optimize_theta:
                th = jax.lax.stop_gradient(th)
            return gap(th, za, zb, spec)

        def project(x):
            th, za, zb = x
            return (_clip_around(th, th0, theta_box), _clip_around(za, zeros, z_box),
                    _clip_around(zb, zeros, z_box))

        return _adam_search(objective, x0, steps, lr, project)

    return jax.vmap(one_restart)(keys)


def falsify(spec: blockiaf.BlockIAFSpec, params: Params, key: jax.Array, *, restarts: int = 8,
            steps: int = 300, lr: float = 0.05, optimize_theta: bool = True, theta: Params | None = None,
            theta_noise: float = 0.3, z_scale: float = 1.0, theta_box: float | None = None,
            z_box: float | None = None, center: Params | None = None) -> Counterexample:
    """Searches for a violation of (9): minimises gap(theta, z, z') by Adam from ``restarts`` random starts.

    params: a parameter pytree (shapes/dtypes only; it fixes the blocks).
    theta: map parameters to start from (default: ``blockiaf.init`` per restart); every leaf then gets
      N(0, theta_noise^2) noise so that the decoders' zero-initialised heads are not all zero.
    optimize_theta: also descend on theta (else theta stays at its perturbed start).
    z_scale: z, z' start as center + N(0, z_scale^2) per entry (center: a pytree like params, default 0,
      e.g. a trained dual initialisation z0).
    theta_box / z_box: optional box constraints (projected after every step): each entry of theta stays
      within theta_box of its start, each entry of z, z' within z_box of center. None: unconstrained.
    Returns the smallest gap over all restarts and steps and the (theta, z, z') where it occurred.
    """
    vals, xs = _falsify_run(jax.random.split(key, restarts), params, theta, center, spec=spec, steps=steps,
                            lr=lr, optimize_theta=optimize_theta, theta_noise=theta_noise, z_scale=z_scale,
                            theta_box=theta_box, z_box=z_box)
    vals = np.asarray(vals)
    r = int(np.nanargmin(vals))
    th, za, zb = jax.tree_util.tree_map(lambda a: a[r], xs)
    return Counterexample(float(gap(th, za, zb, spec)), th, za, zb, r, vals)


def map_gap(fn: Callable, z: Params, z_prime: Params) -> jnp.ndarray:
    """(z - z')^T (f(z) - f(z')) / |z - z'|^2 for any map ``fn`` of a pytree to a pytree of its structure."""
    dz, _ = ravel_pytree(jax.tree_util.tree_map(jnp.subtract, z, z_prime))
    df, _ = ravel_pytree(jax.tree_util.tree_map(jnp.subtract, fn(z), fn(z_prime)))
    return jnp.vdot(dz, df) / (jnp.vdot(dz, dz) + jnp.finfo(dz.dtype).tiny)


def falsify_map(fn: Callable, center: Params, key: jax.Array, *, restarts: int = 8, steps: int = 300,
                lr: float = 0.05, z_scale: float = 1.0) -> Counterexample:
    """``falsify`` for a fixed map ``fn`` (e.g. MD's sandwich P g(P w), ``md_meta.methods.md``): Adam on
    map_gap over the pair (z, z') from ``restarts`` random starts center + N(0, z_scale^2)."""
    objective = lambda x: map_gap(fn, *x)

    @jax.jit
    def run(keys):
        def one(k):
            ka, kb = jax.random.split(k)
            return _adam_search(objective, (_perturb(ka, center, z_scale), _perturb(kb, center, z_scale)), steps, lr)
        return jax.vmap(one)(keys)

    vals, xs = run(jax.random.split(key, restarts))
    vals = np.asarray(vals)
    r = int(np.nanargmin(vals))
    za, zb = jax.tree_util.tree_map(lambda a: a[r], xs)
    return Counterexample(float(map_gap(fn, za, zb)), None, za, zb, r, vals)


# ----------------------------------------------------------------------------- diagnostics

def sym_jacobian_matvec(theta: Params, z: Params, spec: blockiaf.BlockIAFSpec) -> tuple[Callable, int]:
    """v -> (J + J^T) v / 2 on flat vectors, J = dg/dz at z (one jvp and one vjp; no dense J)."""
    z_flat, unravel = ravel_pytree(z)
    f = lambda x: ravel_pytree(blockiaf_engine.forward(theta, unravel(x), spec))[0]
    _, vjp_fn = jax.vjp(f, z_flat)

    def matvec(v):
        jv = jax.jvp(f, (z_flat,), (v,))[1]
        return 0.5 * (jv + vjp_fn(v)[0])
    return matvec, z_flat.shape[0]


def lanczos_extremes(matvec: Callable, dim: int, key: jax.Array, num_iters: int = 40,
                     dtype=jnp.float32) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(lambda_min, lambda_max) of a symmetric operator by Lanczos with full reorthogonalisation.

    Stores num_iters vectors of length dim. On breakdown (an invariant Krylov subspace) it restarts
    with a fresh random vector orthogonal to the basis, so the tridiagonal matrix decouples and its
    eigenvalues stay eigenvalues of the operator. With num_iters >= dim the result is exact.
    """
    m = int(min(num_iters, dim))
    k0, key = jax.random.split(key)
    v0 = jax.random.normal(k0, (dim,), dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    V = jnp.zeros((m, dim), dtype).at[0].set(v0)
    alphas = jnp.zeros((m,), dtype)
    betas = jnp.zeros((m,), dtype)   # betas[j] couples j-1 and j (betas[0] unused)
    keys = jax.random.split(key, m)
    eps = jnp.finfo(dtype).eps

    def orth(w, V, j):
        mask = (jnp.arange(m) <= j)[:, None]
        Vm = jnp.where(mask, V, 0.0)
        w = w - Vm.T @ (Vm @ w)
        return w - Vm.T @ (Vm @ w)   # twice is enough

    def body(j, carry):
        V, alphas, betas, scale = carry
        v = V[j]
        w = matvec(v)
        a = jnp.vdot(v, w)
        alphas = alphas.at[j].set(a)
        w = orth(w, V, j)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(a) + b)
        broke = b <= 1e3 * eps * scale
        r = orth(jax.random.normal(keys[j], (dim,), dtype), V, j)
        nxt = jnp.where(broke, r / jnp.linalg.norm(r), w / jnp.where(broke, 1.0, b))
        jn = jnp.minimum(j + 1, m - 1)
        V = jnp.where(j + 1 < m, V.at[jn].set(nxt), V)
        betas = jnp.where(j + 1 < m, betas.at[jn].set(jnp.where(broke, 0.0, b)), betas)
        return V, alphas, betas, scale

    V, alphas, betas, _ = jax.lax.fori_loop(0, m, body, (V, alphas, betas, jnp.asarray(0.0, dtype)))
    T = jnp.diag(alphas) + jnp.diag(betas[1:], 1) + jnp.diag(betas[1:], -1)
    ev = jnp.linalg.eigvalsh(T)
    return ev[0], ev[-1]


@partial(jax.jit, static_argnames=('spec', 'num_iters'))
def sym_jacobian_lambda_min(theta: Params, z: Params, spec: blockiaf.BlockIAFSpec, key: jax.Array,
                            num_iters: int = 40) -> jnp.ndarray:
    """Smallest eigenvalue of (J + J^T)/2 at z (Lanczos; an upper estimate of the true minimum that
    converges fast for extremal eigenvalues; exact when num_iters >= d)."""
    matvec, dim = sym_jacobian_matvec(theta, z, spec)
    dtype = ravel_pytree(z)[0].dtype
    return lanczos_extremes(matvec, dim, key, num_iters, dtype)[0]


def sample_around(center: Params, key: jax.Array, num: int, scale: float) -> Params:
    """``num`` points center + scale * N(0, I), stacked on a leading axis."""
    flat, unravel = ravel_pytree(center)
    x = flat + scale * jax.random.normal(key, (num,) + flat.shape, flat.dtype)
    return jax.vmap(unravel)(x)


def empirical_gap(theta: Params, spec: blockiaf.BlockIAFSpec, center: Params, key: jax.Array,
                  num_pairs: int = 256, scale: float = 1.0, pair_scale: float | None = None) -> dict:
    """gap over random pairs: z = center + scale * N, z' = z + pair_scale * N (default pair_scale = scale).
    Returns min, mean and the 1% quantile of the normalised gap."""
    k1, k2 = jax.random.split(key)
    zs = sample_around(center, k1, num_pairs, scale)
    flat, unravel = ravel_pytree(center)
    ps = pair_scale if pair_scale is not None else scale
    dz = ps * jax.random.normal(k2, (num_pairs,) + flat.shape, flat.dtype)
    zps = jax.vmap(lambda z, d: unravel(ravel_pytree(z)[0] + d))(zs, dz)
    gaps = np.asarray(jax.jit(jax.vmap(lambda a, b: gap(theta, a, b, spec)))(zs, zps))
    return {'min': float(gaps.min()), 'mean': float(gaps.mean()), 'q01': float(np.quantile(gaps, 0.01)),
            'num_pairs': int(num_pairs)}


def diagnose(theta: Params, spec: blockiaf.BlockIAFSpec, center: Params, key: jax.Array, *,
             num_points: int = 16, scale: float = 1.0, num_pairs: int = 256, num_iters: int = 40) -> dict:
    """Monotonicity diagnostics of a (trained) map around ``center`` (e.g. the learned z0):
    lambda_min of the symmetric Jacobian at ``num_points`` points center + scale * N(0, I) (the first
    point is ``center`` itself), the empirical gap over ``num_pairs`` random pairs, and, for a monotone
    spec, the certified constants (every lambda_min and gap must be >= C_mono)."""
    k1, k2, k3 = jax.random.split(key, 3)
    pts = sample_around(center, k1, num_points, scale)
    pts = jax.tree_util.tree_map(lambda p, c: p.at[0].set(c), pts, center)
    lam_fn = jax.jit(jax.vmap(lambda z, k: sym_jacobian_lambda_min(theta, z, spec, k, num_iters)))
    lams = np.asarray(lam_fn(pts, jax.random.split(k2, num_points)))
    out = {'lambda_min': float(lams.min()), 'lambda_min_at_center': float(lams[0]),
           'lambda_min_mean': float(lams.mean()), 'num_points': int(num_points),
           'gap': empirical_gap(theta, spec, center, k3, num_pairs, scale)}
    if spec.monotone:
        out['certificate'] = certificate(spec)
    return out
