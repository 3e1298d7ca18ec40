"""The data-stage commands end to end, as a user runs them, with their bad-input errors."""

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import leftovers, write_jsonl
from lmforge.model.config import get_preset
from lmforge.model.gpt import GPT

COMMANDS = ["clean", "pack", "shards", "quickstart", "tokenizer"]


def test_help_lists_every_command_with_defaults(cli):
    r = cli("--help")
    assert r.code == 0
    for name in COMMANDS:
        assert f"\n  {name} " in r.out
    for sub in (["clean"], ["pack"], ["shards"], ["quickstart"], ["tokenizer", "train"], ["tokenizer", "encode"],
                ["tokenizer", "decode"], ["tokenizer", "inspect"]):
        r = cli(*sub, "--help")
        assert r.code == 0, sub
        assert "Usage: lmforge " + " ".join(sub) in r.out
    assert "default: 8192" in cli("tokenizer", "train", "--help").out
    assert "[default: 0.85]" in cli("clean", "--help").out


def test_pipeline_through_the_cli(cli, tmp_path, stdlib_texts):
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"body": t} for t in stdlib_texts[:30]])
    (tmp_path / "raw" / "page.html").write_text("<html><body><nav>menu</nav><p>" + "Some words here. " * 20 + "</p></body></html>")
    r = cli("clean", tmp_path / "raw", "-o", tmp_path / "clean", "--text-field", "body", "--no-progress", "--workers", "1")
    assert r.code == 0, r.err
    assert "kept 31" in r.out
    r = cli("tokenizer", "train", tmp_path / "clean", "-o", tmp_path / "tok", "--vocab-size", "500", "--no-progress")
    assert r.code == 0, r.err
    assert "500 tokens" in r.out
    r = cli("tokenizer", "encode", tmp_path / "tok", "def f(x):", "--tokens")
    ids = r.out.splitlines()[0].split()
    assert r.code == 0 and len(ids) > 1
    r = cli("tokenizer", "decode", tmp_path / "tok", *ids)
    assert r.out == "def f(x):\n"
    r = cli("tokenizer", "inspect", tmp_path / "tok", "--sample", tmp_path / "clean", "--json")
    report = json.loads(r.out)
    assert report["vocab_size"] == 500 and report["bytes_per_token"] > 1
    r = cli("pack", tmp_path / "clean", "--tokenizer", tmp_path / "tok", "-o", tmp_path / "shards", "--val-fraction", "0.1", "--no-progress", "--workers", "1")
    assert r.code == 0, r.err
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["documents"] == 31 and meta["splits"]["val"]["documents"] == 3
    r = cli("shards", tmp_path / "shards", "--tokenizer", tmp_path / "tok")
    assert r.code == 0 and "tokenizer matches" in r.out and f"train: {meta['splits']['train']['tokens']} tokens" in r.out


def one_line_error(r, *fragments):
    assert r.code != 0
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), r.err
    for f in fragments:
        assert f in lines[0]


def test_bad_input_gives_one_line_errors(cli, tmp_path, stdlib_texts):
    one_line_error(cli("clean", tmp_path / "nope", "-o", tmp_path / "o"), "nope: no such file or directory")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01binary")
    one_line_error(cli("clean", tmp_path / "bin.txt", "-o", tmp_path / "o", "--no-progress"), "bin.txt: binary file")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9" * 10)
    one_line_error(cli("clean", tmp_path / "latin.txt", "-o", tmp_path / "o", "--encoding-errors", "strict", "--no-progress"), "latin.txt: invalid UTF-8 at byte 3")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(cli("clean", tmp_path / "empty.txt", "-o", tmp_path / "o", "--no-progress"), "no document survived cleaning")
    one_line_error(cli("tokenizer", "train", tmp_path / "latin.txt", "-o", tmp_path / "t", "--vocab-size", "5000", "--no-progress"), "less than --vocab-size 5000")
    one_line_error(cli("tokenizer", "decode", tmp_path / "nope", "1"), "nope: no such file")
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in stdlib_texts[:3]])
    assert cli("tokenizer", "train", tmp_path / "docs.jsonl", "-o", tmp_path / "t", "--vocab-size", "300", "--no-progress").code == 0
    one_line_error(cli("tokenizer", "decode", tmp_path / "t", "999999"), "out of range")
    one_line_error(cli("pack", tmp_path / "docs.jsonl", "--tokenizer", tmp_path / "t", "-o", tmp_path / "s", "--no-progress", "--workers", "1"), "val split is empty")
    one_line_error(cli("shards", tmp_path), "not a shards dir")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
    assert leftovers(tmp_path) == []
    # usage errors come from the CLI library: non-zero, with a pointer to --help
    r = cli("clean", "--bogus")
    assert r.code == 2 and "No such option: --bogus" in r.err


def test_ctrl_c_leaves_nothing_half_written(tmp_path, stdlib_texts):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(1500):  # several seconds of work: the interrupt must land mid-run on a fast machine too
        (corpus / f"doc{i:04d}.txt").write_text(stdlib_texts[i % len(stdlib_texts)] + f"\n# copy {i}\n" * 3)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "clean", str(corpus), "-o", str(out), "--workers", "1", "--no-dedup-near", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
        # ignored; the test is about Ctrl-C in a terminal, so give the child the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while not leftovers(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # wait until the run is writing its temp folder
    assert proc.poll() is None, "the run ended before it could be interrupted"
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "lmforge: interrupted", err
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_models_and_estimate_commands(cli):
    r = cli("models", "--presets")
    assert r.code == 0
    for name in ("tiny", "gpt2-124m", "llama-tiny", "smollm2-135m"):
        assert name in r.out
    assert "124.4M" in r.out and "134.5M" in r.out
    r = cli("estimate", "--model", "gpt2-124m", "--batch-size", "2", "--seq-len", "128")
    assert r.code == 0 and "124,439,808 parameters" in r.out
    weights = float(r.out.split("weights")[1].split()[0])
    assert weights == pytest.approx(124_439_808 * 4 / 2**30, abs=1e-3)
    r = cli("estimate", "--model", "tiny", "--model.n-layer", "8")
    assert r.code == 0 and "tiny:" in r.out
    # The override took effect: the count is the 8-layer model's, not the preset's.
    with torch.device("meta"):
        want = GPT(dataclasses.replace(get_preset("tiny"), n_layer=8)).param_count()
    assert get_preset("tiny").n_layer != 8 and f"tiny: {want:,} parameters" in r.out
    r = cli("estimate", "--model", "nope")
    assert r.code == 1 and "unknown model preset 'nope'" in r.err
