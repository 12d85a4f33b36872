"""Keeping freed host memory mapped between XLA:CPU executions (Linux with glibc).

XLA:CPU allocates each execution's temporaries (one block, several GB for a second-order CNN4
meta-step: 4.2 GB for WarpGrad on benchmark shape (c)) with malloc and frees them when the execution
ends. glibc serves a block that large with mmap and returns it with munmap, so every meta-step
faults its temporaries in again, a page at a time, and the kernel zeroes each page: about a million
minor page faults per step on shape (c), about a third of the step's CPU time (docs/benchmarks.md).

``retain_freed_memory()`` tells glibc to serve large blocks from its main heap (no mmap) and never to
give the heap's free top back to the kernel, so the next step reuses the same pages; and it turns off
JAX's asynchronous CPU dispatch, so that the calling (main) thread, which allocates from that heap,
allocates the temporaries. (Another thread's arena cannot hold a block over 64 MB and falls back to
mmap; one arena for every thread, glibc's other way, measured 20-40% slower: the threads contend for
its lock.) The process's resident memory stays at its peak, which a meta-training loop reaches every
step anyway. Call it before the first JAX computation (the CPU client reads the dispatch setting when
it starts). The entry points call it (``--host_memory=retain``, the default); so does tests/conftest.py.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import warnings

HOST_MEMORY_MODES = ('retain', 'system')

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _glibc():
    """The C library if it is glibc (it has gnu_get_libc_version), else None (macOS, musl, Windows)."""
    name = ctypes.util.find_library('c')
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 -- raises AttributeError outside glibc
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def _jax_backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def retain_freed_memory() -> bool:
    """mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, SIZE_MAX) and ``jax_cpu_enable_async_dispatch=False``:
    freed host memory stays mapped for the next execution. Returns whether glibc accepted both (False,
    and nothing changed, where the C library is not glibc). Warns if JAX's backends are already up: the
    CPU client has then read the dispatch setting, and its threads would still allocate the temporaries."""
    libc = _glibc()
    if libc is None:
        return False
    if _jax_backends_initialized():
        warnings.warn('md_meta.host_memory.retain_freed_memory() was called after the first JAX computation, '
                      'so it may not take effect; call it first.', RuntimeWarning, stacklevel=2)
    import jax
    jax.config.update('jax_cpu_enable_async_dispatch', False)
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1  # the int -1 is SIZE_MAX as glibc's size_t
    return bool(ok)


def configure(mode: str) -> bool:
    """``'retain'``: ``retain_freed_memory()``; ``'system'``: leave malloc as it is. Returns whether the
    memory is retained."""
    if mode not in HOST_MEMORY_MODES:
        raise ValueError(f'host_memory must be one of {HOST_MEMORY_MODES}, got {mode!r}')
    return retain_freed_memory() if mode == 'retain' else False
