"""Chaos: `lmforge pretrain` and a LoRA `lmforge finetune` killed with SIGKILL at 20+ moments each
(mid-step, during evaluation, while a checkpoint or best/ is being written, at start-up) and
resumed each time until done. Every interrupted run must end with exactly the per-step losses of
an uninterrupted one, with no temp folders left and `latest` naming a verified checkpoint after
every kill.

The moments are chosen by a seeded RNG: a step a few past the last one logged, then either a
random delay of up to a few steps or the appearance of the next checkpoint or best/ temp folder
(polled every half millisecond)."""

import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import write_jsonl
from lmforge.train.checkpoint import latest_checkpoint, verify_checkpoint
from lmforge.train.metrics import read_metrics
from lmforge.train.runlock import lock_path
from test_finetune_run import chats

pytestmark = pytest.mark.slow

KILLS = 22
# One thread: per-step losses must be bit-identical between processes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
COMPARED = ("step", "train_loss", "val_loss", "lr", "grad_norm", "retention_loss")
TEMP = re.compile(r"\.(tmp|old|del|failed)-\d+$")


def last_logged_step(metrics: Path) -> int:
    """The step of the last complete row of metrics.csv (0 if none yet)."""
    try:
        lines = metrics.read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return 0
    return int(lines[-1].split(b",")[0]) if len(lines) > 1 else 0


def temp_names(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if TEMP.search(p.name)]


def wait_and_kill(proc: subprocess.Popen, out: Path, rng: random.Random, every: int) -> str | None:
    """Kill `proc` at a moment chosen by `rng`; the name of that moment, or None if it finished first."""
    mode = rng.choice(["step", "step", "checkpoint", "best", "start"])
    if mode == "start":  # while loading, settling leftovers, validating
        deadline = time.perf_counter() + rng.uniform(0.5, 4.0)
        begun = last_logged_step(out / "metrics.csv")
        # Start-up ends with the first step logged: on a fast machine the delay could otherwise
        # run dozens of steps, and the run would finish before it had been killed 20 times.
        while time.perf_counter() < deadline and proc.poll() is None and last_logged_step(out / "metrics.csv") <= begun:
            time.sleep(0.005)
    else:
        target = last_logged_step(out / "metrics.csv") + rng.randint(1, 4)
        give_up = target + 3 * every  # the watched write may not come (no improvement): kill anyway
        watch = {"checkpoint": (out / "checkpoints", ".step-"), "best": (out, ".best.tmp-")}.get(mode)
        reached = False
        while proc.poll() is None:
            step = last_logged_step(out / "metrics.csv")
            if step >= target and not reached:
                reached = True
                if mode == "step":
                    time.sleep(rng.uniform(0.0, 0.05))  # mid-step, eval or checkpoint, as it falls
                    break
            if reached and watch is not None:
                folder, prefix = watch
                try:
                    if any(n.startswith(prefix) and ".tmp-" in n for n in os.listdir(folder)):
                        break
                except FileNotFoundError:
                    pass
                if step >= give_up:
                    mode = "step"
                    break
            time.sleep(0.0005)
    if proc.poll() is not None:
        return None
    proc.kill()
    proc.wait()
    return mode


def run_with_chaos(tmp_path: Path, name: str, fresh: list[str], resume: list[str], every: int, seed: int) -> tuple[Path, Counter]:
    out = tmp_path / name
    log = open(tmp_path / f"{name}.log", "ab")
    rng = random.Random(seed)
    moments: Counter = Counter()
    had_latest = False
    for _ in range(3 * KILLS):
        if sum(moments.values()) >= KILLS:
            break
        # No checkpoint yet (killed before the first): start over; --overwrite replaces the remains.
        cmd = resume if (out / "latest").exists() else fresh + (["--overwrite"] if out.exists() else [])
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", *cmd], stdout=log, stderr=log, env=ENV)
        mode = wait_and_kill(proc, out, rng, every)
        if mode is None:
            break
        moments[mode] += 1
        last_step = last_logged_step(out / "metrics.csv")
        if had_latest or (out / "latest").exists():
            had_latest = True
            verify_checkpoint(latest_checkpoint(out))  # `latest` never names a half-written checkpoint
    assert sum(moments.values()) >= 20, f"the run finished after only {dict(moments)} kills: raise --max-steps"
    done = subprocess.run([sys.executable, "-m", "lmforge", *resume], stdout=log, stderr=log, env=ENV)
    log.close()
    assert done.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    print(f"{name}: killed at {dict(moments)}; the last kill at step {last_step}")
    return out, moments


def assert_same_run(chaotic: Path, reference: Path, moments: Counter) -> None:
    assert sum(moments.values()) >= 20, moments
    rows = [{k: r[k] for k in COMPARED} for r in read_metrics(chaotic / "metrics.csv")]
    ref = [{k: r[k] for k in COMPARED} for r in read_metrics(reference / "metrics.csv")]
    assert len(rows) == len(ref) and rows == ref  # the floats' repr: bit-identical
    assert temp_names(chaotic.parent) == [] and not lock_path(chaotic).exists()
    verify_checkpoint(latest_checkpoint(chaotic))


def reference_run(tmp_path: Path, name: str, fresh: list[str]) -> Path:
    r = subprocess.run([sys.executable, "-m", "lmforge", *fresh], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    return tmp_path / name


def test_pretrain_survives_kill_9_anywhere(shards, tmp_path):
    data, model_file = shards
    train = ["--max-steps", "240", "--batch-size", "4", "--block-size", "32", "--eval-every", "3", "--eval-batches", "2",
             "--checkpoint-every", "4", "--keep-last", "2", "--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3",
             "--seed", "7", "--no-progress"]
    args = lambda out: ["pretrain", "--data", str(data), "--model", str(model_file), "-o", str(tmp_path / out), *train]  # noqa: E731
    ref = reference_run(tmp_path, "ref", args("ref"))
    out, moments = run_with_chaos(tmp_path, "chaos", args("chaos"), ["pretrain", "-o", str(tmp_path / "chaos"), "--resume",
                                  "--no-progress"], every=4, seed=1)
    assert_same_run(out, ref, moments)


def test_lora_finetune_survives_kill_9_anywhere(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chats(24))
    train = ["--max-steps", "200", "--batch-size", "4", "--block-size", "64", "--lr", "1e-2", "--min-lr", "1e-3",
             "--warmup-steps", "1", "--eval-every", "3", "--eval-batches", "2", "--checkpoint-every", "4", "--early-stop", "0",
             "--keep-last", "2", "--log-every", "1", "--lora.rank", "4", "--lora.dropout", "0.1", "--device", "cpu",
             # Rehearsal off: a random tiny model finishes none of its replies (and generating them
             # at every fresh start would take most of the test's time).
             "--replay", "0", "--retention-tolerance", "0", "--no-progress"]
    args = lambda out: ["finetune", str(tiny_model_dir), "--data", str(data), "-o", str(tmp_path / out), *train]  # noqa: E731
    ref = reference_run(tmp_path, "ref", args("ref"))
    out, moments = run_with_chaos(tmp_path, "chaos", args("chaos"), ["finetune", str(tiny_model_dir), "-o",
                                  str(tmp_path / "chaos"), "--resume", "--no-progress"], every=4, seed=2)
    assert_same_run(out, ref, moments)
