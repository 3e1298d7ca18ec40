"""The one reader of the JSON and JSONL files users hand in, so that every bad byte, line or value
is reported the same way: one line naming FILE (and LINE) and the cause, never a traceback.

    FILE:LINE: invalid UTF-8 at byte N (...)
    FILE:LINE: invalid JSON (... at column N)
    FILE:LINE: expected a JSON object, got list

Beyond `json.JSONDecodeError`, the standard parser fails in three ways a user's file can reach:
a RecursionError on deeply nested arrays, a ValueError on integers longer than Python's digit
limit, and lone UTF-16 surrogate escapes ("\\ud800"), which it accepts but which no UTF-8 output
can hold (the clean writer would crash on them much later). All three are refused here.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lmforge.errors import LmforgeError

# A \uD800-\uDFFF escape: rare, so the exact (slower) surrogate check runs only when one is present.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def strict_decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{where}: invalid UTF-8 at byte {e.start} ({e.reason})") from None


def _parse(text: str) -> Any:
    """json.loads, with every way it fails turned into a ValueError carrying a short reason."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(str(e).split(";")[0]) from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a lone UTF-16 surrogate escape (\\uD800-\\uDFFF) is not a character") from None
        except RecursionError:  # pragma: no cover - json.loads would have failed first
            raise ValueError("nested too deeply") from None
    return value


def parse_json(text: str | bytes, where: str) -> Any:
    """A whole JSON document (`where` names it in errors)."""
    if isinstance(text, bytes):
        text = strict_decode(text, where)
    try:
        return _parse(text)
    except ValueError as e:
        raise LmforgeError(f"{where}: invalid JSON ({e})") from None


def read_bytes(path: str | os.PathLike, what: str, *, if_missing: str = "") -> bytes:
    """A whole file; missing, a folder or unreadable is a one-line LmforgeError naming it.
    what: what the file should be ("a JSON file"); if_missing: said after "no such file"."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file{if_missing}") from None
    except IsADirectoryError:
        raise LmforgeError(f"{path}: a folder, not {what}") from None
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read ({e.strerror or e})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """A whole JSON file; a missing file, bad UTF-8 or bad JSON is a one-line LmforgeError."""
    return parse_json(read_bytes(path, f"a {what}"), str(path))


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise LmforgeError(f"{path}: expected a JSON object, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def iter_jsonl(lines: Iterable[bytes], source: str, *, decode: Callable[[bytes, str], str] = strict_decode,
               objects: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of `lines` (bytes, as a binary file yields
    them); `objects`: every value must be a JSON object."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        text = decode(line, where)
        try:
            value = _parse(text)
        except ValueError as e:
            raise LmforgeError(f"{where}: invalid JSON ({str(e).replace('at line 1 column', 'at column')})") from None
        if objects and not isinstance(value, dict):
            raise LmforgeError(f"{where}: expected a JSON object, got {_type_name(value)}")
        yield lineno, value


def read_jsonl(path: str | os.PathLike, *, objects: bool = True, allow_empty: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a .jsonl (or .jsonl.gz) file, streamed."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"{path}: no such file")
    if not path.is_file():
        raise LmforgeError(f"{path}: not a file")
    found = False
    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
            for lineno, value in iter_jsonl(stream, str(path), objects=objects):
                found = True
                yield lineno, value
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise LmforgeError(f"{path}: cannot read ({e})") from None
    if not found and not allow_empty:
        raise LmforgeError(f"{path}: empty file (no JSON lines)")
