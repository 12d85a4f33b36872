"""The inner step that trained runs learned: the step matrix S of each geometry, its diagonal and its mixing.

    python -m experiments.studies.step_factors --workdirs='runs/ablate/md-kron-s*/md-5shot,runs/ablate/metasgd-s*/metasgd-5shot'

For a geometry whose inner step is linear in the gradient, one step from the meta-learned start moves the network
parameters by phi_1 - phi_0 = -alpha S grad L to first order, with S = -(1/alpha) d phi(update(state_0, v)) / dv
at v = 0 (``step_matrix``): MAML S = I; Meta-SGD diag(a_j) / alpha; MetaCurvature its Kronecker matrix K; MD
dg/dz at z_0 = J_g (diagonal inside each block, the scales sigma; between blocks the shifts' coupling), with
md.kronecker='dual_step' J_g K, with 'sandwich' P J_g P. MetaKFO's step f(v) = A v + C relu(B v) (tensor mode
products) and MD's with md.kronecker='kfo_step' are nonlinear in v: S is taken at v = the support gradient of
``--tasks`` test tasks (S(v) = A + C D_v B, D_v = diag(1[B v > 0]), times J_g for MD; the value at v = 0 would
drop the relu path), the rows pool those tasks, and two more columns say how far the step is from linear: the
relative residual |Delta phi(v) + alpha S(v) v| / |Delta phi(v)| (0 for MetaKFO, whose f is positively
homogeneous; MD's map adds second-order terms) and |S(v) - S(0)|_F / |S(v)|_F (the relu path's share). Printed
per run: the diagonal's quantiles and the fractions below 0.1 and above 2 (the monotone map's default scale
bounds); the share of S's Frobenius mass, within each network tensor's diagonal block, that lies off the diagonal
(how much one step mixes a kernel's entries: 0 for Meta-SGD and today's MD, the point of MetaCurvature); the share
that lies between tensors (MD's autoregressive coupling); the mean cosine of S v with the support gradient v over
the ``--tasks`` tasks (1 for MAML; > 0: a descent direction to first order). S is dense (n x n): networks up to
``MAX_PARAMETERS`` parameters (the sinusoid MLP has 1761). docs/methods.md, "Why MD does no better than Meta-SGD".

``--map_scales`` (MD runs, any network, e.g. CNN4): per network tensor, the map's scales sigma at z_0, S's diagonal
for the map alone, with alpha times the largest: how far each tensor's inner step size has moved from alpha.
"""
from __future__ import annotations

import glob

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.flatten_util import ravel_pytree

from ..harness import run

FLAGS = flags.FLAGS
MAX_PARAMETERS = 20000
METHODS = ('maml', 'metasgd', 'metacurvature', 'md', 'metakfo')


def is_linear(config) -> bool:
    """Whether the run's inner step is linear in the gradient (S the same at every gradient)."""
    return not (config.method == 'metakfo' or (config.method == 'md' and config.md.kronecker == 'kfo_step'))


def step_matrix(geometry, meta, alpha: float, at=None) -> np.ndarray:
    """S (n x n, ``ravel_pytree`` order of the network parameters) with phi_1 - phi_0 = -alpha S grad to first
    order around the gradient ``at`` (raveled; default 0), from the start the meta-parameters ``meta`` give (one
    forward-mode product per parameter)."""
    loop = geometry.inner(meta['geom'])
    state0 = loop.start(meta['init'], jax.random.PRNGKey(0))
    phi0, unravel = ravel_pytree(loop.params_of(state0))
    if phi0.size > MAX_PARAMETERS:
        raise ValueError(f'step_matrix: {phi0.size} parameters; the dense step matrix is for networks of at most '
                         f'{MAX_PARAMETERS}')
    moved = lambda v: ravel_pytree(loop.params_of(loop.update(state0, unravel(v))))[0]
    at = jnp.zeros_like(phi0) if at is None else jnp.asarray(at, phi0.dtype)
    chex.assert_equal_shape((at, phi0))
    return -np.asarray(jax.jit(jax.jacfwd(moved))(at)) / alpha


def step_residual(geometry, meta, alpha: float, v, S: np.ndarray) -> float:
    """|Delta phi(v) + alpha S v| / |Delta phi(v)|: 0 when one step is S's linear map of the gradient v."""
    loop = geometry.inner(meta['geom'])
    state0 = loop.start(meta['init'], jax.random.PRNGKey(0))
    phi0, unravel = ravel_pytree(loop.params_of(state0))
    delta = np.asarray(ravel_pytree(loop.params_of(loop.update(state0, unravel(jnp.asarray(v)))))[0] - phi0)
    return float(np.linalg.norm(delta + alpha * S @ np.asarray(v)) / np.linalg.norm(delta))


