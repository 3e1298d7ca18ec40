"""Read documents from text, Markdown, HTML, JSONL and Parquet files (optionally gzipped),
folders and globs, one document at a time so that memory stays flat on any corpus size.

A text/Markdown/HTML file is one document; a JSONL line or a Parquet row is one document.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

from lmforge.errors import LmforgeError
from lmforge.jsonio import iter_jsonl

EncodingErrors = Literal["replace", "strict"]

# What a folder walk picks up; a file named explicitly is read whatever its extension.
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".html", ".htm", ".jsonl", ".parquet")
HTML_SUFFIXES = {".html", ".htm"}
BINARY_SNIFF_BYTES = 8192


@dataclass
class Document:
    text: str
    source: str  # file path, with ":LINE" for JSONL / "#ROW" for Parquet
    is_html: bool = False


@dataclass
class ReadStats:
    files: int = 0
    bytes_read: int = 0  # bytes on disk (compressed size for .gz)
    documents: int = 0
    decode_replacements: int = 0  # U+FFFD characters inserted for invalid UTF-8
    skipped_files: dict[str, str] = field(default_factory=dict)  # path -> reason


def _logical_suffix(path: Path) -> str:
    """The suffix that decides the format: `a.jsonl.gz` reads as `.jsonl`."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def expand_inputs(inputs: Sequence[str | os.PathLike], extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Resolve files, folders (walked recursively, filtered by extension) and globs to a sorted file list."""
    if not inputs:
        raise LmforgeError("no input given: name at least one file, folder or glob")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and _logical_suffix(f) in exts
            )
            if not found:
                raise LmforgeError(f"{p}: folder holds no files with extensions {sorted(exts)}")
            files.extend(found)
        elif glob.has_magic(str(raw)):
            found = sorted(Path(f) for f in glob.glob(str(raw), recursive=True) if Path(f).is_file())
            if not found:
                raise LmforgeError(f"{raw}: glob matched no files")
            files.extend(found)
        else:
            raise LmforgeError(f"{p}: no such file or directory")
    # The same file named twice (a folder and a glob inside it) is read once.
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


class _Replacements:
    """Counts the characters a 'replace' decode substituted, without a second pass over the text."""

    count = 0

    @classmethod
    def handler(cls, err: UnicodeDecodeError):
        cls.count += err.end - err.start
        return ("\ufffd" * (err.end - err.start), err.end)


codecs.register_error("lmforge_count_replace", _Replacements.handler)


def decode_bytes(data: bytes, where: str, errors: EncodingErrors) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise LmforgeError(
                f"{where}: invalid UTF-8 at byte {e.start} ({e.reason}); "
                "pass --encoding-errors replace to decode it with U+FFFD"
            ) from None
        return data.decode("utf-8", errors="lmforge_count_replace")


def _check_not_binary(head: bytes, path: Path) -> None:
    nul = head.find(b"\x00")
    if nul != -1:
        raise LmforgeError(f"{path}: binary file (NUL byte at offset {nul}), not text")


class DocumentReader:
    """Iterate the documents of many files; `stats` and `on_progress(bytes)` report as it goes."""

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike],
        *,
        text_field: str = "text",
        encoding_errors: EncodingErrors = "replace",
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        skip_bad_files: bool = False,
        on_progress: Callable[[int], None] | None = None,
    ):
        if encoding_errors not in ("replace", "strict"):
            raise LmforgeError(f"--encoding-errors must be 'replace' or 'strict', not {encoding_errors!r}")
        self.files = expand_inputs(inputs, extensions)
        self.text_field = text_field
        self.encoding_errors = encoding_errors
        self.skip_bad_files = skip_bad_files
        self.on_progress = on_progress or (lambda n: None)
        self.stats = ReadStats()

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def __iter__(self) -> Iterator[Document]:
        for path in self.files:
            raw = open(path, "rb")
            last_pos = 0
            try:
                stream = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
                before = _Replacements.count
                docs: Iterable[Document] = self._read_file(path, stream)
                if self.skip_bad_files:
                    # A file reported as skipped must contribute nothing, so its documents wait
                    # until it has been read through (memory: one file's text at a time).
                    docs = list(docs)
                for doc in docs:
                    self.stats.documents += 1
                    pos = raw.tell()
                    self.on_progress(pos - last_pos)
                    last_pos = pos
                    yield doc
                self.stats.decode_replacements += _Replacements.count - before
                self.stats.files += 1
            except LmforgeError as e:
                if not self.skip_bad_files:
                    raise
                self.stats.skipped_files[str(path)] = str(e)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                msg = f"{path}: cannot read ({e})"
                if not self.skip_bad_files:
                    raise LmforgeError(msg) from None
                self.stats.skipped_files[str(path)] = msg
            finally:
                size = os.fstat(raw.fileno()).st_size
                self.on_progress(size - last_pos)
                self.stats.bytes_read += size
                raw.close()

    def _read_file(self, path: Path, stream: io.BufferedIOBase) -> Iterator[Document]:
        suffix = _logical_suffix(path)
        if suffix == ".jsonl":
            yield from self._read_jsonl(path, stream)
        elif suffix == ".parquet":
            yield from self._read_parquet(path, stream)
        else:
            data = stream.read()
            _check_not_binary(data[:BINARY_SNIFF_BYTES], path)
            yield Document(decode_bytes(data, str(path), self.encoding_errors), str(path), suffix in HTML_SUFFIXES)

    def _read_jsonl(self, path: Path, stream: io.BufferedIOBase) -> Iterator[Document]:
        def sniffed(lines: Iterator[bytes]) -> Iterator[bytes]:
            for lineno, line in enumerate(lines, 1):
                if lineno == 1:
                    _check_not_binary(line[:BINARY_SNIFF_BYTES], path)
                yield line

        decode = lambda data, where: decode_bytes(data, where, self.encoding_errors)  # noqa: E731
        for lineno, record in iter_jsonl(sniffed(stream), str(path), decode=decode):
            where = f"{path}:{lineno}"
            if self.text_field not in record:
                raise LmforgeError(
                    f"{where}: no field {self.text_field!r} (fields: {', '.join(map(repr, sorted(record))) or 'none'}); "
                    "choose one with --text-field"
                )
            text = record[self.text_field]
            if not isinstance(text, str):
                raise LmforgeError(f"{where}: field {self.text_field!r} is {type(text).__name__}, not a string")
            yield Document(text, where)

    def _read_parquet(self, path: Path, stream: io.BufferedIOBase) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LmforgeError(f"{path}: reading Parquet needs pyarrow: pip install 'lmforge[parquet]'") from None
        try:
            pf = pq.ParquetFile(stream)
        except Exception as e:  # pyarrow raises its own ArrowInvalid for corrupt files
            raise LmforgeError(f"{path}: not a readable Parquet file ({e})") from None
        if self.text_field not in pf.schema_arrow.names:
            raise LmforgeError(
                f"{path}: no column {self.text_field!r} (columns: {', '.join(map(repr, pf.schema_arrow.names))}); "
                "choose one with --text-field"
            )
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise LmforgeError(f"{path}#{row}: column {self.text_field!r} is not a string")
                yield Document(text, f"{path}#{row}")
