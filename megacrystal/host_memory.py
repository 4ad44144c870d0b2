"""Keep freed host memory in the process instead of handing it back to the kernel after every step.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps them on free.
A CPU training step allocates and frees the same large tensors every time (logits, attention scores,
activations), so each step page-faults hundreds of MB back in: measured at the small shape, a quarter of the
step went to the kernel zeroing pages. With mmap off for malloc and trimming off, freed blocks are reused
(what jemalloc/tcmalloc do, without preloading a library). Set MEGACRYSTAL_SYSTEM_MALLOC=1 to keep glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tune glibc malloc for this process; return whether it was tuned (False off glibc or when opted out)."""
    if os.environ.get("MEGACRYSTAL_SYSTEM_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; both settings hold for every arena from now on.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
