"""Few-row products on block-quantized weights, compiled by numba: y[r, o] = sum_i x[r, i] W[o, i].

A decode step multiplies a handful of rows (1..8: one new token per sequence) by every weight
matrix, so its cost is reading the weights; in a block format they are 3.8x (Q8_0) to 7.1x
(Q4_0) fewer bytes than fp32. The kernels read each block once, in place, for all the rows:
a weight row's blocks are decoded into a scratch of K values (a few KB, in L1: the fp32 matrix
is never built) and multiplied into every row of x while they are there, as
lmforge.generate.kernels does with fp32 rows. Output rows are split among numba's threads in
chunks of CHUNK (one scratch per chunk). One row has its own kernel; 2..8 rows run the 8-row
kernel (padded with zero rows), more in blocks of 8.

Two ways to multiply, both here so they can be measured against each other (bench/bench_quant.py):

- `linear`: fp32 activations times the decoded weights (d q, + m for Q4_1, in fp32). Exact up
  to fp32 rounding.
- `linear_q8`: activations quantized per block of 32 to int8 with an fp32 scale dx (llama.cpp's
  Q8_0 activation side; for Q4_1 the exact block sums of x are kept, as its Q8_1 keeps sums),
  integer products q qx, y = sum_b d_b dx_b (q_b . qx_b) (+ m_b sum(x_b)). Each activation moves
  by at most dx_b / 2, which bounds the error (the tests check that bound). Activations must be
  finite (as everywhere in the decoder).

fp16 scales are decoded by integer arithmetic: numba has no float16 type, and a 64K-entry table
(ggml's way without F16C) would compete with the weights for cache. Reductions are reassociated
for vectorisation as in the fp32 decode kernels (`fastmath` reassoc + contract only). The code
is whatever LLVM makes of the loops for the host CPU (AVX2 or AVX-512); NUMBA_CPU_NAME=haswell
builds the AVX2 baseline. Compiled on first use (~20 s for all formats) and cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from lmforge.quant.formats import BLOCK, FORMATS, QuantTensor

_FAST = {"reassoc", "contract"}
CHUNK = 16  # output rows per parallel task: one scratch allocation per chunk, not per row
ROWS = 8  # the row-blocked kernels' width, as in lmforge.generate.kernels
# Half a block, passed to the kernels as an argument rather than a constant: with a constant
# trip count of 16, LLVM unrolls the nibble loops completely and its SLP vectoriser then gives
# up (scalar converts, 2x slower); with a trip count it cannot see, the loop vectoriser runs.
_HALF = BLOCK // 2

# 2**(e - 25) for fp16's exponent field e: a normal half is (1024 + mantissa) * 2**(e - 25),
# a subnormal (e = 0) mantissa * 2**-24.
_POW2 = np.array([2.0**-24] + [2.0 ** (e - 25) for e in range(1, 31)] + [0.0], dtype=np.float32)
_Q8_0, _Q4_0, _Q4_1 = 0, 1, 2  # the `kind` codes the compiled functions take
_KIND = {"q8_0": _Q8_0, "q4_0": _Q4_0, "q4_1": _Q4_1}
_BYTES_Q8_0, _BYTES_Q4_0, _BYTES_Q4_1 = (FORMATS[n].block_bytes for n in _KIND)  # numba freezes these


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
def _dequantize_row(kind, row, nb, half, w):
    """One row's fp32 weights into the scratch w [K], as ggml computes them (d q, + m).

    kind (0 Q8_0, 1 Q4_0, 2 Q4_1) is a constant in every caller: once this is inlined there,
    the branches on it fold away. Block strides are constants (bytes) or 2 * half (values):
    computed from the array's shape, they kept the loops from vectorising (19 ms against 3.3 ms,
    Q4_0 head, one row, one thread)."""
    bb = _BYTES_Q8_0 if kind == 0 else _BYTES_Q4_0 if kind == 1 else _BYTES_Q4_1
    for b in range(nb):
        p = b * bb
        d = _half(row[p], row[p + 1])
        o = b * 2 * half
        if kind == 0:
            for j in range(half):  # in halves, like the nibbles: one loop over 32 ran 6x slower
                w[o + j] = d * np.float32(np.int8(row[p + 2 + j]))  # the byte as int8
                w[o + half + j] = d * np.float32(np.int8(row[p + 2 + half + j]))
        elif kind == 1:
            for j in range(half):  # element j in the low nibble, j + 16 in the high one
                v = np.int32(row[p + 2 + j])
                w[o + j] = d * np.float32((v & 15) - 8)
                w[o + half + j] = d * np.float32((v >> 4) - 8)
        else:
            m = _half(row[p + 2], row[p + 3])
            for j in range(half):
                v = np.int32(row[p + 4 + j])
                w[o + j] = d * np.float32(v & 15) + m
                w[o + half + j] = d * np.float32(v >> 4) + m


@njit(fastmath=_FAST, cache=True)
def _decode_row(kind, row, nb, half, q, d, m):
    """One row's integer values into q [K] (int8: q, or q - 8 for Q4_0), scales into d [nb],
    Q4_1's mins into m [nb]. kind as in _dequantize_row."""
    bb = _BYTES_Q8_0 if kind == 0 else _BYTES_Q4_0 if kind == 1 else _BYTES_Q4_1
    for b in range(nb):
        p = b * bb
        d[b] = _half(row[p], row[p + 1])
        o = b * 2 * half
        if kind == 0:
            for j in range(half):
                q[o + j] = np.int8(row[p + 2 + j])
                q[o + half + j] = np.int8(row[p + 2 + half + j])
        else:
            start = p + 2
            bias = 8
            if kind == 2:
                m[b] = _half(row[p + 2], row[p + 3])
                start = p + 4
                bias = 0
            for j in range(half):
                v = np.int32(row[start + j])
                q[o + j] = (v & 15) - bias
                q[o + half + j] = (v >> 4) - bias


