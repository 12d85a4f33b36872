"""The method registry: ``--config.method=NAME`` picks one module with ``make(config) -> Geometry``.

A method module may also define ``LOWER_LEVEL`` and ``LOSS_GEOMETRY`` (its row of the paper's Table 1,
shown by ``experiments.report``), ``config_section()`` (its knobs with their defaults: config.<name>, which
``config.base_config`` assembles from the registry), ``validate(config, require)`` for that section
(``require(condition, field, message)`` raises the one-line ConfigError) and ``learns_step_sizes(config)``
(True where inner.step_size only initialises meta-learned step sizes, so that evaluation may not change it).
Shared code asks these, never a method's name."""
from __future__ import annotations

import importlib
from types import ModuleType

from md_meta.geometry import Geometry

# name -> module exposing make(config) -> Geometry: a module of md_meta.methods, or a dotted path to any module
_MODULES = {
    'maml': 'maml',
    'anil': 'anil',
    'metasgd': 'metasgd',
    'tnet': 'tnet',
    'mtnet': 'mtnet',
    'warpgrad': 'warpgrad',
    'metacurvature': 'metacurvature',
    'metakfo': 'metakfo',
    'ecml': 'ecml',
    'md': 'md',
}


def names() -> tuple:
    return tuple(_MODULES)


def module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f'unknown method {name!r}; choose from {names()}')
    path = _MODULES[name]
    return importlib.import_module(path if '.' in path else f'md_meta.methods.{path}')


def config_sections() -> dict:
    """{name: config section} of the methods whose module has ``config_section()``, in the registry's order."""
    modules = {name: module(name) for name in names()}
    return {name: m.config_section() for name, m in modules.items() if hasattr(m, 'config_section')}


def make_geometry(config) -> Geometry:
    return module(config.method).make(config)


def describe(name: str) -> tuple:
    """(lower-level optimizer, loss-geometry model) of the method, '?' where its module does not say."""
    if name not in _MODULES:
        return '?', '?'
    m = module(name)
    return getattr(m, 'LOWER_LEVEL', '?'), getattr(m, 'LOSS_GEOMETRY', '?')


def learns_step_sizes(config) -> bool:
    """Whether the chosen method meta-learns its inner step sizes (its module's ``learns_step_sizes``)."""
    return bool(getattr(module(config.method), 'learns_step_sizes', lambda c: False)(config))


def validate(config, require) -> None:
    """The chosen method's own checks of its config section, if it has any."""
    check = getattr(module(config.method), 'validate', None)
    if check is not None:
        check(config, require)
