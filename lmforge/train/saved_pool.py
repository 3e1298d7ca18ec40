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
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from lmforge.allocator import trim_heap
from lmforge.model.fused import RECIPES

ALIGN = 64  # bytes: every pooled tensor starts on a cache line


@dataclass
class _Recipe:
    """How to remake a saved tensor in backward: fn(*inputs), viewed as the saved tensor was."""

    fn: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    versions: tuple[int | None, ...]  # None: a pooled copy (private; its version counter is the buffer's)
    view: tuple[torch.Size, tuple[int, ...], int]

    def remake(self) -> torch.Tensor:
        if any(v is not None and t._version != v for t, v in zip(self.inputs, self.versions)):
            raise RuntimeError("an input of a recomputed activation was modified in place before backward")
        with torch.no_grad():
            out = self.fn(*self.inputs)
        size, stride, offset = self.view
        return out.as_strided(size, stride, offset)


class SavedActivationPool:
    MIN_BYTES = 256 << 10  # smaller tensors: not worth a copy (and they fit the heap's small bins)

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.offset = 0
        self.needed = 0  # bytes the step asked for, pooled or not: the next capacity
        self._weights: set[int] = set()
        # this recording's pooled copies, by id of the original: (weak original, copy)
        self._copies: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        # outputs offered by lmforge.model.fused, by storage: (weak output, version, recipe)
        self._offers: dict[int, tuple[weakref.ref, int, Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    @property
    def capacity(self) -> int:
        return self.buffer.numel()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Pool what autograd saves inside; the previous recording's tensors become invalid."""
        self.offset = 0
        # Weights are saved by reference (a matmul keeps its weight): never copied.
        self._weights = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        self._copies.clear()
        self._offers.clear()
        RECIPES.current = self
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield
        finally:
            RECIPES.current = None
            self._copies.clear()
            self._offers.clear()

    def offer(self, out: torch.Tensor, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
        """`out` can be remade as fn(*inputs) (lmforge.model.fused offers its outputs). The inputs
        are held as their pooled copies where they have one, so the offer keeps nothing alive."""
        if out.device.type != "cpu" or out.storage_offset() != 0 or not out.is_contiguous():
            return
        held = []
        for t in inputs:
            copy = self._copies.get(id(t))
            held.append(copy[1] if copy is not None and copy[0]() is t else t)
        self._offers[out.untyped_storage().data_ptr()] = (weakref.ref(out), out._version, fn, tuple(held))

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

    def _pack(self, t: torch.Tensor) -> torch.Tensor | _Recipe:
        nbytes = t.numel() * t.element_size()
        if nbytes < self.MIN_BYTES or t.device.type != "cpu" or t.untyped_storage().data_ptr() in self._weights:
            return t
        offer = self._offers.get(t.untyped_storage().data_ptr())
        if offer is not None:
            out, version, fn, inputs = offer
            if out() is not None and t._version == version:  # the offered output itself, or a view of it
                pool = self.buffer.untyped_storage().data_ptr()
                versions = tuple(None if i.untyped_storage().data_ptr() == pool else i._version for i in inputs)
                return _Recipe(fn, inputs, versions, (t.size(), t.stride(), t.storage_offset()))
        start = -(-self.offset // ALIGN) * ALIGN
        self.offset = start + nbytes
        self.needed = max(self.needed, self.offset)
        if self.offset > self.capacity:
            return t  # the first step, or a longer batch than any before: kept as is, pooled from the next step
        pooled = self.buffer[start:self.offset].view(t.dtype).view(t.shape)
        pooled.copy_(t)
        self._copies[id(t)] = (weakref.ref(t), pooled)
        return pooled


def _unpack(saved: torch.Tensor | _Recipe) -> torch.Tensor:
    return saved.remake() if isinstance(saved, _Recipe) else saved
