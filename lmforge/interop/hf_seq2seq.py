"""Hugging Face transformers <-> lmforge for the encoder-decoder (Seq2Seq): MBartForConditionalGeneration.

Why mBART: it is the transformers encoder-decoder whose layout is ours. Marian and BART are
post-norm (the norm after each residual addition) and Marian's positions are sinusoidal; T5
has relative position biases and no biases or LayerNorm. mBART is pre-norm with LayerNorm,
learned absolute positions, a LayerNorm on the embeddings and a final LayerNorm in each stack,
a biased GELU MLP and biased attention projections: exactly a Seq2Seq with norm=layernorm,
position=learned, mlp=gelu_exact (or gelu, mBART's "gelu_new") and bias=True, which is what
the encoder-decoder presets are. The only offset is in the position tables: mBART's have two
extra rows in front (position p reads row p + 2); they are never read, exported as zeros.

Like lmforge.interop.hf, this works on plain dicts and tensors; transformers is never imported.
The mapping (HF names under model., per block i):

    lmforge                               MBartForConditionalGeneration
    tok_emb                               shared (= encoder/decoder.embed_tokens; = lm_head when tied)
    src_tok_emb (import only)             encoder.embed_tokens when it is not the decoder's table
    {encoder,decoder}.pos_emb             {encoder,decoder}.embed_positions, rows 2..
    {encoder,decoder}.norm_emb            {encoder,decoder}.layernorm_embedding
    {encoder,decoder}.blocks.{i}.norm_1   {encoder,decoder}.layers.{i}.self_attn_layer_norm
      .attn.qkv / .attn.proj              .self_attn.{q,k,v}_proj (concatenated) / .self_attn.out_proj
      .norm_2, .mlp.fc, .mlp.proj         .final_layer_norm, .fc1, .fc2
    decoder.blocks.{i}.norm_cross         decoder.layers.{i}.encoder_attn_layer_norm
      .cross_attn.q / .kv / .proj         .encoder_attn.q_proj / .{k,v}_proj (concatenated) / .out_proj
    {encoder,decoder}.norm_f              {encoder,decoder}.layer_norm
    lm_head (untied only)                 lm_head; final_logits_bias: zeros (refused on import otherwise)

Not exportable, refused with a one-line error: rmsnorm, swiglu, rope, norm_eps other than 1e-5
(mBART's LayerNorms use torch's default), grouped-query attention, a separate source vocabulary
(transformers 4 always reads the source through the shared table). bias=False exports as zero
biases (and imports back as bias=True). Config fields without a counterpart in lmforge are
refused on import: scale_embedding=True, encoder and decoder of different widths or heads.

Generation: transformers starts the decoder with `decoder_start_token_id`, written into
config.json and generation_config.json: the bundle's generation.json "decoder_start_token_id",
else the tokenizer's bos token, else its eos. transformers >= 5 has no "translation" pipeline
any more; AutoTokenizer + AutoModelForSeq2SeqLM.generate run an export (tests/test_seq2seq_model.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_dir, atomic_file
from lmforge.interop.bundle import ModelBundle, save_bundle, stop_token_ids
from lmforge.interop.hf import checked_import
from lmforge.model.config import ModelConfig
from lmforge.model.io import check_state_dict, first_non_finite, model_from_state_dict, model_state_dict, read_json, read_safetensors

HF_ARCHITECTURE = "MBartForConditionalGeneration"
POSITION_OFFSET = 2  # mBART's position tables start two rows early
_GELU = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def is_hf_seq2seq(hf_config: dict[str, Any]) -> bool:
    """Whether an HF config.json describes the architecture this module converts."""
    if not isinstance(hf_config, dict):
        return False
    archs = hf_config.get("architectures") or []
    return (archs[0] == HF_ARCHITECTURE) if archs else hf_config.get("model_type") == "mbart"


# -- configs ------------------------------------------------------------------------------------
def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from an mBART config.json dict, refusing what Seq2Seq cannot reproduce. The
    source vocabulary is the shared one; `load_hf_dir` switches to a separate one when the
    weights have it."""
    d = hf_config
    if not is_hf_seq2seq(d):
        raise LmforgeError(f"HF config: not an mBART model ({(d.get('architectures') or [d.get('model_type')])[0]!r})")
    if d.get("scale_embedding", False):
        raise LmforgeError("HF config: mBART with scale_embedding=True is not supported (lmforge does not scale embeddings)")
    act = d.get("activation_function", "gelu")
    if act not in _GELU:
        raise LmforgeError(f"HF config: mBART activation_function {act!r} is not supported (gelu, gelu_new)")
    for enc, dec in (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads")):
        if d.get(enc, 4096 if "ffn" in enc else 16) != d.get(dec, 4096 if "ffn" in dec else 16):
            raise LmforgeError(f"HF config: {enc} != {dec} is not supported (lmforge's encoder and decoder share both)")
    heads = d.get("encoder_attention_heads", 16)
    name = str(d.get("_name_or_path") or "mbart").rstrip("/").split("/")[-1] or "mbart"
    return ModelConfig(
        name=name, arch="encoder-decoder", vocab_size=d.get("vocab_size", 50265),
        block_size=d.get("max_position_embeddings", 1024), n_encoder_layer=d.get("encoder_layers", 12),
        n_layer=d.get("decoder_layers", 12), n_head=heads, n_kv_head=heads, n_embd=d.get("d_model", 1024),
        intermediate_size=d.get("encoder_ffn_dim", 4096), norm="layernorm", norm_eps=1e-5, mlp=_GELU[act],
        position="learned", bias=True, tie_embeddings=d.get("tie_word_embeddings", True),
        dropout=float(d.get("dropout", 0.0)), init_std=d.get("init_std", 0.02),
    )


def check_exportable(config: ModelConfig) -> None:
    """Raise a one-line LmforgeError naming every setting mBART cannot hold exactly."""
    c = config
    if not c.is_encoder_decoder:
        raise LmforgeError(f"model {c.name!r}: not an encoder-decoder (arch {c.arch!r}); see lmforge.interop.hf")
    problems = []
    if c.norm != "layernorm":
        problems.append(f"norm={c.norm} (mBART: layernorm)")
    elif c.norm_eps != 1e-5:
        problems.append(f"norm_eps={c.norm_eps} (mBART: 1e-5)")
    if c.mlp not in ("gelu", "gelu_exact"):
        problems.append(f"mlp={c.mlp} (mBART: gelu_exact or gelu)")
    if c.position != "learned":
        problems.append(f"position={c.position} (mBART: learned)")
    if c.n_kv_head != c.n_head:
        problems.append(f"n_kv_head={c.n_kv_head} != n_head={c.n_head} (mBART has no grouped-query attention)")
    if c.src_vocab_size:
        problems.append(f"src_vocab_size={c.src_vocab_size} (mBART: one vocabulary shared by source and target)")
    if problems:
        raise LmforgeError(f"model {c.name!r} cannot be exported as {HF_ARCHITECTURE}: {'; '.join(problems)}")


def config_to_hf(config: ModelConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 decoder_start_token_id: int | None = None) -> dict[str, Any]:
    """A config.json dict transformers loads as MBartForConditionalGeneration."""
    check_exportable(config)
    c = config
    return {
        "architectures": [HF_ARCHITECTURE], "model_type": "mbart", "is_encoder_decoder": True,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.block_size, "d_model": c.n_embd,
        "encoder_layers": c.n_encoder_layer, "decoder_layers": c.n_layer,
        "encoder_attention_heads": c.n_head, "decoder_attention_heads": c.n_head,
        "encoder_ffn_dim": c.intermediate_size, "decoder_ffn_dim": c.intermediate_size,
        "activation_function": "gelu" if c.mlp == "gelu_exact" else "gelu_new",
        # lmforge's one dropout: embeddings, residual branches, attention weights; none on the MLP hidden.
        "dropout": c.dropout, "attention_dropout": c.dropout, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "scale_embedding": False,
        "tie_word_embeddings": c.tie_embeddings, "init_std": c.init_std,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "decoder_start_token_id": decoder_start_token_id, "forced_eos_token_id": None,
        # transformers >= 5 reads "dtype", older versions "torch_dtype".
        "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
    }


# -- state dicts --------------------------------------------------------------------------------
def _module_groups(config: ModelConfig) -> list[tuple[str, list[str]]]:
    """(lmforge module, HF modules concatenated along dim 0 to make it), for every module that
    has a weight and a bias (all of mBART's linear layers and norms)."""
    groups = []
    for stack, n_layers in (("encoder", config.n_encoder_layer), ("decoder", config.n_layer)):
        hf = f"model.{stack}."
        groups.append((f"{stack}.norm_emb", [f"{hf}layernorm_embedding"]))
        for i in range(n_layers):
            ours, layer = f"{stack}.blocks.{i}.", f"{hf}layers.{i}."
            groups += [(f"{ours}norm_1", [f"{layer}self_attn_layer_norm"]),
                       (f"{ours}attn.qkv", [f"{layer}self_attn.{p}_proj" for p in "qkv"]),
                       (f"{ours}attn.proj", [f"{layer}self_attn.out_proj"])]
            if stack == "decoder":
                groups += [(f"{ours}norm_cross", [f"{layer}encoder_attn_layer_norm"]),
                           (f"{ours}cross_attn.q", [f"{layer}encoder_attn.q_proj"]),
                           (f"{ours}cross_attn.kv", [f"{layer}encoder_attn.k_proj", f"{layer}encoder_attn.v_proj"]),
                           (f"{ours}cross_attn.proj", [f"{layer}encoder_attn.out_proj"])]
            groups += [(f"{ours}norm_2", [f"{layer}final_layer_norm"]),
                       (f"{ours}mlp.fc", [f"{layer}fc1"]), (f"{ours}mlp.proj", [f"{layer}fc2"])]
        groups.append((f"{stack}.norm_f", [f"{hf}layer_norm"]))
    return groups


def _token_tables(sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (encoder, decoder) token tables an mBART forward reads: each stack's embed_tokens when
    stored (transformers >= 5 keeps them apart when embeddings are untied), else the shared one."""
    shared = sd.get("model.shared.weight")
    return sd.get("model.encoder.embed_tokens.weight", shared), sd.get("model.decoder.embed_tokens.weight", shared)


def has_separate_source_table(sd: dict[str, torch.Tensor]) -> bool:
    """Whether an mBART state dict's encoder reads another token table than its decoder."""
    enc, dec = _token_tables(sd)
    return enc is not None and dec is not None and enc is not dec and not torch.equal(enc, dec)


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """mBART weights -> Seq2Seq names and layout for `config` (from `config_from_hf`; with
    src_vocab_size = vocab_size when `has_separate_source_table`)."""
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise LmforgeError(f"HF state dict: missing tensor {name!r}")
        used.add(name)
        return sd[name]

    for ours, hf_names in _module_groups(config):
        for s in ("weight", "bias"):
            parts = [take(f"{n}.{s}") for n in hf_names]
            out[f"{ours}.{s}"] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    for stack in ("encoder", "decoder"):
        table = take(f"model.{stack}.embed_positions.weight")
        out[f"{stack}.pos_emb.weight"] = table[POSITION_OFFSET:]
    used.update(k for k in ("model.shared.weight", "model.encoder.embed_tokens.weight",
                            "model.decoder.embed_tokens.weight") if k in sd)
    enc, dec = _token_tables(sd)
    if dec is None:
        raise LmforgeError("HF state dict: missing tensor 'model.shared.weight'")
    out["tok_emb.weight"] = dec
    if config.src_vocab_size:
        out["src_tok_emb.weight"] = enc
    elif has_separate_source_table(sd):
        raise LmforgeError("HF state dict: the encoder's token embeddings differ from the decoder's; "
                           "the config needs a separate source vocabulary (src_vocab_size)")
    head = sd.get("lm_head.weight")
    if head is not None:
        used.add("lm_head.weight")
    if not config.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    elif head is not None and head is not dec and not torch.equal(head, dec):
        raise LmforgeError("HF state dict: tie_word_embeddings is set but lm_head.weight differs from the token embeddings")
    bias = sd.get("final_logits_bias")
    if bias is not None:
        used.add("final_logits_bias")
        if bool(bias.ne(0).any()):
            raise LmforgeError("HF state dict: final_logits_bias is not zero (lmforge's output head has no bias)")
    return checked_import(out, sd, used, config)


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Seq2Seq weights -> mBART names and layout, every tensor its own (safetensors refuses
    shared storage). Tied: the token table once, as model.shared; untied: also as each stack's
    embed_tokens, which transformers >= 5 keeps as separate parameters then."""
    check_exportable(config)
    sd = {k: v for k, v in sd.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    check_state_dict(sd, config, "lmforge state dict")
    out: dict[str, torch.Tensor] = {}
    for ours, hf_names in _module_groups(config):
        weight = sd[f"{ours}.weight"]
        bias = sd.get(f"{ours}.bias")
        if bias is None:  # bias=False: mBART always has biases; zeros compute the same
            bias = weight.new_zeros(weight.shape[0])
        sizes = config.fused_parts(f"{ours}.weight")
        for s, t in (("weight", weight), ("bias", bias)):
            parts = t.split(sizes, dim=0) if sizes else [t]
            out.update({f"{n}.{s}": p.contiguous() for n, p in zip(hf_names, parts)})
    for stack in ("encoder", "decoder"):
        table = sd[f"{stack}.pos_emb.weight"]
        out[f"model.{stack}.embed_positions.weight"] = torch.cat([table.new_zeros(POSITION_OFFSET, table.shape[1]), table])
    tokens = sd["tok_emb.weight"]
    out["model.shared.weight"] = tokens.contiguous()
    if not config.tie_embeddings:
        out["model.encoder.embed_tokens.weight"] = tokens.clone()
        out["model.decoder.embed_tokens.weight"] = tokens.clone()
        out["lm_head.weight"] = sd["lm_head.weight"].contiguous()
    out["final_logits_bias"] = tokens.new_zeros(1, config.vocab_size)
    return out


# -- directories --------------------------------------------------------------------------------
def load_hf_dir(path: str | os.PathLike, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32):
    """A Seq2Seq (eval mode) and its ModelConfig from an mBART folder (weights as lmforge.interop.hf reads them)."""
    from lmforge.interop.hf import _weight_files, read_torch_weights

    path = Path(path)
    hf_config = read_json(path / "config.json")
    if not isinstance(hf_config, dict):
        raise LmforgeError(f"{path / 'config.json'}: expected a JSON object")
    try:
        config = config_from_hf(hf_config)
    except LmforgeError as e:
        raise LmforgeError(f"{path / 'config.json'}: {str(e).removeprefix('HF config: ')}") from None
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        sd.update(read_safetensors(f, device) if f.suffix == ".safetensors" else read_torch_weights(f, device))
    if has_separate_source_table(sd):
        config = config.replace(src_vocab_size=config.vocab_size)
    try:
        ours = state_dict_from_hf(sd, config)
    except LmforgeError as e:
        raise LmforgeError(f"{path}: {e}") from None
    return model_from_state_dict(config, ours, source=str(path), device=device, dtype=dtype), config


def decoder_start_id(tokenizer, generation: dict[str, Any] | None = None) -> int | None:
    """The token the decoder starts from: generation.json's decoder_start_token_id, else the
    tokenizer's bos, else its eos (None without either)."""
    start = (generation or {}).get("decoder_start_token_id")
    if isinstance(start, int):
        return start
    if tokenizer is None:
        return None
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def save_hf_dir(model, config: ModelConfig, path: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                stop_token_ids: list[int] | None = None, decoder_start_token_id: int | None = None) -> Path:
    """Write an mBART folder (config.json, generation_config.json, model.safetensors, tokenizer
    files) that transformers' AutoModelForSeq2SeqLM and AutoTokenizer load as is."""
    from safetensors.torch import save_file

    from lmforge.interop.hf import _DTYPE_NAMES

    check_exportable(config)
    dtype = model.tok_emb.weight.dtype
    if dtype not in _DTYPE_NAMES:
        raise LmforgeError(f"save_hf_dir: cannot export weights of dtype {dtype}")
    ids: dict[str, int | None] = {}
    if tokenizer is not None:
        if tokenizer.vocab_size > config.vocab_size:
            raise LmforgeError(
                f"save_hf_dir: the tokenizer has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}"
            )
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if decoder_start_token_id is None:
        decoder_start_token_id = decoder_start_id(tokenizer)
    bad = first_non_finite(model_state_dict(model))
    if bad is not None:
        raise LmforgeError(f"{path}: not written: model {config.name!r} has non-finite weights ({dtype}) in {bad}")
    hf_config = config_to_hf(config, dtype=_DTYPE_NAMES[dtype], decoder_start_token_id=decoder_start_token_id, **ids)
    hf_sd = {k: v.cpu() for k, v in state_dict_to_hf(model_state_dict(model), config).items()}
    generation = {k: v for k, v in ids.items() if v is not None}
    if decoder_start_token_id is not None:
        generation["decoder_start_token_id"] = decoder_start_token_id
    stops = sorted(set(stop_token_ids or []) | ({ids["eos_token_id"]} if ids.get("eos_token_id") is not None else set()))
    if len(stops) > 1:
        generation["eos_token_id"] = stops
    generation["forced_eos_token_id"] = None  # mBART's config class defaults it to 2
    with atomic_dir(path, overwrite=overwrite) as tmp:
        with atomic_file(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
            f.write("\n")
        with atomic_file(tmp / "generation_config.json", "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2)
        save_file(hf_sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # transformers needs the metadata
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)


def read_hf_dir(path: str | os.PathLike) -> ModelBundle:
    """An mBART folder as a bundle (fp32 Seq2Seq + tokenizer; the decoder start and stop tokens
    from generation_config.json or config.json into generation.json)."""
    from lmforge.interop.hf import read_hf_tokenizer

    path = Path(path)
    tokenizer = read_hf_tokenizer(path)  # first: a missing tokenizer fails before any weights are read
    model, config = load_hf_dir(path)
    hf_config = read_json(path / "config.json")
    if not hf_config.get("_name_or_path"):
        model.config = config = config.replace(name=path.resolve().name)
    if tokenizer.vocab_size > config.vocab_size:
        raise LmforgeError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}")
    settings = dict(hf_config)
    if (path / "generation_config.json").is_file():
        settings.update({k: v for k, v in read_json(path / "generation_config.json").items() if v is not None})
    eos = settings.get("eos_token_id")
    extra = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    generation: dict[str, Any] = {}
    if extra or tokenizer.eos_id is not None:
        generation["stop_token_ids"] = stop_token_ids(tokenizer, extra)
    if isinstance(settings.get("decoder_start_token_id"), int):
        generation["decoder_start_token_id"] = settings["decoder_start_token_id"]
    source = {"format": "hf", "path": str(path.resolve()), "architecture": HF_ARCHITECTURE}
    return ModelBundle(model, tokenizer, generation, source)


def import_hf_dir(path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert an mBART folder into a model dir (weights, tokenizer files, generation.json)."""
    return save_bundle(read_hf_dir(path), out, overwrite=overwrite)


def write_hf_dir(bundle: ModelBundle, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write an encoder-decoder bundle as an mBART folder."""
    return save_hf_dir(bundle.model, bundle.config, out, tokenizer=bundle.tokenizer, overwrite=overwrite,
                       stop_token_ids=bundle.generation.get("stop_token_ids"),
                       decoder_start_token_id=decoder_start_id(bundle.tokenizer, bundle.generation))
