"""keep_freed_heap_pages: measured by its effect, page faults, in fresh processes (the setting is
process-wide, so the pytest process itself cannot hold a clean before and after): inside the
block freed pages stay mapped, after it glibc returns them again."""

import json
import platform
import subprocess
import sys

import pytest

# A training step's pattern: several buffers of a few MB allocated, written, then all freed.
CHILD = """
import json, resource, sys
import contextlib
from lmforge.allocator import keep_freed_heap_pages
def step():
    bufs = [bytearray(3 << 20) for _ in range(6)]  # 18 MB, zero-filled: every page touched
    del bufs
def faults():
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
if sys.argv[1] == "after":
    with keep_freed_heap_pages() as kept:
        assert kept
        step()
with keep_freed_heap_pages() if sys.argv[1] == "keep" else contextlib.nullcontext(True) as kept:
    assert kept
    print(json.dumps(faults()))
"""


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_heap_pages_are_not_faulted_back_in():
    default, kept, after = _faults_per_step("default"), _faults_per_step("keep"), _faults_per_step("after")
    # glibc's defaults return the freed 18 MB and fault ~4,600 pages back in per step.
    assert default > 1000, default
    assert kept < default / 20, (kept, default)
    # Scoped: once the block is left, the process's allocator returns freed memory again.
    assert after > 1000, after


# The other policy: a live buffer among freed ones; with the heap kept, the freed ones stay resident.
RELEASE_CHILD = """
import json, sys
import psutil
from lmforge.allocator import HEAP_POLICIES
with HEAP_POLICIES[sys.argv[1]]():
    bufs = [bytearray(4 << 20) for _ in range(50)]  # 200 MB, every page touched
    keep = bufs[-1]  # the last one stays alive, above the others in the heap
    del bufs
    print(json.dumps(psutil.Process().memory_info().rss / 2**20))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_release_returns_freed_buffers_to_the_system():
    rss = {mode: json.loads(subprocess.run([sys.executable, "-c", RELEASE_CHILD, mode], capture_output=True, text=True,
                                           check=True).stdout) for mode in ("keep", "release")}
    # keep: the 196 MB freed below the live buffer stay resident; release: each went back when freed
    assert rss["keep"] - rss["release"] > 150, rss
