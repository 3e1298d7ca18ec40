"""A training step's saved activations in one buffer, reused every step (`--heap pool`).

What a step keeps for backward is allocated op by op between the step's short-lived buffers, so
glibc's heap ends up with holes between them; the holes count as resident, and they grow over
the first steps as the layout shifts (LoRA on SmolLM2-135M, 16 x 60 tokens: 2.0 GB live, 3.5 GB
resident). Here every saved tensor of >= 256 KB is copied, as autograd saves it, into the next
free bytes of one flat buffer sized on the first step and kept: the heap then holds only
short-lived buffers, which reuse the same few blocks layer after layer, and its free pages are
handed back after each step. The price is one copy of the saved bytes per step.

Only for the CPU (CUDA's caching allocator has no such holes) and only while `recording`: a
pooled tensor is valid until the next `recording` starts, so the step's backward must run
before then (the Trainer's loop does: forward, backward, next micro-batch).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lmforge.allocator import trim_heap

ALIGN = 64  # bytes: every pooled tensor starts on a cache line


class SavedActivationPool:
    MIN_BYTES = 256 << 10  # smaller tensors: not worth a copy (and they fit the heap's small bins)

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.offset = 0
        self.needed = 0  # bytes the step asked for, pooled or not: the next capacity
        self._weights: set[int] = set()

    @property
    def capacity(self) -> int:
        return self.buffer.numel()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Pool what autograd saves inside; the previous recording's tensors become invalid."""
        self.offset = 0
        # Weights are saved by reference (a matmul keeps its weight): never copied.
        self._weights = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            yield

    def after_step(self) -> None:
        """Grow to what the step needed (first step: from nothing), and give the heap's freed pages back."""
        if self.needed == 0:
            return  # nothing pooled (activation checkpointing keeps its own): the heap is left as it is
        if self.needed > self.capacity:
            self.buffer = torch.empty(0, dtype=torch.uint8)
            trim_heap()
            self.buffer = torch.empty(self.needed + self.needed // 16, dtype=torch.uint8)
        trim_heap()
        self.needed = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        if nbytes < self.MIN_BYTES or t.device.type != "cpu" or t.untyped_storage().data_ptr() in self._weights:
            return t
        start = -(-self.offset // ALIGN) * ALIGN
        self.offset = start + nbytes
        self.needed = max(self.needed, self.offset)
        if self.offset > self.capacity:
            return t  # the first step, or a longer batch than any before: kept as is, pooled from the next step
        pooled = self.buffer[start:self.offset].view(t.dtype).view(t.shape)
        pooled.copy_(t)
        return pooled


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
