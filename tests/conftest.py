import os
import sys

# The suite's time is almost all XLA compilation. Tests check values, not generated code: LLVM's optimisation
# passes off (the same HLO programs and fusions) take a third off each compile. Subprocesses inherit it.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

# Many tests (and the subprocesses of the CLI tests) compile the same programs: one persistent compilation
# cache per test run, shared by the xdist workers (they inherit the controller's environment) and removed at
# its end. A cache the user set is left alone.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='md-meta-test-jit-cache-')
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

import pytest  # noqa: E402

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
