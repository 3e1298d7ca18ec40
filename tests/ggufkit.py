"""Test helpers: small GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them
(independently of lmforge's writer), tiny tokenizers, and wheels that pip can "download"."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import torch

MIXED_UNICODE = ("Hello wörld! 你好，世界 🤖🚀 naïve café — Ελληνικά, русский, עברית, العربية 12345 3.14159"
                 "  tabs\tand\nnewlines   <|im_start|>user\nhi<|im_end|> ﬁ ＡＢＣ e\u0301 \u200b zero-width")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokenizer(texts, vocab_size: int = 320):
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    return train_tokenizer(texts, TokenizerTrainConfig(vocab_size=vocab_size), show_progress=False)


def _tokenizer_metadata(w, tok, n_vocab: int, model: str = "gpt2") -> None:
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = tok.hf.get_added_tokens_decoder()
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [3 if i in added and added[i].special else 1 if i in by_id else 5 for i in range(n_vocab)]
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _add(w, name: str, t: torch.Tensor, qtype) -> None:
    a = t.detach().float().numpy()
    if a.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, a.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)


def write_gguf_from_hf(path: Path, hf_model, tok=None, qtype=None, *, arch: str | None = None,
                       tokenizer_model: str = "gpt2", drop: tuple[str, ...] = (), extra: dict | None = None) -> Path:
    """A transformers GPT2LMHeadModel / LlamaForCausalLM as llama.cpp's converter writes it."""
    qtype = qtype if qtype is not None else gguf.GGMLQuantizationType.F32
    cfg = hf_model.config
    sd = hf_model.state_dict()
    is_llama = cfg.model_type == "llama"
    w = gguf.GGUFWriter(str(path), arch or ("llama" if is_llama else "gpt2"))
    w.add_name("tiny test model")
    if is_llama:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_vocab_size(cfg.vocab_size)
    else:
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.n_inner)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    for key, value in (extra or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    if tok is not None:
        _tokenizer_metadata(w, tok, cfg.vocab_size, tokenizer_model)

    tensors: dict[str, torch.Tensor] = {}
    if is_llama:
        h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        tensors["token_embd.weight"] = sd["model.embed_tokens.weight"]
        for i in range(cfg.num_hidden_layers):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            tensors[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
            tensors[b + "attn_q.weight"] = torch.from_numpy(llama_cpp_permute(sd[p + "self_attn.q_proj.weight"].numpy(), h))
            tensors[b + "attn_k.weight"] = torch.from_numpy(llama_cpp_permute(sd[p + "self_attn.k_proj.weight"].numpy(), kv))
            tensors[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
            tensors[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
            tensors[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
            tensors[b + "ffn_gate.weight"] = sd[p + "mlp.gate_proj.weight"]
            tensors[b + "ffn_up.weight"] = sd[p + "mlp.up_proj.weight"]
            tensors[b + "ffn_down.weight"] = sd[p + "mlp.down_proj.weight"]
        tensors["output_norm.weight"] = sd["model.norm.weight"]
        if not cfg.tie_word_embeddings:
            tensors["output.weight"] = sd["lm_head.weight"]
    else:
        tensors["token_embd.weight"] = sd["transformer.wte.weight"]
        tensors["position_embd.weight"] = sd["transformer.wpe.weight"]
        for i in range(cfg.n_layer):
            p, b = f"transformer.h.{i}.", f"blk.{i}."
            for ours, theirs, transpose in (("attn_norm", "ln_1", False), ("attn_qkv", "attn.c_attn", True),
                                            ("attn_output", "attn.c_proj", True), ("ffn_norm", "ln_2", False),
                                            ("ffn_up", "mlp.c_fc", True), ("ffn_down", "mlp.c_proj", True)):
                wt = sd[p + theirs + ".weight"]
                tensors[b + ours + ".weight"] = wt.t().contiguous() if transpose else wt
                tensors[b + ours + ".bias"] = sd[p + theirs + ".bias"]
        tensors["output_norm.weight"] = sd["transformer.ln_f.weight"]
        tensors["output_norm.bias"] = sd["transformer.ln_f.bias"]
        tensors["output.weight"] = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    for name, t in tensors.items():
        if name not in drop:
            _add(w, name, t, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_tiny_llama(vocab: int, tie: bool = True, seed: int = 0, n_kv: int = 2):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv, max_position_embeddings=64, rope_theta=1000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg)
    _perturb(model, seed + 1)
    return model.eval()


def hf_tiny_gpt2(vocab: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    # transformers' GGUF loader maps gpt2.context_length to n_ctx (not n_positions) and ignores
    # gpt2.feed_forward_length, so only GPT-2's default shapes (1024 positions, 4 x width) survive it.
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=2, n_head=4, n_inner=256,
                                  bos_token_id=0, eos_token_id=0, activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(cfg)
    _perturb(model, seed + 1)
    return model.eval()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def make_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding `files` (pip checks its name, METADATA and RECORD)."""
    dist = package.replace("-", "_")
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: lmforge-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for name, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in contents.items():
            z.writestr(name, data)
    return wheel
