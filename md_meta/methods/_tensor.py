"""Shared helpers of the per-tensor methods: tensor views, Kronecker-factored maps (mode products),
layer grouping of a parameter pytree.

A gradient tensor is viewed as a small multi-way array, the blockIAF's view (``blockiaf.mode_shape``):
1-D stays 1-D (handled elementwise; a scalar is a 1-vector), a matrix (in, out) keeps its two modes, a conv
kernel (kh, kw, cin, cout) becomes (kh*kw, cin, cout), any other tensor keeps its modes. A
Kronecker-factored linear map multiplies every mode by its own matrix (tensor mode products):
X x_1 M_1 x_2 M_2 ... , which is (M_1 kron M_2 kron ...) vec(X) at O(d * sum_k n_k) cost instead of O(d^2).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from md_meta.blockiaf import mode_shape


def mode_product(x: jnp.ndarray, m: jnp.ndarray, mode: int) -> jnp.ndarray:
    """(x x_mode m)[.., a, ..] = sum_i m[a, i] x[.., i, ..]."""
    return jnp.moveaxis(jnp.tensordot(m, x, axes=([1], [mode])), 0, mode)


def init_factors(shape, fill: str = 'identity', dtype=jnp.float32):
    """Factors of a Kronecker-factored map for a tensor of ``shape``: a vector (1-D tensors, elementwise)
    or one square matrix per mode of ``mode_shape``. fill: 'identity' (ones / I) or 'zero' (the first
    factor zero, the others identity: the map is 0 but its gradient w.r.t. the zero factor is not)."""
    vs = mode_shape(shape)
    if len(vs) <= 1:
        return jnp.ones(vs, dtype) if fill == 'identity' else jnp.zeros(vs, dtype)
    mats = [jnp.eye(n, dtype=dtype) for n in vs]
    if fill == 'zero':
        mats[0] = jnp.zeros_like(mats[0])
    return mats


def kron_apply(factors, g: jnp.ndarray) -> jnp.ndarray:
    """Applies the Kronecker-factored map ``factors`` (from ``init_factors``) to the tensor g."""
    if not isinstance(factors, (list, tuple)):
        return (factors * g.reshape(factors.shape)).reshape(g.shape)
    x = g.reshape(mode_shape(g.shape))
    for k, m in enumerate(factors):
        x = mode_product(x, m, k)
    return x.reshape(g.shape)


def map_leaves(fn, *trees):
    """tree_map over the parameter leaves of the first tree, with the other trees' matching subtrees
    (whose leaves may be lists of factors) passed whole."""
    return jax.tree_util.tree_map(fn, trees[0], *trees[1:], is_leaf=lambda x: isinstance(x, (list, tuple)))


def layer_names(params) -> list:
    """Top-level layer names (``layer_0, layer_1, ...``) in network order."""
    def key(name):
        m = re.search(r'(\d+)$', name)
        return (int(m.group(1)) if m else -1, name)
    return sorted(params, key=key)
