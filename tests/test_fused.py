"""The fused RMSNorm and SwiGLU autograd functions: the same values and gradients as autograd's
own graph of the plain formulas, and only the input kept for backward."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.fused import _SwiGLU, rms_norm, swiglu


def saved_numel(fn, *args) -> int:
    """Elements autograd keeps for backward while running fn(*args), parameters excluded."""
    total = 0
    params = {id(a) for a in args if isinstance(a, torch.nn.Parameter)}

    def pack(t):
        nonlocal total
        if id(t) not in params:
            total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))
    h = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (h,))


@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_matches_the_plain_formula(weight_grad):
    torch.manual_seed(1)
    x = torch.randn(4, 7, 64, requires_grad=True)
    w = (torch.rand(64) + 0.5).requires_grad_(weight_grad)
    y = rms_norm(x, w, 1e-6)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w] if weight_grad else [x], g)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(weight_grad)
    ref = x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-6) * w2
    want = torch.autograd.grad(ref, [x2, w2] if weight_grad else [x2], g)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swiglu_matches_the_plain_formula():
    torch.manual_seed(2)
    h = torch.randn(4, 7, 2 * 48, requires_grad=True)
    y = swiglu(h)
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, h, g)
    h2 = h.detach().clone().requires_grad_(True)
    gate, up = h2.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    (want,) = torch.autograd.grad(ref, h2, g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_the_input_is_kept_for_backward():
    x = torch.randn(2, 10, 32, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(32))
    assert saved_numel(rms_norm, x, w, 1e-5) == x.numel() + 2 * 10  # x and one rstd per row
    # autograd's own graph of the same formula keeps x and the normalised x (for w's gradient)
    plain = lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    assert saved_numel(plain, x, w, 1e-5) >= 2 * x.numel()
    h = torch.randn(2, 10, 64, requires_grad=True)
    assert saved_numel(swiglu, h) == h.numel()
    assert saved_numel(lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1], h) >= h.numel() * 3 // 2


def test_inference_takes_the_plain_kernels():
    x, w = torch.randn(2, 3, 16), torch.ones(16)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, w, 1e-5), F.rms_norm(x, (16,), w, 1e-5), rtol=0, atol=0)
    assert saved_numel(rms_norm, x, w, 1e-5) == 0


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_cross_entropy_matches_the_plain_loss(chunk, weight_grad):
    from lmforge.model.fused import linear_cross_entropy_sum

    torch.manual_seed(3)
    h = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(50, 16).requires_grad_(weight_grad)
    t = torch.randint(0, 50, (10,))
    loss = linear_cross_entropy_sum(h, w, t, chunk) / 10
    ref = F.cross_entropy(h @ w.t(), t)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    wrt = [h, w] if weight_grad else [h]
    for got, want in zip(torch.autograd.grad(2 * loss, wrt), torch.autograd.grad(2 * ref, wrt)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone, no gradient work kept
        torch.testing.assert_close(linear_cross_entropy_sum(h, w, t, chunk) / 10, ref.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fp32"):
        linear_cross_entropy_sum(h.double(), w.double(), t, chunk)
