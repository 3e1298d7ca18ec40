"""The process's memory allocators, tuned for training: opt-in, never as a side effect of `import lmforge`.

Torch-free on purpose: `use_huge_pages` must run before torch is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator

from lmforge.errors import LmforgeError

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Put PyTorch's CPU tensors of >= 2 MB on transparent huge pages (THP_MEM_ALLOC_ENABLE=1).

    Measured on LoRA fine-tuning of SmolLM2-135M (seq 512, batch 4): peak RSS 3.5 GB -> 2.1 GB at
    the same speed, because glibc's heap otherwise keeps the holes left by recomputed
    activations. The `lmforge` command calls this for its own process; a library user calls it
    first thing, before torch is imported (torch reads the variable once). A value already in
    the environment wins (THP_MEM_ALLOC_ENABLE=0 keeps huge pages off). Returns whether they are on.
    """
    if THP_VARIABLE not in os.environ:
        if "torch" in sys.modules:
            raise LmforgeError(f"use_huge_pages() must be called before torch is imported (it is already); "
                               f"call it first, or set {THP_VARIABLE}=1 before starting Python")
        os.environ[THP_VARIABLE] = "1"
    return os.environ[THP_VARIABLE] == "1"


# glibc mallopt parameters (malloc.h) and their defaults (mallopt(3)): 128 KiB each.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
GLIBC_DEFAULT_TRIM_THRESHOLD = 128 << 10
GLIBC_DEFAULT_MMAP_THRESHOLD = 128 << 10

_lock = threading.Lock()
_depth = 0  # nested or concurrent trainings: the outermost sets, the last to leave restores


def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _set(libc, mmap_threshold: int, trim_threshold: int) -> bool:
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@contextlib.contextmanager
def keep_freed_heap_pages(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> Iterator[bool]:
    """While inside: glibc keeps the heap's freed top mapped instead of returning it after every step.

    A training step frees all its activations at once; with glibc's defaults the heap top beyond
    2x the (adaptive) mmap threshold, a few MB, is returned to the kernel, and the next step
    page-faults the same memory back in: ~1,000 faults per step on the nanoGPT CPU benchmark,
    ~6% of its step time. Inside, buffers under `mmap_threshold` come from the heap and up to
    `trim_threshold` bytes of free heap stay mapped. Yields False where the C library is not
    glibc (nothing to tune there), else True.

    On leaving, both thresholds go back to glibc's default values (128 KiB). mallopt cannot give
    back glibc's *dynamic* mmap threshold (which grows as large blocks are freed): after the
    block the thresholds stay fixed at 128 KiB, as mallopt(3) documents for any explicit setting.
    """
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        ok = _set(libc, mmap_threshold, trim_threshold) if _depth == 0 else True
        _depth += 1
    try:
        yield ok
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, GLIBC_DEFAULT_MMAP_THRESHOLD, GLIBC_DEFAULT_TRIM_THRESHOLD)
