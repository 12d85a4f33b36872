"""Bitwise fingerprint of the meta-step, for a change that must not change a number (a refactor):

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python -m experiments.studies.step_fingerprint > before.txt
    (the same at the new commit > after.txt; then diff before.txt after.txt)

Two meta-steps of every registered method and of several MD forms, on the sinusoid MLP (tasks drawn on the device,
one fused chunk) and on CNN4 at the benchmark's shape (a) (host batches); one line per (shape, form): sha256
prefixes of the meta-parameters, the optimizer state and the metrics after the two steps. One XLA thread makes
the CPU's reductions reproducible. Arguments: the forms to run (default: all).
"""
from __future__ import annotations

import hashlib
import sys

import jax
import numpy as np

from md_meta import experiment, methods, training

from .. import benchmark

# MD forms: name -> overrides (the default form, the map alone, the authors' form, each Kronecker form, ...)
MD_FORMS = {
    'md': [], 'md-none': ['md.kronecker=none'],
    'md-paper': ['md.monotone=false', 'md.scale=exp', 'md.kronecker=none'],
    'md-sandwich': ['md.kronecker=sandwich'], 'md-kfo': ['md.kronecker=kfo_step'],
    'md-primal-elu': ['md.start=primal', 'md.activation=elu'],
    'md-learnable': ['md.head_init=learnable', 'md.kronecker=none'],
}


def digest(tree) -> str:
    """sha256 prefix of a pytree's leaves: dtype, shape and bytes, in leaf order."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.asarray(leaf)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def fingerprint(method: str, overrides: list, shape: str) -> str:
    """'meta <digest> opt <digest> metrics <digest>' after two meta-steps from config.seed's start."""
    c = benchmark.make_config(method, shape, overrides=overrides)
    c.meta.batch_size = 8 if shape == 's' else 4
    exp = benchmark.build(c)
    meta, opt = experiment.init_state(exp)
    if shape == 's':
        meta, opt, m = training.make_train_chunk(exp, 2)(meta, opt, 0)
    else:
        step = training.make_host_step(exp)
        for i in range(2):
            batch = exp.source.sample(i, c.meta.batch_size, 'train', c.task.query)
            meta, opt, m = step(meta, opt, batch, i)
    return f'meta {digest(meta)} opt {digest(opt)} metrics {digest(m)}'


def main(only: list) -> None:
    forms = [(name, 'md', ov) for name, ov in MD_FORMS.items()]
    forms = [(m, m, []) for m in methods.names() if m != 'md'] + forms
    for shape in ('s', 'a'):
        for name, method, overrides in forms:
            if not only or name in only:
                print(f'{shape} {name:14s} {fingerprint(method, overrides, shape)}', flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
