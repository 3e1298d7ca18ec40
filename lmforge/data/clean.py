"""`lmforge clean`: raw documents in, cleaned and deduplicated JSONL documents out.

Each step can be switched off, and every document a step changes or removes is counted in
`stats.json`, so a user can see what the cleaning did to their corpus.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np

from lmforge.data.sources import DEFAULT_EXTENSIONS, Document, DocumentReader, EncodingErrors
from lmforge.data.workers import spawn_pool
from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_dir, atomic_file
from lmforge.progress import progress_bar

Normalization = Literal["nfc", "nfkc", "none"]

# C0/C1 control characters except tab and newline, plus invisible format characters that only
# add noise to a corpus (BOM, zero-width space, soft hyphen, word joiner).
_CONTROL_TABLE = {c: None for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROL_TABLE.update({0xFEFF: None, 0x200B: None, 0x00AD: None, 0x2060: None})
# Unicode space separators (NBSP, en/em spaces, ...) become a plain space.
_SPACE_TABLE = {c: " " for c in [0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000]}
_SPACE_TABLE.update({0x2028: "\n", 0x2029: "\n"})
_punct_table: dict[int, None] | None = None


@dataclass
class CleanConfig:
    """What `lmforge clean` does to each document, in this order."""

    html: bool = True  # HTML -> text for .html/.htm inputs (script/style/nav dropped)
    fix_mojibake: bool = True  # Repair UTF-8 decoded as Latin-1/cp1252 (ftfy.fix_encoding)
    normalize: Normalization = "nfc"  # Unicode normalization form
    control_chars: bool = True  # drop control and invisible format characters
    whitespace: bool = True  # unify line ends and odd spaces, strip line ends, cap blank runs at 2
    lowercase: bool = False  # lowercase everything (loses information a model could use)
    strip_punctuation: bool = False  # textbook step; hurts a language model (see README)
    min_chars: int = 20  # drop shorter documents (0 = keep all)
    max_symbol_ratio: float = 0.5  # drop when this share of non-space chars is not alphanumeric (1 = off)
    max_repeated_lines: float = 0.5  # drop when this share of non-blank lines repeats another (1 = off)
    dedup_exact: bool = True  # drop documents identical to an earlier one
    dedup_near: bool = True  # drop near-duplicates (MinHash LSH)
    near_threshold: float = 0.85  # estimated Jaccard similarity of 5-word shingles
    near_num_perm: int = 128  # MinHash permutations (more = finer estimate, slower)

    def __post_init__(self) -> None:
        if self.normalize not in ("nfc", "nfkc", "none"):
            raise LmforgeError(f"--normalize must be nfc, nfkc or none, not {self.normalize!r}")
        for name in ("max_symbol_ratio", "max_repeated_lines"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise LmforgeError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise LmforgeError(f"--near-threshold must be in (0, 1], got {self.near_threshold}")
        if self.min_chars < 0:
            raise LmforgeError(f"--min-chars must be >= 0, got {self.min_chars}")
        if self.near_num_perm < 2:
            raise LmforgeError(f"--near-num-perm must be >= 2 (MinHash LSH needs two permutations), got {self.near_num_perm}")


def _punctuation_table() -> dict[int, None]:
    global _punct_table
    if _punct_table is None:
        _punct_table = {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P")}
    return _punct_table


def normalize_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_SPACE_TABLE)
    # Trailing spaces go; leading indentation stays (it is meaningful in code).
    lines = [line.rstrip() for line in text.split("\n")]
    out: list[str] = []
    blank_run = 0
    for line in lines:
        blank_run = blank_run + 1 if not line else 0
        if blank_run <= 2:
            out.append(line)
    return "\n".join(out).strip("\n")


_SYMBOL = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s")


def symbol_ratio(text: str) -> float:
    """Share of the non-space characters that are neither letters nor digits."""
    visible = len(text) - len(_SPACE.findall(text))
    if visible == 0:
        return 0.0
    return _SYMBOL.subn("", text)[1] / visible


def repeated_line_ratio(text: str) -> float:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return 0.0
    counts = Counter(lines)
    repeats = sum(n - 1 for n in counts.values())
    return repeats / len(lines)


@dataclass
class CleanedDocument:
    text: str
    source: str
    modified: list[str]  # steps that changed the text
    rejected: str | None  # reason from the per-document filters, None if kept so far
    digest: bytes | None = None  # for exact dedup
    minhash: np.ndarray | None = None  # for near dedup


def transform(doc: Document, c: CleanConfig) -> tuple[str, list[str]]:
    """The text-to-text steps, in order; returns the text and the steps that changed it."""
    text, modified = doc.text, []

    def step(name: str, new: str) -> None:
        nonlocal text
        if new != text:
            modified.append(name)
            text = new

    if c.html and doc.is_html:
        from lmforge.data.html import html_to_text

        step("html", html_to_text(text))
    if c.fix_mojibake:
        import ftfy

        step("fix_mojibake", ftfy.fix_encoding(text))
    if c.normalize != "none":
        step("normalize", unicodedata.normalize(c.normalize.upper(), text))
    if c.control_chars:
        step("control_chars", text.translate(_CONTROL_TABLE))
    if c.whitespace:
        step("whitespace", normalize_whitespace(text))
    if c.lowercase:
        step("lowercase", text.lower())
    if c.strip_punctuation:
        step("strip_punctuation", text.translate(_punctuation_table()))
    return text, modified


def quality_rejection(text: str, c: CleanConfig) -> str | None:
    """Why a transformed document fails the per-document filters, or None."""
    if not text.strip():
        return "empty"
    if len(text) < c.min_chars:
        return "too_short"
    if c.max_symbol_ratio < 1.0 and symbol_ratio(text) > c.max_symbol_ratio:
        return "symbol_ratio"
    if c.max_repeated_lines < 1.0 and repeated_line_ratio(text) > c.max_repeated_lines:
        return "repeated_lines"
    return None


def clean_document(doc: Document, c: CleanConfig) -> CleanedDocument:
    """Everything that depends on one document alone (so it can run in a worker process)."""
    text, modified = transform(doc, c)
    rejected = quality_rejection(text, c)
    out = CleanedDocument(text, doc.source, modified, rejected)
    if rejected is None:
        from lmforge.data.dedup import exact_signature, minhash_signature

        if c.dedup_exact:
            out.digest = exact_signature(text)
        if c.dedup_near:
            out.minhash = minhash_signature(text, c.near_num_perm)
    return out


_worker_config: CleanConfig | None = None


def _init_worker(config: CleanConfig) -> None:
    global _worker_config
    _worker_config = config


def _clean_in_worker(doc: Document) -> CleanedDocument:
    return clean_document(doc, _worker_config)


class Cleaner:
    """Cleans a stream of documents in corpus order; counts what each step changed or removed."""

    def __init__(self, config: CleanConfig, workers: int = 1) -> None:
        self.config = config
        self.workers = max(1, workers)
        self.modified: Counter[str] = Counter()
        self.removed: Counter[str] = Counter()
        # Imported here: datasketch pulls in scipy, which the CLI should not pay for at startup.
        from lmforge.data.dedup import ExactDuplicateFilter, NearDuplicateFilter

        self._exact = ExactDuplicateFilter() if config.dedup_exact else None
        self._near = NearDuplicateFilter(config.near_threshold, config.near_num_perm) if config.dedup_near else None

    def _duplicate(self, doc: CleanedDocument) -> str | None:
        if self._exact is not None and self._exact.seen_before(doc.digest):
            return "exact_duplicate"
        if self._near is not None and self._near.seen_before(doc.minhash):
            return "near_duplicate"
        return None

    def _cleaned(self, docs: Iterable[Document]) -> Iterator[CleanedDocument]:
        if self.workers == 1:
            for doc in docs:
                yield clean_document(doc, self.config)
            return
        with spawn_pool(self.workers, _init_worker, (self.config,)) as pool:
            yield from pool.imap(_clean_in_worker, docs, chunksize=4)

    def clean(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in self._cleaned(docs):
            self.modified.update(doc.modified)
            reason = doc.rejected or self._duplicate(doc)
            if reason is None:
                yield Document(doc.text, doc.source)
            else:
                self.removed[reason] += 1


class JsonlShardWriter:
    """Writes `{"text", "source"}` lines into part-00000.jsonl, part-00001.jsonl, ... of `shard_bytes` each."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.shards: list[str] = []
        self.documents = 0
        self.chars = 0
        self._file = None
        self._size = 0

    def write(self, doc: Document) -> None:
        if self._file is None or self._size >= self.shard_bytes:
            self._open_next()
        line = (json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n").encode("utf-8")
        self._file.write(line)
        self._size += len(line)
        self.documents += 1
        self.chars += len(doc.text)

    def _open_next(self) -> None:
        self.close()
        name = f"part-{len(self.shards):05d}.jsonl"
        self.shards.append(name)
        self._file = open(self.folder / name, "wb")
        self._size = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def clean_corpus(
    inputs: Sequence[str],
    out: str | Path,
    config: CleanConfig = CleanConfig(),
    *,
    text_field: str = "text",
    encoding_errors: EncodingErrors = "replace",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    skip_bad_files: bool = False,
    shard_mb: float = 64.0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Clean `inputs` into the folder `out` (JSONL shards + stats.json); returns the stats."""
    started = time.perf_counter()
    if not 0 < shard_mb < float("inf"):
        raise LmforgeError(f"--shard-mb must be a positive number of megabytes, got {shard_mb}")
    if workers is not None and workers < 0:
        raise LmforgeError(f"--workers must be >= 0 (0 = one per core), got {workers}")
    reader = DocumentReader(
        inputs, text_field=text_field, encoding_errors=encoding_errors, extensions=extensions,
        skip_bad_files=skip_bad_files,
    )
    bar = progress_bar(total=reader.total_bytes(), unit="B", unit_scale=True, unit_divisor=1024, desc="clean", disable=not progress)
    reader.on_progress = bar.update
    cleaner = Cleaner(config, workers=workers or os.cpu_count() or 1)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = JsonlShardWriter(tmp, int(shard_mb * 1024 * 1024))
        try:
            for doc in cleaner.clean(reader):
                writer.write(doc)
        finally:
            writer.close()
            bar.close()
        if writer.documents == 0:
            raise LmforgeError(
                f"{', '.join(map(str, inputs))}: no document survived cleaning "
                f"({reader.stats.documents} read; removed: {dict(cleaner.removed) or 'none'})"
            )
        seconds = time.perf_counter() - started
        stats = {
            "config": asdict(config),
            "input": {**asdict(reader.stats), "encoding_errors": encoding_errors, "text_field": text_field},
            "output": {"documents": writer.documents, "chars": writer.chars, "shards": writer.shards},
            "modified": dict(cleaner.modified),
            "removed": dict(cleaner.removed),
            "seconds": round(seconds, 3),
            "mb_per_s": round(reader.stats.bytes_read / 1e6 / max(seconds, 1e-9), 3),
        }
        with atomic_file(tmp / "stats.json", "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
    return stats
