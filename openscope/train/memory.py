"""The process's memory policy for training on the CPU: keep freed memory for reuse.

PyTorch's CPU tensors come from the C library's `malloc`, which hands blocks above a threshold (at most
32 MB) to the kernel on every free and maps fresh pages on every allocation, and returns the top of its
heap once enough is free there. A training step allocates and frees the same blocks every step, so each
step pays the kernel once per 4 kB page again. A cross-layer transcoder's step holds [L, B, d] blocks
(189 MB at 18 layers of Gemma 3 270M and B 4096) and 2 GB of per-target blocks: measured on a 2-core
virtual machine, 800k page faults a step and 11 s of its 20 s in the kernel; with the policy below, none
after the first step (`benchmarks/bench_clt_speed.py`).

`keep_freed_memory` tells glibc's allocator to serve every block from its heap (no per-block maps) and
never to give the heap back. The process's resident memory then stays at its peak, which a training run
reaches in its first step anyway. Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
"""mallopt parameter: free bytes at the heap's top before they are returned (-1: never)."""
_M_MMAP_MAX = -4
"""mallopt parameter: how many blocks may be served by their own maps (0: none)."""


def keep_freed_memory(device: str = "cpu") -> bool:
    """For training on `device`: on the CPU, make glibc keep freed memory in the process for reuse (once per
    process); True where the policy applies. Other devices have their own allocators: nothing to do."""
    return device == "cpu" and _keep_freed_memory()


@functools.cache
def _keep_freed_memory() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_version = libc.gnu_get_libc_version  # glibc only: musl has a mallopt that does nothing
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    gnu_version.restype = ctypes.c_char_p
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
    log.debug("glibc %s: keep freed memory %s", gnu_version().decode(), "on" if applied else "refused")
    return applied
