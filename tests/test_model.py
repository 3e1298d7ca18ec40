"""The decoder-only GPT, its config and presets, the KV cache, model dirs and estimates."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model import GPT, PRESETS, KVCache, ModelConfig, get_preset, load_model_dir, save_model_dir
from lmforge.model.estimate import activation_bytes_per_layer, estimate_memory

from conftest import random_model


pytestmark = pytest.mark.usefixtures("one_thread")

# Small shapes of both families, plus grouped-query attention and an untied head.
GPT2_SMALL = ModelConfig(
    name="gpt2-small-test", vocab_size=67, block_size=48, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
    intermediate_size=128, norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True,
)
LLAMA_SMALL = ModelConfig(
    name="llama-small-test", vocab_size=67, block_size=48, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
    intermediate_size=72, norm="rmsnorm", mlp="swiglu", position="rope", rope_theta=500.0, bias=False,
    tie_embeddings=True,
)
LLAMA_GQA = dataclasses.replace(LLAMA_SMALL, name="llama-gqa-test", n_head=6, n_kv_head=2, n_embd=48,
                                tie_embeddings=False)
FAMILIES = {"gpt2": GPT2_SMALL, "llama": LLAMA_SMALL, "llama-gqa": LLAMA_GQA}


def tokens(config: ModelConfig, *shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, shape, generator=g)


# -- forward and loss -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes(family):
    cfg = FAMILIES[family]
    model = random_model(cfg)
    logits, loss = model(tokens(cfg, 3, 11))
    assert logits.shape == (3, 11, cfg.vocab_size)
    assert loss is None
    last, _ = model(tokens(cfg, 3, 11), logits_to_keep=1)
    assert last.shape == (3, 1, cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_is_mean_cross_entropy_over_kept_positions(family):
    cfg = FAMILIES[family]
    model = random_model(cfg)
    idx, targets = tokens(cfg, 2, 9), tokens(cfg, 2, 9, seed=2)
    targets[0, :4] = -100  # e.g. a masked prompt
    targets[1, 7] = -100
    logits, loss = model(idx, targets)
    # Reference written out by hand: -log p(target), averaged over the kept positions only.
    logp = torch.log_softmax(logits.double(), dim=-1)
    kept = targets != -100
    nll = -logp[kept].gather(1, targets[kept][:, None]).squeeze(1)
    assert nll.numel() == 13
    assert loss.item() == pytest.approx(nll.mean().item(), abs=1e-5)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, cfg.vocab_size), targets.view(-1)).item(), abs=1e-6)
    # A single kept position: the loss is exactly its negative log-likelihood.
    one = torch.full_like(targets, -100)
    one[1, 3] = targets[1, 3]
    assert model(idx, one)[1].item() == pytest.approx(-logp[1, 3, targets[1, 3]].item(), abs=1e-5)


def test_loss_backward_reaches_every_parameter():
    model = random_model(LLAMA_GQA).train()
    idx = tokens(LLAMA_GQA, 2, 10)
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- parameter counts and FLOPs -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_param_count_counts_shared_tensors_once(family):
    cfg = FAMILIES[family]
    model = GPT(cfg)
    unique = {t.data_ptr(): t.numel() for t in model.state_dict().values() if t.is_floating_point()}
    assert model.param_count() == sum(unique.values())
    untied = GPT(dataclasses.replace(cfg, tie_embeddings=not cfg.tie_embeddings))
    sign = 1 if cfg.tie_embeddings else -1
    assert untied.param_count() - model.param_count() == sign * cfg.vocab_size * cfg.n_embd
    # Non-embedding: what the blocks and the final norm hold.
    inner = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.norm_f.parameters())
    assert model.param_count(non_embedding=True) == inner


@pytest.mark.parametrize("name, expected", [("gpt2-124m", 124_439_808), ("smollm2-135m", 134_515_008)])
def test_preset_param_counts_match_published_figures(name, expected):
    with torch.device("meta"):
        model = GPT(get_preset(name))
    assert model.param_count() == expected


def test_presets_are_valid_and_shaped_as_documented():
    assert set(PRESETS) >= {"tiny", "gpt2-124m", "llama-tiny", "smollm2-135m"}
    with torch.device("meta"):
        tiny = GPT(get_preset("tiny"))
    assert 1e6 < tiny.param_count() < 1e7
    smol = get_preset("smollm2-135m")
    assert (smol.n_head, smol.n_kv_head, smol.rope_theta, smol.block_size) == (9, 3, 100000.0, 8192)
    with pytest.raises(LmforgeError, match="known presets: tiny, gpt2-124m"):
        get_preset("gpt5")
    p = get_preset("tiny")
    p.n_layer = 99
    assert get_preset("tiny").n_layer != 99  # a copy, not the shared preset


def test_flops_per_token_formula():
    cfg = GPT2_SMALL
    model = GPT(cfg)
    # N: the blocks and final norm, plus the output head's matmul (tied or not); the embedding
    # lookups do no FLOPs.
    n = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.norm_f.parameters())
    n += cfg.vocab_size * cfg.n_embd
    t = 40
    assert model.flops_per_token(t) == 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * t


# -- KV cache -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_equals_full_forward(family):
    cfg = FAMILIES[family]
    model = random_model(cfg)
    idx = tokens(cfg, 2, 20)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(batch_size=2, max_len=24)
        parts = [model(idx[:, :7], cache=cache)[0]]  # prefill
        assert cache.pos == 7
        parts.append(model(idx[:, 7:11], cache=cache)[0])  # a chunk after a cached prefix
        for t in range(11, 20):  # then one token at a time
            parts.append(model(idx[:, t:t + 1], cache=cache)[0])
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_layout_and_overflow():
    cfg = LLAMA_GQA
    model = random_model(cfg)
    cache = model.new_cache(batch_size=3, max_len=10)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == (cfg.n_layer, 3, cfg.n_kv_head, 10, cfg.head_dim)
    with torch.no_grad():
        model(tokens(cfg, 3, 8), cache=cache)
        with pytest.raises(LmforgeError, match="KV cache full"):
            model(tokens(cfg, 3, 3), cache=cache)
    with pytest.raises(LmforgeError, match="block_size 48"):
        model(tokens(cfg, 1, 49))


def test_gqa_fallback_for_old_torch_matches_enable_gqa():
    # torch < 2.5 has no SDPA enable_gqa; the model then repeats kv heads itself.
    cfg = LLAMA_GQA
    model = random_model(cfg)
    idx = tokens(cfg, 2, 12)
    with torch.no_grad():
        ref, _ = model(idx)
        for block in model.blocks:
            block.attn.kv_repeat, block.attn.sdpa_kwargs = cfg.n_head // cfg.n_kv_head, {}
        fallback, _ = model(idx)
    torch.testing.assert_close(fallback, ref, atol=1e-6, rtol=0)


def _left_pad(rows: list[torch.Tensor], pad_id: int = 0):
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = r
        mask[i, T - len(r):] = True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return idx, mask, positions


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_unpadded_rows(family):
    cfg = FAMILIES[family]
    model = random_model(cfg)
    rows = [tokens(cfg, 1, 9, seed=3)[0], tokens(cfg, 1, 4, seed=4)[0], tokens(cfg, 1, 1, seed=5)[0]]
    extra = tokens(cfg, 3, 5, seed=6)  # tokens to decode after the prompts
    idx, mask, positions = _left_pad(rows)
    T = idx.shape[1]
    with torch.no_grad():
        # No cache: one padded forward.
        logits, _ = model(idx, positions=positions, attn_mask=mask)
        assert torch.isfinite(logits).all()
        # With a cache: padded prefill, then decode with a growing key mask.
        cache = model.new_cache(3, T + 5)
        prefill, _ = model(idx, positions=positions, attn_mask=mask, cache=cache)
        steps = []
        for j in range(5):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
            positions = positions[:, -1:] + 1
            steps.append(model(extra[:, j:j + 1], positions=positions, attn_mask=mask, cache=cache)[0])
        for i, r in enumerate(rows):
            alone, _ = model(torch.cat([r, extra[i]])[None])
            n = len(r)
            torch.testing.assert_close(logits[i, T - n:], alone[0, :n], atol=1e-5, rtol=0)
            torch.testing.assert_close(prefill[i, T - n:], alone[0, :n], atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.cat(steps, 1)[i], alone[0, n:], atol=1e-5, rtol=0)


def test_padding_mask_never_leaves_a_query_without_keys():
    # torch < 2.5's SDPA returns NaN for a fully masked row (a padding query), and 0 * NaN in
    # the next layer would reach the real tokens; so each query always keeps its own key.
    _, mask, _ = _left_pad([torch.arange(5), torch.arange(1)])
    for start in (0, 3):
        full = torch.cat([torch.ones(2, start, dtype=torch.bool), mask], dim=1)
        m = GPT._attention_mask(full, mask.shape[1], start, "cpu")
        assert m.shape == (2, 1, 5, start + 5)
        assert m.any(-1).all()
        assert not m[1, 0, 0, start + 1:].any()  # and still causal


def test_attn_mask_must_be_bool_and_cover_all_keys():
    model = random_model(LLAMA_SMALL)
    idx = tokens(LLAMA_SMALL, 2, 5)
    with pytest.raises(LmforgeError, match="bool"):
        model(idx, attn_mask=torch.ones(2, 5))
    with pytest.raises(LmforgeError, match="expected 5"):
        model(idx, attn_mask=torch.ones(2, 4, dtype=torch.bool))


# -- config --------------------------------------------------------------------------------------
def test_config_round_trip_and_validation():
    cfg = LLAMA_GQA
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.head_dim == 8
    with pytest.raises(LmforgeError, match="n_embd \\(30\\) must be divisible by n_head \\(4\\)"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(LmforgeError, match="n_head \\(6\\) must be divisible by n_kv_head \\(4\\)"):
        ModelConfig(n_embd=48, n_head=6, n_kv_head=4)
    with pytest.raises(LmforgeError, match="norm must be one of"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(LmforgeError, match="n_layer must be int"):
        ModelConfig.from_dict({"n_layer": "4"})
    with pytest.raises(LmforgeError, match="cfg.json: unknown model config key 'n_layers'"):
        ModelConfig.from_dict({"n_layers": 4}, source="cfg.json")


def test_every_field_has_help_text():
    import inspect
    import re

    src = inspect.getsource(ModelConfig)
    commented = set(re.findall(r"^\s*(\w+)\s*:[^#\n]*#\s*\S", src, flags=re.M))
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= commented


def _fingerprint(cfg: ModelConfig):
    torch.manual_seed(0)
    model = GPT(cfg).train()
    torch.manual_seed(1)
    logits, _ = model(tokens(cfg, 2, 6))
    shapes = {k: tuple(v.shape) for k, v in [*model.state_dict().items(), *model.named_buffers()]}
    return shapes, logits


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 70), ("block_size", 40), ("n_layer", 3), ("n_head", 8), ("n_kv_head", 2), ("n_embd", 40),
    ("intermediate_size", 60), ("norm", "layernorm"), ("norm_eps", 0.5), ("mlp", "gelu"),
    ("position", "learned"), ("rope_theta", 7.0), ("bias", True), ("tie_embeddings", False),
    ("dropout", 0.3), ("init_std", 0.1),
])
def test_every_config_field_changes_the_model(field, value):
    base = _fingerprint(LLAMA_SMALL)
    changed = _fingerprint(dataclasses.replace(LLAMA_SMALL, **{field: value}))
    assert base[0] != changed[0] or base[1].shape != changed[1].shape or not torch.equal(base[1], changed[1])


# -- init and optimizer groups -------------------------------------------------------------------
def test_gpt2_init():
    cfg = dataclasses.replace(GPT2_SMALL, n_layer=8, n_embd=128, intermediate_size=512)
    torch.manual_seed(0)
    model = GPT(cfg)
    std = cfg.init_std
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.05)
    for b in model.blocks:
        for proj in (b.attn.proj, b.mlp.proj):
            assert proj.weight.std().item() == pytest.approx(std / math.sqrt(2 * cfg.n_layer), rel=0.05)
            assert torch.all(proj.bias == 0)
    assert model.tok_emb.weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(model.blocks[0].norm_1.weight == 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimizer_groups(family):
    cfg = FAMILIES[family]
    model = GPT(cfg)
    decay, no_decay = model.configure_optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # tied: reported once, as tok_emb
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay_names.isdisjoint(no_decay_names)
    assert decay_names | no_decay_names == set(names.values())
    assert "tok_emb.weight" in no_decay_names
    assert ("pos_emb.weight" in no_decay_names) == (cfg.position == "learned")
    assert ("lm_head.weight" in decay_names) == (not cfg.tie_embeddings)
    for n in decay_names - {"lm_head.weight"}:
        assert n.endswith(("qkv.weight", "proj.weight", "fc.weight")), n
    for n in no_decay_names:
        assert n.endswith("bias") or "norm" in n or "emb" in n, n
    torch.optim.AdamW([decay, no_decay], lr=1e-3)  # accepted as is


def test_activation_checkpointing_gives_same_loss_and_grads():
    cfg = LLAMA_GQA
    idx = tokens(cfg, 2, 12)
    results = []
    for ckpt in (False, True):
        model = random_model(cfg).train()
        model.activation_checkpointing = ckpt
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


# -- model dirs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    text = ["the quick brown fox jumps over the lazy dog", "a model dir holds weights and a tokenizer"] * 20
    return train_tokenizer(text, TokenizerTrainConfig(vocab_size=60, min_frequency=1), show_progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_dir_round_trip(tmp_path, family, tokenizer):
    cfg = FAMILIES[family]
    model = random_model(cfg)
    out = save_model_dir(model, tmp_path / "m", tokenizer=tokenizer, extra_config={"trained_tokens": 123})
    raw = json.loads((out / "config.json").read_text())
    assert raw["lmforge_model"] == cfg.to_dict() and raw["trained_tokens"] == 123
    assert (out / "tokenizer.json").exists()
    loaded, loaded_cfg = load_model_dir(out)
    assert loaded_cfg == cfg
    assert not loaded.training
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == cfg.tie_embeddings
    idx = tokens(cfg, 2, 10)
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    # Loading in another dtype casts the weights.
    half, _ = load_model_dir(out, dtype=torch.bfloat16)
    assert half.tok_emb.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(half(idx)[0]).all()
    # No silent overwrite.
    with pytest.raises(LmforgeError, match="already exists"):
        save_model_dir(model, out)


def test_model_dir_errors(tmp_path):
    cfg = LLAMA_SMALL
    out = save_model_dir(random_model(cfg), tmp_path / "m")
    # The checks a model dir without a manifest still gets (older lmforge, made by hand); the
    # manifest's own checks are in test_corrupt_weights.py.
    (out / "manifest.json").unlink()
    weights = out / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(LmforgeError, match="model.safetensors: not a complete safetensors file"):
        load_model_dir(out)
    weights.write_bytes(data)

    raw = json.loads((out / "config.json").read_text())
    raw["lmforge_model"]["n_embedding"] = 32
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmforgeError, match="config.json lmforge_model: unknown model config key 'n_embedding'"):
        load_model_dir(out)

    del raw["lmforge_model"]["n_embedding"]
    raw["lmforge_model"]["intermediate_size"] = 64
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmforgeError, match="blocks.0.mlp.fc.weight has shape \\[144, 32\\], the config needs \\[128, 32\\]"):
        load_model_dir(out)

    raw["lmforge_model"]["intermediate_size"] = 72
    raw["lmforge_model"]["tie_embeddings"] = False
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmforgeError, match="missing tensors lm_head.weight"):
        load_model_dir(out)

    (out / "config.json").unlink()
    with pytest.raises(LmforgeError, match="no config.json"):
        load_model_dir(out)
    with pytest.raises(LmforgeError, match="not a folder"):
        load_model_dir(tmp_path / "nowhere")


# -- estimates ---------------------------------------------------------------------------------------
def test_estimate_matches_measured_weights_grads_and_adamw_state():
    cfg = LLAMA_GQA
    model = random_model(cfg).train()
    est = estimate_memory(cfg, 2, 16)
    assert est["params"] == model.param_count()
    assert est["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.configure_optimizer_groups(0.1), lr=1e-3)
    idx = tokens(cfg, 2, 16)
    model(idx, idx)[1].backward()
    opt.step()
    assert est["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert est["optimizer"] == state
    assert estimate_memory(cfg, 2, 16, optimizer="sgd")["optimizer"] == state // 2
    assert est["flops_per_token"] == model.flops_per_token(16)
    assert est["total"] == sum(est[k] for k in ("weights", "grads", "optimizer", "activations", "logits"))
    with pytest.raises(LmforgeError, match="unknown optimizer 'lion'"):
        estimate_memory(cfg, 2, 16, optimizer="lion")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("family", FAMILIES)
def test_estimated_activations_match_saved_tensors(family, dropout):
    """The activation formula against what autograd actually keeps for backward."""
    cfg = dataclasses.replace(FAMILIES[family], dropout=dropout)
    model = random_model(cfg).train()
    keep = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in keep:
            saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    B, T = 4, 32
    idx = tokens(cfg, B, T)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(idx, idx)
    measured = sum(saved.values()) + logits.numel() * logits.element_size()  # the caller holds the logits
    # On the CPU, dropout masks are fp32 and attention dropout takes SDPA's materialised path.
    est = estimate_memory(cfg, B, T, fused_attention=not dropout, dropout_mask_bytes=4)
    assert est["activations"] + est["logits"] == pytest.approx(measured, rel=0.05)
    ckpt = estimate_memory(cfg, B, T, activation_checkpointing=True)
    assert ckpt["activations"] < est["activations"]


def test_activation_formula_reduces_to_the_published_one():
    # Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per GPT layer in 16-bit with dropout.
    cfg = get_preset("gpt2-124m").replace(dropout=0.1)
    s, b, h, a = 1024, 8, 768, 12
    got = activation_bytes_per_layer(cfg, b, s, dtype_bytes=2, fused_attention=False)
    assert got == s * b * h * 34 + 5 * a * s * s * b
