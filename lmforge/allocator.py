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
def heap_settings(mmap_threshold: int, trim_threshold: int) -> Iterator[bool]:
    """While inside: glibc serves buffers of >= `mmap_threshold` bytes with their own mapping
    (returned to the kernel when freed) and keeps up to `trim_threshold` bytes of free heap top
    mapped. Yields False where the C library is not glibc (nothing to tune there), else True.

    On leaving, both thresholds go back to glibc's default values (128 KiB). mallopt cannot give
    back glibc's *dynamic* mmap threshold (which grows as large blocks are freed): after the
    block the thresholds stay fixed at 128 KiB, as mallopt(3) documents for any explicit setting.
    Nested or concurrent blocks: the outermost one's settings hold until the last one leaves.
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


def keep_freed_heap_pages(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20):
    """Training's fast setting (`--heap keep`): freed activations stay mapped for the next step.

    A training step frees all its activations at once; with glibc's defaults the heap top beyond
    2x the (adaptive) mmap threshold, a few MB, is returned to the kernel, and the next step
    page-faults the same memory back in: ~1,000 faults per step on the nanoGPT CPU benchmark,
    ~6% of its step time. Here buffers under 32 MB come from the heap and up to 64 MB of free
    heap top stays mapped. The price is fragmentation: the heap's holes between the activations a
    step keeps for backward count as resident, and grow with varying shapes.
    """
    return heap_settings(mmap_threshold, trim_threshold)


def release_freed_buffers(mmap_threshold: int = 1 << 20, trim_threshold: int = 64 << 20):
    """`--heap release`: every buffer of >= 1 MB gets its own mapping, returned when freed, so that
    resident memory is what is live and nothing more (fine-tuning's default is `pool`, as lean at
    full speed: lmforge.train.saved_pool).

    Measured on LoRA fine-tuning of SmolLM2-135M (bench/bench_finetune.py --part peer: 16 chats x 60
    tokens, batch 16): peak RSS 3.47 GB with the heap kept (it grows over the first steps as
    holes open between the activations a step keeps) -> 2.15 GB, flat from step to step; but
    223.5 -> 164.6 tokens/s, the kernel zeroing and mapping ~2.5 GB of pages again every step.
    """
    return heap_settings(mmap_threshold, trim_threshold)


# "pool": the heap kept as for "keep"; the Trainer moves saved activations out of it
# (lmforge.train.saved_pool) and trims it after every step.
HEAP_POLICIES = {"keep": keep_freed_heap_pages, "release": release_freed_buffers, "pool": keep_freed_heap_pages}


def trim_heap() -> bool:
    """Return the heap's free pages to the kernel now (glibc's malloc_trim(0)); False where the C
    library is not glibc. Free chunks in the middle of the heap go too, not only its top."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
