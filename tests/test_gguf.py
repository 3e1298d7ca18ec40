"""GGUF import and export against small files written here the way llama.cpp writes them, with
transformers' GGUF loader as the second reader. The real SmolLM2 file is in test_smollm2.py."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF

from ggufkit import (  # noqa: E402
    MIXED_UNICODE,
    hf_tiny_gpt2,
    hf_tiny_llama,
    llama_cpp_permute,
    tiny_tokenizer,
    write_gguf_from_hf,
)

from conftest import random_model  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.interop.bundle import ModelBundle  # noqa: E402
from lmforge.interop.gguf import import_gguf, open_gguf, read_gguf, write_gguf  # noqa: E402
from lmforge.model import ModelConfig, load_model_dir  # noqa: E402
from lmforge.quant.formats import quantize  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(stdlib_texts):
    return tiny_tokenizer(stdlib_texts[:8])


@pytest.fixture(scope="module")
def hf_llama(tok):
    return hf_tiny_llama(tok.vocab_size)


def _ids(tok, text="def main(args):\n    return sorted(args, key=len)  # ünïcode") -> torch.Tensor:
    return torch.tensor([tok.encode(text)[:40]])


def _hf_from_gguf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def test_llama_f32_import_matches_the_original_and_transformers(tmp_path, tok, hf_llama):
    path = write_gguf_from_hf(tmp_path / "m.gguf", hf_llama, tok)
    b = read_gguf(path)
    assert b.config.tie_embeddings and (b.config.n_head, b.config.n_kv_head) == (4, 2)
    assert b.config.rope_theta == 1000.0 and b.config.norm_eps == 1e-5
    ids = _ids(tok)
    with torch.no_grad():
        ours = b.model(ids)[0]
        original = hf_llama(ids).logits
        theirs = _hf_from_gguf(path)(ids).logits
    # The q/k permutation undone exactly: same weights as the HF model the file was made from.
    assert (ours - original).abs().max().item() <= 1e-5
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_llama_matches_transformers_dequantized(tmp_path, tok, hf_llama, qtype):
    hf = hf_tiny_llama(tok.vocab_size, tie=False, seed=3)
    path = write_gguf_from_hf(tmp_path / f"m-{qtype}.gguf", hf, tok, Q[qtype])
    b = read_gguf(path)
    assert not b.config.tie_embeddings and qtype in b.source["tensor_types"]
    ids = _ids(tok)
    with torch.no_grad():
        ours = b.model(ids)[0]
        theirs = _hf_from_gguf(path)(ids).logits
        original = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # Quantization error is visible but bounded: the dequantized model is near the original.
    err = (ours - original).abs().max().item()
    assert 0 < err < {"F16": 0.01, "Q8_0": 0.05, "Q4_0": 1.0, "Q4_1": 1.0}[qtype]


def test_gpt2_import_matches_transformers_and_reties_the_head(tmp_path, tok):
    hf = hf_tiny_gpt2(tok.vocab_size)
    path = write_gguf_from_hf(tmp_path / "g.gguf", hf, tok)
    b = read_gguf(path)
    c = b.config
    assert (c.norm, c.mlp, c.position, c.bias) == ("layernorm", "gelu", "learned", True)
    assert c.tie_embeddings  # output.weight was the embedding copied, as llama.cpp writes GPT-2
    ids = _ids(tok)
    with torch.no_grad():
        ours = b.model(ids)[0]
        assert (ours - hf(ids).logits).abs().max().item() <= 1e-5
        assert (ours - _hf_from_gguf(path)(ids).logits).abs().max().item() <= 1e-5


def test_tokenizer_is_rebuilt_like_transformers(tmp_path, tok, hf_llama):
    path = write_gguf_from_hf(tmp_path / "m.gguf", hf_llama, tok)
    ours = read_gguf(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in (MIXED_UNICODE, "  leading spaces and 2024-01-01", "<|im_start|>user\nhi<|im_end|>\n"):
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text)  # and the same as the tokenizer the file was written from
        assert ours.decode(ids) == text
    assert ours.special_tokens() == tok.special_tokens()
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert ours.chat_template == tok.chat_template


def test_import_writes_a_model_dir_with_stop_tokens(tmp_path, tok, hf_llama):
    path = write_gguf_from_hf(tmp_path / "m.gguf", hf_llama, tok)
    out = import_gguf(path, tmp_path / "dir", name="tiny")
    model, cfg = load_model_dir(out)
    assert cfg.name == "tiny"
    generation = json.loads((out / "generation.json").read_text())
    assert generation["stop_token_ids"] == sorted({tok.eos_id, tok.hf.token_to_id("<|im_end|>")})
    assert json.loads((out / "config.json").read_text())["source"]["format"] == "gguf"
    assert Tokenizer.load(out).encode(MIXED_UNICODE) == tok.encode(MIXED_UNICODE)
    with torch.no_grad():
        assert torch.equal(model(_ids(tok))[0], read_gguf(path).model(_ids(tok))[0])
    with pytest.raises(LmforgeError, match="already exists"):
        import_gguf(path, out)


# -- export ----------------------------------------------------------------------------------------
LLAMA = dict(name="exp", block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96)


@pytest.mark.parametrize("dtype,tol", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 2e-2)])
def test_export_reads_back_tensor_for_tensor(tmp_path, tok, dtype, tol):
    cfg = ModelConfig(vocab_size=tok.vocab_size, tie_embeddings=False, **LLAMA)
    model = random_model(cfg)
    path = tmp_path / f"e-{dtype}.gguf"
    info = write_gguf(ModelBundle(model, tok), path, dtype=dtype)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    sd = model.state_dict()
    hd = cfg.head_dim
    q, k, v = sd["blocks.1.attn.qkv.weight"].split([4 * hd, 2 * hd, 2 * hd])
    gate, up = sd["blocks.0.mlp.fc.weight"].split([96, 96])
    expected = {
        "token_embd.weight": sd["tok_emb.weight"], "output.weight": sd["lm_head.weight"],
        "blk.1.attn_q.weight": torch.from_numpy(llama_cpp_permute(q.numpy(), 4)),
        "blk.1.attn_k.weight": torch.from_numpy(llama_cpp_permute(k.numpy(), 2)),
        "blk.1.attn_v.weight": v, "blk.0.ffn_gate.weight": gate, "blk.0.ffn_up.weight": up,
        "blk.0.ffn_norm.weight": sd["blocks.0.norm_2.weight"], "output_norm.weight": sd["norm_f.weight"],
    }
    for name, want in expected.items():
        t = tensors[name]
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(want.shape))
        assert (got - want).abs().max().item() <= tol, name
        if want.ndim == 1:
            assert t.tensor_type == Q.F32  # norms stay f32, as llama.cpp keeps them
    want_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == want_type
    # 7 matrices per block + embedding + head; 2 norms per block + the final one.
    assert info["tensor_types"] == ({"F32": 21} if dtype == "f32" else {want_type: 16, "F32": 5})
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2


def test_export_round_trips_and_transformers_reads_it(tmp_path, tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, **LLAMA)
    model = random_model(cfg, seed=1)
    path = tmp_path / "e.gguf"
    write_gguf(ModelBundle(model, tok, {"stop_token_ids": [tok.eos_id]}), path)
    back = read_gguf(path)
    assert dataclasses.replace(back.config, name="exp") == cfg
    ids = _ids(tok)
    with torch.no_grad():
        ref = model(ids)[0]
        assert torch.equal(back.model(ids)[0], ref)
        # transformers reads the file as llama.cpp would: the q/k permutation went the right way.
        assert (_hf_from_gguf(path)(ids).logits - ref).abs().max().item() <= 1e-5
    assert back.tokenizer.encode(MIXED_UNICODE) == tok.encode(MIXED_UNICODE)
    assert back.tokenizer.chat_template == tok.chat_template


def test_llama_with_biases_round_trips(tmp_path, tok):
    # transformers' GGUF loader drops Llama biases, so this one is checked against ourselves.
    cfg = ModelConfig(vocab_size=tok.vocab_size, bias=True, **LLAMA)
    model = random_model(cfg, seed=5)
    path = tmp_path / "b.gguf"
    write_gguf(ModelBundle(model, tok), path)
    assert "blk.0.attn_q.bias" in open_gguf(path).tensors
    back = read_gguf(path)
    assert back.config.bias
    with torch.no_grad():
        assert torch.equal(back.model(_ids(tok))[0], model(_ids(tok))[0])


def test_gpt2_export_round_trips_through_transformers(tmp_path, tok):
    # GPT-2's default shapes (1024 positions, MLP 4 x width): the only ones transformers' GGUF loader reads right.
    cfg = ModelConfig(name="g", vocab_size=tok.vocab_size, block_size=1024, n_layer=2, n_head=4, n_kv_head=4,
                      n_embd=64, intermediate_size=256, norm="layernorm", mlp="gelu", position="learned", bias=True)
    model = random_model(cfg, seed=2)
    path = tmp_path / "g.gguf"
    write_gguf(ModelBundle(model, tok), path, dtype="f16")
    ids = _ids(tok)
    with torch.no_grad():
        ref = model(ids)[0]
        assert (read_gguf(path).model(ids)[0] - ref).abs().max().item() < 0.05
        assert (_hf_from_gguf(path)(ids).logits - read_gguf(path).model(ids)[0]).abs().max().item() <= 1e-4
    with pytest.raises(LmforgeError, match="tanh GELU"):
        write_gguf(ModelBundle(random_model(dataclasses.replace(cfg, mlp="gelu_exact")), tok), tmp_path / "x.gguf")


def test_export_refuses_what_gguf_cannot_hold(tmp_path, tok, stdlib_texts):
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    wp = train_tokenizer(stdlib_texts[:3], TokenizerTrainConfig(kind="wordpiece", vocab_size=200), show_progress=False)
    model = random_model(ModelConfig(vocab_size=wp.vocab_size, **LLAMA))
    with pytest.raises(LmforgeError, match="only byte-level BPE tokenizers can be written to GGUF"):
        write_gguf(ModelBundle(model, wp), tmp_path / "w.gguf")
    with pytest.raises(LmforgeError, match="GGUF dtype must be one of f32, f16, q8_0, q4_0, q4_1; got 'q5_k'"):
        write_gguf(ModelBundle(model, tok), tmp_path / "w.gguf", dtype="q5_k")
    assert not list(tmp_path.iterdir())  # nothing half-written


# -- bad input -------------------------------------------------------------------------------------
@pytest.fixture
def good(tmp_path, tok, hf_llama):
    return write_gguf_from_hf(tmp_path / "good.gguf", hf_llama, tok)


def test_truncated_and_corrupt_files_are_named(tmp_path, good):
    data = good.read_bytes()
    cases = {
        "half.gguf": (data[: len(data) // 2], "truncated or corrupt GGUF"),
        "header.gguf": (data[:200], "truncated or corrupt GGUF"),
        "tiny.gguf": (data[:10], "truncated GGUF file"),
        "magic.gguf": (b"GGML" + data[4:], "not a GGUF file"),
        "counts.gguf": (data[:8] + struct.pack("<QQ", 2**40, 5) + data[24:], "header lists 1099511627776 tensors"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(LmforgeError, match=message) as e:
            read_gguf(p)
        assert str(p) in str(e.value)


def test_non_finite_weights_are_refused(tmp_path, tok):
    hf = hf_tiny_llama(tok.vocab_size)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    path = write_gguf_from_hf(tmp_path / "nan.gguf", hf, tok)
    with pytest.raises(LmforgeError, match=r"nan.gguf: tensor blk.1.ffn_down.weight holds NaN"):
        read_gguf(path)


def test_unsupported_architecture_quantization_and_tokenizer(tmp_path, tok, hf_llama):
    with pytest.raises(LmforgeError, match=r"arch.gguf: unsupported architecture 'falcon'"):
        read_gguf(write_gguf_from_hf(tmp_path / "arch.gguf", hf_llama, tok, arch="falcon"))
    # A tensor type lmforge does not dequantize (IQ4_NL: 18 bytes per 32 values), written raw.
    path = tmp_path / "iq.gguf"
    write_gguf_from_hf(path, hf_llama, tok, drop=("blk.0.ffn_up.weight",))
    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "llama")
    r = open_gguf(path)
    for key, value in r.metadata.items():
        if key.startswith(("llama.", "tokenizer.")) and not isinstance(value, list):
            (w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float)
             else w.add_bool if isinstance(value, bool) else w.add_uint32)(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
    for t in r.tensors.values():
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((128, 64 // 32 * 18), dtype=np.uint8), raw_dtype=Q.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LmforgeError, match=r"iq2.gguf: tensor blk.0.ffn_up.weight is stored as IQ4_NL, which lmforge cannot dequantize"):
        read_gguf(tmp_path / "iq2.gguf")
    # No tokenizer at all, and a SentencePiece one.
    with pytest.raises(LmforgeError, match=r"notok.gguf: no tokenizer in this file"):
        read_gguf(write_gguf_from_hf(tmp_path / "notok.gguf", hf_llama, None))
    with pytest.raises(LmforgeError, match=r"sp.gguf: tokenizer type 'llama' is not supported"):
        read_gguf(write_gguf_from_hf(tmp_path / "sp.gguf", hf_llama, tok, tokenizer_model="llama"))
    # A missing tensor, and an unknown one.
    with pytest.raises(LmforgeError, match=r"miss.gguf: tensors missing for a llama model: blk.1.attn_v.weight"):
        read_gguf(write_gguf_from_hf(tmp_path / "miss.gguf", hf_llama, tok, drop=("blk.1.attn_v.weight",)))


# -- blocks kept on import -------------------------------------------------------------------------
def _tensor_bytes(path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("family", ["llama", "llama-untied", "gpt2"])
def test_quantized_gguf_round_trips_byte_for_byte(tmp_path, tok, family):
    """q4_1 (embedding q8_0) dir -> GGUF -> import -> export: every tensor's bytes as they were,
    and the import's blocks are the quantized dir's own (the q/k rows un-permuted exactly)."""
    from lmforge.interop.convert import convert, quantize_model
    from lmforge.model.io import save_model_dir
    from safetensors.torch import load_file

    if family == "gpt2":
        cfg = ModelConfig(name="g", vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=4,
                          n_embd=64, intermediate_size=128, norm="layernorm", mlp="gelu", position="learned", bias=True)
    else:
        cfg = ModelConfig(vocab_size=tok.vocab_size, tie_embeddings=family == "llama", **LLAMA)
    save_model_dir(random_model(cfg, seed=7), tmp_path / "src", tokenizer=tok)
    quantize_model(tmp_path / "src", tmp_path / "q", "q4_1")
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert convert(tmp_path / "q", first, "gguf")["dtype"] == "q4_1"
    s = convert(first, tmp_path / "imported", "lmforge")
    assert s["dtype"] == "q4_1" and s["tensor_types"]["q8_0"] == (1 if family != "llama-untied" else 2)
    convert(tmp_path / "imported", second, "gguf")

    a, b = _tensor_bytes(first), _tensor_bytes(second)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    assert a["token_embd.weight"][0] == "Q8_0" and a["blk.1.ffn_down.weight"][0] == "Q4_1"
    assert a["output_norm.weight"][0] == "F32"

    q_entry = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    i_entry = json.loads((tmp_path / "imported" / "config.json").read_text())["quantization"]
    assert i_entry["format"] == "q4_1"
    assert {n: i_entry["tensors"][n] for n in q_entry["tensors"]} == q_entry["tensors"]
    qsd, isd = load_file(str(tmp_path / "q" / "model.safetensors")), load_file(str(tmp_path / "imported" / "model.safetensors"))
    for name in q_entry["tensors"]:
        assert torch.equal(qsd[name], isd[name]), name
    imported, quantized = load_model_dir(tmp_path / "imported")[0], load_model_dir(tmp_path / "q")[0]
    if family == "gpt2":
        # The one change: the export made GPT-2's fp32 position table q4_1, like every 2-D weight,
        # and the import kept those blocks.
        assert i_entry["tensors"]["pos_emb.weight"]["format"] == "q4_1" and "pos_emb.weight" not in q_entry["tensors"]
        pos = quantize(quantized.pos_emb.weight.detach().numpy(), "q4_1").dequantize()
        assert torch.equal(imported.pos_emb.weight, torch.from_numpy(pos))
        return
    # And it computes as the quantized dir does.
    ids = _ids(tok)
    with torch.no_grad():
        assert torch.equal(imported(ids)[0], quantized(ids)[0])


def test_import_keeps_llama_cpp_blocks_in_our_row_order(tmp_path, tok):
    """A Q4_1 file written as llama.cpp writes it (q/k rows permuted, then quantized by gguf):
    the imported qkv blocks are gguf's blocks of the original, unpermuted HF rows."""
    hf = hf_tiny_llama(tok.vocab_size, tie=False, seed=4)
    path = write_gguf_from_hf(tmp_path / "m.gguf", hf, tok, Q.Q4_1)
    out = import_gguf(path, tmp_path / "dir")
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    entry = json.loads((out / "config.json").read_text())["quantization"]
    assert entry["format"] == "q4_1" and entry["tensors"]["blocks.0.attn.qkv.weight"] == {"format": "q4_1", "shape": [128, 64]}
    attn = hf.model.layers[1].self_attn
    want = np.concatenate([gguf.quants.quantize(p.weight.detach().numpy(), Q.Q4_1)
                           for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    assert np.array_equal(sd["blocks.1.attn.qkv.weight"].numpy(), want)
    assert sd["blocks.0.norm_1.weight"].dtype == torch.float32 and "blocks.0.norm_1.weight" not in entry["tensors"]
    # --dtype fp32: today's model dir, the same values, no blocks
    plain = import_gguf(path, tmp_path / "fp32", dtype="fp32")
    assert "quantization" not in json.loads((plain / "config.json").read_text())
    a, b = load_model_dir(out)[0].state_dict(), load_model_dir(plain)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LmforgeError, match="GGUF import dtype must be fp32 or None"):
        import_gguf(path, tmp_path / "x", dtype="q4_1")


def _retype(src, dst, types: dict[str, "Q"]):
    """A copy of the GGUF `src` with the tensors named in `types` stored in another type."""
    r = open_gguf(src)
    w = gguf.GGUFWriter(str(dst), r.arch)
    for key, value in r.metadata.items():
        if key.startswith((r.arch + ".", "tokenizer.")):
            if isinstance(value, list):
                w.add_array(key, value)
            else:
                (w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float)
                 else w.add_bool if isinstance(value, bool) else w.add_uint32)(key, value)
    for t in r.tensors.values():
        if t.name in types:
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(r.shape(t.name))
            w.add_tensor(t.name, gguf.quants.quantize(values, types[t.name]), raw_dtype=types[t.name])
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_other_types_and_mixed_parts_are_dequantized(tmp_path, tok, hf_llama, cli):
    """F16 tensors, and a fused weight whose GGUF parts differ in type, become fp32; the rest stay blocks."""
    q41 = write_gguf_from_hf(tmp_path / "m.gguf", hf_llama, tok, Q.Q4_1)
    mixed = _retype(q41, tmp_path / "mixed.gguf", {"blk.0.attn_k.weight": Q.Q8_0, "blk.1.ffn_down.weight": Q.F16})
    r = cli("convert", mixed, tmp_path / "dir", "--to", "lmforge")
    assert r.code == 0, r.err
    assert "to lmforge q4_1" in r.out
    entry = json.loads((tmp_path / "dir" / "config.json").read_text())["quantization"]["tensors"]
    assert "blocks.0.attn.qkv.weight" not in entry and "blocks.1.mlp.proj.weight" not in entry
    assert entry["blocks.1.attn.qkv.weight"]["format"] == "q4_1" and entry["tok_emb.weight"]["format"] == "q4_1"
    ours = load_model_dir(tmp_path / "dir")[0]
    with torch.no_grad():
        assert (ours(_ids(tok))[0] - _hf_from_gguf(mixed)(_ids(tok)).logits).abs().max().item() <= 1e-4
    # --dtype fp32 (the import command's flag): nothing kept, the same model
    r = cli("convert", mixed, tmp_path / "fp32", "--to", "lmforge", "--dtype", "fp32")
    assert r.code == 0 and "to lmforge f32" in r.out, r.err
    assert "quantization" not in json.loads((tmp_path / "fp32" / "config.json").read_text())
    a, b = ours.state_dict(), load_model_dir(tmp_path / "fp32")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A NaN scale in kept blocks (inside the fused qkv): the GGUF tensor is named, as for fp32 ones.
    data = bytearray(q41.read_bytes())
    t = open_gguf(q41).tensors["blk.1.attn_k.weight"]
    data[t.data_offset + 20 * 2 + 0: t.data_offset + 20 * 2 + 2] = np.float16("nan").tobytes()  # row 0, block 2's d
    (tmp_path / "nan.gguf").write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match=r"nan.gguf: tensor blk.1.attn_k.weight holds NaN"):
        read_gguf(tmp_path / "nan.gguf")
