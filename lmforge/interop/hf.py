"""Hugging Face transformers <-> lmforge, for GPT2LMHeadModel and LlamaForCausalLM.

Encoder-decoders (ModelConfig arch "encoder-decoder") go to and come from
MBartForConditionalGeneration through lmforge.interop.hf_seq2seq; the folder-level functions
here (load_hf_dir, save_hf_dir, read_hf_dir, write_hf_dir) hand them over to it.

Everything here works on plain dicts and tensors: transformers itself is never imported, so
this module runs without it. The mapping, per block i:

    lmforge                      GPT-2 (transformer.h.{i}.)         Llama (model.layers.{i}.)
    blocks.{i}.norm_1            ln_1                              input_layernorm
    blocks.{i}.attn.qkv          attn.c_attn (Conv1D: transposed)  self_attn.{q,k,v}_proj (concatenated)
    blocks.{i}.attn.proj         attn.c_proj (transposed)          self_attn.o_proj
    blocks.{i}.norm_2            ln_2                              post_attention_layernorm
    blocks.{i}.mlp.fc            mlp.c_fc (transposed)             mlp.{gate,up}_proj (concatenated)
    blocks.{i}.mlp.proj          mlp.c_proj (transposed)           mlp.down_proj
    tok_emb / pos_emb / norm_f   transformer.wte / wpe / ln_f      model.embed_tokens / - / model.norm

Conv1D stores [in, out], nn.Linear [out, in]; HF Llama's q/k weights are already in the
"rotate_half" order our RoPE uses, so nothing is permuted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_dir, atomic_file
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.interop.bundle import ModelBundle, save_bundle, stop_token_ids
from lmforge.model.io import (check_state_dict, first_non_finite, model_from_state_dict, model_state_dict, read_json,
                              read_safetensors)
from lmforge.tokenizer import Tokenizer

SUPPORTED = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # old HF buffers


def hf_family(hf_config: dict[str, Any]) -> str:
    """'gpt2' or 'llama' from a config.json's architectures (or model_type); else an error."""
    archs = hf_config.get("architectures") or []
    if archs:
        if archs[0] not in SUPPORTED:
            raise LmforgeError(
                f"HF config: unsupported architecture {archs[0]!r}; lmforge converts {', '.join(SUPPORTED)} "
                "and MBartForConditionalGeneration"
            )
        return SUPPORTED[archs[0]]
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED.values():
        raise LmforgeError(f"HF config: unsupported model_type {model_type!r}; lmforge converts gpt2 and llama")
    return model_type


def _rope_theta(d: dict[str, Any]) -> float:
    # transformers >= 5 nests it in rope_parameters; older configs have it at the top level,
    # possibly with a rope_scaling entry (llama3, yarn, ...) that our RoPE does not implement.
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type")) or scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type != "default":
        raise LmforgeError(f"HF config: rope type {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from an HF config.json dict, refusing what our model cannot reproduce."""
    d = hf_config
    family = hf_family(d)
    name = str(d.get("_name_or_path") or d.get("model_type") or family).rstrip("/").split("/")[-1] or family
    if family == "gpt2":
        act = d.get("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}.get(act)
        if mlp is None:
            raise LmforgeError(f"HF config: GPT-2 activation_function {act!r} is not supported (gelu_new or gelu)")
        for key, bad in (("add_cross_attention", True), ("scale_attn_by_inverse_layer_idx", True),
                         ("scale_attn_weights", False)):
            if d.get(key, not bad) == bad:
                raise LmforgeError(f"HF config: GPT-2 with {key}={bad} is not supported")
        n_embd = d.get("n_embd", 768)
        return ModelConfig(
            name=name, vocab_size=d.get("vocab_size", 50257), block_size=d.get("n_positions", 1024),
            n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12), n_kv_head=d.get("n_head", 12),
            n_embd=n_embd, intermediate_size=d.get("n_inner") or 4 * n_embd, norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp=mlp, position="learned", bias=True,
            tie_embeddings=d.get("tie_word_embeddings", True), dropout=d.get("resid_pdrop", 0.0),
            init_std=d.get("initializer_range", 0.02),
        )
    if d.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"HF config: Llama hidden_act {d.get('hidden_act')!r} is not supported (only silu)")
    hidden, heads = d.get("hidden_size", 4096), d.get("num_attention_heads", 32)
    if d.get("head_dim") not in (None, hidden // heads):
        raise LmforgeError(f"HF config: head_dim {d['head_dim']} != hidden_size/num_attention_heads is not supported")
    attn_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise LmforgeError("HF config: attention_bias and mlp_bias must agree (lmforge has one bias switch)")
    return ModelConfig(
        name=name, vocab_size=d.get("vocab_size", 32000), block_size=d.get("max_position_embeddings", 2048),
        n_layer=d.get("num_hidden_layers", 32), n_head=heads, n_kv_head=d.get("num_key_value_heads") or heads,
        n_embd=hidden, intermediate_size=d.get("intermediate_size", 11008), norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6), mlp="swiglu", position="rope", rope_theta=_rope_theta(d),
        bias=attn_bias, tie_embeddings=d.get("tie_word_embeddings", False),
        dropout=float(d.get("attention_dropout", 0.0)), init_std=d.get("initializer_range", 0.02),
    )