def support_gradients(exp, meta, num_tasks: int, split: str = 'test') -> list:
    """grad_phi L(phi_0; D_trn) of ``num_tasks`` tasks of ``split`` (raveled), at the start phi_0 the
    meta-parameters give: the gradients the first inner step transforms."""
    from md_meta import losses
    learner = exp.learner
    loop = learner.geometry.inner(meta['geom'])
    phi0 = loop.params_of(loop.start(meta['init'], jax.random.PRNGKey(0)))
    apply = lambda phi, x: learner.model.apply({'params': phi, **meta['net']}, x)
    loss_fn = losses.get(learner.loss)
    batch = exp.source.sample(20_000_000, num_tasks, split, exp.config.task.query)
    grad = jax.jit(jax.vmap(lambda x, y: ravel_pytree(jax.grad(lambda p: loss_fn(apply(p, x), y))(phi0))[0]))
    return list(np.asarray(grad(batch.support_x, batch.support_y)))


def mixing(S: np.ndarray, params) -> dict:
    """{'within': share of the Frobenius mass of S's per-tensor diagonal blocks off their diagonals, 'between':
    share of S's mass outside those blocks}; the tensors are the leaves of ``params`` in ``ravel_pytree`` order."""
    sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(params)]
    ends = np.cumsum(sizes)
    block = np.zeros(S.shape, bool)
    for a, b in zip(ends - sizes, ends):
        block[a:b, a:b] = True
    diag = np.eye(S.shape[0], dtype=bool)
    sq = S * S
    within = sq[block].sum()
    return {'within': float(sq[block & ~diag].sum() / within) if within else 0.0,
            'between': float(sq[~block].sum() / sq.sum()) if sq.sum() else 0.0}


def md_jacobian(theta, z, spec) -> np.ndarray:
    """dg/dz at z (``theta`` in the per-leaf layout), rows and columns in ``ravel_pytree``'s order: one
    forward-mode product per parameter, batched (n x n for a network of n parameters)."""
    from md_meta import blockiaf
    flat, unravel = ravel_pytree(z)
    g = lambda x: ravel_pytree(blockiaf.forward_per_leaf(theta, unravel(x), spec))[0]
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    return np.asarray(jax.jit(lambda x: jax.vmap(lambda v: jax.jvp(g, (x,), (v,))[1])(eye))(flat)).T


def md_step_factors(theta, z, spec) -> np.ndarray:
    """diag(dg/dz) at z, raveled in ``ravel_pytree``'s order."""
    return np.diagonal(md_jacobian(theta, z, spec)).copy()


def run_step_factors(workdir: str, num_tasks: int = 4) -> dict:
    """{'method', 'diag': diag(S), 'mixing': mixing(S), 'cosine': mean cos(S v, v)} of a finished run's last
    checkpoint over ``num_tasks`` test tasks' support gradients v; for a nonlinear step S is taken at each v
    (diagonals pooled, mixing shares averaged), with the nonlinearity columns 'residual' and 'relu_share'."""
    from md_meta import evaluation
    exp, meta, _ = evaluation.load_run(workdir, which='last')
    c = exp.config
    if c.method not in METHODS:
        raise ValueError(f'{workdir}: a {c.method} run; the step matrix is defined for {METHODS}')
    geometry, alpha = exp.learner.geometry, float(c.inner.step_size)
    S0 = step_matrix(geometry, meta, alpha)
    grads = support_gradients(exp, meta, num_tasks)
    cosine = lambda S, v: float(v @ S @ v / (np.linalg.norm(v) * np.linalg.norm(S @ v)))
    if is_linear(c):
        return {'method': c.method, 'diag': np.diagonal(S0).copy(), 'mixing': mixing(S0, meta['init']),
                'cosine': float(np.mean([cosine(S0, v) for v in grads]))}
    diags, mixes, residuals, shares, cosines = [], [], [], [], []
    for v in grads:
        S = step_matrix(geometry, meta, alpha, at=v)
        diags.append(np.diagonal(S).copy())
        mixes.append(mixing(S, meta['init']))
        residuals.append(step_residual(geometry, meta, alpha, v, S))
        shares.append(float(np.linalg.norm(S - S0) / np.linalg.norm(S)))
        cosines.append(cosine(S, v))
    return {'method': c.method, 'diag': np.concatenate(diags),
            'mixing': {k: float(np.mean([m[k] for m in mixes])) for k in mixes[0]},
            'residual': float(np.mean(residuals)), 'relu_share': float(np.mean(shares)),
            'cosine': float(np.mean(cosines))}


