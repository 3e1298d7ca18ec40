import json

import pytest


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
