"""md_meta.host_memory: a freed large block is reused without page faults when retained."""
import os
import subprocess
import sys

import pytest

from md_meta import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, touches and frees a 256 MB block twice on the main thread (which allocates XLA:CPU's
# temporaries once retain_freed_memory() has turned async dispatch off); prints the minor page faults of
# the second round and the dispatch setting.
_SCRIPT = r'''
import ctypes, resource, sys
import jax
from md_meta import host_memory
retained = host_memory.configure(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(256 << 20)
    ctypes.memset(p, 1, 256 << 20)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(retained, faults[1], jax.config.values['jax_cpu_enable_async_dispatch'])
'''


def _second_round_faults(mode):
    out = subprocess.run([sys.executable, '-c', _SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == 'True', int(out[1]), out[2] == 'True'


@pytest.mark.skipif(host_memory._glibc() is None, reason='glibc only')
def test_retained_block_is_reused_without_page_faults():
    pages = (256 << 20) // os.sysconf('SC_PAGE_SIZE')
    retained, faults, async_dispatch = _second_round_faults('retain')
    assert retained and faults < pages // 100 and not async_dispatch
    # system: mmap + munmap, so the block faults in again (every 4 KB page, or every 2 MB one where the
    # kernel's transparent huge pages are 'always': 128 faults)
    retained, system_faults, async_dispatch = _second_round_faults('system')
    assert not retained and async_dispatch and system_faults > max(10 * faults, 64)


def test_configure_rejects_unknown_mode():
    with pytest.raises(ValueError, match='host_memory'):
        host_memory.configure('cached')
