import json
import math
import os
import subprocess
import sys

import pytest

from lmforge.data.embedded import stdlib_files
from lmforge.model.io import load_model_dir
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import latest_checkpoint, verify_checkpoint


def test_quickstart_short_run_end_to_end(tmp_path):
    """The README's main command as `make quickstart` runs it (the console entry point, with
    --overwrite), on 60 small standard-library files for 18 seconds of training."""
    files = [p for p in stdlib_files(include_tests=False) if 2000 < p.stat().st_size < 12000][:60]
    out = tmp_path / "qs"
    args = [sys.executable, "-m", "lmforge", "quickstart", "-o", str(out), "--overwrite", "--no-progress",
            "--vocab-size", "512", "--minutes", "0.3", "--batch-size", "8", "--block-size", "64"]
    for f in files:
        args += ["--input", str(f)]
    # One thread: on a busy 2-core machine torch's threads wait on each other at every op.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]

    stats = json.loads((out / "clean" / "stats.json").read_text())
    assert stats["input"]["files"] == len(files) == 60 and stats["output"]["documents"] == 60
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.vocab_size == 512
    meta = json.loads((out / "shards" / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["documents"] == 60
    assert meta["splits"]["train"]["tokens"] > 100_000 and meta["splits"]["val"]["tokens"] > 0

    run = out / "run"
    verify_checkpoint(latest_checkpoint(run))  # complete, not half written
    best, config = load_model_dir(run / "best")
    assert config.vocab_size == 512 and config.name == "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] >= 1 and summary["stopped_because"] in ("max_steps", "time_budget")
    # Trained: below the loss of guessing uniformly over the vocabulary.
    assert summary["uniform_loss"] == pytest.approx(math.log(512))
    assert math.isfinite(summary["best_val_loss"]) and summary["best_val_loss"] < summary["uniform_loss"]
    sample = summary["samples"][0]["text"]
    assert sample.startswith("def fibonacci(n):") and len(sample) > len("def fibonacci(n):")
    report = (run / "report.md").read_text()
    assert "unigram baseline" in report and f"{summary['best_val_loss']:.4f}" in report
    assert (run / "loss.png").stat().st_size > 1000
    assert f"[quickstart] val loss {summary['best_val_loss']:.4f} vs unigram baseline" in done.stdout


@pytest.mark.slow
def test_quickstart_on_the_standard_library(cli, tmp_path):
    """The README's main command, end to end (a shorter time budget than the default)."""
    r = cli("quickstart", "-o", tmp_path / "qs", "--minutes", "2", "--no-progress")
    assert r.code == 0, r.err
    stats = json.loads((tmp_path / "qs" / "clean" / "stats.json").read_text())
    meta = json.loads((tmp_path / "qs" / "shards" / "meta.json").read_text())
    assert stats["input"]["files"] > 500 and stats["output"]["documents"] > 0.8 * stats["input"]["documents"]
    assert meta["vocab_size"] == 4096 and meta["splits"]["train"]["tokens"] > 1_000_000
    summary = json.loads((tmp_path / "qs" / "run" / "summary.json").read_text())
    # The model must have learned more than token frequencies.
    assert summary["best_val_loss"] < summary["unigram_val_loss"] - 0.5
    assert summary["samples"][0]["text"].startswith("def fibonacci(n):")
    report = (tmp_path / "qs" / "run" / "report.md").read_text()
    assert "unigram baseline" in report and (tmp_path / "qs" / "run" / "loss.png").exists()
    assert "vs unigram baseline" in r.out
