"""GGUF's block formats Q8_0, Q4_0 and Q4_1, byte for byte as ggml lays them out.

A weight matrix [rows, cols] is cut along each row into blocks of 32 values; each block is
stored as a few bytes of scale (and min) followed by the quantized values:

  Q8_0  34 bytes: d (fp16), 32 x int8 q                       value = q * d
  Q4_0  18 bytes: d (fp16), 16 bytes of nibbles, q in 0..15   value = (q - 8) * d
  Q4_1  20 bytes: d (fp16), m (fp16), 16 bytes of nibbles     value = q * d + m

In the nibble bytes, byte j holds element j in its low nibble and element j + 16 in its high one
(ggml's order, not the interleaved one a reader might guess). fp16 is little-endian IEEE half.

Quantization follows ggml's reference C code (quantize_row_*_ref) operation for operation in
fp32, so that our blocks are the ones llama.cpp and `gguf.quants` produce for the same weights:
a different rounding rule or a division where ggml multiplies by a reciprocal would flip a
value now and then, and the "exact weights the user downloaded" would no longer be exact.
A block's bytes stay together in a row of a uint8 array, as in the GGUF file, so loading a
GGUF tensor is a view of its bytes, and writing one back is those bytes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.errors import LmforgeError

BLOCK = 32  # values per block, in every format here


@dataclass(frozen=True)
class BlockFormat:
    """One block format: its lmforge name, ggml's type id (GGMLQuantizationType) and bytes per block."""

    name: str
    ggml_type: int
    block_bytes: int
    has_min: bool  # Q4_1 stores a per-block offset m after d


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("q8_0", ggml_type=8, block_bytes=2 + BLOCK, has_min=False),
        BlockFormat("q4_0", ggml_type=2, block_bytes=2 + BLOCK // 2, has_min=False),
        BlockFormat("q4_1", ggml_type=3, block_bytes=2 + 2 + BLOCK // 2, has_min=True),
    )
}


