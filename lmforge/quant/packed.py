"""Block-quantized weights in memory, laid out for the decode kernels: eight rows interleaved.

A GGUF tensor keeps each row's blocks together (d, [m], 16 or 32 value bytes, then the next
block). A matrix-vector product over that layout has to sum each block's 32 products across a
vector register (a horizontal reduction per block and row) before scaling by the block's d: the
cost that kept the earlier kernels at 2-4 G weights/s. Here rows are taken eight at a time, and
for each block the eight rows' value bytes are interleaved: byte j of the eight rows' block b
sits in 8 consecutive bytes. One vector load then gives 8 rows' values for element j (and j + 16
for the 4-bit formats), one multiply-add puts them into 8 row sums at once, and the scales are
vectors of 8 too: no reduction at all until the row sums are written.

    qs  uint8  [groups, blocks, J, 8]   J = 16 nibble bytes (q4_0, q4_1) or 32 int8 (q8_0)
    d   uint16 [groups, blocks, 8]      the blocks' fp16 scales, bit for bit
    m   uint16 [groups, blocks, 8]      Q4_1's fp16 mins (empty for the other formats)

Rows are padded to a multiple of 8 with zero blocks. The layout is a permutation of the GGUF bytes
(plus that padding): `to_blocks` gives back exactly the bytes `pack` took, so a loaded model still
exports the weights the user downloaded, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.quant.formats import BLOCK, BlockFormat, QuantTensor

GROUP = 8  # rows interleaved: one fp32 vector register of AVX2 holds the 8 rows' sums


@dataclass(frozen=True)
class PackedWeight:
    """A 2-D weight [rows, cols] in a block format, in the kernels' layout (module docstring)."""

    format: BlockFormat
    shape: tuple[int, int]
    qs: np.ndarray  # uint8, flat
    d: np.ndarray  # uint16, flat
    m: np.ndarray  # uint16, flat (empty unless the format has mins)

    @property
    def groups(self) -> int:
        return -(-self.shape[0] // GROUP)

    @property
    def blocks_per_row(self) -> int:
        return self.shape[1] // BLOCK

    @property
    def value_bytes(self) -> int:
        """Value bytes per block: 32 (int8) or 16 (two nibbles a byte)."""
        return self.format.block_bytes - (4 if self.format.has_min else 2)

    @property
    def nbytes(self) -> int:
        return int(self.qs.nbytes + self.d.nbytes + self.m.nbytes)

    def to_blocks(self) -> QuantTensor:
        """The GGUF bytes this was packed from (the padding rows dropped)."""
        rows, cols = self.shape
        G, nb, J = self.groups, self.blocks_per_row, self.value_bytes
        parts = [self.d.reshape(G, nb, GROUP).transpose(0, 2, 1)[..., None].view(np.uint8)]
        if self.format.has_min:
            parts.append(self.m.reshape(G, nb, GROUP).transpose(0, 2, 1)[..., None].view(np.uint8))
        parts.append(self.qs.reshape(G, nb, J, GROUP).transpose(0, 3, 1, 2))
        blocks = np.concatenate(parts, axis=-1).reshape(G * GROUP, nb * self.format.block_bytes)[:rows]
        return QuantTensor(self.format, self.shape, np.ascontiguousarray(blocks))

    def dequantize(self) -> np.ndarray:
        """fp32 [rows, cols] (as ggml computes it; for references and tests)."""
        return self.to_blocks().dequantize()


def pack(t: QuantTensor) -> PackedWeight:
    """`t`'s blocks in the kernels' layout (a copy: the source bytes can be dropped after)."""
    rows, cols = t.shape
    f = t.format
    nb = cols // BLOCK
    G = -(-rows // GROUP)
    b = t.blocks.reshape(rows, nb, f.block_bytes)
    if G * GROUP != rows:  # zero blocks: d = 0 (and m = 0), so padding rows compute to 0
        b = np.concatenate((b, np.zeros((G * GROUP - rows, nb, f.block_bytes), np.uint8)))
    b = b.reshape(G, GROUP, nb, f.block_bytes)

    def halves(lo: int) -> np.ndarray:
        return np.ascontiguousarray(b[..., lo : lo + 2].transpose(0, 2, 1, 3)).view("<u2").reshape(-1)

    start = 4 if f.has_min else 2
    qs = np.ascontiguousarray(b[..., start:].transpose(0, 2, 3, 1)).reshape(-1)
    m = halves(2) if f.has_min else np.zeros(0, np.uint16)
    return PackedWeight(f, (rows, cols), qs, halves(0), m)


def check_packed(w: PackedWeight, where: str) -> None:
    """Refuse arrays whose sizes do not match the shape (a truncated or foreign file)."""
    G, nb = w.groups, w.blocks_per_row
    want = {"qs": G * nb * w.value_bytes * GROUP, "d": G * nb * GROUP, "m": G * nb * GROUP if w.format.has_min else 0}
    for name, n in want.items():
        a = getattr(w, name)
        if a.ndim != 1 or a.size != n:
            raise LmforgeError(f"{where}: packed {w.format.name} {name} should hold {n} values, got {a.shape}")
