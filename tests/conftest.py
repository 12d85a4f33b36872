import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
OMNIGLOT_DIR = os.path.join(SHARED, 'data', 'omniglot')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from md_meta import host_memory  # noqa: E402

host_memory.retain_freed_memory()  # as the entry points do (before any JAX computation)


@pytest.fixture
def root():
    return ROOT
