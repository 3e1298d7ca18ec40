"""The numba decode kernels against numpy/torch references of the same arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.generate import kernels


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    with kernels.kernel_threads(request.param):
        yield request.param


def _rand(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 17])
@pytest.mark.parametrize("n_out,k_in", [(5, 7), (8, 64), (33, 40)])
def test_few_row_linear_matches_numpy(threads, rows, n_out, k_in):
    rng = np.random.default_rng(rows * 100 + n_out)
    x, w = _rand(rng, rows, k_in), _rand(rng, n_out, k_in)
    got = kernels.few_row_linear(x, w)
    assert got.shape == (rows, n_out) and got.dtype == np.float32
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_few_row_linear_takes_strided_rows():
    rng = np.random.default_rng(0)
    x, w = _rand(rng, 4, 20)[:, ::2], _rand(rng, 6, 10)  # x not contiguous
    np.testing.assert_allclose(kernels.few_row_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)


def test_few_row_linear_rejects_bad_input():
    w = np.zeros((4, 8), dtype=np.float32)
    with pytest.raises(TypeError, match="fp32"):
        kernels.few_row_linear(np.zeros((1, 8)), w)  # float64
    with pytest.raises(ValueError, match="does not match"):
        kernels.few_row_linear(np.zeros((1, 7), dtype=np.float32), w)


def _reference_attention(qkv, pos, rope, keys, values, start, bias, scale):
    """numpy: rotate, write the cache, then softmax(q k^T * scale + bias) v per head."""
    B, width, D = qkv.shape
    Hkv = keys.shape[1]
    H = width - 2 * Hkv
    qk = qkv[:, : H + Hkv].astype(np.float64)
    if rope is not None:
        cos, sin = rope[0][pos][:, None, :], rope[1][pos][:, None, :]
        qk = qk * cos + np.roll(qk, D // 2, axis=-1) * sin
    keys[:, :, start] = qk[:, H:]
    values[:, :, start] = qkv[:, H + Hkv :]
    q = qk[:, :H].reshape(B, Hkv, H // Hkv, D)
    k, v = keys[:, :, : start + 1].astype(np.float64), values[:, :, : start + 1].astype(np.float64)
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    if bias is not None:
        scores = scores + bias[:, None, None, :]
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).reshape(B, H * D)


@pytest.mark.parametrize("rope", [False, True], ids=["learned", "rope"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_decode_attention_matches_reference(threads, rope, masked, heads, kv_heads):
    rng = np.random.default_rng(heads + 10 * kv_heads + 100 * rope + 1000 * masked)
    B, D, max_len, start = 3, 16, 12, 7
    qkv = _rand(rng, B, heads + 2 * kv_heads, D)
    pos = np.array([7, 5, 2], dtype=np.int64)
    tables = (_rand(rng, max_len, D), _rand(rng, max_len, D)) if rope else None
    keys, values = _rand(rng, B, kv_heads, max_len, D), _rand(rng, B, kv_heads, max_len, D)
    bias = None
    if masked:  # left padding: row 1 skips its first 2 positions, row 2 its first 5
        bias = np.zeros((B, start + 1), dtype=np.float32)
        bias[1, :2] = -np.inf
        bias[2, :5] = -np.inf
    ref_keys, ref_values = keys.copy(), values.copy()
    want = _reference_attention(qkv, pos, tables, ref_keys, ref_values, start, bias, 0.25)
    got = kernels.decode_attention(qkv, pos, tables, keys, values, start, bias, 0.25)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(keys, ref_keys, rtol=1e-6, atol=1e-6)  # the rotated k went into the cache
    np.testing.assert_array_equal(values, ref_values)


@pytest.mark.parametrize("kind", ["layernorm", "layernorm-no-bias", "rmsnorm"])
def test_norm_matches_torch(threads, kind):
    rng = np.random.default_rng(len(kind))
    x, w, b = _rand(rng, 5, 48) * 3 + 1, _rand(rng, 48), _rand(rng, 48)
    t = torch.from_numpy
    if kind == "rmsnorm":
        got, want = kernels.norm(x, w, None, True, 1e-5), F.rms_norm(t(x), (48,), t(w), 1e-5)
    else:
        bias = b if kind == "layernorm" else None
        got = kernels.norm(x, w, bias, False, 1e-5)
        want = F.layer_norm(t(x), (48,), t(w), None if bias is None else t(bias), 1e-5)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_silu_mul_matches_torch(threads):
    h = _rand(np.random.default_rng(3), 4, 2 * 40) * 4
    gate, up = torch.from_numpy(h).chunk(2, dim=-1)
    np.testing.assert_allclose(kernels.silu_mul(h), (F.silu(gate) * up).numpy(), rtol=1e-5, atol=1e-5)


def test_softmax_exponential_is_within_two_ulp():
    """The vectorisable exp of attention's softmax and SwiGLU, against float64 numpy over its
    domain (x <= 0): 0 below -87 (fp32's subnormals) and for -inf (masked positions)."""
    from numba import njit

    @njit
    def run(a, out):
        for i in range(a.shape[0]):
            out[i] = kernels._exp_nonpositive(a[i])

    rng = np.random.default_rng(0)
    x = np.concatenate([-np.abs(rng.standard_normal(100_000) * 20), -rng.random(10_000) * 87,
                        [0.0, -0.0, -1e-30, -87.0, -87.01, -1000.0, -np.inf]]).astype(np.float32)
    got = np.empty_like(x)
    run(x, got)
    ref = np.exp(x.astype(np.float64))
    normal = x >= -87.0
    assert (np.abs(got[normal] - ref[normal]) <= 2 * np.spacing(ref[normal].astype(np.float32))).all()
    assert (got[~normal] == 0).all() and got[x == 0].tolist() == [1.0, 1.0]
