"""The short-sequence attention kernel against PyTorch's SDPA: outputs and all three gradients."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.attention import SHORT_SEQUENCE, short_causal_attention, uses_short_kernel


@pytest.mark.parametrize("B,H,Hkv,T,D", [(3, 4, 4, 64, 32), (2, 6, 2, 17, 16), (1, 3, 1, 1, 8), (2, 4, 4, SHORT_SEQUENCE, 32)])
def test_matches_sdpa_forward_and_backward(B, H, Hkv, T, D):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, generator=g, requires_grad=True)
    grad_out = torch.randn(B, H, T, D, generator=g)
    assert uses_short_kernel(q, 0.0)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    out = short_causal_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


def test_inputs_from_a_strided_qkv_projection():
    # The model hands in transposed views of one fused projection, not contiguous tensors.
    B, T, H, D = 2, 9, 4, 8
    qkv = torch.randn(B, T, 3 * H, D, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.split(H, dim=2))
    out = short_causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.square().sum(), qkv)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), qkv)
    torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4)


def test_only_short_fp32_cpu_without_dropout():
    q = torch.zeros(1, 2, SHORT_SEQUENCE, 8)
    assert uses_short_kernel(q, 0.0)
    assert not uses_short_kernel(torch.zeros(1, 2, SHORT_SEQUENCE + 1, 8), 0.0)
    assert not uses_short_kernel(q, 0.1)
    assert not uses_short_kernel(q.double(), 0.0)
    assert not uses_short_kernel(q.bfloat16(), 0.0)
