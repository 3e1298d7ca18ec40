"""Which library multiplies fp32 matrices on the CPU: torch's default (MKL) or oneDNN.

PyTorch's x86 builds send an fp32 `F.linear` to MKL, and MKL runs its AVX2 code on AMD
processors even where they have AVX-512. oneDNN, which the same builds carry, picks its kernels
by the CPU's features instead. On an AMD EPYC with AVX-512 (2 threads) it measured 2.1-2.4x
MKL's FLOP/s on this project's forward products (64 x 512 x 2048: 287 vs 120 GFLOP/s; the
37,000-wide head: 317 vs 135) and 2-2.5x on the backward's input gradients: the same fp32
arithmetic, summed in another order (differences of a few 1e-6, relative).

The choice is made by a rule, not a timing race, so that results never depend on how busy the
machine was at start: oneDNN on AMD CPUs with AVX-512, torch's default elsewhere (MKL uses
AVX-512 on Intel's). LMFORGE_CPU_MATMUL=torch|onednn overrides it (auto: the rule).
`Linear` (lmforge.model.gpt) calls `linear` here for fp32 CPU tensors; autograd goes through
`_OneDnnLinear`, whose backward is two more oneDNN products and a sum.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from lmforge.errors import LmforgeError
from lmforge.model.hardware import cpu_fields

BACKENDS = ("auto", "torch", "onednn")


def rule_choice(vendor: str, flags: set[str]) -> str:
    return "onednn" if vendor == "AuthenticAMD" and "avx512f" in flags else "torch"


@lru_cache(maxsize=None)
def cpu_matmul_backend() -> str:
    """'onednn' or 'torch' for this process (LMFORGE_CPU_MATMUL, else the rule above)."""
    asked = os.environ.get("LMFORGE_CPU_MATMUL", "auto").strip().lower() or "auto"
    if asked not in BACKENDS:
        raise LmforgeError(f"LMFORGE_CPU_MATMUL={asked!r}: give one of {', '.join(BACKENDS)}")
    available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if asked == "onednn" and not available:
        raise LmforgeError("LMFORGE_CPU_MATMUL=onednn: this PyTorch build has no oneDNN linear kernel")
    if asked == "auto":
        cpu = cpu_fields()
        return rule_choice(cpu.get("vendor_id", ""), set(cpu.get("flags", "").split())) if available else "torch"
    return asked


def _product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T (+ b), by oneDNN; w may be a strided view (a transpose)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        # What backward needs, as F.linear keeps: x for the weight's gradient, w for the input's
        # (a frozen base layer under LoRA keeps no activation here).
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_w else None, w if need_x else None)
        ctx.has_bias = b is not None
        return _product(x, w, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors  # x [rows, in]
        g = grad
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # grad @ w, as a linear whose weight is w^T
            gx = _product(g, w.t(), None)
        if ctx.needs_input_grad[1]:  # grad^T @ x, as a linear whose weight is x^T
            gw = _product(g.t(), x.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear` takes this product: plain fp32 CPU tensors (no subclass such as FSDP's
    DTensor, nothing being traced by torch.compile, no bf16 autocast asked for) when oneDNN is
    the backend."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and type(x) in _PLAIN and type(w) in _PLAIN and x.layout == torch.strided
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and cpu_matmul_backend() == "onednn")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, w, b) through oneDNN (call where `applies`)."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        # 2-D through the Function, reshaped outside it: its output is then no view, which
        # callers may update in place (LoRA adds its low-rank term into the base's output).
        y = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]), w, b)
        return y.view(*x.shape[:-1], w.shape[0])
    return _product(x, w, b)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for 2-D tensors (into `out` if given) by the library `Linear` uses: for products
    outside a Linear (the chunked head's loss) and for what a measured matmul peak (MFU's
    denominator, the speed model's efficiency) must time."""
    if applies(a, b):
        y = _product(a, b.t(), None)
        return y if out is None else out.copy_(y)
    return a @ b if out is None else torch.mm(a, b, out=out)
