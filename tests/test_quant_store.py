"""`lmforge quantize`: a model dir of GGUF blocks, byte for byte what lmforge.quant.formats makes,
loading back as exactly the dequantized weights; broken files refused with one line."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.interop.registry import load_model
from lmforge.model.io import load_model_dir, model_state_dict
from lmforge.quant.formats import quantize


# The embedding (and so a tied head) stays q8_0 under a 4-bit format unless told otherwise.
EMBEDDING = {"q8_0": "q8_0", "q4_0": "q8_0", "q4_1": "q8_0"}


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_quantize_stores_blocks_and_loads_them_back(cli, tiny_model_dir, tmp_path, fmt):
    out = tmp_path / fmt
    r = cli("quantize", tiny_model_dir, "--to", fmt, "-o", out)
    assert r.code == 0, r.err
    assert f"to {fmt}, token embedding (the tied head shares it) {EMBEDDING[fmt]}" in r.out
    fp32, _ = load_model_dir(tiny_model_dir)
    ref = model_state_dict(fp32)
    config = json.loads((out / "config.json").read_text())
    listed = config["quantization"]["tensors"]
    assert config["quantization"]["format"] == fmt
    # every linear weight and the embedding; norms stay fp32
    assert "tok_emb.weight" in listed and "blocks.1.mlp.proj.weight" in listed and not any("norm" in n for n in listed)
    assert listed["tok_emb.weight"] == {"format": EMBEDDING[fmt], "shape": list(ref["tok_emb.weight"].shape)}
    assert listed["blocks.0.attn.qkv.weight"] == {"format": fmt, "shape": list(ref["blocks.0.attn.qkv.weight"].shape)}
    stored = load_file(str(out / "model.safetensors"))
    loaded, _ = load_model_dir(out, dequantize=True)
    got = model_state_dict(loaded)
    for name, w in ref.items():
        if name in listed:
            q = quantize(w.numpy(), EMBEDDING[fmt] if name == "tok_emb.weight" else fmt, name)
            assert np.array_equal(stored[name].numpy(), q.blocks), name  # the bytes ggml would write
            assert torch.equal(got[name], torch.from_numpy(q.dequantize())), name
        else:
            assert torch.equal(got[name], w), name
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # still tied
    # smaller on disk: blocks instead of fp32 (q8_0 34/128 of the bytes, q4 18-20/128)
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(out) < 0.4 * size(tiny_model_dir)
    # loads through every front door: the registry, as a bundle
    assert torch.equal(load_model(out, dequantize=True).model.tok_emb.weight, got["tok_emb.weight"])


def test_quantize_refuses_bad_requests(cli, tiny_model_dir, tmp_path):
    r = cli("quantize", tiny_model_dir, "--to", "q5_k", "-o", tmp_path / "x")
    assert r.code != 0 and "unknown quantization format 'q5_k'" in r.err and not (tmp_path / "x").exists()
    cli("quantize", tiny_model_dir, "--to", "q8_0", "-o", tmp_path / "y")
    r = cli("quantize", tiny_model_dir, "--to", "q8_0", "-o", tmp_path / "y")
    assert r.code != 0 and "--overwrite" in r.err


def test_a_damaged_quantized_dir_is_refused(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    cli("quantize", tiny_model_dir, "--to", "q4_1", "-o", out)
    (out / "manifest.json").unlink()  # past the manifest: the layout checks themselves
    sd = load_file(str(out / "model.safetensors"))
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:, :-20].contiguous()  # a block short per row
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(LmforgeError, match=r"blocks\.0\.attn\.qkv\.weight: q4_1 tensor of shape .* needs uint8 blocks"):
        load_model_dir(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["format"] = "q9"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match="unknown quantization format 'q9'"):
        load_model_dir(out)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_gguf_export_writes_the_blocks_unchanged(cli, tiny_model_dir, tmp_path, fmt):
    from gguf import GGUFReader

    from lmforge.interop.convert import read_any

    qdir, file = tmp_path / "q", tmp_path / "m.gguf"
    assert cli("quantize", tiny_model_dir, "--to", fmt, "-o", qdir).code == 0
    r = cli("convert", qdir, file, "--to", "gguf")  # no --dtype: the dir's own format
    assert r.code == 0, r.err
    assert f"to gguf {fmt}" in r.out
    stored = load_file(str(qdir / "model.safetensors"))
    tensors = {t.name: t for t in GGUFReader(str(file)).tensors}
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type.name == fmt.upper()
    assert np.array_equal(np.asarray(down.data).reshape(stored["blocks.1.mlp.proj.weight"].shape),
                          stored["blocks.1.mlp.proj.weight"].numpy())  # the same bytes
    assert tensors["token_embd.weight"].tensor_type.name == EMBEDDING[fmt].upper()  # each in its own format
    emb = stored["tok_emb.weight"].numpy()
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data).reshape(emb.shape), emb)
    # read back by lmforge (the q/k rows un-permuted): the quantized dir's weights exactly
    back, ours = read_any(file).model.state_dict(), load_model_dir(qdir)[0].state_dict()
    for name, w in ours.items():
        assert torch.equal(back[name], w), name


def test_gguf_export_quantizes_a_plain_model_to_q4(cli, tiny_model_dir, tmp_path):
    """--dtype q4_1 from fp32 weights: the blocks lmforge.quant.formats makes (ggml's reference bytes)."""
    from gguf import GGUFReader

    file = tmp_path / "m.gguf"
    r = cli("convert", tiny_model_dir, file, "--to", "gguf", "--dtype", "q4_1")
    assert r.code == 0, r.err
    w = model_state_dict(load_model_dir(tiny_model_dir)[0])["blocks.0.mlp.proj.weight"]
    t = next(t for t in GGUFReader(str(file)).tensors if t.name == "blk.0.ffn_down.weight")
    assert np.array_equal(np.asarray(t.data).reshape(-1), quantize(w.numpy(), "q4_1").blocks.reshape(-1))


def _untied_dir(tiny_model_dir, path):
    """tiny_model_dir's architecture with its own lm_head."""
    from conftest import random_model
    from lmforge.model.io import read_model_config, save_model_dir
    from lmforge.tokenizer import Tokenizer

    cfg = read_model_config(tiny_model_dir)[0].replace(name="untied", tie_embeddings=False)
    return save_model_dir(random_model(cfg, seed=4), path, tokenizer=Tokenizer.load(tiny_model_dir))


def _formats(out):
    entry = json.loads((out / "config.json").read_text())["quantization"]
    return {name: spec["format"] for name, spec in entry["tensors"].items()}


def test_embedding_format_flag_and_an_untied_head(cli, tiny_model_dir, tmp_path):
    src = _untied_dir(tiny_model_dir, tmp_path / "untied")
    r = cli("quantize", src, "--to", "q4_0", "-o", tmp_path / "a")
    assert r.code == 0, r.err
    assert "to q4_0, token embedding (and lm_head) q8_0" in r.out
    formats = _formats(tmp_path / "a")
    assert formats.pop("tok_emb.weight") == formats.pop("lm_head.weight") == "q8_0"
    assert set(formats.values()) == {"q4_0"} and len(formats) == 8  # 4 matrices in each of 2 blocks
    # The stored head is the q8_0 blocks of the original head: what a model dir of them loads.
    ref = model_state_dict(load_model_dir(src)[0])["lm_head.weight"]
    got = load_model_dir(tmp_path / "a", dequantize=True)[0].lm_head.weight
    assert torch.equal(got, torch.from_numpy(quantize(ref.numpy(), "q8_0").dequantize()))

    r = cli("quantize", src, "--to", "q4_0", "--embedding-format", "q4_0", "-o", tmp_path / "b")
    assert r.code == 0 and "token embedding (and lm_head) q4_0" in r.out
    assert set(_formats(tmp_path / "b").values()) == {"q4_0"}
    r = cli("quantize", tiny_model_dir, "--to", "q8_0", "--embedding-format", "q4_1", "-o", tmp_path / "c")
    assert r.code == 0 and "to q8_0, token embedding (the tied head shares it) q4_1" in r.out
    formats = _formats(tmp_path / "c")
    assert formats.pop("tok_emb.weight") == "q4_1" and set(formats.values()) == {"q8_0"}
    loaded = load_model_dir(tmp_path / "c")[0]
    assert loaded.lm_head.packed is loaded.tok_emb.packed  # the tied head is the q4_1 embedding
    assert loaded.tok_emb.packed.format.name == "q4_1"

    r = cli("quantize", tiny_model_dir, "--to", "q4_1", "--embedding-format", "f16", "-o", tmp_path / "d")
    assert r.code != 0 and "--embedding-format: unknown quantization format 'f16'" in r.err
    assert not (tmp_path / "d").exists()


def test_requantizing_keeps_the_blocks_already_in_the_format(tiny_model_dir, tmp_path):
    from lmforge.interop.convert import quantize_model

    first = quantize_model(tiny_model_dir, tmp_path / "a", "q4_1")
    assert first["reused_blocks"] == 0 and first["tensor_types"] == {"q4_1": 8, "q8_0": 1, "f32": 5}
    again = quantize_model(tmp_path / "a", tmp_path / "b", "q4_1")
    assert again["reused_blocks"] == again["quantized_tensors"] == 9
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # To q4_0: the q8_0 embedding is kept, the q4_1 matrices are quantized from their values.
    other = quantize_model(tmp_path / "a", tmp_path / "c", "q4_0")
    assert other["reused_blocks"] == 1
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert torch.equal(c["tok_emb.weight"], a["tok_emb.weight"])
    w = load_model_dir(tmp_path / "a", dequantize=True)[0].state_dict()["blocks.0.mlp.fc.weight"]
    assert np.array_equal(c["blocks.0.mlp.fc.weight"].numpy(), quantize(w.numpy(), "q4_0").blocks)


def test_entry_layouts_old_and_new(cli, tiny_model_dir, tmp_path):
    """Each tensor in its own format; the first layout's bare [rows, cols] means the main format."""
    from lmforge.quant.store import dequantize_state_dict, quant_tensors

    out = tmp_path / "q"
    assert cli("quantize", tiny_model_dir, "--to", "q4_1", "-o", out).code == 0
    sd = load_file(str(out / "model.safetensors"))
    entry = json.loads((out / "config.json").read_text())["quantization"]
    q = quant_tensors(sd, entry, "m")
    assert q["tok_emb.weight"].format.name == "q8_0" and q["blocks.1.attn.proj.weight"].format.name == "q4_1"
    fp32 = dequantize_state_dict(sd, entry, "m")
    for name, t in q.items():
        assert torch.equal(fp32[name], torch.from_numpy(t.dequantize())), name
    assert torch.equal(fp32["norm_f.weight"], sd["norm_f.weight"])

    old = {"format": "q4_1", "tensors": {n: s["shape"] for n, s in entry["tensors"].items() if s["format"] == "q4_1"}}
    got = quant_tensors(sd, old, "m")
    assert got.keys() == old["tensors"].keys() and all(got[n].format.name == "q4_1" for n in got)
    assert all(np.array_equal(got[n].blocks, q[n].blocks) for n in got)
    # The old layout says nothing but the main format: q8_0 bytes read as q4_1 are refused.
    old["tensors"]["tok_emb.weight"] = entry["tensors"]["tok_emb.weight"]["shape"]
    with pytest.raises(LmforgeError, match=r"^m: tok_emb\.weight: q4_1 tensor of shape \(\d+, 64\) needs uint8 blocks"):
        quant_tensors(sd, old, "m")

    # A whole dir in the old layout (all q4_1, as `quantize` wrote them before) still loads.
    same = tmp_path / "same"
    assert cli("quantize", tiny_model_dir, "--to", "q4_1", "--embedding-format", "q4_1", "-o", same).code == 0
    want = model_state_dict(load_model_dir(same)[0])
    (same / "manifest.json").unlink()
    config = json.loads((same / "config.json").read_text())
    config["quantization"]["tensors"] = {n: s["shape"] for n, s in config["quantization"]["tensors"].items()}
    (same / "config.json").write_text(json.dumps(config))
    got = model_state_dict(load_model_dir(same)[0])
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("spec,message", [
    ({"format": "q5_k", "shape": [400, 64]}, r"tensors\['tok_emb\.weight'\]\.format: unknown quantization format 'q5_k'"),
    ({"shape": [400, 64]}, r"tensors\['tok_emb\.weight'\] must have exactly \"format\" and \"shape\", got keys \['shape'\]"),
    ({"format": "q8_0", "shape": [400, 64], "scale": 2}, r"must have exactly \"format\" and \"shape\""),
    ({"format": "q8_0", "shape": [400]}, r"tensors\['tok_emb\.weight'\] must be \{\"format\": \.\.\., \"shape\": \[rows, cols\]\}"),
    ("q8_0", r"tensors\['tok_emb\.weight'\] must be \{\"format\""),
    ({"format": "q4_0", "shape": [400, 64]}, r"tok_emb\.weight: q4_0 tensor of shape \(400, 64\) needs uint8 blocks of shape \(400, 36\)"),
])
def test_a_bad_tensor_entry_is_named(cli, tiny_model_dir, tmp_path, spec, message):
    out = tmp_path / "q"
    assert cli("quantize", tiny_model_dir, "--to", "q4_1", "-o", out).code == 0
    (out / "manifest.json").unlink()  # past the manifest: the entry's own checks
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["tensors"]["tok_emb.weight"]["shape"] == [400, 64]
    config["quantization"]["tensors"]["tok_emb.weight"] = spec
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match=message) as e:
        load_model_dir(out)
    assert str(out / "model.safetensors") in str(e.value) and "\n" not in str(e.value)
