"""Crash-safe file output: everything is written under a temporary name and renamed into place.

A crash, Ctrl-C or `kill -9` therefore never leaves a half-written file or folder under the final
name; at worst a `.NAME.tmp-PID` leftover, which no reader mistakes for the real thing.

A full disk (ENOSPC, or EDQUOT for a quota) while writing is reported as a `DiskFullError`
naming the output and the free space, after the partial temp output is removed; the old output,
if any, is untouched because it is only replaced once the new one is complete.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from lmforge.errors import LmforgeError


class DiskFullError(LmforgeError):
    """No space (or quota) left while writing an output; the message says where and how much."""


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


# numpy's tofile (the GGUF writer's tensors) reports a short fwrite without an errno.
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, as an OSError, as numpy's short write, or as safetensors' writer reports it
    (a SafetensorError, a bare Exception subclass whose message alone carries the OS error)."""
    if isinstance(e, DiskFullError):
        return True
    if isinstance(e, OSError):
        return e.errno in _DISK_FULL_ERRNOS or (e.errno is None and bool(_SHORT_WRITE.match(str(e))))
    if type(e).__name__ == "SafetensorError":
        msg = str(e)
        return "No space left on device" in msg or "Disk quota exceeded" in msg
    return False


def _mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def disk_full_error(path: str | os.PathLike, written: int | None = None) -> DiskFullError:
    """The one-line error for a write to `path` that ran out of space, `written` bytes in; call it
    after the partial output is removed, so the free space shown is what the user has to work with."""
    mount = _mount_point(Path(path))
    free = shutil.disk_usage(mount).free
    done = f"; the write had put {human_bytes(written)} there when it failed and needs more" if written else ""
    return DiskFullError(f"{path}: disk full: {human_bytes(free)} free on {mount}{done} "
                         "(nothing was replaced; free some space and run again)")


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    if os.name == "nt":  # Windows cannot open a folder as a file; NTFS journals the rename itself
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        written = _file_bytes(tmp)
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, written) from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def check_output_free(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace existing output unless asked: nothing a user made is lost by accident."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LmforgeError(f"{path}: output already exists; pass --overwrite to replace it")


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on clean exit fsync its files and rename it to `path`.

    An existing `path` is replaced only with `overwrite=True`, and only after the new folder is
    complete, so an interrupted run keeps the old output intact.
    """
    path = Path(path)
    check_output_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        # Everything written inside the temp folder (shards, safetensors, tokenizer files, nested
        # atomic files) ran out of space *here*: the error names the folder the user asked for.
        full = is_disk_full(e)
        written = _tree_bytes(tmp) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full_error(path, written) from None
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file name beside `path` for a writer that opens files itself (GGUFWriter,
    zipfile extraction); on clean exit fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        written = _file_bytes(tmp)
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, written) from None
        raise
