"""Training-time autograd functions that keep less for backward than autograd's own graph.

RMSNorm and SwiGLU: autograd keeps every intermediate it may need (RMSNorm its input and the
normalised input, for the weight's gradient; SwiGLU gate|up and silu(gate)). Both intermediates
are one elementwise pass away from the input, so here backward recomputes them instead. Per
SmolLM2-135M layer at 960 tokens that is 2.2 MB x 2 norms + 5.9 MB of the ~40 MB a LoRA step
keeps (~0.3 GB over the model's 30 layers). While a SavedActivationPool records
(lmforge.train.saved_pool), both also offer a recipe for their output, so an adapter that saves
it keeps the recipe instead of a copy.

The chunked linear + cross-entropy: each chunk's gradient in the same pass as its loss, so the
head's [rows, vocab] logits exist one chunk at a time and are never recomputed.

Used while autograd records (training); inference keeps the plain kernels.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lmforge.model import cpu_matmul


class RecipeBook(Protocol):
    def offer(self, out: torch.Tensor, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None: ...


class _Book(threading.local):
    current: RecipeBook | None = None


# While a training step records (lmforge.train.saved_pool), the functions below offer how to
# recompute their output from what they keep anyway: a later op that saves the output (a LoRA
# adapter saves its input) can then keep the recipe instead of a second tensor.
RECIPES = _Book()


def _offer(out: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    book = RECIPES.current
    if book is not None:
        book.offer(out, fn, inputs)
    return out


def _rms_forward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return (x * rstd).mul_(weight)


def _swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class _RMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last dimension (fp32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        # rstd = rsqrt(mean(x^2) + eps), computed by the caller without autograd: backward below
        # takes its dependence on x into account.
        ctx.save_for_backward(x, weight, rstd)
        return _rms_forward(x, weight, rstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xn = x * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * xn).reshape(-1, x.shape[-1]).sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad * weight
            # d/dx of x * rstd: rstd * (g - xn * mean(g * xn))
            grad_x = (g - xn * (g * xn).mean(-1, keepdim=True)).mul_(rstd)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        with torch.no_grad():
            rstd = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        return _offer(_RMSNorm.apply(x, weight, rstd), _rms_forward, x, weight, rstd)
    return F.rms_norm(x, weight.shape, weight, eps)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for h = [gate | up] along the last dimension."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return _swiglu_forward(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        torch.mul(grad, silu, out=grad_up)
        # silu'(g) = sig * (1 + g * (1 - sig)) = sig + silu * (1 - sig)
        torch.mul(grad * up, silu.mul_(sig.neg().add_(1)).add_(sig), out=grad_gate)
        return grad_h


def swiglu(h: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and h.requires_grad:
        return _offer(_SwiGLU.apply(h), _swiglu_forward, h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(h_i W^T, t_i) over rows that all count, chunk by chunk, with the
    gradients computed in the same pass.

    A chunk's [rows, vocab] logits live only while it is processed: their softmax, minus one at
    the target, is d(loss)/d(logits), which the chunk turns at once into its rows of dh
    (and its share of dW) and frees. Backward then only scales those. Checkpointing each chunk's
    loss instead (what the plain path does) keeps as little but computes the head and its
    log-softmax twice.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, with_grad: bool):
        need_h = with_grad and ctx.needs_input_grad[0]
        need_w = with_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            rows, t = h[i : i + chunk], targets[i : i + chunk]
            logits = cpu_matmul.mm(rows, weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                d_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                d_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                d_logits = d_logits.to(h.dtype)
                if need_h:
                    cpu_matmul.mm(d_logits, weight, out=grad_h[i : i + chunk])
                if need_w:
                    grad_w.addmm_(d_logits.t(), rows)  # in place (MKL); oneDNN would need a [vocab, C] temporary a chunk
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.have = (need_h, need_w)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        need_h, need_w = ctx.have
        grad_h = next(saved) * grad_total if need_h else None
        grad_w = next(saved) * grad_total if need_w else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy_applies(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 h and weight outside autocast: autocast does not take the out= products it fuses."""
    return h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type)


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """The summed cross-entropy of logits h @ weight^T (computed in fp32) against `targets`, every
    row counted (no -100), `chunk` rows of logits at a time; see `linear_cross_entropy_applies`."""
    if not linear_cross_entropy_applies(h, weight):
        raise ValueError(f"linear_cross_entropy_sum takes fp32 inputs outside autocast, got {h.dtype} and {weight.dtype}")
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, with_grad)
