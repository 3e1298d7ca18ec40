"""Run dirs that cannot corrupt each other: the run lock (two real processes), an --overwrite that
validates before it touches anything and puts the old run back when the new one fails, the
leftovers of a kill settled on the next start, no empty --out after a failed start, metrics.csv
rewritten atomically, and the exit codes of a run stopped by a signal."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import leftovers, write_jsonl
from lmforge.errors import LmforgeError
from lmforge.model.lora import LoRAConfig
from lmforge.train.checkpoint import latest_checkpoint, verify_checkpoint
from lmforge.train.config import FinetuneConfig
from lmforge.train.finetune import finetune
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import pretrain
from lmforge.train.runlock import lock_path, own_run_dir
from test_finetune_run import cfg as ft_cfg, chats
from test_train import _pretrain_proc, _wait_for_checkpoint, small_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def short_run(shards, out: Path, steps: int = 2, overwrite: bool = False) -> dict:
    data, model_file = shards
    return pretrain(data, str(model_file), out, small_cfg(max_steps=steps, eval_every=steps, checkpoint_every=steps),
                    progress=False, sample_tokens=2, overwrite=overwrite)


# -- the lock --------------------------------------------------------------------------------

def test_a_second_process_on_a_live_run_is_refused_naming_the_owner(shards, tmp_path):
    data, model_file = shards
    out = tmp_path / "r"
    owner = _pretrain_proc(data, model_file, out, 100000, 3)
    try:
        _wait_for_checkpoint(out, owner)
        config = (out / "config.yaml").read_bytes()
        # --overwrite against a live run used to delete its folder under it (--resume, tested in
        # process below, mixed two processes' rows into one metrics.csv).
        other = subprocess.run(
            [sys.executable, "-m", "lmforge", "pretrain", "--data", str(data), "--model", str(model_file), "-o", str(out),
             "--max-steps", "4", "--batch-size", "4", "--block-size", "32", "--seed", "3", "--no-progress", "--overwrite"],
            capture_output=True, text=True, timeout=300)
        assert other.returncode == 1, other.stderr
        line = other.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"{out}: in use by pid {owner.pid} on host {socket.gethostname()} since " in line
        assert "(lmforge pretrain)" in line
        assert owner.poll() is None and (out / "config.yaml").read_bytes() == config
        owner.send_signal(signal.SIGTERM)
        stdout, stderr = owner.communicate(timeout=120)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.communicate()
    # SIGTERM: the run stops after its step with a checkpoint, and says so with 128 + 15.
    assert owner.returncode == 143, stderr
    last = latest_checkpoint(out)
    step = int(last.name.split("-")[1])
    assert f"lmforge: stopped by SIGTERM at step {step}; checkpoint {last}" in stderr
    steps = [int(r["step"]) for r in read_metrics(out / "metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == step  # one process's rows, in order
    assert not lock_path(out).exists() and not leftovers(tmp_path)


def test_lock_is_shared_by_pretrain_and_finetune_and_released(shards, tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    with own_run_dir(out, "pretrain", new=True):
        owner = json.loads(lock_path(out).read_text())
        assert owner["pid"] == os.getpid() and owner["command"] == "lmforge pretrain"
        with pytest.raises(LmforgeError, match=rf"r: in use by pid {os.getpid()} on host .* \(lmforge pretrain\)"):
            finetune(str(tiny_model_dir), write_jsonl(tmp_path / "d.jsonl", chats(8)), out, FinetuneConfig(), ft_cfg(),
                     LoRAConfig(), progress=False)
        with pytest.raises(LmforgeError, match="in use by pid"):
            short_run(shards, out)
        with pytest.raises(LmforgeError, match="in use by pid"):
            pretrain(shards[0], str(shards[1]), out, small_cfg(), progress=False, resume=True)
    # A lock file whose owner is gone (kill -9 leaves one) does not hold the next run back.
    lock_path(out).write_text(json.dumps({"pid": 999999, "host": "h", "since": "x", "command": "lmforge pretrain"}))
    short_run(shards, out)
    assert (out / "latest").exists() and not lock_path(out).exists()


# -- --overwrite --------------------------------------------------------------------------------

def test_overwrite_validates_before_it_touches_the_old_run(shards, tiny_model_dir, tmp_path):
    data, model_file = shards
    out = tmp_path / "r"
    short_run(shards, out)
    before = snapshot(out)
    with pytest.raises(LmforgeError, match="unknown model preset 'no-such-preset'"):
        pretrain(data, "no-such-preset", out, small_cfg(), progress=False, overwrite=True)
    with pytest.raises(LmforgeError, match="needs about"):
        pretrain(data, str(model_file), out, small_cfg(batch_size=10**9), progress=False, overwrite=True)
    with pytest.raises(LmforgeError, match="missing.jsonl"):
        finetune(str(tiny_model_dir), tmp_path / "missing.jsonl", out, FinetuneConfig(), ft_cfg(), LoRAConfig(),
                 progress=False, overwrite=True)
    assert snapshot(out) == before and not leftovers(tmp_path)


def test_overwrite_puts_the_old_run_back_when_the_new_one_fails_before_its_first_checkpoint(shards, tmp_path):
    out = tmp_path / "r"
    short_run(shards, out)
    before = snapshot(out)
    # lr 1e9 diverges at step 1: a failure after the old run was moved aside, before any checkpoint.
    with pytest.raises(LmforgeError, match="training diverged"):
        pretrain(shards[0], str(shards[1]), out, small_cfg(lr=1e9, warmup_steps=0), progress=False, overwrite=True)
    assert snapshot(out) == before and not leftovers(tmp_path)
    # A successful overwrite replaces it, and the old run is gone (not left aside).
    short_run(shards, out, steps=3, overwrite=True)
    assert (out / "latest").read_text().strip() == "step-000003" and not leftovers(tmp_path)


def test_an_overwrite_killed_midway_is_settled_on_the_next_start(shards, tmp_path):
    out = tmp_path / "r"
    short_run(shards, out)
    old = snapshot(out)
    # Killed before the new run's first checkpoint: the old run comes back.
    os.replace(out, tmp_path / ".r.old-4242")
    out.mkdir()
    (out / "config.yaml").write_text("new: run\n")
    s = pretrain(shards[0], str(shards[1]), out, small_cfg(max_steps=4, eval_every=2, checkpoint_every=2), progress=False,
                 sample_tokens=2, resume=True)
    assert s["steps"] == 4 and not leftovers(tmp_path)
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")][:2] == [1, 2]
    assert (out / "checkpoints" / "step-000002" / "model.safetensors").read_bytes() == old["checkpoints/step-000002/model.safetensors"]
    # Killed after it: the new run stands and the old one is deleted.
    (tmp_path / ".r.old-4343").mkdir()
    (tmp_path / ".r.old-4343" / "config.yaml").write_text("old: run\n")
    new = snapshot(out)
    with pytest.raises(LmforgeError, match="already holds a run"):
        short_run(shards, out)
    assert not (tmp_path / ".r.old-4343").exists() and snapshot(out) == new


# -- leftovers, failed starts, metrics.csv ----------------------------------------------------

def test_a_killed_runs_temp_folders_are_removed_on_the_next_start(shards, tmp_path):
    out = tmp_path / "r"
    short_run(shards, out, steps=4)
    ckpts = out / "checkpoints"
    planted = [ckpts / ".step-000006.tmp-4242", out / ".best.tmp-4242", ckpts / ".step-000002.del-4242"]
    for folder in planted:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    (out / ".latest.tmp-4242").write_text("step-0000")
    (out / ".metrics.csv.tmp-4242").write_text("step\n")
    # Killed between an atomic replace's two renames: the old best/ is aside and is the good one.
    os.replace(out / "best", out / ".best.old-4242")
    best = snapshot(out / ".best.old-4242")
    s = pretrain(shards[0], str(shards[1]), out, small_cfg(max_steps=4), progress=False, sample_tokens=2, resume=True)
    assert s["steps"] == 4 and s["best_step"] == 4
    assert not leftovers(out) and not leftovers(ckpts)
    assert snapshot(out / "best") == best
    verify_checkpoint(latest_checkpoint(out))


def test_a_failed_start_leaves_no_out_behind(shards, tiny_model_dir, tmp_path):
    data, model_file = shards
    out = tmp_path / "new" / "run"
    with pytest.raises(LmforgeError, match="unknown model preset"):
        pretrain(data, "no-such-preset", out, small_cfg(), progress=False)
    with pytest.raises(LmforgeError, match="nothing to resume"):
        pretrain(data, str(model_file), out, small_cfg(), progress=False, resume=True)
    with pytest.raises(LmforgeError, match="training diverged"):  # fails after the run dir was made
        pretrain(data, str(model_file), out, small_cfg(lr=1e9, warmup_steps=0), progress=False)
    with pytest.raises(LmforgeError, match="missing.jsonl"):
        finetune(str(tiny_model_dir), tmp_path / "missing.jsonl", out, FinetuneConfig(), ft_cfg(), LoRAConfig(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_metrics_csv_drops_a_row_cut_by_a_kill_and_is_rewritten_atomically(shards, tmp_path, monkeypatch):
    data, model_file = shards
    out = tmp_path / "r"
    pretrain(data, str(model_file), out, small_cfg(max_steps=8), progress=False, sample_tokens=2, pause_at=6)
    with open(out / "metrics.csv", "a") as f:
        f.write("1")  # a kill while appending the row of step 13 (say) left only its first digit
    whole = (out / "metrics.csv").read_bytes()

    class Killed(Exception):
        pass

    writes = []

    def writerow(self, row):
        writes.append(row)
        if len(writes) == 3:
            raise Killed
        return real(self, row)

    real = csv.DictWriter.writerow
    monkeypatch.setattr(csv.DictWriter, "writerow", writerow)
    with pytest.raises(Killed):
        pretrain(data, str(model_file), out, small_cfg(max_steps=8), progress=False, resume=True)
    assert (out / "metrics.csv").read_bytes() == whole  # the rewrite died: the old file is whole
    monkeypatch.undo()
    pretrain(data, str(model_file), out, small_cfg(max_steps=8), progress=False, sample_tokens=2, resume=True)
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")] == list(range(1, 9))
