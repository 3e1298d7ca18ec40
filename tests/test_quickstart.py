import json

import pytest


@pytest.mark.slow
def test_quickstart_on_the_standard_library(cli, tmp_path):
    r = cli("quickstart", "-o", tmp_path / "qs", "--no-progress")
    assert r.code == 0, r.err
    stats = json.loads((tmp_path / "qs" / "clean" / "stats.json").read_text())
    meta = json.loads((tmp_path / "qs" / "shards" / "meta.json").read_text())
    assert stats["input"]["files"] > 500 and stats["output"]["documents"] > 0.8 * stats["input"]["documents"]
    assert meta["vocab_size"] == 4096 and meta["splits"]["train"]["tokens"] > 1_000_000
    assert meta["splits"]["val"]["tokens"] > 10_000
