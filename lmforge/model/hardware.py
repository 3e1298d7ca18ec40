"""What a machine offers a model: memory, matmul FLOP/s, memory bandwidth — measured on this
machine, from the datasheet for a named GPU.

The GPU figures are the vendors' dense (no sparsity) peaks: bf16 tensor-core FLOP/s with fp32
accumulation, which is what torch's bf16 autocast runs, or fp32 where the card has no bf16 (T4:
lmforge trains there in fp32, `runtime.resolve_precision`). A datasheet peak is never reached;
`lmforge.model.speed` applies the efficiencies it states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache

from lmforge.errors import LmforgeError

GB = 10**9


@dataclass(frozen=True)
class Hardware:
    name: str
    kind: str  # "cpu" or "gpu"
    memory_bytes: int  # what a model may use: available RAM here, the card's memory for a GPU
    peak_flops: float  # dense matmul FLOP/s in the precision lmforge trains in there
    bandwidth: float  # bytes/s read from memory
    source: str  # where the figures come from
    precision: str = "fp32"  # what lmforge trains in on it
    # bytes/s read + written by an elementwise op into a fresh tensor (what activations, norms and
    # softmaxes do); 0 = the read bandwidth
    elementwise_bandwidth: float = 0.0

    def describe(self) -> str:
        ew = f", elementwise {self.elementwise_bandwidth / GB:.0f} GB/s" if self.elementwise_bandwidth else ""
        return (f"{self.name}: {self.memory_bytes / 2**30:.1f} GiB, {self.peak_flops / 1e12:.3g} TFLOP/s "
                f"{self.precision}, {self.bandwidth / GB:.0f} GB/s{ew} ({self.source})")


def _gpu(name: str, memory_gb: float, tflops: float, bandwidth_gb_s: float, source: str,
         precision: str = "bf16") -> Hardware:
    return Hardware(name, "gpu", int(memory_gb * GB), tflops * 1e12, bandwidth_gb_s * GB, source, precision)


GPUS: dict[str, Hardware] = {g.name: g for g in (
    _gpu("h200", 141, 989, 4800, "NVIDIA H200 datasheet (SXM)"),
    _gpu("h100", 80, 989, 3350, "NVIDIA H100 datasheet (SXM5)"),
    _gpu("h100-pcie", 80, 756, 2000, "NVIDIA H100 datasheet (PCIe)"),
    _gpu("a100-80gb", 80, 312, 2039, "NVIDIA A100 datasheet (SXM4 80GB)"),
    _gpu("a100-40gb", 40, 312, 1555, "NVIDIA A100 datasheet (40GB)"),
    _gpu("l4", 24, 121, 300, "NVIDIA L4 datasheet (242 TFLOP/s is with sparsity)"),
    _gpu("rtx-4090", 24, 165.2, 1008, "NVIDIA Ada whitepaper (bf16, fp32 accumulate)"),
    _gpu("rtx-3090", 24, 35.6, 936, "NVIDIA Ampere GA102 whitepaper (bf16, fp32 accumulate)"),
    _gpu("t4", 16, 8.1, 320, "NVIDIA T4 datasheet (fp32: no bf16 on Turing)", precision="fp32"),
)}


def gpu(name: str) -> Hardware:
    """A named GPU's datasheet figures, or a one-line error listing the names known."""
    key = name.strip().lower().replace(" ", "-")
    if key not in GPUS:
        raise LmforgeError(f"--gpu {name!r}: not a GPU lmforge knows; known: {', '.join(GPUS)}")
    return GPUS[key]


@cache
def measured_bandwidth() -> float:
    """Bytes/s this machine reads from memory now: the best of a few sums over 256 MiB (far past
    any cache), on torch's threads."""
    import torch

    x = torch.ones(64 * 2**20, dtype=torch.float32)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


# The rate at which the non-matmul part of a training step moves its bytes (norms, activations,
# softmaxes, the loss, the optimizer), as a share of the read bandwidth: fitted to the training steps
# bench/bench_estimate.py measures here (five configs from 4.5M to 135M parameters: 5.1, 10.0,
# 10.7, 11.4 and 13.1 GB/s against ~48 GB/s of reads; the median is 0.22 of it). Timing such ops
# directly swung 4-18 GB/s between processes with the allocator's and the threads' state.
ELEMENTWISE_SHARE = 0.22


@cache
def cpu_fields() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("vendor_id", "model name", "flags", ...);
    empty where there is no such file (macOS, Windows)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def this_machine() -> Hardware:
    """This machine's CPU as lmforge uses it: the matmul peak and read bandwidth measured now (a
    busy machine measures slower, as it would run slower), the memory the OS calls available."""
    import torch

    from lmforge.runtime import available_memory_bytes, measured_peak_flops

    threads = torch.get_num_threads()
    bandwidth = measured_bandwidth()
    return Hardware(f"this machine (cpu, {threads} threads)", "cpu", available_memory_bytes(torch.device("cpu")),
                    measured_peak_flops("cpu", "fp32"), bandwidth, "measured now",
                    elementwise_bandwidth=ELEMENTWISE_SHARE * bandwidth)


def target(gpu_name: str | None) -> Hardware:
    return gpu(gpu_name) if gpu_name else this_machine()
