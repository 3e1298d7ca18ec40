"""SavedActivationPool (`--heap pool`): the saved activations of a step go into one reused buffer,
and training computes exactly what it computes without it."""

import dataclasses

import torch

from conftest import random_model
from lmforge.model.lora import LoRAConfig, apply_lora
from lmforge.train.saved_pool import SavedActivationPool
from test_model import LLAMA_GQA, tokens

# Wide enough that a layer's activations pass the pool's 256 KB floor at 4 x 64 tokens.
CFG = dataclasses.replace(LLAMA_GQA, n_embd=256, n_head=4, n_kv_head=2, intermediate_size=512, block_size=64)


def grads_after_steps(pool: SavedActivationPool | None, model, steps: int = 3) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        idx = tokens(CFG, 4, 64, seed=step)
        ctx = pool.recording() if pool is not None else torch.enable_grad()
        with ctx:
            _, loss = model(idx, idx)
        loss.backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if pool is not None:
            pool.after_step()
    return grads + [p.detach().clone() for p in params]


def fresh(lora: bool):
    model = random_model(CFG).train()
    if lora:
        torch.manual_seed(0)
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    return model


def test_pooled_training_is_bit_identical():
    for lora in (False, True):
        plain = grads_after_steps(None, fresh(lora))
        model = fresh(lora)
        pool = SavedActivationPool(model)
        pooled = grads_after_steps(pool, model)
        assert all(torch.equal(a, b) for a, b in zip(plain, pooled)), f"lora={lora}"
        assert pool.capacity > 0


def test_the_pool_holds_the_saved_activations():
    """Every big saved tensor is either copied into the buffer or, for an output of
    lmforge.model.fused (a norm's output saved by an adapter), kept as a recipe."""
    from lmforge.train.saved_pool import _Recipe

    model = fresh(True)
    pool = SavedActivationPool(model)
    grads_after_steps(pool, model, steps=1)  # the first step sizes the pool
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kinds = []
    pack = pool._pack

    def spy(t):
        packed = pack(t)
        if t.numel() * t.element_size() >= pool.MIN_BYTES and t.untyped_storage().data_ptr() not in weights:
            kinds.append("recipe" if isinstance(packed, _Recipe) else
                         "pooled" if packed.untyped_storage().data_ptr() == pool.buffer.untyped_storage().data_ptr() else "kept")
        return packed

    pool._pack = spy
    idx = tokens(CFG, 4, 64)
    with pool.recording():
        _, loss = model(idx, idx)
    assert "kept" not in kinds and kinds.count("pooled") > 0
    # per layer: both norms' outputs (saved by the qkv and fc adapters) and SwiGLU's (by the down
    # adapter); but the first norm sees the frozen embedding's output: no autograd there, a plain copy
    assert kinds.count("recipe") == 3 * CFG.n_layer - 1
    assert pool.offset <= pool.capacity
    loss.backward()