def block_format(name: str) -> BlockFormat:
    """The format called `name` (q8_0, q4_0, q4_1), or a one-line error listing those there are."""
    fmt = FORMATS.get(str(name).lower())
    if fmt is None:
        raise LmforgeError(f"unknown quantization format {name!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def format_for_ggml_type(type_id: int, tensor: str = "tensor") -> BlockFormat:
    """The format of a GGUF tensor from its ggml type id, refusing types kept elsewhere."""
    for fmt in FORMATS.values():
        if fmt.ggml_type == int(type_id):
            return fmt
    raise LmforgeError(f"{tensor}: ggml type {int(type_id)} is not a block format lmforge keeps "
                       f"quantized (supported: {', '.join(f'{f.name} ({f.ggml_type})' for f in FORMATS.values())})")


@dataclass(frozen=True)
class QuantTensor:
    """A 2-D weight [rows, cols] held in a block format.

    blocks: uint8 [rows, cols // 32 * format.block_bytes], each row the row's blocks in order,
    exactly the bytes a GGUF file stores for the tensor.
    """

    format: BlockFormat
    shape: tuple[int, int]
    blocks: np.ndarray

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if cols % BLOCK:
            raise LmforgeError(f"{self.format.name} tensor of shape {self.shape}: the row length {cols} "
                               f"is not a multiple of the block size {BLOCK}")
        want = (rows, cols // BLOCK * self.format.block_bytes)
        if self.blocks.dtype != np.uint8 or self.blocks.shape != want:
            raise LmforgeError(f"{self.format.name} tensor of shape {self.shape} needs uint8 blocks of "
                               f"shape {want}, got {self.blocks.dtype} {self.blocks.shape}")

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes)

    def _fields(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(d [rows, nb] fp32, m [rows, nb] fp32 or None, q [rows, nb, 32] the quantized ints)."""
        rows, cols = self.shape
        b = self.blocks.reshape(rows, cols // BLOCK, self.format.block_bytes)
        d = _half(b[..., 0:2])
        if self.format.name == "q8_0":
            return d, None, b[..., 2:].view(np.int8)
        start = 4 if self.format.has_min else 2
        m = _half(b[..., 2:4]) if self.format.has_min else None
        nib = b[..., start:]
        return d, m, np.concatenate((nib & np.uint8(0x0F), nib >> np.uint8(4)), axis=-1)

    def dequantize(self) -> np.ndarray:
        """fp32 [rows, cols], computed as ggml does (the scale times the value, then + m, in fp32)."""
        d, m, q = self._fields()
        d = d[..., None]
        if self.format.name == "q8_0":
            out = q.astype(np.float32) * d
        elif self.format.name == "q4_0":
            out = d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)
        else:
            out = d * q.astype(np.float32) + m[..., None]
        return out.reshape(self.shape)

    def components(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The block fields as arrays (for references and error bounds, not for decoding):
        d and m fp32 [rows, cols // 32], the integer values [rows, cols] as ggml applies them
        (q for Q8_0 and Q4_1, q - 8 for Q4_0)."""
        d, m, q = self._fields()
        q = q.astype(np.int32) - (8 if self.format.name == "q4_0" else 0)
        return d, m, q.reshape(self.shape)


def _half(pair: np.ndarray) -> np.ndarray:
    """Two little-endian bytes per entry (last axis) read as fp16 and widened to fp32."""
    return np.ascontiguousarray(pair).view("<f2")[..., 0].astype(np.float32)


def _as_half_bytes(x: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 (round to nearest even, as ggml's GGML_FP32_TO_FP16) -> 2 bytes each."""
    with np.errstate(over="ignore"):
        half = x.astype("<f2")
    return half.view(np.uint8).reshape(*x.shape, 2)


def quantize(weights: np.ndarray, fmt: str | BlockFormat, name: str = "weight") -> QuantTensor:
    """Quantize a 2-D fp32 array into `fmt`'s blocks, as ggml's reference quantizer does.

    Refuses (LmforgeError naming `name` and its shape) arrays that are not 2-D, rows whose length
    is not a multiple of 32 and non-finite values: ggml would store garbage scales for those.
    """
    fmt = fmt if isinstance(fmt, BlockFormat) else block_format(fmt)
    w = np.asarray(weights)
    if w.ndim != 2:
        raise LmforgeError(f"{name}: only 2-D weights are quantized, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % BLOCK:
        raise LmforgeError(f"{name}: shape {tuple(w.shape)} cannot be quantized to {fmt.name}: the row "
                           f"length {cols} is not a multiple of the block size {BLOCK}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise LmforgeError(f"{name}: shape {tuple(w.shape)} holds NaN or infinite values, which "
                           f"{fmt.name} cannot represent")
    x = w.reshape(rows, cols // BLOCK, BLOCK)
    if fmt.name == "q8_0":
        fields = _q8_0(x)
    elif fmt.name == "q4_0":
        fields = _q4_0(x)
    else:
        fields = _q4_1(x)
    # A scale past fp16's range (|w| above ~8e6 for q8_0, ~5e5 for q4) would be stored as inf.
    scale = np.concatenate(fields[:-1], axis=-1).view("<f2")
    if not np.isfinite(scale).all():
        raise LmforgeError(f"{name}: shape {tuple(w.shape)} has values too large for {fmt.name}'s fp16 "
                           f"scales (largest magnitude {float(np.abs(w).max()):.4g})")
    blocks = np.concatenate(fields, axis=-1).reshape(rows, -1)
    return QuantTensor(fmt, (rows, cols), np.ascontiguousarray(blocks))


def _reciprocal(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1.0f/d : 0.0f` in fp32 (an all-zero block quantizes to zeros)."""
    safe = np.where(d == 0, np.float32(1), d)
    return np.where(d == 0, np.float32(0), np.float32(1) / safe).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes: element j low, element j + 16 high."""
    return q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << np.uint8(4))


def _q8_0(x: np.ndarray) -> tuple[np.ndarray, ...]:
    d = np.abs(x).max(axis=-1) / np.float32(127)
    v = x * _reciprocal(d)[..., None]
    # roundf: halves away from zero (numpy's rint rounds them to even). Not floor(|v| + 0.5):
    # that sum rounds up in fp32 for |v| just below one half.
    a = np.abs(v)
    whole = np.floor(a)
    q = np.copysign(whole + (a - whole >= np.float32(0.5)), v)
    return _as_half_bytes(d), q.astype(np.int8).view(np.uint8)


def _q4_0(x: np.ndarray) -> tuple[np.ndarray, ...]:
    # The signed value of largest magnitude (the first of equal ones) maps to -8, the end of the
    # range with one more step, so that it is represented exactly.
    first = np.abs(x).argmax(axis=-1)[..., None]
    peak = np.take_along_axis(x, first, axis=-1)[..., 0]
    d = peak / np.float32(-8)
    # C's (int8_t)(v + 8.5f) truncates; every v + 8.5 here is >= 0.5, so trunc == floor.
    q = np.trunc(x * _reciprocal(d)[..., None] + np.float32(8.5)).astype(np.uint8)
    return _as_half_bytes(d), _pack_nibbles(np.minimum(q, np.uint8(15)))


def _q4_1(x: np.ndarray) -> tuple[np.ndarray, ...]:
    lo = x.min(axis=-1)
    hi = x.max(axis=-1)
    d = (hi - lo) / np.float32(15)
    q = np.trunc((x - lo[..., None]) * _reciprocal(d)[..., None] + np.float32(0.5)).astype(np.uint8)
    return _as_half_bytes(d), _as_half_bytes(lo), _pack_nibbles(np.minimum(q, np.uint8(15)))


def from_gguf_bytes(data: np.ndarray, fmt: str | BlockFormat | int, name: str = "tensor") -> QuantTensor:
    """A QuantTensor over a GGUF tensor's bytes as gguf's reader gives them: uint8
    [rows, row_bytes] (`ReaderTensor.data`) in format `fmt` (a name or ggml type id). The bytes
    are used as they are (no copy when already contiguous)."""
    if isinstance(fmt, BlockFormat):
        f = fmt
    elif isinstance(fmt, (int, np.integer)):
        f = format_for_ggml_type(int(fmt), name)
    else:
        f = block_format(fmt)
    raw = np.asarray(data)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise LmforgeError(f"{name}: expected the {f.name} bytes as a 2-D uint8 array [rows, row_bytes], "
                           f"got {raw.dtype} of shape {tuple(raw.shape)}")
    if raw.shape[1] % f.block_bytes:
        raise LmforgeError(f"{name}: {raw.shape[1]} bytes per row is not a whole number of "
                           f"{f.block_bytes}-byte {f.name} blocks")
    return QuantTensor(f, (raw.shape[0], raw.shape[1] // f.block_bytes * BLOCK), np.ascontiguousarray(raw))


def to_gguf_bytes(t: QuantTensor) -> np.ndarray:
    """The tensor's bytes for a GGUF file: uint8 [rows, row_bytes], the blocks unchanged."""
    return t.blocks
