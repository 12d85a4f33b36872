"""The method registry: ``--config.method=NAME`` picks one ``Geometry`` factory ``make(config)``."""
from __future__ import annotations

import importlib

from md_meta.geometry import Geometry

# name -> module in md_meta.methods exposing make(config) -> Geometry
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
    return importlib.import_module(f'md_meta.methods.{_MODULES[config.method]}').make(config)
