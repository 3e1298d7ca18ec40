"""Few-row products on block-quantized weights, compiled by numba: y[r, o] = sum_i x[r, i] W[o, i].

A decode step multiplies a handful of rows (1..8: one new token per sequence) by every weight
matrix, so its cost is reading the weights; in a block format they are 3.6x (Q8_0) to 6.4x
(Q4_0) fewer bytes than fp32. The kernels read each block once, in place, for all the rows:
its 32 values are decoded into a 32-entry scratch (L1-resident; the fp32 matrix is never
built) and multiplied into every row while they are there, as lmforge.generate.kernels does
with fp32 rows. Output rows are split among numba's threads in chunks (one scratch per chunk).

Two ways to multiply, both here so they can be measured against each other:

- `linear`: fp32 activations times the decoded weights, y = sum_b d_b * (q_b . x_b)
  (+ m_b * sum(x_b) for Q4_1, with the block sums of x computed once per call). Exact up to
  fp32 rounding.
- `linear_q8`: activations quantized per block of 32 to int8 with an fp32 scale (llama.cpp's
  Q8_0 activation side; for Q4_1 the block sum of x is kept too, as its Q8_1 does), then
  integer dot products per block, y = sum_b d_b * dx_b * (q_b . qx_b) (+ m_b * sum(x_b)). Each
  activation moves by at most dx_b / 2, which bounds the error (tests check that bound).

fp16 scales are decoded by integer arithmetic: numba has no float16 type, and a 64K-entry table
(ggml's way without F16C) would compete with the weights for cache. Reductions are reassociated
for vectorisation as in the fp32 decode kernels (`fastmath` reassoc + contract only).
Compiled on first use and cached on disk by numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from lmforge.quant.formats import BLOCK, QuantTensor

_FAST = {"reassoc", "contract"}
CHUNK = 16  # output rows per parallel task: one scratch allocation per chunk, not per row

# 2**(e - 25) for fp16's exponent field e: a normal half is (1024 + mantissa) * 2**(e - 25),
# a subnormal (e = 0) mantissa * 2**-24.
_POW2 = np.array([2.0**-24] + [2.0 ** (e - 25) for e in range(1, 31)] + [0.0], dtype=np.float32)
_Q8_0, _Q4_0, _Q4_1 = 0, 1, 2
_KIND = {"q8_0": _Q8_0, "q4_0": _Q4_0, "q4_1": _Q4_1}


@njit(fastmath=_FAST, cache=True)
def _half(lo, hi):
    """Two little-endian bytes of an IEEE half -> float32 (exact; inf and NaN kept)."""
    h = np.int32(lo) | (np.int32(hi) << 8)
    e = (h >> 10) & 31
    mant = h & 1023
    if e == 31:
        v = np.float32(np.inf) if mant == 0 else np.float32(np.nan)
    elif e == 0:
        v = np.float32(mant) * _POW2[0]
    else:
        v = np.float32(mant + 1024) * _POW2[e]
    return -v if h & 0x8000 else v


@njit(fastmath=_FAST, cache=True)
def _decode(kind, row, p, out):
    """The 32 integer values of the block starting at byte p of `row` into out (any numeric
    dtype): q for Q8_0 and Q4_1, q - 8 for Q4_0; low nibbles are elements 0..15."""
    if kind == 0:
        for j in range(BLOCK):
            v = np.int32(row[p + 2 + j])
            out[j] = v - ((v & 128) << 1)  # the byte as int8
    else:
        start = p + (4 if kind == 2 else 2)
        bias = 8 if kind == 1 else 0
        for j in range(BLOCK // 2):
            v = np.int32(row[start + j])
            out[j] = (v & 15) - bias
            out[j + BLOCK // 2] = (v >> 4) - bias


@njit(parallel=True, fastmath=_FAST, cache=True)
def _linear_f32(kind, blocks, x, xsum, y):
    rows, k_in = x.shape
    n_out = blocks.shape[0]
    nb = k_in // BLOCK
    bb = blocks.shape[1] // nb
    for c in prange((n_out + CHUNK - 1) // CHUNK):
        w = np.empty(BLOCK, dtype=np.float32)
        acc = np.empty(rows, dtype=np.float32)
        for o in range(c * CHUNK, min(n_out, (c + 1) * CHUNK)):
            row = blocks[o]
            acc[:] = 0.0
            for b in range(nb):
                p = b * bb
                d = _half(row[p], row[p + 1])
                _decode(kind, row, p, w)
                base = b * BLOCK
                for r in range(rows):
                    s = np.float32(0.0)
                    for j in range(BLOCK):
                        s += w[j] * x[r, base + j]
                    acc[r] += d * s
                if kind == 2:
                    m = _half(row[p + 2], row[p + 3])
                    for r in range(rows):
                        acc[r] += m * xsum[r, b]
            for r in range(rows):
                y[r, o] = acc[r]


@njit(parallel=True, fastmath=_FAST, cache=True)
def _linear_q8(kind, blocks, xq, xd, xsum, y):
    rows, k_in = xq.shape
    n_out = blocks.shape[0]
    nb = k_in // BLOCK
    bb = blocks.shape[1] // nb
    for c in prange((n_out + CHUNK - 1) // CHUNK):
        w = np.empty(BLOCK, dtype=np.int16)
        acc = np.empty(rows, dtype=np.float32)
        for o in range(c * CHUNK, min(n_out, (c + 1) * CHUNK)):
            row = blocks[o]
            acc[:] = 0.0
            for b in range(nb):
                p = b * bb
                d = _half(row[p], row[p + 1])
                _decode(kind, row, p, w)
                base = b * BLOCK
                for r in range(rows):
                    s = np.int32(0)  # |q| <= 128 and |qx| <= 127: 32 products fit easily
                    for j in range(BLOCK):
                        s += np.int32(w[j]) * np.int32(xq[r, base + j])
                    acc[r] += d * xd[r, b] * np.float32(s)
                if kind == 2:
                    m = _half(row[p + 2], row[p + 3])
                    for r in range(rows):
                        acc[r] += m * xsum[r, b]
            for r in range(rows):
                y[r, o] = acc[r]


@njit(fastmath=_FAST, cache=True)
def _quantize_rows(x, xq, xd, xsum):
    rows, k_in = x.shape
    for r in range(rows):
        for b in range(k_in // BLOCK):
            base = b * BLOCK
            amax = np.float32(0.0)
            total = np.float32(0.0)
            for j in range(BLOCK):
                v = x[r, base + j]
                amax = max(amax, abs(v))
                total += v
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for j in range(BLOCK):
                xq[r, base + j] = np.int8(round(x[r, base + j] * inv))
            xd[r, b] = d
            xsum[r, b] = total


def _check(x: np.ndarray, w: QuantTensor) -> np.ndarray:
    if not isinstance(w, QuantTensor):
        raise TypeError(f"expected a QuantTensor, got {type(w).__name__}")
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {x.dtype} {x.shape} does not match {w.format.name} weights {w.shape} "
                         "(x fp32 [R, K], w [N, K])")
    return np.ascontiguousarray(x)


def block_sums(x: np.ndarray) -> np.ndarray:
    """Sums of x [R, K] over each block of 32 columns: [R, K // 32] (Q4_1's m multiplies these)."""
    return np.ascontiguousarray(x.reshape(x.shape[0], -1, BLOCK).sum(axis=-1, dtype=np.float32))


def linear(x: np.ndarray, w: QuantTensor) -> np.ndarray:
    """x [R, K] fp32 @ W[N, K].T -> [R, N] fp32, W's blocks decoded on the fly."""
    x = _check(x, w)
    y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    xsum = block_sums(x) if w.format.has_min else np.zeros((x.shape[0], 1), dtype=np.float32)
    _linear_f32(_KIND[w.format.name], w.blocks, x, xsum, y)
    return y


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of x [R, K] in blocks of 32: int8 values qx [R, K], scales dx [R, K/32] fp32
    (amax / 127, values rounded to nearest, so |x - dx qx| <= dx / 2), and the exact block sums."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, k_in = x.shape
    xq = np.empty((rows, k_in), dtype=np.int8)
    xd = np.empty((rows, k_in // BLOCK), dtype=np.float32)
    xsum = np.empty((rows, k_in // BLOCK), dtype=np.float32)
    _quantize_rows(x, xq, xd, xsum)
    return xq, xd, xsum


def linear_q8(x: np.ndarray, w: QuantTensor) -> np.ndarray:
    """As `linear`, with x quantized per block to int8 and integer dot products per block."""
    x = _check(x, w)
    xq, xd, xsum = quantize_activations(x)
    y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    _linear_q8(_KIND[w.format.name], w.blocks, xq, xd, xsum, y)
    return y
