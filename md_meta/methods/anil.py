"""ANIL (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML", ICLR 2020): almost no inner loop, only the classifier head adapts:

    phi <- phi - alpha * m (.) grad L(phi; D_trn),    m = 1 on the head's leaves, 0 on the body's,

with the whole initialisation phi_0 (body and head) meta-learned by the second-order meta-gradient, as in
MAML: the body is held at its meta-learned start within a task and learned across tasks. Geometry: the
identity on the head, 0 elsewhere (a singular preconditioner). With m all ones the step is MAML's
(``masked_gradient_descent``: the same expression on every leaf), so the two differ only by the mask.

The mask is static, one 0/1 per leaf, and applied by selection: a body leaf is returned unchanged (bitwise,
whatever its gradient; 0 * inf would be nan) and a head leaf takes MAML's step. The body's gradients are
then unused and XLA drops their computation from the inner loop.

The head is one top-level entry of the parameter pytree (``head_of``), the network's last layer:
  * md-meta's networks (MLP, CNN4, ResNet-12) name their layers ``layer_0 .. layer_N`` in network order
    (``md_meta.blockiaf.default_blocks``): the head is ``layer_N``, the classifier (or regression output);
  * a Flax module whose top-level submodules are all of one class gets Flax's names ``Dense_0, Dense_1, ...``,
    numbered in call order: the head is the highest number;
  * names that do not give the order (several classes, ``Conv_0, Conv_1, Dense_0``; hand-named layers) are
    refused in one line: say which entry is the head with ``config.anil.head``.
"""
from __future__ import annotations

import re
from typing import Callable

import jax
import ml_collections

from md_meta.config import ConfigError
from md_meta.geometry import Geometry, InnerLoop

LOWER_LEVEL, LOSS_GEOMETRY = 'GD on the head', 'identity on the head, 0 elsewhere'


def head_of(params, head: str = 'auto') -> str:
    """The top-level entry of ``params`` that ANIL adapts: ``head`` if named, else the last layer in network
    order (module docstring); ConfigError naming ``anil.head`` where the names do not tell which."""
    keys = list(params)
    if head != 'auto':
        if head not in params:
            raise ConfigError(f'config.anil.head: {head!r} is not a top-level entry of the network\'s '
                              f'parameters {tuple(keys)}')
        return head
    numbered = [re.fullmatch(r'(.+)_(\d+)', k) for k in keys]
    if keys and all(numbered) and len({m.group(1) for m in numbered}) == 1:
        return max(numbered, key=lambda m: int(m.group(2))).group(0)
    raise ConfigError(f'config.anil.head: cannot tell the last layer from the top-level entries {tuple(keys)} '
                      f'(md-meta\'s networks name them layer_0..layer_N); name the head, e.g. '
                      f'--config.anil.head={keys[-1] if keys else "NAME"}')


def head_mask(params, head: str = 'auto'):
    """A pytree like ``params`` with leaves 1 (the head's) and 0 (the body's): Python ints, static."""
    name = head_of(params, head)
    return {k: jax.tree_util.tree_map(lambda _: int(k == name), v) for k, v in params.items()}


def masked_gradient_descent(step_size: float, mask_of: Callable) -> Callable:
    """theta -> InnerLoop of phi <- phi - alpha m (.) grad, m = mask_of(phi) static 0/1 per leaf: a leaf
    with m = 1 takes MAML's step (the same expression, ``geometry.sgd_step``), one with m = 0 stays as it is."""
    def update(phi, grad):
        return jax.tree_util.tree_map(lambda m, p, g: p - step_size * g if m else p, mask_of(phi), phi, grad)
    return lambda theta: InnerLoop(update=update)


def make(config) -> Geometry:
    head = config.anil.head

    def init(key, params):
        del key
        head_of(params, head)   # refuse an unknown or ambiguous head before anything compiles
        return params, {}

    return Geometry(init=init, inner=masked_gradient_descent(float(config.inner.step_size),
                                                             lambda phi: head_mask(phi, head)))


def config_section() -> ml_collections.ConfigDict:
    """config.anil: which entry of the parameters is the head (``head_of``)."""
    c = ml_collections.ConfigDict()
    c.head = 'auto'           # the top-level parameter entry adapted: 'auto' = the last layer (layer_N)
    return c


def validate(config, require) -> None:
    h = config.anil.head
    require(isinstance(h, str) and h != '', 'anil.head',
            f"must be 'auto' (the last layer) or a top-level parameter name, got {h!r}")
