"""A full disk (ENOSPC) under every writer is one line naming the output and the free space, the
old output stays whole and no temp is left: injected ENOSPC through the CLI for each command,
and a real small tmpfs where this machine lets us mount one."""

import errno
import os
import subprocess
from pathlib import Path

import pytest

from conftest import leftovers
from lmforge.fsutil import DiskFullError, atomic_dir, atomic_file, atomic_path, is_disk_full

pytestmark = pytest.mark.usefixtures("one_thread")

ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def safetensors_enospc(*_a, **_k):
    from safetensors import SafetensorError

    raise SafetensorError(ENOSPC_TEXT)


def fail_after(monkeypatch, owner, name, calls: int, error=enospc, when=lambda *a, **k: True):
    """Let `calls` matching calls of owner.name through (so there is partial output to clean up),
    then raise `error` as a full disk would."""
    real = getattr(owner, name)
    seen = {"n": 0, "failed": 0}

    def wrapper(*a, **k):
        if when(*a, **k):
            seen["n"] += 1
            if seen["n"] > calls:
                seen["failed"] += 1
                return error()
        return real(*a, **k)

    monkeypatch.setattr(owner, name, wrapper)
    return seen


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_disk_full(r, path: Path):
    assert r.code == 1, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert lines[0].startswith(f"lmforge: error: {path}: disk full: ") and " free on /" in lines[0], lines[0]


@pytest.fixture(scope="module")
def corpus(shards):
    """The shared tiny corpus: clean/ (JSONL), tok/, shards/ and small.yaml under one folder."""
    return shards[0].parent


# -- the helpers -------------------------------------------------------------------------------------
def test_atomic_writers_translate_disk_full_and_nothing_else(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    for error in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded")):
        with pytest.raises(DiskFullError, match=rf"^{target}: disk full: [0-9.]+ [KMG]B free on /.*the write had put 10.0 KB there"):
            with atomic_file(target) as f:
                f.write(b"x" * 10_000)
                f.flush()
                raise error
        assert target.read_bytes() == b"old" and leftovers(tmp_path) == []
    with pytest.raises(DiskFullError, match=rf"^{target}: disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"y" * 1000)
            safetensors_enospc()
    # A nested writer's error is reported for the folder the user asked for, not the temp file inside.
    folder = tmp_path / "dir"
    with pytest.raises(DiskFullError, match=rf"^{folder}: disk full"):
        with atomic_dir(folder) as tmp:
            with atomic_file(tmp / "inner.json") as f:
                f.write(b"{}")
                raise OSError(errno.ENOSPC, "No space left on device")
    assert not folder.exists() and leftovers(tmp_path) == []
    # Other errors pass through untouched.
    with pytest.raises(PermissionError):
        with atomic_file(target) as f:
            raise PermissionError(errno.EACCES, "denied")
    assert not is_disk_full(OSError(errno.EIO, "I/O error")) and not is_disk_full(ValueError("No space left"))


# -- every writer, through the CLI -----------------------------------------------------------------
def test_clean(cli, corpus, tmp_path, monkeypatch):
    from lmforge.data import clean

    out = tmp_path / "clean"
    assert cli("clean", corpus / "clean", "-o", out, "--workers", "1", "--no-progress", "--shard-mb", "0.05").code == 0
    before = snapshot(out)
    seen = fail_after(monkeypatch, clean.JsonlShardWriter, "write", calls=5)
    r = cli("clean", corpus / "clean", "-o", out, "--workers", "1", "--no-progress", "--overwrite", "--shard-mb", "0.05")
    assert seen["failed"] == 1
    assert_disk_full(r, out)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_pack(cli, corpus, tmp_path, monkeypatch):
    from lmforge.data import pack

    out = tmp_path / "shards"
    args = ("pack", corpus / "clean", "--tokenizer", corpus / "tok", "-o", out, "--val-fraction", "0.1", "--workers", "1", "--no-progress")
    assert cli(*args).code == 0
    before = snapshot(out)
    seen = fail_after(monkeypatch, pack.ShardWriter, "write", calls=1)
    assert_disk_full(cli(*args, "--overwrite"), out)
    assert seen["failed"] == 1 and snapshot(out) == before and leftovers(tmp_path) == []


def _pretrain(cli, corpus, out, steps=4):
    return cli("pretrain", "--data", corpus / "shards", "--model", corpus / "small.yaml", "-o", out, "--max-steps", steps,
               "--checkpoint-every", 2, "--eval-every", 2, "--eval-batches", 1, "--batch-size", 2, "--block-size", 32,
               "--lr", "0.01", "--warmup-steps", 0, "--seed", 3, "--no-progress")


def test_checkpoint(cli, corpus, tmp_path, monkeypatch):
    from lmforge.train import checkpoint

    run = tmp_path / "run"
    # The second checkpoint's RNG file hits the full disk, as safetensors reports it.
    seen = fail_after(monkeypatch, checkpoint, "save_file", calls=1, error=safetensors_enospc,
                      when=lambda tensors, file, *a, **k: file.endswith("rng.safetensors"))
    r = _pretrain(cli, corpus, run)
    assert seen["failed"] == 1
    assert_disk_full(r, run / "checkpoints" / "step-000004")
    from lmforge.train.checkpoint import latest_checkpoint, verify_checkpoint

    first = latest_checkpoint(run)  # the step-2 checkpoint is whole, and still what `latest` names
    assert first.name == "step-000002"
    verify_checkpoint(first)
    assert leftovers(run / "checkpoints") == []


def test_checkpoint_optimizer_parts(cli, corpus, tmp_path, monkeypatch):
    """ENOSPC inside torch.distributed.checkpoint (which wraps every failure in its own exception)
    is still the one-line disk-full error, and the previous checkpoint stays what `latest` names."""
    from lmforge.train import checkpoint

    run = tmp_path / "run"
    seen = fail_after(monkeypatch, checkpoint.dcp.HuggingFaceStorageWriter, "write_data", calls=1)
    r = _pretrain(cli, corpus, run)
    assert seen["failed"] == 1
    assert_disk_full(r, run / "checkpoints" / "step-000004")
    from lmforge.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(run).name == "step-000002" and leftovers(run / "checkpoints") == []


def test_best_model(cli, corpus, tmp_path, monkeypatch):
    from lmforge.model import io

    run = tmp_path / "run"
    # best/ is written at every eval that improves val loss (steps 2 and 4 here, seeded); the second one fails.
    seen = fail_after(monkeypatch, io, "save_file", calls=1, error=enospc,
                      when=lambda sd, file, *a, **k: Path(file).parent.name.startswith(".best.tmp-"))
    r = _pretrain(cli, corpus, run)
    assert seen["failed"] == 1, "the seeded run no longer improves at step 4: pick another seed"
    assert_disk_full(r, run / "best")
    from lmforge.manifest import verify_manifest

    assert verify_manifest(run / "best", required=True)  # the step-2 best model, whole
    assert leftovers(run) == []


@pytest.mark.parametrize("to", ["hf", "gguf"])
def test_convert(cli, tiny_model_dir, tmp_path, monkeypatch, to):
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    assert cli("convert", tiny_model_dir, out, "--to", to).code == 0
    before = out.read_bytes() if to == "gguf" else snapshot(out)
    if to == "gguf":
        import gguf

        def partial_then_full(self, *a, **k):  # some bytes reach the temp file, then the disk is full
            Path(self.path).write_bytes(b"GGUF" + b"\0" * 5000)
            enospc()

        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", partial_then_full)
    else:
        import safetensors.torch
        from safetensors import SafetensorError

        def full(tensors, file, *a, **k):
            Path(file).write_bytes(b"\0" * 5000)
            raise SafetensorError(ENOSPC_TEXT)

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert_disk_full(cli("convert", tiny_model_dir, out, "--to", to, "--overwrite"), out)
    assert (out.read_bytes() if to == "gguf" else snapshot(out)) == before
    assert leftovers(tmp_path) == []


# -- a real full disk ------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs; skipped (with the reason) where mounting is not permitted (not root, a container
    without CAP_SYS_ADMIN)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(r.stderr or r.stdout).strip() or r.returncode}")
    yield mnt
    if subprocess.run(["umount", str(mnt)]).returncode != 0:  # a file left open by a failing writer
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        pytest.fail(f"{mnt} was still busy after the test: a writer left a file open")


