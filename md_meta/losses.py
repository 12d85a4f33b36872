"""Task losses and metrics: 'mse' for regression, 'xent' (integer labels) for classification, or your own
callable (outputs, targets) -> scalar."""
import jax.numpy as jnp
import optax


def mse(pred, y):
    """L = mean (pred - y)^2."""
    return jnp.mean(jnp.square(pred - y))


def xent(logits, labels):
    """L = mean -log softmax(logits)[label]."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits, labels):
    return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


LOSSES = {'mse': mse, 'xent': xent}


def get(name):
    """The loss function of a name in LOSSES, or ``name`` itself when it is a callable (outputs, y) -> scalar."""
    if callable(name):
        return name
    if name not in LOSSES:
        raise ValueError(f'loss must be one of {tuple(LOSSES)} or a callable (outputs, targets) -> scalar, '
                         f'got {name!r}')
    return LOSSES[name]


def metrics(name, outputs, y):
    """Per-task metrics on query outputs: always 'loss'; 'accuracy' for classification ('xent')."""
    out = {'loss': get(name)(outputs, y)}
    if name == 'xent':
        out['accuracy'] = accuracy(outputs, y)
    return out
