"""glibc malloc settings per command: training keeps freed memory, a streaming `prepare` hands it back.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps them on free.
A CPU training step allocates and frees the same large tensors every time (logits, attention scores,
activations), so each step page-faults hundreds of MB back in: measured at the small shape, a quarter of the
step went to the kernel zeroing pages. With mmap off for malloc and trimming off, freed blocks are reused
(what jemalloc/tcmalloc do, without preloading a library). `prepare` wants the opposite (see
bound_retained_memory). Set MEGACRYSTAL_SYSTEM_MALLOC=1 to keep glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_STREAM_BLOCK = 16 << 20


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



def bound_retained_memory() -> bool:
    """For long streaming passes (`prepare`): blocks above 16 MiB come from mmap and go back on free, and a heap
    top with over 16 MiB free is trimmed; return whether it was set (False off glibc).

    sentencepiece needs ~50 bytes per character while it encodes one document, so a multi-MB source file
    briefly takes hundreds of MB. glibc's default raises its mmap threshold after such a block is freed, so
    later ones land in the thread arenas and stay there: peak memory crept up with the input's length
    (measured in docs/benchmarks/README.md). Fixed thresholds keep it flat at the same speed.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None or os.environ.get("MEGACRYSTAL_SYSTEM_MALLOC") == "1":
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _STREAM_BLOCK)) and bool(mallopt(_M_TRIM_THRESHOLD, _STREAM_BLOCK))
