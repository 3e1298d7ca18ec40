"""Hugging Face interop: configs and state dicts of GPT2LMHeadModel and LlamaForCausalLM.

transformers is the reference: tiny random HF models are converted to lmforge and back and
must give the same logits (fp32, eval mode, eager attention on the HF side).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.interop.hf import (
    config_from_hf,
    config_to_hf,
    load_hf_dir,
    save_hf_dir,
    state_dict_from_hf,
    state_dict_to_hf,
)
from lmforge.model import GPT, ModelConfig
from lmforge.model.io import model_from_state_dict

transformers = pytest.importorskip("transformers")

VOCAB = 61


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model: torch.nn.Module, seed: int) -> None:
    # Fresh HF models have unit norms and zero biases; random ones make every mapping count.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def hf_gpt2(tie: bool, activation: str = "gelu_new"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2, n_head=4, n_inner=80,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, layer_norm_epsilon=1e-5,
        activation_function=activation,
    )
    cfg._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(cfg)
    _perturb(model, 1)
    return model.eval()


def hf_llama(tie: bool, n_kv: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=n_kv, max_position_embeddings=40, rope_theta=3000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
    )
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg)
    _perturb(model, 2)
    return model.eval()


HF_MODELS = {
    "gpt2-tied": lambda: hf_gpt2(True),
    "gpt2-untied": lambda: hf_gpt2(False),
    "gpt2-exact-gelu": lambda: hf_gpt2(True, activation="gelu"),
    "llama-gqa-tied": lambda: hf_llama(True),
    "llama-gqa-untied": lambda: hf_llama(False),
    "llama-mha": lambda: hf_llama(False, n_kv=6),
}


def _ids(n: int = 17, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", HF_MODELS)
def test_hf_to_lmforge_logits_match(kind):
    hf = HF_MODELS[kind]()
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert cfg.n_kv_head == hf.config.to_dict().get("num_key_value_heads", cfg.n_head)
    model = model_from_state_dict(cfg, state_dict_from_hf(hf.state_dict(), cfg))
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        ours, _ = model(ids)
    assert ours.shape == ref.shape
    assert _max_diff(ours, ref) <= 1e-5
    # And the KV-cache decode path agrees with HF too.
    with torch.no_grad():
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :9], cache=cache)[0]] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(9, 17)]
    assert _max_diff(torch.cat(steps, 1), ref) <= 1e-5


@pytest.mark.parametrize("kind", HF_MODELS)
def test_state_dict_round_trip_is_exact(kind):
    hf = HF_MODELS[kind]()
    cfg = config_from_hf(hf.config.to_dict())
    ours = state_dict_from_hf(hf.state_dict(), cfg)
    back = state_dict_to_hf(ours, cfg)
    expected = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    # The dict loads straight into a transformers model; only a tied head is left to re-tie.
    fresh = type(hf)(hf.config)
    result = fresh.load_state_dict(back, strict=False)
    assert set(result.missing_keys) == ({"lm_head.weight"} if cfg.tie_embeddings else set())
    assert not result.unexpected_keys


def _random_lmforge(cfg: ModelConfig) -> GPT:
    torch.manual_seed(4)
    model = GPT(cfg)
    _perturb(model, 5)
    return model.eval()


EXPORTABLE = {
    "gpt2": ModelConfig(name="g", vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_head=4, n_embd=32,
                        intermediate_size=64, norm="layernorm", mlp="gelu", position="learned", bias=True),
    "gpt2-exact-gelu": ModelConfig(name="g", vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_head=4,
                                   n_embd=32, intermediate_size=64, norm="layernorm", mlp="gelu_exact",
                                   position="learned", bias=True),
    "llama-gqa-untied": ModelConfig(name="l", vocab_size=VOCAB, block_size=32, n_layer=2, n_head=6, n_kv_head=3,
                                    n_embd=48, intermediate_size=72, rope_theta=777.0, tie_embeddings=False),
    "llama-bias-tied": ModelConfig(name="lb", vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                                   n_embd=32, intermediate_size=40, bias=True, norm_eps=1e-6),
}


@pytest.mark.parametrize("kind", EXPORTABLE)
def test_export_reloads_in_transformers_with_identical_logits(tmp_path, kind):
    cfg = EXPORTABLE[kind]
    model = _random_lmforge(cfg)
    out = save_hf_dir(model, cfg, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if kind.startswith("gpt2") else "LlamaForCausalLM")
    ids = _ids(20)
    with torch.no_grad():
        assert _max_diff(hf(ids).logits, model(ids)[0]) <= 1e-5
    # And back through our own reader of HF folders.
    again, again_cfg = load_hf_dir(out)
    assert dataclasses.replace(again_cfg, name=cfg.name, dropout=cfg.dropout) == cfg
    with torch.no_grad():
        assert torch.equal(again(ids)[0], model(ids)[0])


def test_config_round_trip():
    for cfg in EXPORTABLE.values():
        d = config_to_hf(cfg)
        assert json.loads(json.dumps(d)) == d
        back = config_from_hf(d)
        assert dataclasses.replace(back, name=cfg.name) == cfg


def test_pipeline_generates_from_an_exported_dir(tmp_path):
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    text = ["an exported model works in a transformers pipeline", "hello world, hello lmforge"] * 30
    tok = train_tokenizer(text, TokenizerTrainConfig(vocab_size=280, min_frequency=1), show_progress=False)
    cfg = dataclasses.replace(EXPORTABLE["llama-bias-tied"], vocab_size=tok.vocab_size)
    out = save_hf_dir(_random_lmforge(cfg), cfg, tmp_path / "hf", tokenizer=tok)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["eos_token_id"] == tok.eos_id is not None
    pipe = transformers.pipeline("text-generation", model=str(out))
    result = pipe("hello", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("hello")


def test_load_hf_dir_from_save_pretrained(tmp_path):
    hf = HF_MODELS["llama-gqa-tied"]()
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = load_hf_dir(tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(model(ids)[0], hf(ids).logits) <= 1e-5
    # A .bin is read only through torch.load(weights_only=True) (tests/test_convert.py has the
    # malicious-pickle case); a safetensors file under that name is no such checkpoint.
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(LmforgeError, match=r"pytorch_model.bin: not loadable as plain weights with torch.load\(weights_only=True\)"):
        load_hf_dir(tmp_path / "hf")


def test_unsupported_inputs_are_named():
    d = config_to_hf(EXPORTABLE["llama-gqa-untied"])
    with pytest.raises(LmforgeError, match="unsupported architecture 'MistralForCausalLM'"):
        config_from_hf({**d, "architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    with pytest.raises(LmforgeError, match="rope type 'llama3'"):
        config_from_hf({**d, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    with pytest.raises(LmforgeError, match="activation_function 'relu'"):
        config_from_hf({**config_to_hf(EXPORTABLE["gpt2"]), "activation_function": "relu"})
    with pytest.raises(LmforgeError, match="no HF architecture matches norm=rmsnorm, mlp=gelu"):
        config_to_hf(dataclasses.replace(EXPORTABLE["gpt2"], norm="rmsnorm"))
    cfg = config_from_hf(d)
    sd = state_dict_to_hf(_random_lmforge(cfg).state_dict(), cfg)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(LmforgeError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        state_dict_from_hf(sd, cfg)
    sd = state_dict_to_hf(_random_lmforge(cfg).state_dict(), cfg)
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    with pytest.raises(LmforgeError, match="no lmforge counterpart: model.layers.0.self_attn.q_norm.weight"):
        state_dict_from_hf(sd, cfg)
