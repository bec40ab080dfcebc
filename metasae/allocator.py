"""The C allocator's settings for this process: keep freed memory for the next step.

Every training step, evaluation batch and judge token allocates the same few tensors
of a few megabytes and frees them again.  With glibc's defaults such a block is
mapped fresh from the kernel (above the dynamic mmap threshold) or handed back when
the top of the heap is trimmed, so each step pays one page fault per 4 KiB touched:
6,500 minor faults per joint step at the default shape against 1,100 for a solo one.
Serving blocks of up to 32 MiB from the heap and trimming it only above 1 GiB of free
memory removes that cost without changing a single value (the arithmetic is the same):
a joint step at the default shape went from 100 ms to 78-82 ms (1 thread, load ~1;
``benchmarks/README.md``).  The price is that a process keeps up to 1 GiB of freed
memory instead of returning it to the system.

Applied by :func:`metasae.pipeline.open_run`, the trainer and the local judge; a
no-op off glibc, or with ``METASAE_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks below this come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = 1024 * 1024 * 1024
"""Free memory at the top of the heap kept for reuse before any is returned."""

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set the two thresholds once per process; True when they are in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("METASAE_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
