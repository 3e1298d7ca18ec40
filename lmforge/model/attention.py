"""Causal self-attention kernels: PyTorch's SDPA, and a batched-matmul one for short CPU sequences.

SDPA's CPU kernel is a blocked flash attention built for long sequences. At nanoGPT's CPU
shapes (12 rows x 4 heads x 64 positions) its tiling overhead dominates: forward + backward of
one layer took 2.1-3.0 ms, while three batched matmuls and a softmax, with a hand-written
backward, take 1.4-2.1 ms (same machine, same run). From 256 positions on they tie, and at 512
the stored probabilities ([B, heads, T, T]) cost more than they save, so the batched-matmul path
is only taken for fp32 CPU tensors of at most SHORT_SEQUENCE positions.
"""

from __future__ import annotations

import math

import torch

SHORT_SEQUENCE = 128


class _ShortCausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale + causal mask) v, keeping the probabilities for backward.

    q [N, G*T, D]: the G query heads that share one kv head stacked along the sequence, so one
    product serves the whole group (grouped-query attention without repeating k and v);
    k, v [N, T, D]. The mask repeats the causal [T, T] pattern G times down the rows.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        T = k.shape[1]
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        if q.shape[1] != T:
            mask = mask.repeat(q.shape[1] // T, 1)
        probs = torch.softmax(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale), dim=-1)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return torch.bmm(probs, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
        grad_probs = torch.bmm(grad_out, v.transpose(1, 2))
        # The softmax Jacobian in one kernel: probs * (grad_probs - rowsum(grad_probs * probs)).
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None


def short_kernel_applies(seq_len: int, *, cpu: bool, fp32: bool, dropout: float) -> bool:
    """The rule for when `short_causal_attention` replaces SDPA (the memory estimate uses it too)."""
    return cpu and fp32 and seq_len <= SHORT_SEQUENCE and dropout == 0.0


def uses_short_kernel(q: torch.Tensor, dropout: float) -> bool:
    """Whether causal attention for queries q [B, H, T, D] takes `short_causal_attention`."""
    return short_kernel_applies(q.shape[2], cpu=q.device.type == "cpu", fp32=q.dtype == torch.float32, dropout=dropout)


def short_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention for `uses_short_kernel` inputs: q [B, H, T, D], k and v [B, Hkv, T, D],
    H a multiple of Hkv (query head h reads kv head h // (H / Hkv), as SDPA's enable_gqa does)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    out = _ShortCausalAttention.apply(q.reshape(B * Hkv, (H // Hkv) * T, D), k.reshape(B * Hkv, T, D),
                                      v.reshape(B * Hkv, T, D), 1.0 / math.sqrt(D))
    return out.view(B, H, T, D)
