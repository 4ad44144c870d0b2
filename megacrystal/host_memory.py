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


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Tune glibc malloc for this process; return whether it was tuned (False off glibc or when opted out)."""
    if os.environ.get("MEGACRYSTAL_SYSTEM_MALLOC") == "1":
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; both settings hold for every arena from now on.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> None:
    """Hand the freed pages of every malloc arena back to the kernel (glibc's malloc_trim; elsewhere nothing).

    A long streaming pass with several threads otherwise keeps its high-water mark plus fragmentation: each
    thread allocates from its own arena, and documents of very different sizes leave holes there.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        trim(0)
