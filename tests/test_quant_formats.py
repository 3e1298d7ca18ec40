"""lmforge.quant.formats against gguf's reference quantizers: the same blocks, byte for byte."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lmforge.errors import LmforgeError
from lmforge.quant import FORMATS, from_gguf_bytes, quantize, to_gguf_bytes

GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}
NAMES = sorted(FORMATS)


def tricky(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random rows at many magnitudes, plus the cases where a quantizer's details show: zero
    rows, constant blocks, ties at exactly .5 after scaling, one outlier per block, fp16-subnormal
    scales, and a row whose largest value is negative."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w *= (10.0 ** rng.uniform(-6, 4, size=(rows, 1))).astype(np.float32)
    w[0] = 0.0
    w[1] = 0.75
    # Q8_0 with amax 127 has scale 1: halves are exact ties for roundf (away from zero).
    w[2] = np.resize(np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5, 0.49999997], np.float32), cols)
    # Q4_0 with peak -8 has scale 1: v + 8.5 lands on integers and halves.
    w[3] = np.resize(np.array([-8.0, 7.0, -7.5, 6.5, 0.5, -0.5, 3.0, 7.5], np.float32), cols)
    w[4, ::32] = 1000.0  # one outlier per block
    w[5] = rng.standard_normal(cols).astype(np.float32) * np.float32(1e-7)  # scales below fp16's normals
    w[6] = -np.abs(w[6])
    return w


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows, cols, seed", [(7, 32, 0), (13, 96, 1), (64, 576, 2), (1, 32 * 9, 3)])
def test_blocks_identical_to_gguf(name, rows, cols, seed):
    w = tricky(max(rows, 7), cols, seed)[-rows:]
    q = quantize(w, name)
    ref = gguf_quantize(w, GGML[name])
    assert q.blocks.dtype == np.uint8 and q.blocks.shape == ref.shape
    differ = np.flatnonzero(q.blocks != ref)
    assert differ.size == 0, f"{differ.size} bytes differ, first at {np.unravel_index(differ[0], ref.shape)}"
    assert q.nbytes == rows * cols // 32 * FORMATS[name].block_bytes
    out = q.dequantize()
    assert out.dtype == np.float32 and out.shape == (rows, cols)
    np.testing.assert_array_equal(out, gguf_dequantize(ref, GGML[name]))


@pytest.mark.parametrize("name", NAMES)
def test_quantization_error_within_half_a_step(name):
    """Independent of gguf: each value comes back within half a quantization step (plus the
    fp16 rounding of the scale), so a layout error (wrong nibble order, scale read from the wrong
    bytes) cannot pass by agreeing with a reference that shares it."""
    w = np.random.default_rng(5).standard_normal((9, 160)).astype(np.float32)
    q = quantize(w, name)
    d, m, ints = q.components()
    step = np.repeat(np.abs(d), 32, axis=1)
    err = np.abs(q.dequantize() - w)
    # Scales are rounded to fp16 (relative 2^-11): the grid is off by up to 2^-11 of the block's range.
    rng_ = np.repeat(np.abs(w).reshape(9, -1, 32).max(-1) * (2 if name == "q4_1" else 1), 32, axis=1)
    # Q4_0 spans [-8d, 7d] with the block's peak at -8d: a value near +8d is clipped to 7d.
    half = np.where((ints == 7) & (name == "q4_0"), 1.0, 0.5)
    assert (err <= half * step + rng_ * 2.0 ** -10 + 1e-7).all()
    # The nibble order: element j is the low nibble of byte j, element j + 16 the high one.
    if name != "q8_0":
        start = 4 if name == "q4_1" else 2
        byte0 = int(q.blocks[0, start])
        assert ints[0, 0] == (byte0 & 15) - (8 if name == "q4_0" else 0)
        assert ints[0, 16] == (byte0 >> 4) - (8 if name == "q4_0" else 0)


@pytest.mark.parametrize("name", NAMES)
def test_gguf_file_bytes_round_trip(tmp_path, name):
    """A tensor written to a GGUF file by gguf's writer, read back by its reader, becomes a
    QuantTensor over the same bytes and dequantizes as gguf does; its bytes go back unchanged."""
    w = tricky(11, 64, 7)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", gguf_quantize(w, GGML[name]), raw_dtype=GGML[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t = gguf.GGUFReader(str(path)).tensors[0]
    q = from_gguf_bytes(t.data, int(t.tensor_type), name="w")
    assert q.format.name == name and q.shape == tuple(int(n) for n in reversed(t.shape))
    np.testing.assert_array_equal(to_gguf_bytes(q), np.asarray(t.data))
    np.testing.assert_array_equal(q.dequantize(), gguf_dequantize(np.asarray(t.data), t.tensor_type))
    assert from_gguf_bytes(np.asarray(t.data), name).shape == q.shape  # by name as well as by type id


def refused(match: str, fn, *args, **kw) -> None:
    with pytest.raises(LmforgeError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)


def test_refusals_are_one_line_errors():
    refused(r"wq: shape \(4, 48\) .* not a multiple of the block size 32", quantize,
            np.zeros((4, 48), np.float32), "q8_0", name="wq")
    refused(r"only 2-D weights.*\(64,\)", quantize, np.zeros(64, np.float32), "q4_0")
    bad = np.ones((2, 32), np.float32)
    bad[1, 3] = np.nan
    refused("NaN or infinite", quantize, bad, "q4_1")
    refused("too large for q8_0's fp16 scales", quantize, np.full((1, 32), 1e7, np.float32), "q8_0")
    refused("unknown quantization format 'q5_0'", quantize, np.zeros((1, 32), np.float32), "q5_0")
    refused("blk.0.attn_q.weight: ggml type 12 is not a block format", from_gguf_bytes,
            np.zeros((1, 144), np.uint8), 12, name="blk.0.attn_q.weight")
    refused("35 bytes per row is not a whole number of 34-byte q8_0 blocks", from_gguf_bytes,
            np.zeros((2, 35), np.uint8), "q8_0")
