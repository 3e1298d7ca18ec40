"""Few-row products on block-quantized weights: y[r, n] = sum_k x[r, k] W[n, k], W in Q8_0/Q4_0/Q4_1.

A decode step multiplies 1..8 rows (one new token per sequence) by every weight matrix, so its
cost is streaming the weights; in a block format they are 3.8x (Q8_0) to 7.1x (Q4_0) fewer bytes
than fp32. The kernels read each block once, in place, for all the rows, in the eight-row
interleaved layout of lmforge.quant.packed: for each block of eight rows, one vector load gives
the rows' values of one element (two with AVX-512), which are converted to fp32 and dequantized
with the block's scales (d, and m or -8 d: vectors of eight as well) by one multiply-add, the
weight values ggml computes; each such vector is then multiplied into every row's sums.
Activations stay fp32 (no rounding of x, so the only error is fp32 summation).

Why LLVM IR and not plain numba loops: written as loops, LLVM vectorised neither the row-sum
updates (it could not prove the small accumulator arrays apart from the weights) nor eight named
scalar sums (the SLP vectoriser left scalar int-to-float conversions): 2-4 G weights/s on one
core. The block step is therefore emitted as IR by hand (`_group_dot`, a numba intrinsic): <8 x i8>
loads, zext/and/shift, sitofp, fp16 scales widened by `fpext` (one vcvtph2ps with F16C, which
every AVX2 CPU has), fused multiply-adds into sums that live in registers for the whole row.
The code is ordinary LLVM vector IR, so LLVM lowers it for whatever CPU numba targets: 16 lanes
(two elements of the eight rows per vector) where it has AVX-512, 8 on AVX2 (`LANES`). Two
partial sums per row and group halve the chain of dependent FMAs, and a call takes as many groups
as keep 4-16 sums in registers (`_groups_per_call`).

Dequantizing each weight vector once, rather than summing q x per block and scaling each row's
block sum, costs one multiply-add per vector whatever the rows; with 8 rows it replaced the
per-row scaling and the spills of its extra sums, and with 16 lanes the pair layout turned the
broadcast of x (a load and a shuffle per multiply-add) into a 64-bit broadcast load shared by the
groups of a call: a SmolLM2-135M Q4_1 step's 8-row products 8.7 -> 7.0 ms on 2 Zen 5 cores (AVX-512),
one row unchanged (~2.7 ms, bound by reading the weights). On AVX2 (the same machine with numba
targeting haswell) it is a wash: 8 rows 10.6 -> 10.2 ms, one row 3.25 -> 3.4 ms.

Batched decode steps (2..8 rows) are bound by those multiply-adds rather than by memory. Asked
for (`Engine(..., int8_activations=True)`, `--int8-activations`), the numpy decoder runs every
step with x rounded to int8 per block of 32 (ggml's Q8_1, ~0.4% per value), as llama.cpp does:
`_group_dot_int8` sums each block's products exactly in int32 with the CPU's u8 x s8 dot
instructions (AVX-512 VNNI's vpdpbusd, or AVX2's vpmaddubsw + vpmaddwd; 4 consecutive elements of
a row per 32-bit lane, shuffled out of the packed layout in registers) and scales once per
block: 8-row products 1.4-2.1x as fast (AVX2: 1.4x). Not the default: greedy text then leaves
the dequantized model's after some 13-47 tokens on SmolLM2, where fp32 activations keep it
exactly.
Either way a row's sums do not depend on the other rows of the batch, so a prompt decodes to the
same tokens alone or batched.

Rows beyond 8 (prefill, scoring) run the same block step in calls of eight rows (and one of the
1-7 left) over tiles of x, each tile's groups shared between the threads (`many_row_linear`):
120-138 G multiply-adds/s on two AVX2 cores, where torch's BLAS on the fp32 weights reaches 84-98
and dequantizing W first cost 1 ns a weight on top; ~200 G on two Zen 5 cores with AVX-512
(SmolLM2's 42-token prefill: 22 ms of products). `dequantize_columns`
writes a slice of W's transpose in fp32, for the backward pass (lmforge.quant.modules).
`rows_of` decodes embedding rows.

Compiled on first use per (format, rows, lanes) and cached on disk by numba.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from lmforge.errors import LmforgeError
from lmforge.quant.formats import BLOCK
from lmforge.quant.packed import GROUP, PackedWeight

ROWS = 8  # most rows one product handles (a decode batch)
_KIND = {"q8_0": 0, "q4_0": 1, "q4_1": 2}

_F32, _I8, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V8F, _V8I8, _V8I16, _V8I32 = (ir.VectorType(t, GROUP) for t in (_F32, _I8, _I16, _I32))
_V8H = ir.VectorType(ir.HalfType(), GROUP)
_U8A, _U16A = types.Array(types.uint8, 1, "C"), types.Array(types.uint16, 1, "C")
_F32A2 = types.Array(types.float32, 2, "C")


def _data(context, builder, arrty, arr):
    return cgutils.create_struct_proxy(arrty)(context, builder, value=arr).data


def _i64(n: int) -> ir.Constant:
    return ir.Constant(_I64, n)


def _splat(builder, value, lanes: int = GROUP):
    v = builder.insert_element(ir.Constant(ir.VectorType(_F32, lanes), ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))


def _fma(builder, a, b, c):
    n = a.type.count
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), f"llvm.fma.v{n}f32")
    return builder.call(fn, [a, b, c])


def _load(builder, ptr, index, vty):
    """An unaligned vector load of vty at ptr + index (elements of ptr's type)."""
    return builder.load(builder.bitcast(builder.gep(ptr, [index]), vty.as_pointer()), align=1)


def _scales(builder, ptr, index):
    """Eight fp16 scales at ptr + index, widened to fp32."""
    raw = _load(builder, builder.bitcast(ptr, _I16.as_pointer()), index, _V8I16)
    return builder.fpext(builder.bitcast(raw, _V8H), _V8F)


def _wide_lanes() -> int:
    """Lanes of the row sums: 16 where numba compiles for a CPU with AVX-512 (two elements of the
    eight rows per vector, half the multiply-adds), else 8 (AVX2: a 16-wide vector would be split
    into two 8-wide ones anyway)."""
    from numba.core import config

    if config.CPU_NAME not in (None, "host"):  # e.g. NUMBA_CPU_NAME=haswell for the AVX2 baseline
        return GROUP
    import llvmlite.binding as llvm

    return 2 * GROUP if llvm.get_host_cpu_features().get("avx512f") else GROUP


LANES = _wide_lanes()


_PAIRS = [(i % 2) * GROUP + i // 2 for i in range(2 * GROUP)]  # a 16-byte load's bytes, row-pair order


def _vec(t, n):
    return ir.VectorType(t, n)


SUMS = 2  # partial sums per row and group in `_group_dot`: weight vectors alternate between them
# Software prefetch of the weights in calls of PREFETCH_ROWS rows or more: with several rows the
# multiply-adds take long enough per byte that the hardware prefetcher alone let them wait on
# memory (SmolLM2's decode step in a batch: 8-row products 7.6-8.1 -> 6.0 ms, 2 rows 3.2-3.4 ->
# 3.0). One row, bound by memory bandwidth, showed no gain beyond the noise: left without.
PREFETCH_ROWS = 2
PREFETCH_BYTES = 2048


def _prefetch(builder, ptr) -> None:
    """A read prefetch of ptr's cache line into all cache levels (a hint: never faults)."""
    i8p = _I8.as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _groups_per_call(rows: int, lanes: int) -> int:
    """Weight groups one `_group_dot` call takes for `rows` rows: enough independent sums (rows x
    groups x SUMS) to hide the multiply-add latency with few rows, and each broadcast of x feeding
    that many multiply-adds, within the vector registers (AVX-512 32, AVX2 16). Measured on
    SmolLM2's products: with 16 lanes 4 groups at 1 row, 2 at 2, 1 from 4 beat both fewer and
    more; with 8 lanes 2 at 1 row (4 spilled), 1 beyond."""
    return max(1, (4 if lanes > GROUP else 2) // rows)


@intrinsic(prefer_literal=True)
def _group_dot(typingctx, kind, rows, lanes, count, qs, d, m, x, y, g, r0):
    """Row sums of weight groups g .. g + count (eight rows each) against rows r0 .. r0 + `rows`
    of x, into the same rows of y.

    kind (0 Q8_0, 1 Q4_0, 2 Q4_1), rows (1..8), lanes (8 or 16) and count (groups) are literals:
    the IR is generated for them. Each vector of weights is dequantized once, as ggml does (q d,
    (q - 8) d, q d + m: one rounding, by a multiply-add with the block's scales), and then
    multiply-added into every row's sums: SUMS accumulators per row and group (the weight vectors
    alternate between them, to shorten the chains of dependent multiply-adds), added at the end;
    the same operations in the same order whatever rows and count are, so a row's result does not
    depend on the rows beside it. With 16 lanes a vector holds elements j and j + 1 of the eight
    rows, as row n's pair in lanes 2n, 2n + 1 (a byte shuffle of the packed layout), so that x's
    pair broadcasts as one 64-bit load; the pair's two sums are added when the groups are done.
    qs/d/m: a PackedWeight's arrays; x [rows, K] fp32; y [R, groups*8]: y[r, 8g:8(g+count)] is
    written."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (kind, rows, lanes, count)):
        return None
    sig = types.void(kind, rows, lanes, count, _U8A, _U16A, _U16A, _F32A2, _F32A2, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        _emit_group_dot(context, builder, kind.literal_value, rows.literal_value, lanes.literal_value,
                        count.literal_value, args[4:])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _group_dot_rows(typingctx, kind, lanes, rows, qs, d, m, x, y, g, r0):
    """`_group_dot` for one group with the row count known at run time (1..8; more count as 8):
    a switch over the eight row counts' code, for the last call of a tile."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (kind, lanes)):
        return None
    sig = types.void(kind, lanes, types.int64, _U8A, _U16A, _U16A, _F32A2, _F32A2, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        count = args[2]
        done = builder.append_basic_block("rows.done")
        blocks = {n: builder.append_basic_block(f"rows.{n}") for n in range(1, ROWS + 1)}
        switch = builder.switch(count, blocks[ROWS])
        for n, block in blocks.items():
            if n < ROWS:
                switch.add_case(ir.Constant(count.type, n), block)
            builder.position_at_end(block)
            _emit_group_dot(context, builder, kind.literal_value, n, lanes.literal_value, 1, args[3:])
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


def _emit_group_dot(context, builder, K_: int, R: int, L: int, C: int, args) -> None:
    """`_group_dot`'s IR for format K_, R rows, L lanes and C groups; args: its arrays and indices
    (qs, d, m, x, y, g, r0)."""
    J = 32 if K_ == 0 else 16  # value bytes per block and row
    step = L // GROUP  # elements of a row per vector: 1 or 2
    vf, vi8, vi32 = _vec(_F32, L), _vec(_I8, L), _vec(_I32, L)
    qs_a, d_a, m_a, x_a, y_a, g, r0 = args
    qp = _data(context, builder, _U8A, qs_a)
    dp, mp = _data(context, builder, _U16A, d_a), _data(context, builder, _U16A, m_a)
    xp, yp = (_data(context, builder, _F32A2, a) for a in (x_a, y_a))
    xs = cgutils.create_struct_proxy(_F32A2)(context, builder, value=x_a)
    ys = cgutils.create_struct_proxy(_F32A2)(context, builder, value=y_a)
    K = cgutils.unpack_tuple(builder, xs.shape, 2)[1]
    nb = builder.udiv(K, _i64(BLOCK))
    n_out = cgutils.unpack_tuple(builder, ys.shape, 2)[1]
    zero = ir.Constant(vf, [0.0] * L)
    # acc[r][c][s]: row r's partial sums for group g + c (registers after mem2reg)
    S = SUMS
    acc = [[[cgutils.alloca_once_value(builder, zero) for _ in range(S)] for _ in range(C)] for _ in range(R)]
    rows_at = [builder.mul(builder.add(r0, _i64(r)), K) for r in range(R)]

    def widen(v8):
        """Eight rows' scales in the L lanes (each row's in both of its lanes)."""
        if L == GROUP:
            return v8
        return builder.shuffle_vector(v8, v8, ir.Constant(_vec(_I32, L), [i // 2 for i in range(L)]))

    def broadcast(row, col):
        """x[row, col .. col + step) over the lanes: one value in all (8 lanes), or the pair
        repeated (16: one 64-bit broadcast load)."""
        if step == 1:
            return _splat(builder, builder.load(builder.gep(xp, [builder.add(row, col)])))
        pair = _load(builder, xp, builder.add(row, col), _vec(_F32, step))
        return builder.shuffle_vector(pair, pair, ir.Constant(_vec(_I32, L), [i % 2 for i in range(L)]))

    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        xoff = builder.mul(b, _i64(BLOCK))
        qoffs, scales = [], []
        for c in range(C):
            blk = builder.add(builder.mul(builder.add(g, _i64(c)), nb), b)
            qoffs.append(builder.mul(blk, _i64(J * GROUP)))
            dv = _scales(builder, dp, builder.mul(blk, _i64(GROUP)))
            mv = (_scales(builder, mp, builder.mul(blk, _i64(GROUP))) if K_ == 2
                  else builder.fmul(dv, ir.Constant(_V8F, [-8.0] * GROUP)) if K_ == 1 else None)
            scales.append((widen(dv), None if mv is None else widen(mv)))
        if R >= PREFETCH_ROWS:  # the groups' value bytes PREFETCH_BYTES ahead, one cache line at a time
            for c in range(C):
                for line in range(0, J * GROUP, 64):
                    _prefetch(builder, builder.gep(qp, [builder.add(qoffs[c], _i64(PREFETCH_BYTES + line))]))
        for j in range(0, J, step):
            weights = []  # per group: [(dequantized vector, element of its first lane)]
            for c in range(C):
                raw = _load(builder, qp, builder.add(qoffs[c], _i64(j * GROUP)), vi8)
                if step == 2:  # [j of rows 0..7, j + 1 of rows 0..7] -> row n's pair in lanes 2n, 2n + 1
                    raw = builder.shuffle_vector(raw, raw, ir.Constant(_vec(_I32, L), _PAIRS))
                dw, mw = scales[c]
                if K_ == 0:
                    weights.append([(builder.fmul(builder.sitofp(raw, vf), dw), j)])
                else:  # byte j: element j in the low nibble, j + 16 in the high one
                    v = builder.zext(raw, vi32)
                    lo = builder.sitofp(builder.and_(v, ir.Constant(vi32, [15] * L)), vf)
                    hi = builder.sitofp(builder.lshr(v, ir.Constant(vi32, [4] * L)), vf)
                    weights.append([(_fma(builder, lo, dw, mw), j), (_fma(builder, hi, dw, mw), j + 16)])
            cols = [col for _, col in weights[0]]

            def add(r, c, i, bx):
                a = acc[r][c][(j // step * len(cols) + i) % S]
                builder.store(_fma(builder, weights[c][i][0], bx, builder.load(a)), a)

            # Emitted in the order that keeps the fewest vectors live: x's broadcasts for all
            # rows, then group by group (few rows), or row by row over the groups (8 rows,
            # whose 16 broadcasts would not fit beside the sums). Each sum gets the same
            # multiply-adds in the same order either way. (Row by row at 1-4 rows too: SmolLM2's
            # products 2.97-3.03 vs 2.80-2.87 ms at 1 row, 3.38-3.78 vs 3.27-3.54 at 4.)
            if R * len(cols) + R * C * S <= 24:
                bxs = [[broadcast(rows_at[r], builder.add(xoff, _i64(col))) for col in cols] for r in range(R)]
                for c in range(C):
                    for r in range(R):
                        for i in range(len(cols)):
                            add(r, c, i, bxs[r][i])
            else:
                for r in range(R):
                    for i, col in enumerate(cols):
                        bx = broadcast(rows_at[r], builder.add(xoff, _i64(col)))
                        for c in range(C):
                            add(r, c, i, bx)
    for r in range(R):
        for c in range(C):
            total = builder.load(acc[r][c][0])
            for a in acc[r][c][1:]:
                total = builder.fadd(total, builder.load(a))
            if L != GROUP:  # row n's two sums: lanes 2n and 2n + 1
                even = builder.shuffle_vector(total, total, ir.Constant(_vec(_I32, GROUP), list(range(0, L, 2))))
                odd = builder.shuffle_vector(total, total, ir.Constant(_vec(_I32, GROUP), list(range(1, L, 2))))
                total = builder.fadd(even, odd)
            col = builder.mul(builder.add(g, _i64(c)), _i64(GROUP))
            out = builder.gep(yp, [builder.add(builder.mul(builder.add(r0, _i64(r)), n_out), col)])
            builder.store(total, builder.bitcast(out, _V8F.as_pointer()), align=4)


_VNNI_CPUS = {"cascadelake", "cooperlake", "icelake-client", "icelake-server", "tigerlake", "rocketlake",
              "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5"}
_AVX2_CPUS = {"haswell", "broadwell", "skylake", "skylake-avx512", "cannonlake", "alderlake", "raptorlake",
              "meteorlake", "x86-64-v3", "x86-64-v4", "znver1", "znver2", "znver3"}


def _int8_mode() -> str | None:
    """The integer dot product numba's target CPU has for the int8 kernels: "vnni" (AVX-512
    VNNI with VL: vpdpbusd, 32 u8 x s8 products summed into 8 int32 per instruction), "avx2"
    (vpmaddubsw + vpmaddwd, the same in two), or None (no int8 kernels: int8 activations are
    refused)."""
    from numba.core import config

    name = (config.CPU_NAME or "host").lower()
    if name != "host":  # an explicit target (NUMBA_CPU_NAME, e.g. haswell for the AVX2 baseline)
        return "vnni" if name in _VNNI_CPUS else "avx2" if name in _AVX2_CPUS else None
    import llvmlite.binding as llvm

    have = llvm.get_host_cpu_features()
    if have.get("avx512vnni") and have.get("avx512vl"):
        return "vnni"
    return "avx2" if have.get("avx2") else None


INT8 = _int8_mode()
_V32I8, _V16I16 = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16)
_I8A2, _I32A2 = types.Array(types.int8, 2, "C"), types.Array(types.int32, 2, "C")


def _call(builder, name: str, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


@intrinsic(prefer_literal=True)
def _group_dot_int8(typingctx, kind, rows, dot, qs, d, m, xq, xd, xs, xsq, y, g, r0):
    """`_group_dot` with x quantized per block of 32 (xq int8 [R, K], xd its scales, xs = xd *
    sum(xq) and xsq = sum(xq) [R, K/32]): each block's products summed exactly in int32 by the
    CPU's u8 x s8 dot instructions, then scaled once by d (and the m term added) in fp32.
    dot (a literal): 0 AVX2 (vpmaddubsw + vpmaddwd), 1 AVX-512 VNNI (vpdpbusd on 256 bits; 512
    bits measured no faster: the broadcasts of x and the per-block scaling bound it). Each 32-bit
    lane holds four consecutive elements of one row, shuffled out of the packed layout in
    registers. The 4-bit values are unsigned already; Q8_0's signed bytes go in as q + 128 with
    128 sum(xq) subtracted (VNNI), or as |q| against x with q's signs (vpmaddubsw: |q| x stays
    within its int16 pair sums)."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (kind, rows, dot)):
        return None
    K_, R, DOT = kind.literal_value, rows.literal_value, dot.literal_value
    J = 32 if K_ == 0 else 16
    # Byte (jj * 8 + r) of a load (element j0 + jj of row r in the packed layout) to byte r * 4 + jj:
    # each 32-bit lane then holds four consecutive elements of one row, as the dot instructions take.
    to_lanes = [jj * GROUP + r for r in range(GROUP) for jj in range(4)]
    sig = types.void(kind, rows, dot, _U8A, _U16A, _U16A, _I8A2, _F32A2, _F32A2, _I32A2, _F32A2,
                     types.int64, types.int64)

    def codegen(context, builder, signature, args):
        _, _, _, qs_a, d_a, m_a, xq_a, xd_a, xs_a, xsq_a, y_a, g, r0 = args
        qp = _data(context, builder, _U8A, qs_a)
        dp, mp = _data(context, builder, _U16A, d_a), _data(context, builder, _U16A, m_a)
        xqp = _data(context, builder, _I8A2, xq_a)
        xdp, xsp, yp = (_data(context, builder, _F32A2, a) for a in (xd_a, xs_a, y_a))
        xsqp = _data(context, builder, _I32A2, xsq_a)
        K = cgutils.unpack_tuple(builder, cgutils.create_struct_proxy(_I8A2)(context, builder, value=xq_a).shape, 2)[1]
        n_out = cgutils.unpack_tuple(builder, cgutils.create_struct_proxy(_F32A2)(context, builder, value=y_a).shape, 2)[1]
        nb = builder.udiv(K, _i64(BLOCK))
        zero_f = ir.Constant(_V8F, [0.0] * GROUP)
        zero_i = ir.Constant(_V8I32, [0] * GROUP)
        ones16 = ir.Constant(_V16I16, [1] * 16)
        acc = [cgutils.alloca_once_value(builder, zero_f) for _ in range(R)]
        base = builder.mul(g, nb)
        xq_word = builder.bitcast(xqp, _I32.as_pointer())

        def dot_add(total, u, x):
            if DOT:
                return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32,
                             [total, builder.bitcast(u, _V8I32), builder.bitcast(x, _V8I32)])
            pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [u, x])
            return builder.add(total, _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [pairs, ones16]))

        def x_lanes(at):
            """x's four elements at .. at + 3 (at a multiple of 4) in every lane."""
            word = builder.load(builder.gep(xq_word, [builder.udiv(at, _i64(4))]), align=1)
            return builder.bitcast(_splat_i32(builder, word), _V32I8)

        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            blk = builder.add(base, b)
            qoff = builder.mul(blk, _i64(J * GROUP))
            isum = [zero_i] * R
            for j0 in range(0, J, 4):  # 32 bytes: elements j0 .. j0 + 3 of the eight rows
                raw = _load(builder, qp, builder.add(qoff, _i64(j0 * GROUP)), _V32I8)
                t = builder.shuffle_vector(raw, raw, ir.Constant(_vec(_I32, 32), to_lanes))
                sign = None
                if K_ != 0:
                    parts = [(builder.and_(t, ir.Constant(_V32I8, [15] * 32)), j0),
                             (builder.lshr(t, ir.Constant(_V32I8, [4] * 32)), j0 + 16)]
                elif DOT:
                    parts = [(builder.xor(t, ir.Constant(_V32I8, [-128] * 32)), j0)]
                else:  # |q| (psign(q, q); -128 stays 0x80 = 128 unsigned) against sign(q) x
                    parts = [(_call(builder, "llvm.x86.avx2.psign.b", _V32I8, [t, t]), j0)]
                    sign = t
                for r in range(R):
                    xrow = builder.add(builder.mul(builder.add(r0, _i64(r)), K), builder.mul(b, _i64(BLOCK)))
                    for u, col in parts:
                        xv = x_lanes(builder.add(xrow, _i64(col)))
                        if sign is not None:
                            xv = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [xv, sign])
                        isum[r] = dot_add(isum[r], u, xv)
            doff = builder.mul(blk, _i64(GROUP))
            dv = _scales(builder, dp, doff)
            if K_ == 2:
                mv = _scales(builder, mp, doff)
            elif K_ == 1:
                mv = builder.fmul(dv, ir.Constant(_V8F, [-8.0] * GROUP))
            for r in range(R):
                at = builder.add(builder.mul(builder.add(r0, _i64(r)), nb), b)
                total = isum[r]
                if K_ == 0 and DOT:  # sum (q + 128) x = sum q x + 128 sum x
                    s = builder.load(builder.gep(xsqp, [at]))
                    total = builder.sub(total, _splat_i32(builder, builder.mul(s, ir.Constant(_I32, 128))))
                scale = builder.fmul(dv, _splat(builder, builder.load(builder.gep(xdp, [at]))))
                a = _fma(builder, builder.sitofp(total, _V8F), scale, builder.load(acc[r]))
                if K_ != 0:
                    a = _fma(builder, mv, _splat(builder, builder.load(builder.gep(xsp, [at]))), a)
                builder.store(a, acc[r])
        col = builder.mul(g, _i64(GROUP))
        for r in range(R):
            out = builder.gep(yp, [builder.add(builder.mul(builder.add(r0, _i64(r)), n_out), col)])
            builder.store(builder.load(acc[r]), builder.bitcast(out, _V8F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _splat_i32(builder, value):
    v = builder.insert_element(ir.Constant(_V8I32, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_V8I32, [0] * GROUP))


@njit(cache=True)
def _quantize_rows(x, xq, xd, xs, xsq):
    """x [R, K] fp32 -> per block of 32: xq = round(x / xd) int8 in [-127, 127] with xd = max|x| /
    127, xsq = sum(xq), xs = xd * xsq (what Q8_1 holds in ggml)."""
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[r, b * 32 + j]))
            dx = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            total = 0
            for j in range(32):
                q = np.int32(np.round(x[r, b * 32 + j] * inv))
                xq[r, b * 32 + j] = np.int8(q)
                total += q
            xd[r, b] = dx
            xsq[r, b] = total
            xs[r, b] = dx * np.float32(total)


@intrinsic(prefer_literal=True)
def _groups_to_columns(typingctx, kind, qs, d, m, first, out):
    """Groups first.. (out.shape[1] / 8 of them), dequantized, into out [K, n] (fp32): W's
    transpose, so that each element j of a block is one contiguous 8-float store for a group's
    eight rows. Blocks outermost, groups inside: consecutive groups fill the same cache lines
    of out's rows while they are in L1 (groups outermost ran at ~1 G weights/s, partial lines
    written back). kind a literal as in _group_dot."""
    if not isinstance(kind, types.IntegerLiteral):
        return None
    K_ = kind.literal_value
    J = 32 if K_ == 0 else 16
    sig = types.void(kind, _U8A, _U16A, _U16A, types.int64, _F32A2)

    def codegen(context, builder, signature, args):
        _, qs_a, d_a, m_a, first, out_a = args
        qp = _data(context, builder, _U8A, qs_a)
        dp, mp = _data(context, builder, _U16A, d_a), _data(context, builder, _U16A, m_a)
        op = _data(context, builder, _F32A2, out_a)
        os_ = cgutils.create_struct_proxy(_F32A2)(context, builder, value=out_a)
        K, n = cgutils.unpack_tuple(builder, os_.shape, 2)
        nb = builder.udiv(K, _i64(BLOCK))
        count = builder.udiv(n, _i64(GROUP))
        with cgutils.for_range(builder, nb) as outer, cgutils.for_range(builder, count) as inner:
            b, i = outer.index, inner.index
            col = builder.mul(i, _i64(GROUP))
            blk = builder.add(builder.mul(builder.add(first, i), nb), b)
            qoff = builder.mul(blk, _i64(J * GROUP))
            doff = builder.mul(blk, _i64(GROUP))
            dv = _scales(builder, dp, doff)
            mv = (_scales(builder, mp, doff) if K_ == 2
                  else builder.fmul(dv, ir.Constant(_V8F, [-8.0] * GROUP)) if K_ == 1 else None)
            row0 = builder.mul(b, _i64(BLOCK))

            def store(value, element):
                at = builder.add(builder.mul(builder.add(row0, _i64(element)), n), col)
                builder.store(value, builder.bitcast(builder.gep(op, [at]), _V8F.as_pointer()), align=4)

            for j in range(J):
                raw = _load(builder, qp, builder.add(qoff, _i64(j * GROUP)), _V8I8)
                if K_ == 0:
                    store(builder.fmul(builder.sitofp(raw, _V8F), dv), j)
                else:  # as ggml: d q + m (Q4_1), d (q - 8) (Q4_0) = d q - 8 d up to rounding
                    v = builder.zext(raw, _V8I32)
                    lo = builder.sitofp(builder.and_(v, ir.Constant(_V8I32, [15] * GROUP)), _V8F)
                    hi = builder.sitofp(builder.lshr(v, ir.Constant(_V8I32, [4] * GROUP)), _V8F)
                    store(_fma(builder, lo, dv, mv), j)
                    store(_fma(builder, hi, dv, mv), j + 16)
        return context.get_dummy_value()

    return sig, codegen


def _make_columns(kind: int):
    # One thread, no OpenMP: this runs between torch's operations in a prefill, where a second
    # thread pool spinning beside torch's made the whole forward 3x slower.
    @njit(cache=True, nogil=True)
    def columns(qs, d, m, first, out):
        _groups_to_columns(kind, qs, d, m, first, out)

    return columns


_COLUMNS = {k: _make_columns(k) for k in _KIND.values()}


def dequantize_columns(w: PackedWeight, first_group: int, out: np.ndarray) -> np.ndarray:
    """Rows [8 first_group, 8 first_group + out.shape[1]) of W, dequantized and transposed into
    out [K, 8 count] (fp32, C-contiguous): the right-hand side of x @ W.T for a slice of W."""
    if out.dtype != np.float32 or out.ndim != 2 or out.shape[0] != w.shape[1] or out.shape[1] % GROUP \
            or not out.flags.c_contiguous or first_group + out.shape[1] // GROUP > w.groups:
        raise ValueError(f"dequantize_columns: out {out.dtype} {out.shape} does not fit {w.format.name} {w.shape}")
    _COLUMNS[_KIND[w.format.name]](w.qs, w.d, w.m, first_group, out)
    return out


def _make_kernel(kind: int, rows: int, lanes: int):
    """The product for one format and row count (both frozen into the compiled code)."""
    count = _groups_per_call(rows, lanes)

    @njit(parallel=True, cache=True)
    def kernel(qs, d, m, x, y):
        groups = y.shape[1] // 8
        calls = groups // count
        for i in prange(calls):
            _group_dot(kind, rows, lanes, count, qs, d, m, x, y, i * count, 0)
        for g in range(calls * count, groups):  # the groups left over: one at a time
            _group_dot(kind, rows, lanes, 1, qs, d, m, x, y, g, 0)

    return kernel


_DOT = {"avx2": 0, "vnni": 1}


def _make_int8(kind: int, rows: int, dot: int):
    @njit(parallel=True, cache=True)
    def kernel(qs, d, m, x, xq, xd, xs, xsq, y):
        _quantize_rows(x, xq, xd, xs, xsq)
        for g in prange(y.shape[1] // 8):
            _group_dot_int8(kind, rows, dot, qs, d, m, xq, xd, xs, xsq, y, g, 0)

    return kernel


def int8_linear(x: np.ndarray, w: PackedWeight, mode: str | None = None) -> np.ndarray:
    """x [R, K] fp32 (R <= 8) times W[N, K].T -> [R, N] fp32, with x quantized to int8 per block
    of 32 (as ggml's Q8_1) and the blocks' products summed exactly in int32: 2..8 rows of a
    batched decode step, where the fp32 multiply-adds, not memory, bound the fp32 kernels.
    mode: "vnni" or "avx2" (default INT8, by the CPU; None there: a clear error)."""
    x = _check(x, w)
    mode = mode or INT8
    if mode not in _DOT:
        raise LmforgeError(f"int8 products need AVX2 or AVX-512 VNNI; this CPU target has neither (mode {mode!r})")
    rows = x.shape[0]
    if not 1 <= rows <= ROWS:
        raise ValueError(f"int8_linear takes 1..{ROWS} rows, got {rows}")
    return _run_int8(_int8_kernel(_KIND[w.format.name], rows, _DOT[mode]), x, w)


def _run_int8(kernel, x: np.ndarray, w: PackedWeight) -> np.ndarray:
    rows, nb = x.shape[0], x.shape[1] // BLOCK
    xq = np.empty(x.shape, np.int8)
    xd, xs = np.empty((rows, nb), np.float32), np.empty((rows, nb), np.float32)
    xsq = np.empty((rows, nb), np.int32)
    y = np.empty((rows, w.groups * GROUP), np.float32)
    kernel(w.qs, w.d, w.m, x, xq, xd, xs, xsq, y)
    return y if y.shape[1] == w.shape[0] else y[:, : w.shape[0]]


TILE = 32  # rows of x per tile in the many-row product: a tile stays in L2 while W streams past


def _make_many(kind: int, lanes: int):
    """The product for more than 8 rows (prefill, scoring): x in tiles of TILE rows, each tile
    multiplied by every group of W in calls of eight rows (and one call for the 1-7 rows left
    at the end, if any). A group's blocks (3-8 KB) stay in L1 for the tile's calls and the tile
    in L2 for all groups, so W is read from memory once per tile and never written out in fp32."""

    @njit(parallel=True, cache=True)
    def kernel(qs, d, m, x, y):
        rows = x.shape[0]
        groups = y.shape[1] // 8
        # Tile by tile, the groups shared out between the threads: the same work for every thread
        # whatever the rows (threads taking whole tiles did 4x the other's work on a 40-row
        # prefill: 32 + 8 rows; 33 -> 22 ms for SmolLM2's 42-token prefill products).
        for t in range(0, rows, TILE):
            end = min(rows, t + TILE)
            for g in prange(groups):
                for r in range(t, end, 8):
                    # one group a call, as the few-row kernels (the same sums); 1-7 rows at the end
                    _group_dot_rows(kind, lanes, min(8, end - r), qs, d, m, x, y, g, r)

    return kernel


def many_row_linear(x: np.ndarray, w: PackedWeight, lanes: int | None = None) -> np.ndarray:
    """x [R, K] fp32 (any R >= 1) times W[N, K].T -> [R, N] fp32, computed on the blocks."""
    x = _check(x, w)
    return _run(_compiled(_make_many, _KIND[w.format.name], lanes or LANES), x, w)


_KERNELS: dict[tuple, object] = {}


def _compiled(make, *key):
    """The kernel `make(*key)` builds, made once per process (numba caches its code on disk)."""
    k = _KERNELS.get((make, *key))  # noqa: SIM401 (hot path: no default built per call)
    if k is None:
        k = _KERNELS[(make, *key)] = make(*key)
    return k


def _kernel(kind: int, rows: int, lanes: int | None = None):
    return _compiled(_make_kernel, kind, rows, lanes or LANES)


def _int8_kernel(kind: int, rows: int, dot: int):
    return _compiled(_make_int8, kind, rows, dot)


def _check(x: np.ndarray, w: PackedWeight) -> np.ndarray:
    if not isinstance(w, PackedWeight):
        raise TypeError(f"expected a PackedWeight, got {type(w).__name__}")
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {x.dtype} {x.shape} does not match {w.format.name} weights {w.shape} "
                         "(x fp32 [R, K], w [N, K])")
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def product(x: np.ndarray, w: PackedWeight, int8: bool = False) -> np.ndarray:
    """The numpy decoder's products, without checks (its own C-contiguous fp32 rows, 1..8: a
    decode step makes ~120 calls, where microseconds add up). int8: `int8_linear`'s arithmetic
    (the caller checked that INT8 is set), else the fp32-activation kernels."""
    rows = x.shape[0]
    if int8:
        return _run_int8(_int8_kernel(_KIND[w.format.name], rows, _DOT[INT8]), x, w)
    return _run(_kernel(_KIND[w.format.name], rows), x, w)


def linear(x: np.ndarray, w: PackedWeight) -> np.ndarray:
    """x [R, K] fp32 times W[N, K].T -> [R, N] fp32 for any R, fp32 activations: the torch
    modules' products (forward of prefill, scoring, training). The few-row kernels up to 8 rows,
    the many-row one beyond."""
    return few_row_linear(x, w) if 0 < x.shape[0] <= ROWS else many_row_linear(x, w)


def _run(kernel, x: np.ndarray, w: PackedWeight) -> np.ndarray:
    y = np.empty((x.shape[0], w.groups * GROUP), np.float32)
    kernel(w.qs, w.d, w.m, x, y)
    return y if y.shape[1] == w.shape[0] else y[:, : w.shape[0]]


def few_row_linear(x: np.ndarray, w: PackedWeight, lanes: int | None = None) -> np.ndarray:
    """x [R, K] fp32 (R <= 8) times W[N, K].T -> [R, N] fp32, reading W's blocks once.
    lanes: 8 or 16 (default LANES, by the CPU)."""
    x = _check(x, w)
    rows = x.shape[0]
    if not 1 <= rows <= ROWS:
        raise ValueError(f"few_row_linear takes 1..{ROWS} rows, got {rows}")
    return _run(_kernel(_KIND[w.format.name], rows, lanes), x, w)


@njit(cache=True)
def _f16(h):
    """An fp16 bit pattern (uint16) -> float32, exactly (numba has no float16 type)."""
    h = np.int32(h)
    e = (h >> 10) & 31
    mant = h & 1023
    if e == 31:
        v = np.inf if mant == 0 else np.nan
    elif e == 0:
        v = mant * 2.0**-24
    else:
        v = (mant + 1024) * 2.0 ** (e - 25)
    return np.float32(-v if h & 0x8000 else v)


@njit(cache=True)
def _gather(qs, d, m, kind, cols, ids, out):
    nb = cols // 32
    J = 32 if kind == 0 else 16
    for i in range(ids.shape[0]):
        t = ids[i]
        g, k = t // 8, t % 8
        for b in range(nb):
            blk = g * nb + b
            dk = _f16(d[blk * 8 + k])
            mk = _f16(m[blk * 8 + k]) if kind == 2 else np.float32(0.0)
            for j in range(J):
                v = qs[(blk * J + j) * 8 + k]
                if kind == 0:
                    out[i, b * 32 + j] = dk * np.float32(np.int8(v))
                elif kind == 1:
                    out[i, b * 32 + j] = dk * np.float32(np.int32(v & 15) - 8)
                    out[i, b * 32 + 16 + j] = dk * np.float32(np.int32(v >> 4) - 8)
                else:
                    out[i, b * 32 + j] = dk * np.float32(v & 15) + mk
                    out[i, b * 32 + 16 + j] = dk * np.float32(v >> 4) + mk


def rows_of(w: PackedWeight, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of W as fp32 [len(ids), K]: an embedding lookup on a quantized table."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise IndexError(f"row ids must be in [0, {w.shape[0]}), got {int(ids.min())}..{int(ids.max())}")
    out = np.empty((ids.size, w.shape[1]), np.float32)
    _gather(w.qs, w.d, w.m, _KIND[w.format.name], w.shape[1], ids, out)
    return out
