"""lmforge.quant.kernels against plain numpy: the weights dequantized by gguf's reference code,
then a float64 matrix product. Random *blocks* (random bytes with random fp16 scales), not only
quantized random weights, so every nibble and int8 value (Q8_0's -128, which ggml's quantizer
never writes) and subnormal scales are decoded."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from lmforge.quant import FORMATS, QuantTensor, quantize
from lmforge.quant.kernels import linear, linear_q8, quantize_activations

pytestmark = pytest.mark.usefixtures("one_thread")

GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}
NAMES = sorted(FORMATS)
U = 2.0**-24  # fp32's unit roundoff
# Odd shapes: output rows not a multiple of the kernels' chunk (16) or of anything else, K = 32 * odd.
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
    """|d q| + |m| per weight: what an fp32 product's rounding error scales with (for Q4_1,
    d q + m may be small while its parts are not)."""
    d, m, q = w.components()
    a = np.abs(np.repeat(d, 32, axis=1) * q)
    return a + np.abs(np.repeat(m, 32, axis=1)) if m is not None else a


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows, cols", SHAPES)
def test_linear_matches_dequantized_reference(name, rows, cols):
    w = random_blocks(name, rows, cols, seed=rows + cols)
    ref_w = gguf_dequantize(w.blocks, GGML[name]).astype(np.float64)
    amag = magnitudes(w)
    rng = np.random.default_rng(1)
    for r in (1, 2, 3, 4, 5, 6, 7, 8, 11):
        x = (rng.standard_normal((r, cols)) * 3).astype(np.float32)
        y = linear(x, w)
        assert y.shape == (r, rows) and y.dtype == np.float32
        ref = x.astype(np.float64) @ ref_w.T
        # fp32 sums of K products in any order are within K u sum|w x| of the exact sum (the
        # kernels reassociate); + 3 u for the scale products and the reference's own fp32 weights.
        bound = (cols + 3) * U * (np.abs(x).astype(np.float64) @ amag.T) + 1e-30
        err = np.abs(y - ref)
        assert (err <= bound).all(), f"R={r}: error {err.max():.3g} above the bound at {np.unravel_index((err / bound).argmax(), err.shape)}"


@pytest.mark.parametrize("name", NAMES)
def test_linear_on_quantized_weights(name):
    """Blocks as ggml's quantizer writes them (the ones real files hold) give the same products
    as their dequantized weights."""
    rng = np.random.default_rng(2)
    w = quantize(rng.standard_normal((67, 160)).astype(np.float32), name)
    x = rng.standard_normal((8, 160)).astype(np.float32)
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    bound = 163 * U * (np.abs(x).astype(np.float64) @ magnitudes(w).T)
    assert (np.abs(linear(x, w) - ref) <= bound).all()
    assert (np.abs(linear(x[:1], w) - ref[:1]) <= bound[:1]).all()


def test_activation_quantization():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 96)) * 10.0 ** rng.uniform(-4, 3, (3, 96))).astype(np.float32)
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, values 0
    xq, dx, xsum = quantize_activations(x)
    assert xq.dtype == np.int8 and dx.shape == xsum.shape == (3, 3)
    blocks = x.reshape(3, 3, 32)
    np.testing.assert_allclose(dx, np.abs(blocks).max(-1) / 127, rtol=2 * U)
    assert dx[1, 1] == 0 and not xq[1, 32:64].any()
    assert np.abs(xq.astype(int)).max() <= 127 and (np.abs(xq.astype(int)).reshape(3, 3, 32).max(-1) >= 126).sum() >= 8
    back = xq.reshape(3, 3, 32) * dx[..., None].astype(np.float64)
    assert (np.abs(back - blocks) <= dx[..., None] * (0.5 + 1e-6)).all()
    np.testing.assert_allclose(xsum, blocks.sum(-1, dtype=np.float64), rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows, cols", SHAPES)
def test_linear_q8_error_bound(name, rows, cols):
    """Activations quantized per block: each moves by at most dx/2, so the product moves by at
    most sum_i |w_i| dx_i / 2 (plus fp32 rounding). And the kernel computes exactly the product
    with the quantized activations (up to rounding), which a kernel quietly using fp32
    activations would not."""
    w = random_blocks(name, rows, cols, seed=3 * rows + cols)
    ref_w = gguf_dequantize(w.blocks, GGML[name]).astype(np.float64)
    amag = magnitudes(w)
    d, m, q = w.components()
    rng = np.random.default_rng(4)
    for r in (1, 2, 5, 8, 11):
        x = (rng.standard_normal((r, cols)) * 3).astype(np.float32)
        y = linear_q8(x, w).astype(np.float64)
        xq, dx, xsum = quantize_activations(x)
        dx_each = np.repeat(dx, 32, axis=1).astype(np.float64)
        rounding = (cols + 4) * U * ((np.abs(x) + dx_each) @ amag.T) + 1e-30
        # Against the fp32 product: the derived bound.
        quant_bound = 0.5 * dx_each @ np.abs(ref_w).T
        err = np.abs(y - x.astype(np.float64) @ ref_w.T)
        assert (err <= quant_bound + rounding).all(), f"R={r}: {(err / (quant_bound + rounding)).max():.3g}x the bound"
        # Against the product with quantized activations: the integer part is exact, Q4_1's
        # m term uses the exact block sums.
        qx = xq.astype(np.float64) * dx_each
        dq = np.repeat(d, 32, axis=1) * q
        exact = qx @ dq.T + (xsum.astype(np.float64) @ m.T if m is not None else 0.0)
        assert (np.abs(y - exact) <= rounding).all()
    # The activations were really quantized: the result differs from the fp32 kernel's by more
    # than rounding.
    assert (np.abs(y - linear(x, w)) > rounding).any()


def test_wrong_inputs_are_refused():
    w = quantize(np.ones((4, 64), np.float32), "q8_0")
    with pytest.raises(ValueError, match=r"does not match q8_0 weights \(4, 64\)"):
        linear(np.ones((1, 32), np.float32), w)
    with pytest.raises(ValueError, match="float64"):
        linear_q8(np.ones((1, 64)), w)
    with pytest.raises(TypeError, match="QuantTensor"):
        linear(np.ones((1, 64), np.float32), np.ones((4, 64), np.float32))
