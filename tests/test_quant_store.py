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


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_quantize_stores_blocks_and_loads_them_back(cli, tiny_model_dir, tmp_path, fmt):
    out = tmp_path / fmt
    r = cli("quantize", tiny_model_dir, "--to", fmt, "-o", out)
    assert r.code == 0, r.err
    assert f"to {fmt}" in r.out
    fp32, _ = load_model_dir(tiny_model_dir)
    ref = model_state_dict(fp32)
    config = json.loads((out / "config.json").read_text())
    listed = config["quantization"]["tensors"]
    assert config["quantization"]["format"] == fmt
    # every linear weight and the embedding; norms stay fp32
    assert "tok_emb.weight" in listed and "blocks.1.mlp.proj.weight" in listed and not any("norm" in n for n in listed)
    stored = load_file(str(out / "model.safetensors"))
    loaded, _ = load_model_dir(out, dequantize=True)
    got = model_state_dict(loaded)
    for name, w in ref.items():
        if name in listed:
            q = quantize(w.numpy(), fmt, name)
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
    assert tensors["token_embd.weight"].tensor_type.name == fmt.upper()
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
