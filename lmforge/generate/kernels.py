"""Decode-step kernels compiled by numba: few-row matrix products and attention over a KV cache.

Decoding B prompts together multiplies B rows (one new token each) by every weight matrix, and
the weights (538 MB for SmolLM2-135M in fp32) are read from memory once per step whatever B is,
so a step should cost little more at 8 rows than at 1. BLAS libraries are built for large
products: for 8 rows OpenBLAS runs SmolLM2's 120 block matrices in 41-48 ms against 19-24 ms for
one row, because it copies each weight panel into its packing buffer before using it. The kernel
here reads each weight row once, in place, and multiplies it into all rows while it is in
registers (8 accumulators, one per row, vectorised along the reduction): 25-29 ms for the same
8-row products, close to the one-row time, which is what a memory-bound product should cost.

Attention for one new token per row (RoPE, the cache write, softmax(q k^T) v), the norms and
SwiGLU's activation were ~25 numpy calls per layer, each paying dispatch and allocation; here
they are four kernel calls, spread over the threads.

Threads: numba keeps its own count and OpenMP pool. The decoder sets the count torch had when
the decoder was built; the Engine holds torch itself to one thread during decode steps (for
numpy's BLAS path, `runtime.inference_backend`), so reading torch's count there would run the
kernels on one thread. Holding torch to one thread or not made no difference to the decoder's
steps (SmolLM2, batch 1 and 8, same session).

The reductions are reassociated for vectorisation (`fastmath` reassoc + contract, nothing that
changes NaN/inf semantics), so sums differ from BLAS's in the last bits, as BLAS results differ
between thread counts; tests hold the decoder's logits to the torch forward's.
Compiled on first use and cached on disk by numba (~10 s once per machine; ~0.6 s to load after).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

ROWS = 8  # the row-blocked kernel's width: fewer rows are padded, more run in blocks of ROWS
_FAST = {"reassoc", "contract"}


@njit(parallel=True, fastmath=_FAST, cache=True)
def _matvec(w, x, y):
    """y[0] = w @ x[0]; four weight rows per iteration share each load of x."""
    n_out, k_in = w.shape
    blocks = n_out // 4
    for blk in prange(blocks):
        n = 4 * blk
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(k_in):
            xk = x[0, k]
            a0 += w[n, k] * xk
            a1 += w[n + 1, k] * xk
            a2 += w[n + 2, k] * xk
            a3 += w[n + 3, k] * xk
        y[0, n] = a0
        y[0, n + 1] = a1
        y[0, n + 2] = a2
        y[0, n + 3] = a3
    for n in range(4 * blocks, n_out):
        acc = np.float32(0.0)
        for k in range(k_in):
            acc += w[n, k] * x[0, k]
        y[0, n] = acc


@njit(parallel=True, fastmath=_FAST, cache=True)
def _rows8(w, x, y):
    """y[r] = w @ x[r] for the 8 rows of x; each weight row is loaded once for all 8."""
    n_out, k_in = w.shape
    for n in prange(n_out):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
        for k in range(k_in):
            wk = w[n, k]
            a0 += wk * x[0, k]
            a1 += wk * x[1, k]
            a2 += wk * x[2, k]
            a3 += wk * x[3, k]
            a4 += wk * x[4, k]
            a5 += wk * x[5, k]
            a6 += wk * x[6, k]
            a7 += wk * x[7, k]
        y[0, n] = a0
        y[1, n] = a1
        y[2, n] = a2
        y[3, n] = a3
        y[4, n] = a4
        y[5, n] = a5
        y[6, n] = a6
        y[7, n] = a7


@contextlib.contextmanager
def kernel_threads(n: int) -> Iterator[None]:
    """Threads for the kernels inside the block (numba keeps its own count, apart from torch's);
    the caller's count comes back after it."""
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def few_row_linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [R, K] @ w[N, K].T -> [R, N] in fp32, for the few rows of a decode step.

    One row takes the matrix-vector kernel; 2..8 rows the 8-row kernel (padded with zero rows:
    the weights are read once either way, and the spare multiplies hide under the memory
    traffic); more rows run in blocks of 8.
    """
    if w.dtype != np.float32 or x.dtype != np.float32:
        raise TypeError(f"few_row_linear takes fp32 arrays, got x {x.dtype} and w {w.dtype}")
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"few_row_linear: x {x.shape} does not match w {w.shape} (x [R, K], w [N, K])")
    w = np.ascontiguousarray(w)
    rows = x.shape[0]
    if rows == 1 or rows == ROWS:  # the decode-step shapes: no padding, no blocks
        y = np.empty((rows, w.shape[0]), dtype=np.float32)
        (_matvec if rows == 1 else _rows8)(w, np.ascontiguousarray(x), y)
        return y
    y = np.empty((-(-rows // ROWS) * ROWS, w.shape[0]), dtype=np.float32)
    for start in range(0, rows, ROWS):
        block = x[start : start + ROWS]
        if block.shape[0] < ROWS:
            block = np.concatenate((block, np.zeros((ROWS - block.shape[0], x.shape[1]), dtype=np.float32)))
        _rows8(w, np.ascontiguousarray(block), y[start : start + ROWS])
    return y[:rows]


@intrinsic
def _bits_to_f32(typingctx, bits):
    """The fp32 whose bit pattern is the low 32 bits of an integer (a reinterpreting cast)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always", fastmath=_FAST)
def _exp_nonpositive(x):
    """exp(x) for x <= 0 (softmax's shifted scores) within 2 ulp, 0 below -87 (where fp32
    goes subnormal) and for -inf: Cephes' expf polynomial and 2^n built from its bits. numba's
    np.exp is a libm call per element (no vector math library here), which kept the softmax
    loops scalar: 30% of a decode step's attention at 8 rows."""
    xc = max(x, np.float32(-87.0))
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # x - n ln 2, ln 2 in two parts
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    value = p * _bits_to_f32((np.int64(n) + 127) << 23)
    return value if x >= np.float32(-87.0) else np.float32(0.0)


@njit(inline="always", fastmath=_FAST)
def _rotate(src, dst, c, sn, use_rope, dim, half):
    """dst = src rotated by RoPE (cos row c, signed sin row sn), or copied without RoPE."""
    if use_rope:
        for d in range(dim):
            other = d + half if d < half else d - half
            dst[d] = src[d] * c[d] + src[other] * sn[d]
    else:
        for d in range(dim):
            dst[d] = src[d]


@njit(inline="always", fastmath=_FAST)
def _write_kv(qkv, b, kv, heads, kv_heads, c, sn, use_rope, keys, values, cache_row, start):
    """Query row b's key (rotated) and value of kv head kv, into its cache row at `start`."""
    dim = qkv.shape[2]
    _rotate(qkv[b, heads + kv], keys[cache_row, kv, start], c, sn, use_rope, dim, dim // 2)
    vsrc = qkv[b, heads + kv_heads + kv]
    vdst = values[cache_row, kv, start]
    for d in range(dim):
        vdst[d] = vsrc[d]


@njit(parallel=True, fastmath=_FAST, cache=True)
def _attend(qkv, pos, cos, sin, use_rope, keys, values, cache_rows, starts, bias, use_bias, scale, write_first, out):
    batch, width, dim = qkv.shape
    kv_heads = keys.shape[1]
    heads = width - 2 * kv_heads
    group = heads // kv_heads
    half = dim // 2
    if write_first:
        # Several query rows of one sequence (a prefill): every key and value is in the cache
        # before any row attends over them; the same arithmetic per row as the fused write below.
        for unit in prange(batch * kv_heads):
            b = unit // kv_heads
            kv = unit - b * kv_heads
            row = pos[b] if use_rope else 0
            _write_kv(qkv, b, kv, heads, kv_heads, cos[row], sin[row], use_rope, keys, values, cache_rows[b], starts[b])
    # One unit of work per (row, kv head): RoPE on its query heads and its key, the cache write,
    # then attention for the query heads that share the key/value rows (read once for all).
    for unit in prange(batch * kv_heads):
        b = unit // kv_heads
        kv = unit - b * kv_heads
        start = starts[b]  # this row's cached positions: the new key goes there
        length = start + 1
        cache_row = cache_rows[b]
        q = np.empty((group, dim), dtype=np.float32)
        row = pos[b] if use_rope else 0  # without RoPE the tables are a placeholder
        c = cos[row]
        sn = sin[row]
        for gi in range(group):
            _rotate(qkv[b, kv * group + gi], q[gi], c, sn, use_rope, dim, half)
        if not write_first:
            _write_kv(qkv, b, kv, heads, kv_heads, c, sn, use_rope, keys, values, cache_row, start)
        kb = keys[cache_row, kv]
        vb = values[cache_row, kv]
        scores = np.empty((group, length), dtype=np.float32)
        for s in range(length):
            for gi in range(group):
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += q[gi, d] * kb[s, d]
                scores[gi, s] = acc * scale + (bias[b, s] if use_bias else np.float32(0.0))
        acc_o = np.zeros((group, dim), dtype=np.float32)
        for gi in range(group):
            top = np.float32(-np.inf)
            for s in range(length):
                top = max(top, scores[gi, s])
            total = np.float32(0.0)
            for s in range(length):
                e = _exp_nonpositive(scores[gi, s] - top)
                scores[gi, s] = e
                total += e
            inv = np.float32(1.0) / total
            for s in range(length):
                scores[gi, s] *= inv
        # Four positions per pass over a head's output row: a quarter of the loads and stores of
        # acc_o, which the compiler keeps in memory (8 rows x 150 positions: 66 -> 57 us a layer).
        s = 0
        while s + 4 <= length:
            for gi in range(group):
                p0, p1, p2, p3 = scores[gi, s], scores[gi, s + 1], scores[gi, s + 2], scores[gi, s + 3]
                for d in range(dim):
                    acc_o[gi, d] += p0 * vb[s, d] + p1 * vb[s + 1, d] + p2 * vb[s + 2, d] + p3 * vb[s + 3, d]
            s += 4
        while s < length:
            for gi in range(group):
                p = scores[gi, s]
                for d in range(dim):
                    acc_o[gi, d] += p * vb[s, d]
            s += 1
        for gi in range(group):
            o = (kv * group + gi) * dim
            for d in range(dim):
                out[b, o + d] = acc_o[gi, d]


_EMPTY2 = np.zeros((1, 1), dtype=np.float32)


def decode_attention(qkv: np.ndarray, pos: np.ndarray, rope: tuple[np.ndarray, np.ndarray] | None,
                     keys: np.ndarray, values: np.ndarray, start: "int | np.ndarray", bias: np.ndarray | None,
                     scale: float, cache_rows: np.ndarray | None = None, one_sequence: bool = False) -> np.ndarray:
    """One decode step of a layer's attention for one new token per row.

    qkv [B, H + 2*Hkv, D]: the fused projection's output. q and k are rotated (RoPE tables
    `rope` = (cos, sin_signed) [max_pos, D], indexed by `pos` [B]) unless rope is None; k and v
    are written into the layer's cache at position `start`; each query then attends over the
    positions [0, start]. start: one position for every row, or an int64 array [B] of each row's
    own (a cache whose rows hold prompts of different lengths, side by side from position 0).
    keys, values [B, Hkv, max_len, D] (a layer of the KVCache; query head h
    reads kv head h // (H / Hkv)); bias [B, start + 1] additive (-inf = masked) or None.
    cache_rows: int64 [B], the cache row each query row writes and reads (default: row b's own;
    the batcher's busy slots). one_sequence: the query rows are tokens of one sequence in one
    cache row (a prefill; start: each token's position), so every key and value is written before
    any row attends. A query row's output is the same bits either way, whatever rows are beside it.
    Returns [B, H*D]."""
    batch, width, dim = qkv.shape
    heads = width - 2 * keys.shape[1]
    out = np.empty((batch, heads * dim), dtype=np.float32)
    cos, sin = rope if rope is not None else (_EMPTY2, _EMPTY2)
    starts = np.full(batch, start, np.int64) if np.isscalar(start) else np.ascontiguousarray(start, dtype=np.int64)
    rows = np.arange(batch, dtype=np.int64) if cache_rows is None else np.ascontiguousarray(cache_rows, dtype=np.int64)
    _attend(np.ascontiguousarray(qkv), pos, cos, sin, rope is not None, keys, values, rows, starts,
            _EMPTY2 if bias is None else bias, bias is not None, np.float32(scale), one_sequence, out)
    return out


@njit(fastmath=_FAST, cache=True)
def _norm_row(x, r, w, b, use_bias, rms, eps, out):
    dim = x.shape[1]
    mean = np.float32(0.0)
    if not rms:
        for d in range(dim):
            mean += x[r, d]
        mean /= dim
    var = np.float32(0.0)
    for d in range(dim):
        c = x[r, d] - mean
        var += c * c
    inv = np.float32(1.0) / np.sqrt(var / dim + eps)
    for d in range(dim):
        v = (x[r, d] - mean) * inv * w[d]
        out[r, d] = v + b[d] if use_bias else v


@njit(parallel=True, fastmath=_FAST, cache=True)
def _norm(x, w, b, use_bias, rms, eps, out):
    for r in prange(x.shape[0]):
        _norm_row(x, r, w, b, use_bias, rms, eps, out)


# One row (batch-1 decoding) runs without OpenMP: a parallel launch costs ~2 us more than the
# row's work, ~90 times a SmolLM2 step.
@njit(fastmath=_FAST, cache=True)
def _norm_one(x, w, b, use_bias, rms, eps, out):
    _norm_row(x, 0, w, b, use_bias, rms, eps, out)


def norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, rms: bool, eps: float) -> np.ndarray:
    """LayerNorm (rms=False: centred) or RMSNorm of each row of x [R, C], then weight and bias."""
    out = np.empty(x.shape, dtype=np.float32)
    has_bias = bias is not None
    fn = _norm_one if x.shape[0] == 1 else _norm
    fn(np.ascontiguousarray(x), weight, bias if has_bias else weight, has_bias, rms, np.float32(eps), out)
    return out


@njit(fastmath=_FAST, cache=True)
def _silu_mul_row(h, r, out):
    half = h.shape[1] // 2
    for i in range(half):
        g = h[r, i]
        e = _exp_nonpositive(-abs(g))  # silu(g) = g / (1 + e^-g) = g e^g / (1 + e^g): e <= 1 either way
        sig = np.float32(1.0) / (np.float32(1.0) + e)
        out[r, i] = g * (sig if g >= 0 else e * sig) * h[r, half + i]


@njit(parallel=True, fastmath=_FAST, cache=True)
def _silu_mul(h, out):
    for r in prange(h.shape[0]):
        _silu_mul_row(h, r, out)


@njit(fastmath=_FAST, cache=True)
def _silu_mul_one(h, out):
    _silu_mul_row(h, 0, out)


def silu_mul(h: np.ndarray) -> np.ndarray:
    """SwiGLU's activation on rows of [gate | up]: silu(gate) * up."""
    out = np.empty((h.shape[0], h.shape[1] // 2), dtype=np.float32)
    (_silu_mul_one if h.shape[0] == 1 else _silu_mul)(np.ascontiguousarray(h), out)
    return out


def compiled_before() -> bool:
    """Whether numba's on-disk cache already holds these kernels: the first decode on a machine
    compiles them (~10 s), which deserves a word to whoever waits. False where numba's cache
    layout cannot be read (its internals moved): a notice too many, never a silent wait."""
    try:
        kernels = (_matvec, _rows8, _attend, _norm, _silu_mul)
        return all(os.path.exists(k._cache._cache_file._index_path) for k in kernels)
    except AttributeError:
        return False