def map_scales(config, meta) -> list:
    """[(leaf path, shape, sigma)] of an MD run's meta-parameters: the map's scales at the start z_0
    (``blockiaf.scales_and_shifts``), S's diagonal for the map alone, per network tensor and for any network size
    (no dense S). With md.kronecker='dual_step' or 'kfo_step' the step is J_g times K's step, of which these are
    J_g's diagonal; the sandwich's map is P g(P w), not g, and is refused."""
    from md_meta import blockiaf, blockiaf_engine, methods
    from md_meta.methods import md
    if config.method != 'md' or config.md.kronecker == 'sandwich':
        raise ValueError(f'map_scales: the scales of the blockIAF g of an MD run (md.kronecker not \'sandwich\'), '
                         f'got method {config.method!r}' + (f' with md.kronecker={config.md.kronecker!r}'
                                                          if config.method == 'md' else ''))
    loop = methods.make_geometry(config).inner(meta['geom'])
    z0 = loop.start(meta['init'], jax.random.PRNGKey(0))
    spec = md.spec_from_config(config, z0)
    theta = blockiaf_engine.unpack(md.split_geom(meta['geom'])[0], spec, z0)
    scales = jax.jit(lambda t, z: blockiaf.scales_and_shifts(t, z, spec)[0])(theta, z0)
    return [(jax.tree_util.keystr(path), np.shape(x), np.asarray(x))
            for path, x in jax.tree_util.tree_leaves_with_path(scales)]


def print_map_scales(workdirs: list) -> None:
    """One row per network tensor of each MD run: its scales' quantiles and alpha times the largest (that entry's
    inner step size for the map alone)."""
    from md_meta import evaluation
    print('| run | tensor | shape | sigma min / 50% / 99% / max | alpha sigma max |')
    print('| --- | --- | --- | --- | --- |')
    for wd in workdirs:
        exp, meta, step = evaluation.load_run(wd, which='last')
        alpha = float(exp.config.inner.step_size)
        for path, shape, x in map_scales(exp.config, meta):
            q = ' / '.join(f'{v:.3g}' for v in (x.min(), *np.quantile(x, [0.5, 0.99]), x.max()))
            print(f'| {wd} (step {step}) | {path} | {shape} | {q} | {alpha * x.max():.3g} |', flush=True)


def main(argv):
    del argv
    from ..harness import prepare_process
    prepare_process()
    workdirs = sorted(w for pattern in FLAGS.workdirs for w in glob.glob(pattern))
    if not workdirs:
        raise SystemExit(f'step_factors: no workdir matches {FLAGS.workdirs}')
    if FLAGS.map_scales:
        return print_map_scales(workdirs)
    print('| run | method | parameters | diag < 0.1 | diag > 2 | diag quantiles 1 / 10 / 50 / 90 / 99% | '
          'mixing within tensors | between tensors | cos(S v, v) | nonlinear: residual | relu share |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for wd in workdirs:
        r = run_step_factors(wd, FLAGS.tasks)
        f, mix = r['diag'], r['mixing']
        q = ' / '.join(f'{x:.3g}' for x in np.quantile(f, [0.01, 0.1, 0.5, 0.9, 0.99]))
        nonlinear = f'{r["residual"]:.3g} | {r["relu_share"]:.3g}' if 'residual' in r else 'linear | -'
        n = f.size if 'residual' not in r else f.size // FLAGS.tasks
        print(f'| {wd} | {r["method"]} | {n} | {np.mean(f < 0.1):.3f} | {np.mean(f > 2):.3f} | {q} | '
              f'{mix["within"]:.3g} | {mix["between"]:.3g} | {r["cosine"]:.3g} | {nonlinear} |', flush=True)


if __name__ == '__main__':
    flags.DEFINE_list('workdirs', [], f'workdirs (glob patterns) of finished runs of {METHODS}')
    flags.DEFINE_integer('tasks', 4, 'test tasks whose support gradients S v is compared with, and a nonlinear '
                         'step (MetaKFO, md-kfo) is linearised at')
    flags.DEFINE_bool('map_scales', False, 'MD runs only, any network size: per network tensor, the blockIAF\'s '
                      'scales sigma at z_0 (S\'s diagonal for the map alone) instead of the dense S')
    run(main)