def family_of(config: ModelConfig) -> str:
    """Which HF architecture can hold this ModelConfig exactly ('gpt2' or 'llama'); else an error."""
    c = config
    if (c.norm, c.position) == ("layernorm", "learned") and c.mlp in ("gelu", "gelu_exact") and c.bias and c.n_kv_head == c.n_head:
        return "gpt2"
    if (c.norm, c.mlp, c.position) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise LmforgeError(
        f"model {c.name!r}: no HF architecture matches norm={c.norm}, mlp={c.mlp}, position={c.position}, "
        f"bias={c.bias}, n_kv_head={c.n_kv_head} (GPT-2: layernorm/gelu/learned with bias and no GQA; "
        "Llama: rmsnorm/swiglu/rope)"
    )


def config_to_hf(config: ModelConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """A config.json dict transformers loads as GPT2LMHeadModel or LlamaForCausalLM."""
    c = config
    family = family_of(c)
    common = {
        "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        # transformers >= 5 reads "dtype", older versions "torch_dtype".
        "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
    }
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_positions": c.block_size, "n_ctx": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_embd": c.n_embd, "n_inner": c.intermediate_size,
            "activation_function": "gelu_new" if c.mlp == "gelu" else "gelu",
            "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout, "scale_attn_weights": True,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
        "max_position_embeddings": c.block_size, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "hidden_size": c.n_embd,
        "head_dim": c.head_dim, "intermediate_size": c.intermediate_size, "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": c.dropout,
    }


