"""Loading the authors' PyTorch code (github.com/zhangyilang/MetaMirrorDescent, never part of md-meta) from a
checkout, for the two tools that run it: ``experiments.studies.crosscheck_reference`` (the maths) and
``experiments.studies.authors_yardstick`` (the speed). Needs a Python with torch and torchmeta (see
``experiments.studies.crosscheck_reference``); only torchmeta's ``modules`` and ``utils.gradient_based`` are loaded, and
the authors' training base class (data loaders) is replaced by a bare ``args`` holder."""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types


class ReferenceUnavailable(RuntimeError):
    """torch, torchmeta or the authors' checkout cannot be loaded; the message says which."""


@functools.lru_cache(maxsize=None)
def load_reference(reference_dir: str):
    """The authors' modules: (torch, models, meta_mirror_descent, meta_curvature, meta_sgd)."""
    try:
        import torch
    except ImportError as e:
        raise ReferenceUnavailable(f'torch is not importable from {sys.executable} ({e}); '
                                   'install it in a separate environment') from None
    if not reference_dir or not os.path.isfile(os.path.join(reference_dir, 'src', 'meta_mirror_descent.py')):
        raise ReferenceUnavailable(f'--reference_dir={reference_dir!r} is not a checkout of '
                                   'github.com/zhangyilang/MetaMirrorDescent (no src/meta_mirror_descent.py)')
    spec = importlib.util.find_spec('torchmeta')
    if spec is None:
        raise ReferenceUnavailable('torchmeta is not importable; pip install --no-deps torchmeta')
    root = list(spec.submodule_search_locations)[0]
    if 'torchmeta' not in sys.modules:  # its __init__ imports torchvision and the data sets: load parts only
        pkg = types.ModuleType('torchmeta')
        pkg.__path__ = [root]
        sys.modules['torchmeta'] = pkg
        utils = types.ModuleType('torchmeta.utils')
        utils.__path__ = [os.path.join(root, 'utils')]
        sys.modules['torchmeta.utils'] = utils
        import torchmeta.modules  # noqa: F401
        from torchmeta.utils.gradient_based import gradient_update_parameters
        utils.gradient_update_parameters = gradient_update_parameters

    class MetaLearningAlgBase:  # the authors' base class builds data loaders; adapt() needs only these fields
        def __init__(self, args):
            self.args = args

    base = types.ModuleType('src.meta_alg_base')
    base.MetaLearningAlgBase = MetaLearningAlgBase
    sys.modules['src.meta_alg_base'] = base
    if reference_dir not in sys.path:
        sys.path.insert(0, reference_dir)
    import src.meta_curvature as mc
    import src.meta_mirror_descent as md
    import src.meta_sgd as msgd
    import src.models as models
    return torch, models, md, mc, msgd
