"""The per-parameter inner step that trained runs learned, relative to alpha, as distributions.

    python -m experiments.step_factors --workdirs='runs/full/md-monotone-s*/md-5shot,runs/full/metasgd-s*/metasgd-5shot'

Meta-SGD: a_j / alpha (phi_j <- phi_j - a_j grad_j L). MD: the diagonal of dg/dz at the learned z_0. Since
phi_i = z_i sigma(a_i) + mu_i(z_<i) with sigma and mu of block i depending on earlier blocks only, that diagonal
is sigma, and one MD step moves phi_j by -alpha sigma_j grad_j L plus the change of the shifts. Prints, per run,
the fraction of parameters whose factor is below 0.1 and above 2 (the monotone map's default scale bounds),
quantiles, and for MD the largest off-diagonal entry of dg/dz: how much one parameter's step moves another
(docs/methods.md, "Why MD does no better than Meta-SGD").
"""
from __future__ import annotations

import glob

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.flatten_util import ravel_pytree

from experiments import run

FLAGS = flags.FLAGS


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
    """(method, factors, largest |off-diagonal entry| of dg/dz: MD's coupling between parameters, None for
    Meta-SGD) of a finished run's last checkpoint."""
    from md_meta import blockiaf, training
    from md_meta.methods import md, metasgd
    exp, meta, _ = training.load_run(workdir, which='last')
    c = exp.config
    if c.method == 'metasgd':
        steps = metasgd.step_sizes(meta['geom'], float(c.inner.step_size))
        return (c.method, np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(steps)]) / c.inner.step_size,
                None)
    if c.method == 'md':
        spec = md.spec_from_config(c, meta['init'])
        jac = md_jacobian(blockiaf.unpack(meta['geom'], spec, meta['init']), meta['init'], spec)
        return c.method, np.diagonal(jac).copy(), float(np.abs(jac - np.diag(np.diagonal(jac))).max())
    raise ValueError(f'{workdir}: a {c.method} run; step factors are defined for md and metasgd runs')


def main(argv):
    del argv
    from experiments import prepare_process
    prepare_process()
    workdirs = sorted(w for pattern in FLAGS.workdirs for w in glob.glob(pattern))
    if not workdirs:
        raise SystemExit(f'step_factors: no workdir matches {FLAGS.workdirs}')
    print('| run | method | parameters | factor < 0.1 | factor > 2 | quantiles 1 / 10 / 50 / 90 / 99% | '
          'largest off-diagonal of dg/dz |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for wd in workdirs:
        method, f, off = run_step_factors(wd)
        q = ' / '.join(f'{x:.3g}' for x in np.quantile(f, [0.01, 0.1, 0.5, 0.9, 0.99]))
        print(f'| {wd} | {method} | {f.size} | {np.mean(f < 0.1):.3f} | {np.mean(f > 2):.3f} | {q} | '
              f'{"-" if off is None else f"{off:.2g}"} |', flush=True)


if __name__ == '__main__':
    flags.DEFINE_list('workdirs', [], 'workdirs (glob patterns) of finished MD or Meta-SGD runs')
    run(main)
