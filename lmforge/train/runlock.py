"""Owning a run dir: one process at a time, an --overwrite that loses nothing, and no leftovers of a kill.

Pretraining and fine-tuning both open their --out with `own_run_dir`:

- The lock is `PARENT/.RUN.lock`, beside the run dir rather than inside it, so that --overwrite can
  move the whole old run aside (and back) with one rename while the lock stays held. It is an
  flock, which the kernel releases when its owner dies, so a lock is never stale; the file holds the
  owner's pid, host, start time and command, which the error shown to a second process names.
- A new run touches nothing until `start_new`, called once everything is validated. With
  --overwrite the old run is renamed to `.RUN.old-PID` and deleted only when the new run has
  written its first checkpoint; a new run that fails before that leaves --out as it found it
  (absent, or the old run put back).
- On every start, the leftovers of a killed predecessor are settled first: temp folders and files
  (`.step-*.tmp-PID`, `.best.tmp-PID`, ...) are removed, a folder caught between the two renames of
  an atomic replace is put back, and an old run moved aside is deleted or restored (by whether the
  new run got as far as a checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError
from lmforge.train.checkpoint import CHECKPOINTS, LATEST

# Names an interrupted writer leaves: fsutil's `.NAME.tmp-PID` (a temp file or folder) and
# `.NAME.old-PID` (the previous version during an atomic replace), checkpoint.py's `.NAME.del-PID`.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-\d+")
# Marks of an lmforge run: a dir holding neither is not one, and is never deleted.
RUN_MARKS = ("config.yaml", LATEST)  # pretrain.RUN_CONFIG (which imports this module), checkpoint.LATEST


if sys.platform == "win32":  # no flock there; msvcrt's byte-range lock is also dropped when its owner dies
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def _read_at_start(fd: int, n: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, n)


def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


def _aside(run_dir: Path, kind: str) -> Path:
    return run_dir.with_name(f".{run_dir.name}.{kind}-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class RunDir:
    """The run dir of this process, locked. See the module docstring for the protocol."""

    def __init__(self, path: Path, command: str, overwrite: bool = False):
        self.path = path
        self.command = command
        self.overwrite = overwrite
        self._fd: int | None = None
        self._made: list[Path] = []  # folders this process created (to remove again if it fails to start)
        self._old: Path | None = None  # the previous run, moved aside by --overwrite
        self._started = False
        self._committed = False

    # -- the lock --------------------------------------------------------------------------
    def _acquire(self) -> None:
        lock = lock_path(self.path)
        self._made = [p for p in [lock.parent, *lock.parent.parents] if not p.exists()]
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
                if not _try_lock(fd):
                    owner = _describe_owner(_read_at_start(fd, 4096))
                    os.close(fd)
                    raise LmforgeError(f"{self.path}: in use by {owner}; wait for it to end or stop it "
                                       "(two runs in one dir would mix their checkpoints and logs)") from None
                # The previous owner unlinks the file on release: if it did so between our open and our
                # flock, we hold a lock on a file nobody else can see, so try again on the new one.
                try:
                    st = os.stat(lock)
                    if (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev):
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
        except OSError as e:
            self._remove_made()
            raise LmforgeError(f"{lock}: cannot take the run lock ({e.strerror})") from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "command": " ".join(["lmforge", self.command])}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(owner).encode())
        self._fd = fd

    def _release(self) -> None:
        if self._fd is None:
            return
        try:
            lock_path(self.path).unlink(missing_ok=True)  # before unlocking: see the retry in _acquire
        except PermissionError:  # Windows keeps an open file; the next owner reuses it
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:  # innermost first; one that something else now holds stays
            try:
                folder.rmdir()
            except OSError:
                break

    # -- leftovers of a killed predecessor -------------------------------------------------
    def _settle_leftovers(self) -> None:
        aside = re.compile(rf"\.{re.escape(self.path.name)}\.(?P<kind>old|failed)-\d+")
        for p in sorted(self.path.parent.iterdir()):
            m = aside.fullmatch(p.name)
            if m is None:
                continue
            if m["kind"] == "failed":
                _remove(p)
            else:
                if (self.path / LATEST).exists():
                    _remove(p)  # the new run wrote its first checkpoint: the old one was due to go
                else:
                    self._put_back(p)  # the new run died before that: as if it never started
        for folder in (self.path, self.path / CHECKPOINTS):
            if folder.is_dir():
                _clean_folder(folder)

    def _put_back(self, old: Path) -> None:
        if self.path.exists():
            failed = _aside(self.path, "failed")
            os.replace(self.path, failed)
            os.replace(old, self.path)
            _remove(failed)
        else:
            os.replace(old, self.path)

    # -- a new run ---------------------------------------------------------------------------
    def check_new(self) -> None:
        """Refuse, touching nothing, to start a new run over something that is not ours to replace."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise LmforgeError(f"{self.path}: exists and is not a folder; choose another --out")
        if any(self.path.iterdir()):
            if not any((self.path / m).exists() for m in RUN_MARKS):
                raise LmforgeError(f"{self.path}: exists, is not empty and is not an lmforge run; choose another --out")
            if not self.overwrite:
                raise LmforgeError(f"{self.path}: already holds a run; pass --resume to continue it or --overwrite to start over")

    def start_new(self) -> None:
        """Call once everything is validated: from here on the run dir is written."""
        self.check_new()
        if self.path.exists() and any(self.path.iterdir()):
            self._old = _aside(self.path, "old")
            os.replace(self.path, self._old)
        if not self.path.exists():
            self._made = [p for p in [self.path, *self.path.parents] if not p.exists()] + self._made
            self.path.mkdir(parents=True)
        self._started = True

    def checkpointed(self, folder: Path | None = None) -> None:
        """The Trainer's hook after each checkpoint: from the first one on, the new run stands on its own."""
        if self._committed:
            return
        self._committed = True
        self._made = []
        if self._old is not None:
            _remove(self._old)
            self._old = None

    def _undo(self) -> None:
        """A new run that failed before its first checkpoint: leave --out as it was."""
        if not self._started or self._committed:
            return
        if self._old is not None:
            self._put_back(self._old)
            self._old = None
        elif self._made and self._made[0] == self.path:
            shutil.rmtree(self.path, ignore_errors=True)
            self._made = self._made[1:] if not self.path.exists() else []


