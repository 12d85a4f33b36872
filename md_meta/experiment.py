"""Building an experiment from a config: config -> (TaskSource, Geometry, Model) -> MetaLearner, with the
meta-optimizer and the task mesh (``Experiment``), and its initial state from config.seed."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from md_meta import config as config_lib
from md_meta import distributed, methods, tasks
from md_meta.inner import InnerConfig
from md_meta.meta import MetaLearner, init_meta_params, init_optimizer_state
from md_meta.networks import Model, make_model, model_from_module


class Experiment(NamedTuple):
    config: Any
    learner: MetaLearner
    optimizer: optax.GradientTransformation
    source: tasks.TaskSource
    mesh: Optional[Mesh] = None   # the task mesh (md_meta.distributed); None: one device


def make_optimizer(meta_cfg) -> optax.GradientTransformation:
    """Adam(lr), or SGD with Nesterov momentum 0.9, weight decay and x0.1 step decay (the reference's). It
    updates the meta-parameters raveled into one vector (``meta.meta_update``): its state holds one vector
    per moment."""
    if meta_cfg.optimizer == 'adam':
        return optax.adam(meta_cfg.lr)
    lr = meta_cfg.lr
    if meta_cfg.lr_decay_every:
        lr = optax.exponential_decay(meta_cfg.lr, meta_cfg.lr_decay_every, 0.1, staircase=True)
    return optax.chain(optax.add_decayed_weights(meta_cfg.weight_decay), optax.sgd(lr, momentum=0.9, nesterov=True))


def build(config, source: tasks.TaskSource | None = None, model=None, loss=None) -> Experiment:
    """Validates the config (one-line ConfigError naming the field) and builds the experiment.

    Bring your own: ``source`` a ``tasks.TaskSource`` instead of config.task; ``model`` a Flax module
    (or ``networks.Model``) mapping a batch of one task's inputs to outputs, instead of config.model;
    ``loss`` 'mse', 'xent' or a callable (outputs, targets) -> scalar instead of the source's. Methods that
    insert layers into md-meta's own networks (tnet, mtnet, warpgrad) need config.model. The device
    request (config.dist) and the global batch are checked against this machine's devices and the task
    mesh is built here, once (``Experiment.mesh``).

    Args:
      config: an ml_collections config of ``config.base_config()``'s schema.
      source, model, loss: your own task source, network and loss (optional, see above).
    Returns:
      Experiment(config, learner, optimizer, source, mesh).
    Raises:
      config.ConfigError (one line naming the field) for a bad config, data.DataError for unusable data."""
    exp = build_on_one_device(config, source, model, loss)
    return exp._replace(mesh=distributed.make_mesh(config))


def build_on_one_device(config, source=None, model=None, loss=None) -> Experiment:
    """``build`` without a mesh (``Experiment.mesh`` None): e.g. to evaluate a run whatever devices it was
    trained on (``evaluation.load_run``)."""
    config_lib.validate(config, own_source=source is not None, own_model=model is not None)
    source = source if source is not None else tasks.make_source(config)
    geometry = methods.make_geometry(config)
    if model is None:
        model = make_model(config.model.name, layer=geometry.layer, conv_impl=config.model.conv_impl,
                           hidden=tuple(config.model.hidden), out=source.out_dim, num_classes=config.task.ways,
                           features=config.model.features, init=config.model.init)
    else:
        if geometry.layer is not None:
            fit = [name for name in methods.names() if methods.module(name).make(config).layer is None]
            raise config_lib.ConfigError(
                f'config.method: {config.method!r} inserts layers into md-meta\'s networks (config.model); with '
                f'your own model use a method that does not ({", ".join(fit)})')
        model = model if isinstance(model, Model) else model_from_module(model)
    if loss is not None:
        source = source._replace(loss=loss)
    inner = InnerConfig(config.inner.steps, config.inner.first_order, config.inner.unroll, config.inner.remat)
    eval_steps = config.inner.eval_steps if config.inner.eval_steps > 0 else config.inner.steps
    eval_inner = InnerConfig(eval_steps, True, config.inner.unroll, False)
    learner = MetaLearner(geometry, model, source.loss, inner, eval_inner, config.meta.task_batching,
                          config.meta.compute_dtype, config.meta.task_gradients, config.meta.task_chunk,
                          config.model.norm_stats)
    return Experiment(config, learner, make_optimizer(config.meta), source)


def init_state(exp: Experiment):
    """The meta-parameters and the optimizer's state at the start, from config.seed.

    Returns:
      (meta, opt_state): meta = {'init': the inner loop's start (phi_0, or MD's z_0), 'geom': the method's theta,
      'net': the network's non-trained collections}; opt_state: the optimizer's state of meta raveled."""
    key = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), 1000)
    meta = init_meta_params(exp.learner, key, jnp.asarray(exp.source.example_x))
    return meta, jax.jit(functools.partial(init_optimizer_state, exp.optimizer))(meta)
