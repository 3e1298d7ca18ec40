"""A padding-free layout for the token-wise layers: the real tokens of a padded batch, packed.

A padded batch [B, T] spends every Linear, norm and MLP on its padding too, and parallel text
of mixed lengths is a third padding or more. Only attention needs the [B, T] grid (a token
attends to its own row's tokens); every other layer treats each token alone. So the residual
stream can hold just the tokens kept, [N, C]: `Packing.pad` lays them out on the grid for
attention (zeros at padding, which the masks keep out of every real token's view) and
`Packing.pack` takes attention's output back to [N, C] before its projection. The loss and the
gradients are the padded layout's, to rounding: nothing a kept token reads changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    index: torch.Tensor  # [N] int64: row * length + position of each kept token, in order
    batch: int
    length: int

    @classmethod
    def of(cls, keep: torch.Tensor) -> "Packing | None":
        """The packing of `keep` [B, T] bool (True = a token to run), or None when every
        position is kept (nothing to skip: the plain layout is the cheaper one)."""
        if bool(keep.all()):
            return None
        B, T = keep.shape
        return cls(keep.reshape(-1).nonzero().squeeze(1), B, T)

    @property
    def tokens(self) -> int:
        return self.index.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]: the kept positions."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros at the positions not kept."""
        grid = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return grid.index_copy(0, self.index, x).view(self.batch, self.length, *x.shape[1:])


def target_keep(targets: torch.Tensor) -> torch.Tensor:
    """The positions a causal decoder must run for `targets` [B, T] (-100 = no loss): each row
    up to its last target. Trailing -100s are right padding, which no kept position attends
    to; a -100 before a row's last target is a token later ones read, so it is kept."""
    T = targets.shape[1]
    has = targets != -100
    last = torch.where(has, torch.arange(T, device=targets.device), -1).amax(1, keepdim=True)
    return torch.arange(T, device=targets.device) <= last
