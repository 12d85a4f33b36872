"""ECML (Hiller, Harandi & Drummond, "On enforcing better conditioned meta-learning for rapid few-shot
adaptation", NeurIPS 2022): the MAML inner loop (optionally preconditioned) plus a meta-objective term
that rewards a well-conditioned inner problem:

    phi <- phi - alpha * P grad L(phi; D_trn),
    meta-loss = L(phi_K; D_val) + lambda * Var_i[ log lambda_i(P^1/2 G P^1/2) ],
    G = J^T H_l J   (Gauss-Newton approximation of the support loss's Hessian at phi_0),

where J is the Jacobian of the support outputs w.r.t. the constrained parameters and H_l the Hessian of
the loss w.r.t. the outputs (MSE: 2/(N*out) I; cross-entropy: (diag(p) - p p^T)/N per point). The
variance of the log-eigenvalues (their spread) is zero iff the preconditioned curvature is perfectly
conditioned (kappa = 1); it penalises the log condition number smoothly.

Choices:
  * computed cheaply in output space: the non-zero eigenvalues of P^1/2 J^T H_l J P^1/2 are those of the
    (N*r x N*r) matrix R^T J P J^T R with H_l = R R^T (r = out for MSE, out-1 for cross-entropy, whose
    Hessian is singular along 1), so the cost is N*out Jacobian rows, not a d x d matrix;
  * ``config.ecml.layers='last'`` (default) constrains the classifier/regression head only, which the
    ECML paper proposes for scalability (the GN of the last layer is exact and cheap: its Jacobian rows
    back-propagate through one layer); 'all' uses every parameter (N*out backward passes per task);
  * only the top min(N*r, #constrained parameters) eigenvalues are used (the rest are structurally zero)
    and a floor ``eps * max eigenvalue`` keeps the logarithm finite;
  * ``config.ecml.preconditioner='none'`` (default): ECML adds no meta-parameters (the paper: "without
    incurring extra parameters"; the learned initialisation, shaped by the penalty, is the implicit
    preconditioner); 'metasgd' adds Meta-SGD's learned diagonal P, which then enters the penalty;
  * the support labels' dtype selects the loss's Hessian (integer: cross-entropy; float: MSE).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from md_meta.geometry import Geometry
from md_meta.methods import _tensor, maml, metasgd

LOWER_LEVEL, LOSS_GEOMETRY = 'PGD', 'Gauss-Newton approximation'


def _ones_complement(n: int) -> np.ndarray:
    """An orthonormal basis (n, n-1) of the complement of the all-ones vector."""
    a = np.concatenate([np.ones((n, 1)) / np.sqrt(n), np.eye(n)[:, :n - 1]], axis=1)
    q, _ = np.linalg.qr(a)
    return q[:, 1:]


def conditioning_penalty(phi0, apply_support, support_y, layers: str = 'last', diag_p=None,
                         eps: float = 1e-6):
    """Var of the log-eigenvalues of the (preconditioned) Gauss-Newton matrix of the support loss at phi0.
    ``diag_p``: the diagonal preconditioner as a pytree like phi0 (None: identity)."""
    names = _tensor.layer_names(phi0)
    sub = names[-1:] if layers == 'last' else names
    fixed = {k: v for k, v in phi0.items() if k not in sub}
    f = lambda w: apply_support({**fixed, **w})
    w0 = {k: phi0[k] for k in sub}
    out = f(w0)
    n, o = out.shape[0], int(np.prod(out.shape[1:]))
    jac = jax.jacrev(f)(w0)
    j = jnp.concatenate([l.reshape(n * o, -1) for l in jax.tree_util.tree_leaves(jac)], axis=1)
    if diag_p is not None:
        p = jnp.concatenate([l.reshape(-1) for l in jax.tree_util.tree_leaves({k: diag_p[k] for k in sub})])
        a = (j * p) @ j.T
    else:
        a = j @ j.T
    if jnp.issubdtype(support_y.dtype, jnp.integer):
        q = jnp.asarray(_ones_complement(o), out.dtype)
        prob = jax.nn.softmax(out.reshape(n, o), -1)
        h = jax.vmap(jnp.diag)(prob) - prob[:, :, None] * prob[:, None, :]          # (n, o, o)
        hq = jnp.einsum('ca,ncd,db->nab', q, h, q) + 1e-12 * jnp.eye(o - 1, dtype=out.dtype)
        r = jnp.einsum('ca,nab->ncb', q, jnp.linalg.cholesky(hq)) / np.sqrt(n)       # (n, o, o-1)
        m = jnp.einsum('ica,icjd,jdb->iajb', r, a.reshape(n, o, n, o), r).reshape(n * (o - 1), n * (o - 1))
        rank = min(n * (o - 1), j.shape[1])
    else:
        m = a * (2.0 / (n * o))
        rank = min(n * o, j.shape[1])
    lam = jnp.linalg.eigvalsh(0.5 * (m + m.T))[-rank:]
    lam = jnp.maximum(lam, 0.0)
    log_lam = jnp.log(lam + eps * jnp.max(lam) + 1e-30)
    return jnp.var(log_lam)


def make(config) -> Geometry:
    c = config.ecml
    weight, layers, eps = float(c.penalty_weight), c.layers, float(c.eps)
    if c.preconditioner == 'metasgd':
        base = metasgd.make(config)
        diag = lambda theta: metasgd.step_sizes(theta, float(config.inner.step_size))
    else:
        base = maml.make(config)
        diag = lambda theta: None

    def penalty(theta, phi0, apply_support, support_y):
        return weight * conditioning_penalty(phi0, apply_support, support_y, layers, diag(theta), eps)

    return base._replace(penalty=penalty)


def config_section() -> ml_collections.ConfigDict:
    """config.ecml: the conditioning penalty and the optional learned preconditioner."""
    c = ml_collections.ConfigDict()
    c.penalty_weight = 0.01   # lambda: weight of the conditioning penalty in the meta-loss
    c.layers = 'last'         # parameters whose Gauss-Newton curvature is conditioned: 'last' | 'all'
    c.preconditioner = 'none'  # 'none' (no extra meta-parameters, as in ECML) | 'metasgd' (learned diagonal)
    c.eps = 1e-6              # eigenvalue floor, relative to the largest eigenvalue
    return c


def learns_step_sizes(config) -> bool:
    """With Meta-SGD's learned diagonal preconditioner, inner.step_size only initialises its steps."""
    return config.ecml.preconditioner == 'metasgd'


def validate(config, require) -> None:
    c = config.ecml
    require(c.penalty_weight >= 0, 'ecml.penalty_weight', f'must be non-negative, got {c.penalty_weight}')
    require(c.layers in ('last', 'all'), 'ecml.layers', f"must be 'last' or 'all', got {c.layers!r}")
    require(c.preconditioner in ('none', 'metasgd'), 'ecml.preconditioner',
            f"must be 'none' or 'metasgd', got {c.preconditioner!r}")
    require(0 < c.eps < 1, 'ecml.eps', f'must be in (0, 1), got {c.eps}')
    if c.preconditioner == 'metasgd':
        metasgd.validate(config, require)
