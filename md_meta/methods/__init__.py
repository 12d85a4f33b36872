"""The method registry: ``--config.method=NAME`` picks one ``Geometry`` factory ``make(config)``."""
from __future__ import annotations

import importlib

from md_meta.geometry import Geometry

# name -> module exposing make(config) -> Geometry: a module of md_meta.methods, or a dotted path to any module
_MODULES = {
    'maml': 'maml',
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


def make_geometry(config) -> Geometry:
    if config.method not in _MODULES:
        raise ValueError(f'unknown method {config.method!r}; choose from {names()}')
    module = _MODULES[config.method]
    return importlib.import_module(module if '.' in module else f'md_meta.methods.{module}').make(config)
