"""`lmforge convert` and Hugging Face folders with their tokenizer files: tiny random GPT-2 and
Llama models built with transformers are imported and exported at the directory / CLI level
and must give identical logits, the same token ids and the same greedy continuation."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ggufkit import MIXED_UNICODE, hf_tiny_gpt2, hf_tiny_llama, tiny_tokenizer  # noqa: E402

import lmforge  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.interop.convert import convert  # noqa: E402
from lmforge.interop.hf import load_hf_dir, read_hf_dir  # noqa: E402
from lmforge.model import load_model_dir  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(stdlib_texts):
    return tiny_tokenizer(stdlib_texts[:8])


def _save_hf(hf_model, tok, folder, generation_eos=None):
    """An HF folder as save_pretrained writes it, with a fast tokenizer and a chat template."""
    hf_model.save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.hf, bos_token=tok.config["bos_token"], eos_token=tok.config["eos_token"],
        pad_token=tok.config["pad_token"])
    fast.chat_template = tok.chat_template
    fast.save_pretrained(folder)
    if generation_eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return folder


def _ids(tok):
    return torch.tensor([tok.encode("import os\nprint(os.getcwd())  # café ✓")[:32]])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_folder_to_lmforge_with_the_cli(tmp_path, cli, tok, family):
    hf = hf_tiny_gpt2(tok.vocab_size) if family == "gpt2" else hf_tiny_llama(tok.vocab_size, tie=False)
    end = tok.hf.token_to_id("<|im_end|>")
    src = _save_hf(hf, tok, tmp_path / "hf", generation_eos=[tok.eos_id, end])
    r = cli("convert", src, tmp_path / "ours", "--to", "lmforge")
    assert r.code == 0, r.err
    assert "converted" in r.out and "to lmforge f32" in r.out
    model, cfg = load_model_dir(tmp_path / "ours")
    assert cfg.name == "hf"  # save_pretrained records no name: the folder's is used
    with torch.no_grad():
        assert (model(_ids(tok))[0] - hf(_ids(tok)).logits).abs().max().item() <= 1e-5
    ours = Tokenizer.load(tmp_path / "ours")
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    assert ours.encode(MIXED_UNICODE) == theirs(MIXED_UNICODE, add_special_tokens=False)["input_ids"]
    assert ours.chat_template == tok.chat_template and ours.eos_id == tok.eos_id
    generation = json.loads((tmp_path / "ours" / "generation.json").read_text())
    assert generation["stop_token_ids"] == sorted({tok.eos_id, end})


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gpt2_dir"])
def test_lmforge_to_hf_reloads_in_transformers(tmp_path, cli, request, fixture):
    src = request.getfixturevalue(fixture)
    r = cli("convert", src, tmp_path / "hf", "--to", "hf")
    assert r.code == 0, r.err
    out = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    model, _ = load_model_dir(src)
    tok = Tokenizer.load(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(tok)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() <= 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(MIXED_UNICODE, add_special_tokens=False)["input_ids"] == tok.encode(MIXED_UNICODE)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.chat_template == tok.chat_template
    # And back: the round trip is exact.
    r = cli("convert", out, tmp_path / "back", "--to", "lmforge")
    assert r.code == 0, r.err
    back, _ = load_model_dir(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_transformers_pipeline_continues_like_lmforge(tmp_path, tiny_model_dir):
    out = tmp_path / "hf"
    convert(tiny_model_dir, out, "hf")
    prompt = "def fibonacci(n):"
    ours = lmforge.pipeline("text-generation", model=str(tiny_model_dir))(prompt, max_new_tokens=12)
    hf_pipe = transformers.pipeline("text-generation", model=str(out))
    theirs = hf_pipe(prompt, max_new_tokens=12, do_sample=False)
    assert theirs[0]["generated_text"] == ours[0]["generated_text"]
    assert len(ours[0]["generated_text"]) > len(prompt)


def test_convert_to_gguf_and_back(tmp_path, cli, tiny_model_dir):
    pytest.importorskip("gguf")
    r = cli("convert", tiny_model_dir, tmp_path / "m.gguf", "--to", "gguf", "--dtype", "q8_0")
    assert r.code == 0, r.err
    assert "Q8_0" in r.out
    r = cli("convert", tmp_path / "m.gguf", tmp_path / "back", "--to", "lmforge")
    assert r.code == 0, r.err
    a, _ = load_model_dir(tiny_model_dir)
    b, _ = load_model_dir(tmp_path / "back")
    tok = Tokenizer.load(tiny_model_dir)
    with torch.no_grad():
        diff = (a(_ids(tok))[0] - b(_ids(tok))[0]).abs().max().item()
    assert 0 < diff < 0.05  # Q8_0: close, not equal
    assert Tokenizer.load(tmp_path / "back").encode(MIXED_UNICODE) == tok.encode(MIXED_UNICODE)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["source"]["converted_from"] == str(tmp_path / "m.gguf")


def test_half_precision_exports(tmp_path, tiny_model_dir):
    convert(tiny_model_dir, tmp_path / "bf16", "lmforge", dtype="bf16")
    half, _ = load_model_dir(tmp_path / "bf16", dtype=torch.bfloat16)
    assert half.tok_emb.weight.dtype == torch.bfloat16
    convert(tiny_model_dir, tmp_path / "hf16", "hf", dtype="f16")
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "float16"


def test_convert_refuses_bad_requests(tmp_path, cli, tiny_model_dir):
    r = cli("convert", tiny_model_dir, tmp_path / "x", "--to", "onnx")
    assert r.code == 1 and "--to must be one of lmforge, hf, gguf; got 'onnx'" in r.err
    r = cli("convert", tiny_model_dir, tmp_path / "x", "--to", "hf", "--dtype", "q8_0")
    assert r.code == 1 and "--dtype for --to hf must be one of f32, f16, bf16" in r.err
    (tmp_path / "taken").mkdir()
    r = cli("convert", tiny_model_dir, tmp_path / "taken", "--to", "hf")
    assert r.code == 1 and "already exists; pass --overwrite" in r.err
    r = cli("convert", tmp_path / "nothing-here", tmp_path / "y", "--to", "hf")
    assert r.code == 1 and "nothing-here: no such path, and not a known model name" in r.err


# -- bad HF folders ------------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path, tok):
    return _save_hf(hf_tiny_llama(tok.vocab_size), tok, tmp_path / "hf")


def test_truncated_safetensors_is_named(hf_dir, tmp_path):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LmforgeError, match=r"model.safetensors: not a complete safetensors file"):
        convert(hf_dir, tmp_path / "out", "lmforge")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_named(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    with pytest.raises(LmforgeError, match=r"config.json: unsupported architecture 'MistralForCausalLM'"):
        read_hf_dir(hf_dir)


def test_missing_tokenizer_is_named(hf_dir, tmp_path):
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(LmforgeError, match=r"hf: no tokenizer.json, so no tokenizer to import"):
        convert(hf_dir, tmp_path / "out", "lmforge")


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint does: run code while being unpickled
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bin_checkpoints_load_only_as_plain_weights(hf_dir, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    (hf_dir / "model.safetensors").unlink()
    torch.save(sd, hf_dir / "pytorch_model.bin")
    model, _ = load_hf_dir(hf_dir)  # plain tensors: read with torch.load(weights_only=True)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-5
    # A pickle that would run code is refused, and the code never runs.
    _Payload.marker = str(tmp_path / "pwned")
    with open(hf_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload()}, f)
    with pytest.raises(LmforgeError, match=r"pytorch_model.bin: not loadable as plain weights with torch.load\(weights_only=True\)"):
        load_hf_dir(hf_dir)
    assert not (tmp_path / "pwned").exists()
    shutil.rmtree(hf_dir)
