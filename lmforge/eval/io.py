"""Reading evaluation inputs with errors that name the file and line: text and lines (JSONL: lmforge.jsonio)."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fsutil import sha256_file


def _open_bytes(path: Path) -> bytes:
    if not path.exists():
        raise LmforgeError(f"{path}: no such file")
    if not path.is_file():
        raise LmforgeError(f"{path}: not a file")
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise LmforgeError(f"{path}: cannot read ({e})") from None


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LmforgeError(f"{path}:{line}: invalid UTF-8 (byte {e.start}); evaluation reads UTF-8 text") from None


def read_text(path: str | os.PathLike) -> str:
    """A whole file as text (UTF-8, .gz too); an empty file is an error."""
    path = Path(path)
    text = _decode(_open_bytes(path), path)
    if not text.strip():
        raise LmforgeError(f"{path}: empty file")
    return text


def read_lines(path: str | os.PathLike) -> list[str]:
    """One segment per line, exactly as the `sacrebleu` command reads files: split at "\\n" only
    and strip trailing whitespace ("\\r" included). Blank lines stay (they are segments too)."""
    path = Path(path)
    text = _decode(_open_bytes(path), path)
    if not text:
        raise LmforgeError(f"{path}: empty file")
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline ends the last line, it does not start another
        lines.pop()
    return [line.rstrip() for line in lines]


def is_jsonl(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def fingerprint(path: str | os.PathLike) -> dict:
    """What identifies an input in a result file: path, size and SHA-256 of its bytes (for a
    folder, of its files' names and hashes in order)."""
    path = Path(path)
    if path.is_dir():
        import hashlib

        h = hashlib.sha256()
        size = 0
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\n".encode())
            size += f.stat().st_size
        return {"path": str(path), "bytes": size, "sha256": h.hexdigest()}
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
