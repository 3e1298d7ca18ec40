"""Where and how computation runs: device choice, precision, measured peak FLOP/s, free memory."""

from __future__ import annotations

import contextlib
import time
from functools import lru_cache

import torch

from lmforge.errors import LmforgeError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmforgeError(f"--device {name!r} is not a device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' means bf16 autocast on GPUs that support it; CPUs train in fp32 (bf16 matmuls on CPUs
    without AMX are slower than fp32, and fp32 makes runs exactly reproducible)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LmforgeError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@lru_cache(maxsize=None)
def measured_peak_flops(device_str: str, precision: str) -> float:
    """Dense matmul FLOP/s this device reaches now (the denominator of MFU): a measured peak is
    honest on CPUs, whose datasheet peak depends on clocks, vector units and thread count."""
    from lmforge.model.cpu_matmul import mm  # the library the model's Linear layers use

    device = torch.device(device_str)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # A private generator: measuring must not move the global RNG that seeds training.
    gen = torch.Generator(device=device).manual_seed(0)
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        best, spent = float("inf"), 0.0
        # The best of several (a busy neighbour only ever makes a run slower): 8, or 3 once they
        # take 0.3 s, since every pretrain/finetune start pays for this (2.5 s of 8 at 2048 on one core).
        for rep in range(8):
            if rep >= 3 and spent > 0.3:
                break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            took = time.perf_counter() - t
            best, spent = min(best, took), spent + took
        # Grow to a size big enough to reach the peak (2048 on CPUs, 8192 on GPUs), but stop
        # once one product takes 50 ms: a CPU without bf16 units emulates it ~100x slower, and
        # measuring at full size would take minutes there.
        if n >= (2048 if device.type == "cpu" else 8192) or best > 0.05:
            return 2 * n**3 / best
        n *= 2


def available_memory_bytes(device: torch.device) -> int:
    """Bytes that can be allocated without swapping: free GPU memory, or what the OS reports as
    available (psutil: MemAvailable on Linux, free + inactive pages on macOS, the available
    physical memory on Windows)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        import psutil
    except ImportError:
        raise LmforgeError("cannot tell how much memory is free: psutil is missing (pip install psutil)") from None
    return int(psutil.virtual_memory().available)


@contextlib.contextmanager
def inference_backend(model: torch.nn.Module, backend: str, switch_layers: bool = True):
    """Run inference matmuls through numpy's BLAS ('numpy') or torch ('torch').

    With 'numpy', torch drops to one thread meanwhile: numpy's BLAS keeps its own threads busy,
    and torch's OpenMP workers spinning beside them on the same cores made decoding 5x slower.
    switch_layers=False leaves the Linear layers on torch (for the NumpyDecoder, which never
    calls them).
    """
    if backend != "numpy":
        yield
        return
    from lmforge.model.gpt import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)] if switch_layers else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A plain bool attribute: object.__setattr__ skips nn.Module's parameter/module bookkeeping,
    # which cost ~8 us per layer, 3 ms per SmolLM2 step for the two flips.
    for m in layers:
        object.__setattr__(m, "numpy_blas", True)
    try:
        yield
    finally:
        for m in layers:
            object.__setattr__(m, "numpy_blas", False)
        torch.set_num_threads(threads)
