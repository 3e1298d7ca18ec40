"""lmforge.quant.kernels (and the packed layout they read) against plain numpy: the weights
dequantized by gguf's reference code, then a float64 matrix product. Random *blocks* (random bytes with random fp16 scales), not only
quantized random weights, so every nibble and int8 value (Q8_0's -128, which ggml's quantizer
never writes) and subnormal scales are decoded."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from lmforge.quant import FORMATS, QuantTensor, quantize
from lmforge.quant.kernels import (TILE, _quantize_rows, dequantize_columns, few_row_linear, int8_linear,
                                   many_row_linear, rows_of)
from lmforge.quant.modules import matmul, matmul_transposed
from lmforge.quant.packed import pack

pytestmark = pytest.mark.usefixtures("one_thread")

GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}
NAMES = sorted(FORMATS)
U = 2.0**-24  # fp32's unit roundoff
# Odd shapes: output rows not a multiple of the 8-row groups (padding), K = 32 * odd.
SHAPES = [(37, 96), (130, 224), (5, 32)]


def random_blocks(name: str, rows: int, cols: int, seed: int) -> QuantTensor:
    rng = np.random.default_rng(seed)
    fmt = FORMATS[name]
    nb = cols // 32
    b = rng.integers(0, 256, size=(rows, nb, fmt.block_bytes), dtype=np.uint8)
    # Scales (and Q4_1's mins) of many magnitudes and both signs, a few fp16 subnormals among them.
    n_half = 2 if fmt.has_min else 1
    scales = (rng.standard_normal((rows, nb, n_half)) * 10.0 ** rng.uniform(-3, 0, (rows, nb, n_half)))
    scales[0, 0, 0] = 3e-6  # below fp16's smallest normal (6.1e-5)
    b[..., : 2 * n_half] = scales.astype("<f2").view(np.uint8).reshape(rows, nb, 2 * n_half)
    return QuantTensor(fmt, (rows, cols), b.reshape(rows, -1))


def magnitudes(w: QuantTensor) -> np.ndarray:
    """What an fp32 product's rounding error scales with, per weight: the kernels sum d q x and
    add m sum(x) (Q4_1) or -8 d sum(x) (Q4_0, q the stored nibble) per block, so |d q| + |m|."""
    d, m, q = w.components()
    if w.format.name == "q4_0":
        return np.abs(np.repeat(d, 32, axis=1)) * (np.abs(q + 8) + 8)
    a = np.abs(np.repeat(d, 32, axis=1) * q)
    return a + np.abs(np.repeat(m, 32, axis=1)) if m is not None else a


def bound(x: np.ndarray, w: QuantTensor) -> np.ndarray:
    """fp32 sums of K products in any order are within K u sum|w x| of the exact sum (the kernels
    reassociate), + 8 u for the scale products, the block sums of x and the fp32 weights."""
    return (w.shape[1] + 8) * U * (np.abs(x).astype(np.float64) @ magnitudes(w).T) + 1e-30


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows, cols", SHAPES + [(8, 64), (9, 32)])
def test_packing_is_a_lossless_permutation(name, rows, cols):
    w = random_blocks(name, rows, cols, seed=rows * cols)
    p = pack(w)
    assert p.groups == -(-rows // 8) and p.nbytes >= w.nbytes
    back = p.to_blocks()
    assert back.format is w.format and back.shape == w.shape and np.array_equal(back.blocks, w.blocks)
    # Rows looked up in the packed layout (an embedding): bit for bit what gguf's reference gives.
    ref = gguf_dequantize(w.blocks, GGML[name]).astype(np.float32)
    ids = np.array([rows - 1, 0, rows // 2, rows - 1])
    assert np.array_equal(rows_of(p, ids), ref[ids])
    with pytest.raises(IndexError, match="row ids"):
        rows_of(p, np.array([rows]))
    # The transposed slices prefill multiplies by: d q (+ m, or - 8 d) in one fused rounding, so
    # within an ulp of |d q| + |m| of ggml's two-step values.
    cols = dequantize_columns(p, 0, np.empty((cols, p.groups * 8), np.float32))[:, :rows].T
    assert (np.abs(cols - ref) <= 2 * U * (magnitudes(w) + 1e-30)).all()
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_columns(p, 1, np.empty((w.shape[1], p.groups * 8), np.float32))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows, cols", SHAPES)
@pytest.mark.parametrize("lanes", [8, 16])
def test_few_row_products_match_dequantized_reference(name, rows, cols, lanes):
    w = random_blocks(name, rows, cols, seed=rows + cols)
    p = pack(w)
    ref_w = gguf_dequantize(w.blocks, GGML[name]).astype(np.float64)
    rng = np.random.default_rng(1)
    for r in range(1, 9):
        x = (rng.standard_normal((r, cols)) * 3).astype(np.float32)
        y = few_row_linear(x, p, lanes)
        assert y.shape == (r, rows) and y.dtype == np.float32
        err = np.abs(y - x.astype(np.float64) @ ref_w.T)
        b = bound(x, w)
        assert (err <= b).all(), f"R={r}: error {err.max():.3g} above the bound at {np.unravel_index((err / b).argmax(), err.shape)}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lanes", [8, 16])
def test_a_rows_sums_do_not_depend_on_the_rows_beside_it(name, lanes):
    """Continuous batching relies on it: a sequence decodes to the same bits alone or in a batch.
    The calls take a different number of weight groups at each row count (4 at one row, 2 at
    two, 1 from four) and leave some over at 5 and 7 groups; every row, every count, same bits."""
    for out_rows in (40, 56, 64):
        w = pack(random_blocks(name, out_rows, 96, seed=out_rows))
        x = (np.random.default_rng(out_rows).standard_normal((8, 96)) * 3).astype(np.float32)
        alone = np.concatenate([few_row_linear(x[i : i + 1], w, lanes) for i in range(8)])
        for rows in range(2, 9):
            assert np.array_equal(few_row_linear(x[:rows], w, lanes), alone[:rows]), f"{out_rows} outputs, {rows} rows"
        assert np.array_equal(many_row_linear(np.concatenate([x, x[::-1]]), w, lanes), np.concatenate([alone, alone[::-1]]))


def _cpu_has(mode: str) -> bool:
    import llvmlite.binding as llvm

    have = llvm.get_host_cpu_features()
    return bool(have.get("avx2")) if mode == "avx2" else bool(have.get("avx512vnni") and have.get("avx512vl"))


def quantized_rows(x: np.ndarray):
    """x quantized per block of 32 by the kernels' own routine, checked against its definition."""
    rows, nb = x.shape[0], x.shape[1] // 32
    xq, xd = np.empty(x.shape, np.int8), np.empty((rows, nb), np.float32)
    xs, xsq = np.empty((rows, nb), np.float32), np.empty((rows, nb), np.int32)
    _quantize_rows(x, xq, xd, xs, xsq)
    amax = np.abs(x.reshape(rows, nb, 32)).max(-1)
    assert np.array_equal(xd, amax / np.float32(127))
    assert (np.abs(xq) <= 127).all() and np.array_equal(xsq, xq.reshape(rows, nb, 32).sum(-1, dtype=np.int32))
    err = np.abs(x.reshape(rows, nb, 32) - xq.reshape(rows, nb, 32) * xd[..., None].astype(np.float64))
    assert (err <= xd[..., None] * (0.5 + 1e-5)).all()  # rounded to the nearest step
    return xq, xd, xs


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["avx2", "vnni"])
def test_int8_products_match_their_integer_reference(name, mode):
    """Batched decode steps: x rounded to int8 per block, each block's products summed exactly
    in int32 by the CPU's dot instructions, scaled in fp32. Against int64 sums of the same
    integers, scaled in float64; and the two instruction sets give the same bits."""
    if not _cpu_has(mode):
        pytest.skip(f"this CPU has no {mode}")
    for rows, cols in SHAPES:
        w = random_blocks(name, rows, cols, seed=rows + 3 * cols)
        p = pack(w)
        d, m, q = (a.astype(np.float64) if a is not None else None for a in w.components())
        if name == "q4_0":
            q = q + 8  # the kernels sum the stored nibbles and add -8 d (x's block sum)
        rng = np.random.default_rng(rows)
        for r in (1, 2, 5, 8):
            x = (rng.standard_normal((r, cols)) * 3).astype(np.float32)
            x[0, :32] = 0  # an all-zero block: scale 0
            xq, xd, xs = quantized_rows(x)
            nb = cols // 32
            sums = np.einsum("nbj,rbj->rnb", q.reshape(rows, nb, 32).astype(np.int64),
                             xq.reshape(r, nb, 32).astype(np.int64))
            terms = d[None] * xd.astype(np.float64)[:, None] * sums
            if name == "q4_1":
                extra = m[None] * xs.astype(np.float64)[:, None]
            elif name == "q4_0":
                extra = -8 * d[None] * xs.astype(np.float64)[:, None]
            else:
                extra = np.zeros_like(terms)
            ref = (terms + extra).sum(-1)
            bound = (nb + 4) * 2 * U * (np.abs(terms) + np.abs(extra)).sum(-1) + 1e-30
            y = int8_linear(x, p, mode)
            assert y.shape == (r, rows) and y.dtype == np.float32
            assert (np.abs(y - ref) <= bound).all(), f"{rows}x{cols} R={r}"
            if mode == "vnni" and _cpu_has("avx2"):
                assert np.array_equal(y, int8_linear(x, p, "avx2"))
    with pytest.raises(ValueError, match="1..8 rows"):
        int8_linear(np.zeros((9, 32), np.float32), pack(random_blocks(name, 8, 32, seed=0)), mode)


