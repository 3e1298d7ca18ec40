"""Reference points a trained model must beat."""

from __future__ import annotations

import math

import numpy as np

from lmforge.data.loader import Split


def _counts(split: Split, vocab_size: int, max_tokens: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.float64)
    left = max_tokens
    for shard in split.shards:
        take = np.asarray(shard[: min(len(shard), left)])
        counts += np.bincount(take, minlength=vocab_size)[:vocab_size]
        left -= len(take)
        if left <= 0:
            break
    return counts


def unigram_cross_entropy(train: Split, val: Split, vocab_size: int, max_tokens: int = 20_000_000) -> float:
    """Cross-entropy (nats/token) on val of the unigram model fitted on train, add-one smoothed:
    the loss of a model that ignores context. Pretraining must fall clearly below it."""
    p = _counts(train, vocab_size, max_tokens) + 1.0
    p /= p.sum()
    q = _counts(val, vocab_size, max_tokens)
    return float(-(q * np.log(p)).sum() / q.sum())


def uniform_cross_entropy(vocab_size: int) -> float:
    """What an untrained model scores: log(V)."""
    return math.log(vocab_size)