# -- state dicts ----------------------------------------------------------------------------
def _gpt2_names(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(lmforge name, HF name, transposed) for every tensor."""
    names = [("tok_emb.weight", "transformer.wte.weight", False), ("pos_emb.weight", "transformer.wpe.weight", False)]
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
            names += [(f"{ours}{a}.weight", f"{hf}{b}.weight", False), (f"{ours}{a}.bias", f"{hf}{b}.bias", False)]
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                     ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            names += [(f"{ours}{a}.weight", f"{hf}{b}.weight", True), (f"{ours}{a}.bias", f"{hf}{b}.bias", False)]
    names += [("norm_f.weight", "transformer.ln_f.weight", False), ("norm_f.bias", "transformer.ln_f.bias", False)]
    return names


def _llama_groups(config: ModelConfig) -> list[tuple[str, list[str]]]:
    """(lmforge name, HF names concatenated along dim 0 to make it) for every tensor."""
    groups = [("tok_emb.weight", ["model.embed_tokens.weight"])]
    suffixes = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        groups += [(f"{ours}norm_1.weight", [f"{hf}input_layernorm.weight"]),
                   (f"{ours}norm_2.weight", [f"{hf}post_attention_layernorm.weight"])]
        for s in suffixes:
            groups += [
                (f"{ours}attn.qkv.{s}", [f"{hf}self_attn.{p}_proj.{s}" for p in "qkv"]),
                (f"{ours}attn.proj.{s}", [f"{hf}self_attn.o_proj.{s}"]),
                (f"{ours}mlp.fc.{s}", [f"{hf}mlp.gate_proj.{s}", f"{hf}mlp.up_proj.{s}"]),
                (f"{ours}mlp.proj.{s}", [f"{hf}mlp.down_proj.{s}"]),
            ]
    groups.append(("norm_f.weight", ["model.norm.weight"]))
    return groups


def _normalise_hf_keys(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Accept a base model's keys (GPT2Model / LlamaModel, no prefix) too; drop stale buffers."""
    prefix = "transformer." if family == "gpt2" else "model."
    out = {}
    for k, v in sd.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        if not k.startswith(prefix) and k != "lm_head.weight":
            k = prefix + k
        out[k] = v
    return out


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel / LlamaForCausalLM weights -> lmforge names and layout for `config`."""
    family = family_of(config)
    sd = _normalise_hf_keys(sd, family)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise LmforgeError(f"HF state dict: missing tensor {name!r}")
        used.add(name)
        return sd[name]

    if family == "gpt2":
        for ours, hf, transposed in _gpt2_names(config):
            t = take(hf)
            out[ours] = t.t().contiguous() if transposed else t
    else:
        for ours, hf_names in _llama_groups(config):
            parts = [take(n) for n in hf_names]
            out[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if "lm_head.weight" in sd:
        used.add("lm_head.weight")
        if not config.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        # Tied: HF may list the shared matrix under both names; ours keeps tok_emb only.
    elif not config.tie_embeddings:
        raise LmforgeError("HF state dict: missing tensor 'lm_head.weight' (the config does not tie embeddings)")
    return checked_import(out, sd, used, config)


def checked_import(out: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], used: set[str],
                   config: ModelConfig) -> dict[str, torch.Tensor]:
    """The end of every HF -> lmforge mapping: no HF tensor left unmapped, and the result holds
    exactly the tensors the config's model has, in their shapes."""
    extra = [k for k in sd if k not in used]
    if extra:
        raise LmforgeError(f"HF state dict: tensors with no lmforge counterpart: {', '.join(extra[:5])}")
    check_state_dict(out, config, "HF state dict (converted)")
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge weights -> HF names and layout. With tied embeddings lm_head.weight is left out,
    as transformers' save_pretrained does (it re-ties on load)."""
    family = family_of(config)
    sd = {k: v for k, v in sd.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    check_state_dict(sd, config, "lmforge state dict")
    out: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        for ours, hf, transposed in _gpt2_names(config):
            t = sd[ours]
            out[hf] = t.t().contiguous() if transposed else t.contiguous()
    else:
        for ours, hf_names in _llama_groups(config):
            sizes = config.fused_parts(ours)
            parts = sd[ours].split(sizes, dim=0) if sizes else [sd[ours]]
            out.update({n: p.contiguous() for n, p in zip(hf_names, parts)})
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"].contiguous()
    return out


# -- directories ----------------------------------------------------------------------------
def load_hf_dir(path: str | os.PathLike, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[GPT, ModelConfig]:
    """A GPT (eval mode) from an HF model folder: config.json + model.safetensors, or shards
    listed in model.safetensors.index.json; else pytorch_model.bin (or its shards), read with
    torch.load(weights_only=True), which rebuilds tensors and never runs the pickle's code."""
    path = Path(path)
    hf_config = read_json(path / "config.json")
    if not isinstance(hf_config, dict):
        raise LmforgeError(f"{path / 'config.json'}: expected a JSON object")
    from lmforge.interop import hf_seq2seq

    if hf_seq2seq.is_hf_seq2seq(hf_config):
        return hf_seq2seq.load_hf_dir(path, device, dtype)
    try:
        config = config_from_hf(hf_config)
    except LmforgeError as e:
        raise LmforgeError(f"{path / 'config.json'}: {str(e).removeprefix('HF config: ')}") from None
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        sd.update(read_safetensors(f, device) if f.suffix == ".safetensors" else read_torch_weights(f, device))
    try:
        ours = state_dict_from_hf(sd, config)
    except LmforgeError as e:
        raise LmforgeError(f"{path}: {str(e)}") from None
    return model_from_state_dict(config, ours, source=str(path), device=device, dtype=dtype), config


def _weight_files(path: Path) -> list[Path]:
    """The weight files of an HF folder, safetensors preferred."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).exists():
            return [path / single]
        if (path / index).exists():
            weight_map = read_json(path / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LmforgeError(f"{path / index}: no weight_map")
            return [path / f for f in sorted(set(weight_map.values()))]
    raise LmforgeError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_torch_weights(file: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a .bin/.pt checkpoint through torch.load(weights_only=True): its restricted
    unpickler builds tensors and plain containers only, so a pickle that would run code fails."""
    if not file.exists():
        raise LmforgeError(f"{file}: no such file")
    try:
        obj = torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError for a bad zip, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmforgeError(f"{file}: not loadable as plain weights with torch.load(weights_only=True) ({first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise LmforgeError(f"{file}: expected a dict of named tensors, got {type(obj).__name__}")
    return obj


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def save_hf_dir(model: GPT, config: ModelConfig, path: str | os.PathLike, tokenizer=None,
                overwrite: bool = False, stop_token_ids: list[int] | None = None) -> Path:
    """Write an HF folder (config.json, model.safetensors, tokenizer files) that
    `transformers.AutoModelForCausalLM.from_pretrained` and `pipeline(...)` load as is (an
    encoder-decoder: lmforge.interop.hf_seq2seq.save_hf_dir)."""
    from safetensors.torch import save_file

    if config.is_encoder_decoder:
        from lmforge.interop.hf_seq2seq import save_hf_dir as save_seq2seq

        return save_seq2seq(model, config, path, tokenizer, overwrite, stop_token_ids)

    dtype = model.tok_emb.weight.dtype
    if dtype not in _DTYPE_NAMES:
        raise LmforgeError(f"save_hf_dir: cannot export weights of dtype {dtype}")
    ids = {}
    if tokenizer is not None:
        if tokenizer.vocab_size > config.vocab_size:
            raise LmforgeError(
                f"save_hf_dir: the tokenizer has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}"
            )
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    bad = first_non_finite(model_state_dict(model))
    if bad is not None:  # after a cast to f16/bf16 too: a weight beyond f16's range is Inf there
        raise LmforgeError(f"{path}: not written: model {config.name!r} has non-finite weights ({dtype}) in {bad}")
    hf_config = config_to_hf(config, dtype=_DTYPE_NAMES[dtype], **ids)
    hf_sd = {k: v.cpu() for k, v in state_dict_to_hf(model_state_dict(model), config).items()}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        with atomic_file(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
            f.write("\n")
        generation = {k: v for k, v in ids.items() if v is not None}
        # transformers stops at every id in eos_token_id: the end-of-turn marker too, as lmforge does.
        stops = sorted(set(stop_token_ids or []) | ({ids["eos_token_id"]} if ids.get("eos_token_id") is not None else set()))
        if len(stops) > 1:
            generation["eos_token_id"] = stops
        if generation:
            with atomic_file(tmp / "generation_config.json", "w", encoding="utf-8") as f:
                json.dump(generation, f, indent=2)
        # transformers refuses safetensors files without format metadata.
        save_file(hf_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)


# -- folders with tokenizer files: import and export ----------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def read_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """An HF folder's tokenizer: tokenizer.json, with roles and chat template gathered from
    tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        others = [f for f in ("vocab.json", "merges.txt", "tokenizer.model") if (path / f).exists()]
        hint = f" (found only {', '.join(others)}: save it with a fast tokenizer to get tokenizer.json)" if others else ""
        raise LmforgeError(f"{path}: no tokenizer.json, so no tokenizer to import{hint}")
    tok = Tokenizer.load(path)
    config = dict(tok.config)
    if (path / "special_tokens_map.json").is_file():
        special = read_json(path / "special_tokens_map.json")
        for role in _ROLES:
            if config.get(role) is None and isinstance(special, dict) and special.get(role) is not None:
                config[role] = special[role]
    for role in _ROLES:  # AddedToken dicts -> their text, as lmforge and transformers both read it
        if isinstance(config.get(role), dict):
            config[role] = config[role].get("content")
    if not config.get("chat_template") and (path / "chat_template.jinja").is_file():
        config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    config.pop("added_tokens_decoder", None)  # restated by tokenizer.json itself
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    return Tokenizer(tok.hf, config, tok._raw_json)


def read_hf_dir(path: str | os.PathLike) -> ModelBundle:
    """An HF GPT2LMHeadModel / LlamaForCausalLM folder as a bundle (fp32 model + tokenizer)."""
    path = Path(path)
    from lmforge.interop import hf_seq2seq

    if (path / "config.json").is_file() and hf_seq2seq.is_hf_seq2seq(read_json(path / "config.json")):
        return hf_seq2seq.read_hf_dir(path)
    tokenizer = read_hf_tokenizer(path)  # first: a missing tokenizer fails before any weights are read
    model, config = load_hf_dir(path)
    hf_config = read_json(path / "config.json")
    if not hf_config.get("_name_or_path"):
        model.config = config = config.replace(name=path.resolve().name)
    if tokenizer.vocab_size > config.vocab_size:
        raise LmforgeError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}")
    extra: list[int] = []
    if (path / "generation_config.json").is_file():
        eos = read_json(path / "generation_config.json").get("eos_token_id")
        extra = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    generation = {"stop_token_ids": stop_token_ids(tokenizer, extra)} if (extra or tokenizer.eos_id is not None) else {}
    source = {"format": "hf", "path": str(path.resolve()), "architecture": (hf_config.get("architectures") or ["?"])[0]}
    return ModelBundle(model, tokenizer, generation, source)


def import_hf_dir(path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert an HF folder into a model dir (weights, tokenizer files, generation.json)."""
    return save_bundle(read_hf_dir(path), out, overwrite=overwrite)


def write_hf_dir(bundle: ModelBundle, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a bundle as an HF folder `transformers.pipeline('text-generation', model=out)` loads
    (an encoder-decoder as mBART: lmforge.interop.hf_seq2seq)."""
    if bundle.config.is_encoder_decoder:
        from lmforge.interop.hf_seq2seq import write_hf_dir as write_seq2seq

        return write_seq2seq(bundle, out, overwrite=overwrite)
    return save_hf_dir(bundle.model, bundle.config, out, tokenizer=bundle.tokenizer, overwrite=overwrite,
                       stop_token_ids=bundle.generation.get("stop_token_ids"))
