"""The logits -> next-token step: repetition penalty, temperature, top-k, top-p, min-p."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.generate.params import SamplingParams

__all__ = ["SamplingParams", "apply_presence_frequency", "apply_repetition_penalty", "filter_logits", "next_tokens"]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: divide positive logits of seen tokens by `penalty`, multiply negative ones.
    `seen` is a bool [B, V] mask of tokens present in each row's text so far."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """OpenAI's penalties: logit - count * frequency_penalty - (count > 0) * presence_penalty,
    where `counts` [B, V] counts each token in the text generated so far (not the prompt)."""
    return logits - counts * p.frequency_penalty - (counts > 0).to(logits.dtype) * p.presence_penalty


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering; removed tokens get -inf. [B, V]"""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * p.min_p
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits of the last position -> [B] next token ids."""
    if p.greedy:
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax (the first maximum, as torch's) is ~10x faster than torch's on one
            # thread, which is what the Engine leaves torch during decode steps.
            return torch.from_numpy(np.argmax(logits.detach().numpy(), axis=-1))
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
