import os
import sys

# The suite's time is almost all XLA compilation. Tests check values, not generated code: LLVM's optimisation
# passes off (the same HLO programs and fusions) take a third off each compile, and XLA:CPU's loop emitters
# instead of its newer fusion emitters (other fusions, the same values to rounding) take more than half off
# what is left (a CNN4 meta-gradient: MAML 8.6 -> 3.6 s, MD 20.3 -> 8.2 s). Subprocesses inherit both; a flag
# the user set is left alone.
for _flag in ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false'):
    if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()

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
