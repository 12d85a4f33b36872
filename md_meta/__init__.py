"""md-meta: optimization-based meta-learning with learned loss geometries, in JAX.

The public interface, by what a user does (each a module, imported on first use: ``md_meta.experiment.build``):

    configure     config.base_config(), config.validate(config)
    build         experiment.build(config, source=None, model=None, loss=None) -> Experiment; experiment.init_state(exp)
    train         training.train(exp, workdir, ...) -> (meta_params, opt_state, metrics)
    evaluate      evaluation.evaluate(exp, meta_params, split), evaluation.load_run(workdir)
    meta-step     meta.meta_loss, meta.meta_value_and_grad, meta.make_meta_step (jit/vmap over a task batch)
    inner loop    inner.adapt(loop, support_loss, start, key, inner_config): the K steps as one lax.scan
    methods       methods.make_geometry(config), methods.names(); geometry.Geometry, geometry.InnerLoop
    the map       blockiaf (eq. 8, its inverse, its certified constants); monotonicity (Theorem 1's checks)
    data          tasks.make_source(config), md_meta.data (Omniglot, miniImageNet, tieredImageNet, CIFAR, folders)
    networks      networks.make_model(name, ...)
    runs          workdirs (config.json, locks, provenance), checkpoint, metric_writers, results
"""
import importlib

__version__ = '0.1.0'

__all__ = ('blockiaf', 'checkpoint', 'config', 'data', 'evaluation', 'experiment', 'geometry', 'inner', 'meta',
           'methods', 'metric_writers', 'monotonicity', 'networks', 'results', 'tasks', 'training', 'workdirs')


def __getattr__(name):
    """``md_meta.<module>`` for the modules of ``__all__``, imported on first use (so ``import md_meta`` stays
    cheap and imports nothing heavy)."""
    if name in __all__:
        return importlib.import_module(f'md_meta.{name}')
    raise AttributeError(f'module md_meta has no attribute {name!r}')
