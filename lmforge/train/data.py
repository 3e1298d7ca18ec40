"""Batch sources for the Trainer. Pretraining draws random windows from token shards."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lmforge.data.loader import Split, random_batch, sequential_windows


class ShardBatches:
    """Random `block_size` windows for training; the first `eval_batches` sequential windows of
    the val split (always the same ones) for evaluation. With several ranks, `batch_size` is per
    rank: each takes its slice of the global batch, and its share of the val windows."""

    def __init__(self, train: Split, val: Split, *, batch_size: int, block_size: int, grad_accum: int,
                 seed: int, eval_batches: int, rank: int = 0, world_size: int = 1):
        self.train, self.val = train, val
        self.batch_size, self.block_size, self.grad_accum = batch_size, block_size, grad_accum
        self.seed, self.eval_batches, self.rank, self.world_size = seed, eval_batches, rank, world_size

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        arr = random_batch(self.train, self.batch_size, self.block_size, seed=self.seed,
                           step=step * self.grad_accum + micro, rank=self.rank, world_size=self.world_size)
        # Contiguous copies: sliced views make the embedding and loss kernels ~15% slower.
        return torch.from_numpy(arr[:, :-1].copy()), torch.from_numpy(arr[:, 1:].copy())

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        windows = list(sequential_windows(self.val, self.block_size, rank=self.rank, world_size=self.world_size,
                                          limit=self.eval_batches * self.batch_size * self.world_size))
        for i in range(0, len(windows), self.batch_size):
            arr = np.stack(windows[i : i + self.batch_size])
            yield torch.from_numpy(arr[:, :-1].copy()), torch.from_numpy(arr[:, 1:].copy())