def test_decoder_products_take_fp32_or_int8_activations_as_asked():
    """`product` (the numpy decoder's): the fp32-activation kernel by default, the int8 one when
    asked, bit for bit, for any row count."""
    from lmforge.quant.kernels import INT8, product

    w = pack(random_blocks("q4_1", 40, 96, seed=9))
    x = np.random.default_rng(10).standard_normal((3, 96)).astype(np.float32)
    for rows in (1, 3):
        assert np.array_equal(product(x[:rows], w), few_row_linear(x[:rows], w))
        if INT8:
            assert np.array_equal(product(x[:rows], w, True), int8_linear(x[:rows], w))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lanes", [8, 16])
def test_many_row_products_match_dequantized_reference(name, lanes):
    """Beyond 8 rows (prefill, scoring): tiles of x against every group in calls of eight rows,
    the last call padded with zero rows (13 = 8 + 5; 2 TILE + 13 = two whole tiles + 8 + 5)."""
    w = random_blocks(name, 1030, 96, seed=5)
    p = pack(w)
    ref_w = gguf_dequantize(w.blocks, GGML[name]).astype(np.float64)
    rng = np.random.default_rng(6)
    for r in (9, 13, 2 * TILE + 13):
        x = (rng.standard_normal((r, 96)) * 3).astype(np.float32)
        y = many_row_linear(x, p, lanes)
        assert y.shape == (r, 1030) and y.dtype == np.float32
        assert (np.abs(y - x.astype(np.float64) @ ref_w.T) <= bound(x, w)).all(), f"R={r}"
    # The same sums as the few-row kernel's, row for row.
    assert np.array_equal(many_row_linear(x[:8], p, lanes), few_row_linear(x[:8], p, lanes))