def fill(mnt: Path, leave: int) -> None:
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    (mnt / "filler").write_bytes(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("to", ["hf", "gguf"])
def test_real_full_tmpfs_convert(cli, tiny_model_dir, tmpfs, to):
    out = tmpfs / ("m.gguf" if to == "gguf" else "m")
    assert cli("convert", tiny_model_dir, out, "--to", to).code == 0
    before = out.read_bytes() if to == "gguf" else snapshot(out)
    fill(tmpfs, leave=20_000)  # the model needs ~200 KB
    r = cli("convert", tiny_model_dir, out, "--to", to, "--overwrite")
    assert_disk_full(r, out)
    assert (out.read_bytes() if to == "gguf" else snapshot(out)) == before
    assert leftovers(tmpfs) == []


def test_real_full_tmpfs_clean(cli, corpus, tmpfs):
    out = tmpfs / "clean"
    fill(tmpfs, leave=50_000)  # the cleaned corpus is several hundred KB
    r = cli("clean", corpus / "clean", "-o", out, "--workers", "1", "--no-progress")
    assert_disk_full(r, out)
    assert not out.exists() and leftovers(tmpfs) == []


def test_a_raw_enospc_outside_the_atomic_writers_is_still_one_line(cli, corpus, tmp_path, monkeypatch):
    """metrics.csv and other appenders write in place: the CLI names the file they were writing."""
    from lmforge.data import clean

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.csv"))

    monkeypatch.setattr(clean, "clean_corpus", full)
    assert_disk_full(cli("clean", corpus / "clean", "-o", tmp_path / "c", "--no-progress"), tmp_path / "metrics.csv")
    def broken(*_a, **_k):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(clean, "clean_corpus", broken)
    with pytest.raises(OSError, match="I/O error"):  # not every OSError is a full disk
        cli("clean", corpus / "clean", "-o", tmp_path / "c", "--no-progress")
