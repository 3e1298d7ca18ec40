"""Results do not depend on timing: `eval ppl` and `eval tasks` run twice give bit-identical JSON
but for the fields that say when and how long (named below). Each run sees a different clock
(a seeded random tick per perf_counter call, as a busy machine would): scoring that picks its
arithmetic by timing the work fails here; scoring runs torch's forward only."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")

# Exactly the fields allowed to differ between two runs: the wall-clock time of the result, and
# durations and rates (per task for `tasks`; the perplexity run's own).
VARYING = {"created", "settings.seconds", "settings.tokens_per_s", "seconds", "tokens_per_s",
           *(f"tasks.{t}.{k}" for t in ("arithmetic", "code", "capitals-gen") for k in ("seconds", "items_per_s"))}


def _diff(a, b, path: str = "") -> set[str]:
    """Dotted paths where two JSON values differ (floats compared by exact value: bit-identical)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in a.keys() | b.keys():
            sub = f"{path}.{k}" if path else k
            out |= _diff(a.get(k), b.get(k), sub) if k in a and k in b else {sub}
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return set().union(*(_diff(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))))
    return set() if a == b and type(a) is type(b) else {path}


@pytest.fixture
def jittery_clock(monkeypatch):
    """time.perf_counter with seeded random ticks: monotonic, but a different speed each run."""
    real = time.perf_counter

    def install(seed: int):
        rng, offset = random.Random(seed), [0.0]

        def clock() -> float:
            offset[0] += rng.expovariate(1.0) * 0.05
            return real() + offset[0]

        monkeypatch.setattr(time, "perf_counter", clock)

    return install


def _twice(cli, jittery_clock, tmp_path, *args) -> tuple[dict, dict]:
    out = []
    for run in range(2):
        jittery_clock(run)
        path = tmp_path / f"run{run}.json"
        r = cli(*args, "-o", path, "--no-progress")
        assert r.code == 0, r.err
        out.append(json.loads(path.read_text()))
    return out[0], out[1]


def test_eval_ppl_twice_is_bit_identical(cli, tmp_path, tiny_model_dir, jittery_clock):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:12000], encoding="utf-8")
    a, b = _twice(cli, jittery_clock, tmp_path, "eval", "ppl", tiny_model_dir, "--data", text,
                  "--context", 64, "--stride", 32, "--batch-size", 2)
    assert len(a["details"]["window_nll"]) > 20  # enough batches for a timing-driven choice to matter
    differ = _diff(a, b)
    assert differ <= VARYING, sorted(differ - VARYING)
    assert "created" in a and "decode_backend" not in a["settings"]  # scoring only: nothing decoded


def test_eval_tasks_twice_is_bit_identical(cli, tmp_path, tiny_model_dir, jittery_clock):
    a, b = _twice(cli, jittery_clock, tmp_path, "eval", "tasks", tiny_model_dir,
                  "--tasks", "arithmetic,code,capitals-gen", "--limit", 12, "--batch-tokens", 256, "--log-items")
    differ = _diff(a, b)
    assert differ <= VARYING, sorted(differ - VARYING)
    # The generative task decoded: the backend it decoded on is recorded.
    assert a["settings"]["decode_backend"] in ("torch", "numpy")