def _clean_folder(folder: Path) -> None:
    for p in folder.iterdir():
        m = _LEFTOVER.fullmatch(p.name)
        if m is None:
            continue
        final = folder / m["name"]
        if m["kind"] == "old" and not final.exists():
            os.replace(p, final)  # killed between an atomic replace's two renames: the old one is still whole
        else:
            _remove(p)


def _describe_owner(raw: bytes) -> str:
    try:
        o = json.loads(raw.decode())
        return f"pid {o['pid']} on host {o['host']} since {o['since']} ({o['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (which is still writing its lock file)"


@contextmanager
def own_run_dir(run_dir: str | os.PathLike, command: str, *, new: bool, overwrite: bool = False) -> Iterator[RunDir]:
    """Lock `run_dir` for the block, settling a killed predecessor's leftovers first. For a `new`
    run, refuse up front to start over something that is not ours to replace; the caller calls
    `start_new()` once it has validated everything. On an exception, a new run not yet
    checkpointed is undone."""
    run = RunDir(Path(run_dir), command, overwrite)
    run._acquire()
    try:
        run._settle_leftovers()
        if new:
            run.check_new()
        yield run
    except BaseException:
        try:
            run._undo()
        except OSError as e:  # the original error matters more; say what could not be put back
            print(f"[lmforge] could not undo the failed start in {run.path}: {e}", file=sys.stderr)
        raise
    finally:
        run._release()
