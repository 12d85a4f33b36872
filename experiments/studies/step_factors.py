"""The inner step that trained runs learned: the step matrix S of each geometry, its diagonal and its mixing.

    python -m experiments.studies.step_factors --workdirs='runs/ablate/md-kron-s*/md-5shot,runs/ablate/metasgd-s*/metasgd-5shot'

For a geometry whose inner step is linear in the gradient, one step from the meta-learned start moves the network
parameters by phi_1 - phi_0 = -alpha S grad L to first order, with S = -(1/alpha) d phi(update(state_0, v)) / dv
at v = 0 (``step_matrix``): MAML S = I; Meta-SGD diag(a_j) / alpha; MetaCurvature its Kronecker matrix K; MD
dg/dz at z_0 = J_g (diagonal inside each block, the scales sigma; between blocks the shifts' coupling), with
md.kronecker='dual_step' J_g K, with 'sandwich' P J_g P. Printed per run: the diagonal's quantiles and the
fractions below 0.1 and above 2 (the monotone map's default scale bounds), the share of S's Frobenius mass, within
each network tensor's diagonal block, that lies off the diagonal (how much one step mixes a kernel's entries:
0 for Meta-SGD and today's MD, the point of MetaCurvature), and the share that lies between tensors (MD's
autoregressive coupling). S is dense (n x n): networks up to ``MAX_PARAMETERS`` parameters (the sinusoid MLP has
1761). docs/methods.md, "Why MD does no better than Meta-SGD".
"""
from __future__ import annotations

import glob

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.flatten_util import ravel_pytree

from ..harness import run

FLAGS = flags.FLAGS
MAX_PARAMETERS = 20000
LINEAR_STEPS = ('maml', 'metasgd', 'metacurvature', 'md')   # methods whose inner step is linear in the gradient


def step_matrix(geometry, meta, alpha: float) -> np.ndarray:
    """S (n x n, ``ravel_pytree`` order of the network parameters) with phi_1 - phi_0 = -alpha S grad to first
    order, from the start the meta-parameters ``meta`` give (one forward-mode product per parameter)."""
    loop = geometry.inner(meta['geom'])
    state0 = loop.start(meta['init'], jax.random.PRNGKey(0))
    phi0, unravel = ravel_pytree(loop.params_of(state0))
    if phi0.size > MAX_PARAMETERS:
        raise ValueError(f'step_matrix: {phi0.size} parameters; the dense step matrix is for networks of at most '
                         f'{MAX_PARAMETERS}')
    moved = lambda v: ravel_pytree(loop.params_of(loop.update(state0, unravel(v))))[0]
    return -np.asarray(jax.jit(jax.jacfwd(moved))(jnp.zeros_like(phi0))) / alpha


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


def run_step_factors(workdir: str) -> tuple:
    """(method, diag(S), mixing(S)) of a finished run's last checkpoint."""
    from md_meta import evaluation
    exp, meta, _ = evaluation.load_run(workdir, which='last')
    c = exp.config
    if c.method not in LINEAR_STEPS:
        raise ValueError(f'{workdir}: a {c.method} run; the step matrix is defined for {LINEAR_STEPS}')
    S = step_matrix(exp.learner.geometry, meta, float(c.inner.step_size))
    return c.method, np.diagonal(S).copy(), mixing(S, meta['init'])


def main(argv):
    del argv
    from ..harness import prepare_process
    prepare_process()
    workdirs = sorted(w for pattern in FLAGS.workdirs for w in glob.glob(pattern))
    if not workdirs:
        raise SystemExit(f'step_factors: no workdir matches {FLAGS.workdirs}')
    print('| run | method | parameters | diag < 0.1 | diag > 2 | diag quantiles 1 / 10 / 50 / 90 / 99% | '
          'mixing within tensors | between tensors |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for wd in workdirs:
        method, f, mix = run_step_factors(wd)
        q = ' / '.join(f'{x:.3g}' for x in np.quantile(f, [0.01, 0.1, 0.5, 0.9, 0.99]))
        print(f'| {wd} | {method} | {f.size} | {np.mean(f < 0.1):.3f} | {np.mean(f > 2):.3f} | {q} | '
              f'{mix["within"]:.3g} | {mix["between"]:.3g} |', flush=True)


if __name__ == '__main__':
    flags.DEFINE_list('workdirs', [], f'workdirs (glob patterns) of finished runs of {LINEAR_STEPS}')
    run(main)