def _kernels(name: str):
    """The four kernels of one format, the format a constant of each (a closure variable numba
    freezes): with it as an argument, the decoding loops were not vectorised and ran 8x slower.
    Only plain ints are captured, so numba's disk cache recognises the kernels in the next
    process (captured functions made it compile and store them anew each time)."""
    kind = _KIND[name]
    q41 = kind == _Q4_1

    @njit(parallel=True, fastmath=_FAST, cache=True)
    def f32_rows1(blocks, x, half, y):
        n_out, k_in = blocks.shape[0], x.shape[1]
        nb = k_in // (2 * half)
        for c in prange((n_out + CHUNK - 1) // CHUNK):
            w = np.empty(k_in, dtype=np.float32)
            for o in range(c * CHUNK, min(n_out, (c + 1) * CHUNK)):
                _dequantize_row(kind, blocks[o], nb, half, w)
                acc = np.float32(0.0)
                for k in range(k_in):
                    acc += w[k] * x[0, k]
                y[0, o] = acc

    @njit(parallel=True, fastmath=_FAST, cache=True)
    def f32_rows8(blocks, x, half, y):
        n_out, k_in = blocks.shape[0], x.shape[1]
        nb = k_in // (2 * half)
        for c in prange((n_out + CHUNK - 1) // CHUNK):
            w = np.empty(k_in, dtype=np.float32)
            for o in range(c * CHUNK, min(n_out, (c + 1) * CHUNK)):
                _dequantize_row(kind, blocks[o], nb, half, w)
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                for k in range(k_in):
                    wk = w[k]
                    a0 += wk * x[0, k]
                    a1 += wk * x[1, k]
                    a2 += wk * x[2, k]
                    a3 += wk * x[3, k]
                    a4 += wk * x[4, k]
                    a5 += wk * x[5, k]
                    a6 += wk * x[6, k]
                    a7 += wk * x[7, k]
                y[0, o] = a0
                y[1, o] = a1
                y[2, o] = a2
                y[3, o] = a3
                y[4, o] = a4
                y[5, o] = a5
                y[6, o] = a6
                y[7, o] = a7

    # The integer products of a block are summed in pairs (element j and j + 16) and the pairs
    # go, times the block's two scales, into `half` fp32 lanes reduced once per output: summing
    # each block's 32 products to one integer first costs a horizontal reduction per block and
    # row, which made these kernels 5-10x slower than the fp32 ones.
    @njit(parallel=True, fastmath=_FAST, cache=True)
    def q8_rows1(blocks, xq, xd, xsum, half, y):
        n_out, k_in = blocks.shape[0], xq.shape[1]
        nb = k_in // (2 * half)
        for c in prange((n_out + CHUNK - 1) // CHUNK):
            q = np.empty(k_in, dtype=np.int8)
            d = np.empty(nb, dtype=np.float32)
            m = np.zeros(nb, dtype=np.float32)
            lanes = np.empty(half, dtype=np.float32)
            for o in range(c * CHUNK, min(n_out, (c + 1) * CHUNK)):
                _decode_row(kind, blocks[o], nb, half, q, d, m)
                lanes[:] = 0.0
                total = np.float32(0.0)
                for b in range(nb):
                    base = b * 2 * half
                    s = d[b] * xd[0, b]
                    for j in range(half):
                        lanes[j] += s * np.float32(np.int32(q[base + j]) * np.int32(xq[0, base + j])
                                                   + np.int32(q[base + half + j]) * np.int32(xq[0, base + half + j]))
                    if q41:
                        total += m[b] * xsum[0, b]
                for j in range(half):
                    total += lanes[j]
                y[0, o] = total

    @njit(parallel=True, fastmath=_FAST, cache=True)
    def q8_rows8(blocks, xq, xd, xsum, half, y):
        n_out, k_in = blocks.shape[0], xq.shape[1]
        nb = k_in // (2 * half)
        for c in prange((n_out + CHUNK - 1) // CHUNK):
            q = np.empty(k_in, dtype=np.int8)
            d = np.empty(nb, dtype=np.float32)
            m = np.zeros(nb, dtype=np.float32)
            lanes = np.empty((ROWS, half), dtype=np.float32)
            for o in range(c * CHUNK, min(n_out, (c + 1) * CHUNK)):
                _decode_row(kind, blocks[o], nb, half, q, d, m)
                lanes[:] = 0.0
                for b in range(nb):
                    base = b * 2 * half
                    for r in range(ROWS):  # the block's values stay in L1 for the 8 rows
                        s = d[b] * xd[r, b]
                        lr = lanes[r]
                        for j in range(half):
                            lr[j] += s * np.float32(np.int32(q[base + j]) * np.int32(xq[r, base + j])
                                                    + np.int32(q[base + half + j]) * np.int32(xq[r, base + half + j]))
                for r in range(ROWS):
                    total = np.float32(0.0)
                    if q41:
                        for b in range(nb):
                            total += m[b] * xsum[r, b]
                    for j in range(half):
                        total += lanes[r, j]
                    y[r, o] = total

    return f32_rows1, f32_rows8, q8_rows1, q8_rows8


_KERNELS = {name: _kernels(name) for name in ("q8_0", "q4_0", "q4_1")}


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


def _by_rows(x: np.ndarray, n_out: int, one, eight) -> np.ndarray:
    """Run `one(x, y)` for a single row, else `eight(xb, yb)` on blocks of 8 rows (the last
    padded with zero rows: the weights are read once either way)."""
    rows = x.shape[0]
    if rows == 1:
        y = np.empty((1, n_out), dtype=np.float32)
        one(x, y)
        return y
    y = np.empty((-(-rows // ROWS) * ROWS, n_out), dtype=np.float32)
    for start in range(0, rows, ROWS):
        block = x[start : start + ROWS]
        if block.shape[0] < ROWS:
            block = np.concatenate((block, np.zeros((ROWS - block.shape[0], *x.shape[1:]), dtype=x.dtype)))
        eight(np.ascontiguousarray(block), y[start : start + ROWS])
    return y[:rows]


def _check(x: np.ndarray, w: QuantTensor) -> np.ndarray:
    if not isinstance(w, QuantTensor):
        raise TypeError(f"expected a QuantTensor, got {type(w).__name__}")
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {x.dtype} {x.shape} does not match {w.format.name} weights {w.shape} "
                         "(x fp32 [R, K], w [N, K])")
    return np.ascontiguousarray(x)


def linear(x: np.ndarray, w: QuantTensor) -> np.ndarray:
    """x [R, K] fp32 @ W[N, K].T -> [R, N] fp32, each row of W's blocks decoded into an L1
    scratch (the row's K floats) and multiplied into all R rows of x."""
    x = _check(x, w)
    rows1, rows8, _, _ = _KERNELS[w.format.name]
    return _by_rows(x, w.shape[0], lambda xb, y: rows1(w.blocks, xb, _HALF, y),
                    lambda xb, y: rows8(w.blocks, xb, _HALF, y))


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
    _, _, rows1, rows8 = _KERNELS[w.format.name]
    xq, xd, xsum = quantize_activations(x)
    if x.shape[0] == 1:
        y = np.empty((1, w.shape[0]), dtype=np.float32)
        rows1(w.blocks, xq, xd, xsum, _HALF, y)
        return y
    rows = x.shape[0]
    pad = -(-rows // ROWS) * ROWS - rows
    if pad:
        xq = np.concatenate((xq, np.zeros((pad, xq.shape[1]), np.int8)))
        xd = np.concatenate((xd, np.zeros((pad, xd.shape[1]), np.float32)))
        xsum = np.concatenate((xsum, np.zeros((pad, xsum.shape[1]), np.float32)))
    y = np.empty((rows + pad, w.shape[0]), dtype=np.float32)
    for s in range(0, rows + pad, ROWS):
        rows8(w.blocks, xq[s : s + ROWS], xd[s : s + ROWS], xsum[s : s + ROWS], _HALF, y[s : s + ROWS])
    return y[:rows]
