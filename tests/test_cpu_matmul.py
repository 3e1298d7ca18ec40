"""lmforge.model.cpu_matmul: the fp32 CPU product through oneDNN, forward and backward, and the rule
that picks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model import cpu_matmul
from lmforge.model.gpt import Linear

pytestmark = pytest.mark.usefixtures("one_thread")
needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                       and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                                  reason="this PyTorch build has no oneDNN linear kernel")


def test_the_rule_picks_onednn_on_amd_with_avx512_only():
    assert cpu_matmul.rule_choice("AuthenticAMD", {"avx2", "avx512f"}) == "onednn"
    assert cpu_matmul.rule_choice("AuthenticAMD", {"avx2"}) == "torch"
    assert cpu_matmul.rule_choice("GenuineIntel", {"avx2", "avx512f"}) == "torch"
    assert cpu_matmul.rule_choice("", set()) == "torch"


@pytest.fixture
def backend(monkeypatch):
    """Set LMFORGE_CPU_MATMUL for one test; the process's choice is recomputed before and after."""
    def choose(value: str) -> str:
        monkeypatch.setenv("LMFORGE_CPU_MATMUL", value)
        cpu_matmul.cpu_matmul_backend.cache_clear()
        return cpu_matmul.cpu_matmul_backend()

    yield choose
    monkeypatch.delenv("LMFORGE_CPU_MATMUL", raising=False)
    cpu_matmul.cpu_matmul_backend.cache_clear()


def test_the_environment_overrides_and_bad_values_are_refused(backend):
    assert backend("torch") == "torch"
    with pytest.raises(LmforgeError, match=r"LMFORGE_CPU_MATMUL='mkl': give one of auto, torch, onednn"):
        backend("mkl")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
def test_onednn_product_and_gradients_equal_torch(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)[..., 1:]  # a strided input: the last dim sliced
    w, b = torch.randn(11, 23, generator=g), torch.randn(11, generator=g) if bias else None
    grad = torch.randn(*x.shape[:-1], 11, generator=g)
    outs = []
    for product in (cpu_matmul.linear, F.linear):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = b.clone().requires_grad_() if bias else None
        y = product(xs, ws, bs)
        y.backward(grad)
        outs.append([y, xs.grad, ws.grad] + ([bs.grad] if bias else []))
    for ours, ref in zip(*outs):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference: the plain product, no graph
        assert not cpu_matmul.linear(x, w, b).requires_grad


@needs_onednn
def test_linear_layers_take_the_chosen_library(backend, monkeypatch):
    calls = []
    product = cpu_matmul._product
    monkeypatch.setattr(cpu_matmul, "_product", lambda *a: calls.append(a[0].shape) or product(*a))
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    backend("onednn")
    layer(x).sum().backward()  # forward, then the backward's input-free weight gradient
    assert calls == [torch.Size([4, 16]), torch.Size([8, 4])]
    calls.clear()
    layer.double()(x.double())  # not fp32: torch's product
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast asked for: torch's, in bf16
        assert layer.float()(x).dtype == torch.bfloat16
    backend("torch")
    layer.float()(x)
    assert calls == []


@needs_onednn
def test_a_frozen_weight_keeps_no_activation_for_backward():
    """As F.linear: the input is saved only for the weight's gradient (LoRA's frozen base layers
    would otherwise hold every layer's input)."""
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(8, 16)  # frozen
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = cpu_matmul.linear(x, w, None)
    assert saved == [w.shape]
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 8) @ w)
