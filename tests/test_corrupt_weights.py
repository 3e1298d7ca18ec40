"""Corrupt or non-finite weights are refused with one line, wherever a model is loaded or exported:
a manifest mismatch names the file (and a checkpoint's previous good sibling), NaN/Inf weights
name the tensor, logits that overflow stop generation and scoring instead of printing empty text
or a null perplexity."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.manifest import MANIFEST, verify_manifest, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_TENSOR = "blocks.1.mlp.fc.weight"


@pytest.fixture
def model(tmp_path, tiny_model_dir) -> Path:
    """A fresh copy of the tiny model dir (with the manifest lmforge writes)."""
    out = tmp_path / "m"
    shutil.copytree(tiny_model_dir, out)
    assert (out / MANIFEST).is_file()  # save_model_dir wrote one
    return out


@pytest.fixture
def text(tmp_path) -> Path:
    f = tmp_path / "text.txt"
    f.write_text("def add(a, b):\n    return a + b\n\n" * 20)
    return f


def rewrite(folder: Path, change, manifest: str) -> None:
    """Re-save model.safetensors with `change` applied; then leave the manifest stale, update it, or delete it."""
    file = folder / "model.safetensors"
    sd = {k: v.clone() for k, v in load_file(str(file)).items()}
    change(sd)
    save_file(sd, str(file), metadata={"format": "pt"})
    if manifest == "update":
        write_manifest(folder)
    elif manifest == "absent":
        (folder / MANIFEST).unlink()


def put_nan(sd):
    sd[BAD_TENSOR][3, 5] = float("nan")
    sd[BAD_TENSOR][0, 0] = float("inf")


def one_line_error(r, *fragments):
    assert r.code == 1, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), r.err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def commands(model: Path, text: Path, tmp_path: Path):
    return {
        "generate": ("generate", model, "def", "--max-new-tokens", 4, "--temperature", 0, "--no-stream"),
        "eval ppl": ("eval", "ppl", model, "--data", text, "--no-progress", "-o", tmp_path / "ppl.json"),
        "convert gguf": ("convert", model, tmp_path / "m.gguf", "--to", "gguf"),
    }


def test_a_byte_changed_after_saving_is_a_manifest_error(cli, model, text, tmp_path):
    rewrite(model, put_nan, manifest="stale")
    for name, args in commands(model, text, tmp_path).items():
        one_line_error(cli(*args), f"{model / 'model.safetensors'}: SHA-256 differs from manifest.json")
    assert not (tmp_path / "ppl.json").exists() and not (tmp_path / "m.gguf").exists()
    # A flipped byte that leaves every value finite is caught the same way.
    data = bytearray((model / "model.safetensors").read_bytes())
    write_manifest(model)
    data[-7] ^= 0x01
    (model / "model.safetensors").write_bytes(bytes(data))
    one_line_error(cli("generate", model, "def", "--max-new-tokens", 2, "--no-stream"), "SHA-256 differs")
    # Truncation is named as such, from the sizes alone.
    (model / "model.safetensors").write_bytes(bytes(data[:-100]))
    one_line_error(cli("generate", model, "def", "--no-stream"), "model.safetensors: ", "manifest.json says", "(truncated)")


@pytest.mark.parametrize("manifest", ["update", "absent"])
def test_nan_weights_are_refused_naming_the_tensor(cli, model, text, tmp_path, manifest):
    rewrite(model, put_nan, manifest=manifest)
    for name, args in commands(model, text, tmp_path).items():
        line = one_line_error(cli(*args), str(model / "model.safetensors"), f"non-finite weights in {BAD_TENSOR}",
                              "(2 of 16384 values are NaN or Inf)")
        assert "Traceback" not in line
    assert not (tmp_path / "ppl.json").exists() and not (tmp_path / "m.gguf").exists()


def test_a_model_dir_without_manifest_still_loads(cli, model):
    (model / MANIFEST).unlink()
    r = cli("generate", model, "def", "--max-new-tokens", 3, "--temperature", 0, "--no-stream")
    assert r.code == 0, r.err


def huge_norm(sd):
    """Finite weights whose logits overflow to Inf: what a diverged run or a bad scale produces."""
    sd["norm_f.weight"].fill_(3e38)  # finite, the largest float32s


def test_overflowing_logits_stop_generation_and_scoring(cli, model, text, tmp_path):
    rewrite(model, huge_norm, manifest="update")
    one_line_error(cli("generate", model, "def", "--max-new-tokens", 4, "--temperature", 0, "--no-stream"),
                   "non-finite logits (NaN or Inf) at generated token 1")
    one_line_error(cli("generate", model, "def", "--max-new-tokens", 4, "--stream"), "non-finite logits")
    one_line_error(cli("eval", "ppl", model, "--data", text, "--no-progress", "-o", tmp_path / "ppl.json"),
                   "non-finite logits (NaN or Inf) while scoring")
    assert not (tmp_path / "ppl.json").exists()


def test_perplexity_that_overflows_is_an_error_not_null(tiny_model_dir):
    """Finite logits can still give exp(NLL) = inf: never reported as a number (JSON null)."""
    from lmforge.eval.perplexity import score_stream
    from lmforge.generate.engine import Engine
    from lmforge.interop.registry import load_model

    loaded = load_model(tiny_model_dir)
    with torch.no_grad():
        loaded.model.norm_f.weight.fill_(1e4)  # logits ~1e4 apart: NLL in the thousands, finite
    engine = Engine(loaded.model, loaded.tokenizer)
    ids = loaded.tokenizer.encode("def add(a, b):\n    return a + b\n" * 4)
    with pytest.raises(LmforgeError, match=r"mean NLL .* nats/token: the perplexity is not a finite number"):
        score_stream(engine, ids, context=64, stride=32)


def test_export_refuses_non_finite_tensors(tiny_model_dir, tmp_path):
    from lmforge.interop.bundle import load_bundle
    from lmforge.interop.gguf import write_gguf
    from lmforge.interop.hf import write_hf_dir

    bundle = load_bundle(tiny_model_dir)
    with torch.no_grad():
        bundle.model.get_parameter(BAD_TENSOR)[1, 2] = float("nan")
    with pytest.raises(LmforgeError, match=rf"m.gguf: not written: model .* non-finite weights in {BAD_TENSOR} \(1 of"):
        write_gguf(bundle, tmp_path / "m.gguf")
    with pytest.raises(LmforgeError, match=rf"hf: not written: .* non-finite weights \(torch.float32\) in {BAD_TENSOR}"):
        write_hf_dir(bundle, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_export_to_f16_refuses_values_beyond_its_range(cli, model, tmp_path):
    rewrite(model, lambda sd: sd[BAD_TENSOR].__setitem__((0, 0), 1e6), manifest="update")
    one_line_error(cli("convert", model, tmp_path / "m.gguf", "--to", "gguf", "--dtype", "f16"),
                   f"{BAD_TENSOR} has values beyond f16's range")
    one_line_error(cli("convert", model, tmp_path / "hf", "--to", "hf", "--dtype", "f16"),
                   f"non-finite weights (torch.float16) in {BAD_TENSOR} (1 of")
    assert cli("convert", model, tmp_path / "ok.gguf", "--to", "gguf", "--dtype", "f32").code == 0
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "hf").exists()


# -- manifests everywhere --------------------------------------------------------------------------
def test_every_model_dir_lmforge_writes_has_a_manifest(cli, model, tmp_path):
    from lmforge.model.io import load_model_dir, save_model_dir

    assert verify_manifest(tmp_path / "m", required=True)
    saved = save_model_dir(load_model_dir(model)[0], tmp_path / "saved")
    assert verify_manifest(saved, required=True)
    assert cli("convert", model, tmp_path / "conv", "--to", "lmforge").code == 0  # save_bundle: imports too
    assert verify_manifest(tmp_path / "conv", required=True)
    assert json.loads((tmp_path / "conv" / MANIFEST).read_text())["files"].keys() >= {"model.safetensors", "config.json", "tokenizer.json"}


def _checkpoint_run(model: Path, run: Path) -> None:
    """A run dir as training leaves it (no best/ yet): two checkpoints with manifests, latest -> the second."""
    for step in (2, 4):
        folder = run / "checkpoints" / f"step-{step:06d}"
        shutil.copytree(model, folder)
        (folder / MANIFEST).unlink()
        write_manifest(folder)
    (run / "latest").write_text("step-000004\n")


def test_a_corrupt_checkpoint_loaded_for_generation_names_the_previous_good_one(cli, model, tmp_path):
    run = tmp_path / "run"
    _checkpoint_run(model, run)
    rewrite(run / "checkpoints" / "step-000004", put_nan, manifest="stale")
    one_line_error(cli("generate", run, "def", "--max-new-tokens", 2, "--no-stream"),
                   "step-000004/model.safetensors: SHA-256 differs",
                   f"the previous good checkpoint is {run / 'checkpoints' / 'step-000002'}")
    assert cli("generate", run / "checkpoints" / "step-000002", "def", "--max-new-tokens", 2, "--no-stream").code == 0


def test_adapter_dirs_are_verified(cli, model, tmp_path):
    from lmforge.model.io import load_model_dir
    from lmforge.model.lora import LoRAConfig, apply_lora, save_adapter
    from lmforge.tokenizer import Tokenizer

    net, _ = load_model_dir(model)
    apply_lora(net, LoRAConfig(rank=2))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_adapter(net, adapter, LoRAConfig(rank=2), base=str(model.resolve()))
    Tokenizer.load(model).save(adapter)
    write_manifest(adapter)
    assert cli("generate", adapter, "def", "--max-new-tokens", 2, "--no-stream").code == 0
    file = adapter / "adapter.safetensors"
    sd = {k: v.clone() for k, v in load_file(str(file)).items()}
    first = sorted(sd)[0]
    sd[first].view(-1)[0] = float("nan")
    save_file(sd, str(file))
    one_line_error(cli("generate", adapter, "def", "--max-new-tokens", 2, "--no-stream"),
                   "adapter.safetensors: SHA-256 differs")
    write_manifest(adapter)
    one_line_error(cli("generate", adapter, "def", "--max-new-tokens", 2, "--no-stream"),
                   f"adapter.safetensors: non-finite weights in {first} (1 of")


def test_a_verified_folder_is_not_hashed_again_until_a_file_changes(model, tmp_path, monkeypatch):
    """The stamp after a full check spares the hashing on later loads (seconds for a 135M model),
    and any write to a file, even one that puts its mtime back, makes the next load hash again."""
    import os

    import lmforge.manifest as manifest

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    hashed = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    assert verify_manifest(model)
    first = len(hashed)
    assert first >= 2 and "model.safetensors" in hashed
    assert verify_manifest(model) and len(hashed) == first  # stamped: no hashing
    weights = model / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime moved
    with pytest.raises(LmforgeError, match="SHA-256 differs"):
        verify_manifest(model)
    assert len(hashed) > first