@pytest.mark.parametrize("name", NAMES)
def test_products_and_gradient_through_the_module_path(name):
    w = random_blocks(name, 1030, 96, seed=5)
    p = pack(w)
    ref_w = gguf_dequantize(w.blocks, GGML[name]).astype(np.float64)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((13, 96)).astype(np.float32)
    for rows in (3, 13):
        assert (np.abs(matmul(x[:rows], p) - x[:rows].astype(np.float64) @ ref_w.T) <= bound(x[:rows], w)).all()
    # Backward (the input gradient): slices of W dequantized into a buffer + BLAS.
    g = rng.standard_normal((13, 1030)).astype(np.float32)
    gx = matmul_transposed(g, p)
    ref = g.astype(np.float64) @ ref_w
    assert np.allclose(gx, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_slices_cover_a_matrix_larger_than_the_buffer(monkeypatch):
    from lmforge.quant import modules

    monkeypatch.setattr(modules, "_SLICE_BYTES", 4 * 64 * 16)  # two groups of 8 rows per slice
    w = random_blocks("q4_1", 45, 64, seed=7)
    g = np.random.default_rng(8).standard_normal((10, 45)).astype(np.float32)
    ref = g.astype(np.float64) @ gguf_dequantize(w.blocks, GGML["q4_1"]).astype(np.float64)
    assert np.allclose(matmul_transposed(g, pack(w)), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name", NAMES)
def test_products_on_quantized_weights(name):
    """Blocks as ggml's quantizer writes them (the ones real files hold) give the same products
    as their dequantized weights."""
    rng = np.random.default_rng(2)
    w = quantize(rng.standard_normal((67, 160)).astype(np.float32), name)
    x = rng.standard_normal((8, 160)).astype(np.float32)
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    assert (np.abs(few_row_linear(x, pack(w)) - ref) <= bound(x, w)).all()
    assert (np.abs(few_row_linear(x[:1], pack(w)) - ref[:1]) <= bound(x[:1], w)).all()


def test_wrong_inputs_are_refused():
    p = pack(quantize(np.ones((4, 64), np.float32), "q8_0"))
    with pytest.raises(ValueError, match=r"does not match q8_0 weights \(4, 64\)"):
        few_row_linear(np.ones((1, 32), np.float32), p)
    with pytest.raises(ValueError, match="float64"):
        few_row_linear(np.ones((1, 64)), p)
    with pytest.raises(ValueError, match="1..8 rows"):
        few_row_linear(np.ones((9, 64), np.float32), p)
    with pytest.raises(TypeError, match="PackedWeight"):
        few_row_linear(np.ones((1, 64), np.float32), np.ones((4, 64), np.float32))
