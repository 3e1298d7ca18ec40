"""Parallel data for translation: (source, target) pairs read, cleaned, filtered and deduplicated.

On disk, one pair per line, in either of two forms (the suffix decides; `.gz` is read too):

    pairs.jsonl   {"source": "Guten Morgen", "target": "Good morning"}   (field names configurable)
    pairs.tsv     Guten Morgen<TAB>Good morning                           (exactly two columns)

Each side goes through the text steps of `lmforge clean` (mojibake repair, NFC, control
characters, whitespace) when `clean` is on; then the pairs are filtered. Filters that need no
tokenizer run at read time (empty sides, exact duplicates); the length filters run once the
lengths are known (`filter_lengths`: in tokens after the tokenizer is trained, or in characters),
so the same code counts both. Every pair dropped is counted under its reason.

A malformed line is an LmforgeError naming FILE:LINE and the field or cause, never a traceback:
a pair corpus with one broken line is usually a broken export, not noise to skip silently.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

from lmforge.data.clean import CleanConfig, transform
from lmforge.data.sources import Document
from lmforge.errors import LmforgeError
from lmforge.jsonio import read_jsonl, strict_decode

LengthUnit = Literal["tokens", "chars"]
JSONL_SUFFIXES = (".jsonl", ".json")
TSV_SUFFIXES = (".tsv",)
# The text-to-text steps of `lmforge clean` that suit one sentence: no HTML stripping (a
# sentence with "<b>" is more likely text than markup), no lowercasing, no punctuation removal.
PAIR_CLEANING = CleanConfig(html=False, lowercase=False, strip_punctuation=False)


@dataclass
class Pair:
    source: str
    target: str
    where: str  # FILE:LINE, for messages


@dataclass
class PairStats:
    """What reading and filtering did: pairs read, kept, and dropped per reason."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    cleaned: int = 0  # pairs where cleaning changed a side

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.kept -= 1

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "cleaned": self.cleaned, "dropped": dict(sorted(self.dropped.items()))}

    def describe(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        return f"{self.read} pairs read, {self.kept} kept" + (f", dropped: {why}" if why else "")


def pair_format(path: str | Path) -> str:
    """"jsonl" or "tsv" by the file's suffix (before a .gz)."""
    p = Path(path)
    suffix = Path(p.stem).suffix.lower() if p.suffix.lower() == ".gz" else p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TSV_SUFFIXES:
        return "tsv"
    raise LmforgeError(f"{path}: parallel data must be .jsonl (one {{\"source\": ..., \"target\": ...}} object a line) "
                       "or .tsv (source<TAB>target a line), optionally .gz")


def is_pair_file(path: str | Path) -> bool:
    """Whether `path` names a parallel-data file (by suffix), as opposed to a token-shards dir."""
    try:
        pair_format(path)
    except LmforgeError:
        return False
    return not Path(path).is_dir()


def _raw_pairs_jsonl(path: Path, source_field: str, target_field: str) -> Iterator[Pair]:
    for lineno, obj in read_jsonl(path):  # bad UTF-8 / JSON / a non-object line: FILE:LINE errors there
        where = f"{path}:{lineno}"
        sides = []
        for name in (source_field, target_field):
            if name not in obj:
                raise LmforgeError(f"{where}: no {name!r} field (the record has {', '.join(map(repr, obj)) or 'none'}; "
                                   "set --source-field/--target-field)")
            value = obj[name]
            if not isinstance(value, str):
                raise LmforgeError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            sides.append(value)
        yield Pair(sides[0], sides[1], where)


def _raw_pairs_tsv(path: Path) -> Iterator[Pair]:
    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
            for lineno, line in enumerate(stream, 1):
                where = f"{path}:{lineno}"
                text = strict_decode(line, where).rstrip("\r\n")
                if not text.strip():
                    continue
                cols = text.split("\t")
                if len(cols) != 2:
                    raise LmforgeError(f"{where}: expected 2 tab-separated columns (source, target), got {len(cols)}")
                yield Pair(cols[0], cols[1], where)
    except (OSError, EOFError, zlib.error) as e:
        raise LmforgeError(f"{path}: cannot read ({e})") from None


def _clean(text: str, where: str) -> str:
    return transform(Document(text, where), PAIR_CLEANING)[0]


def read_pairs(path: str | Path, *, source_field: str = "source", target_field: str = "target", clean: bool = True,
               dedup: bool = True, stats: PairStats | None = None) -> tuple[list[Pair], PairStats]:
    """The pairs of one file, cleaned (`clean`), without empty sides and (`dedup`) without exact
    repeats of an earlier (source, target) pair. Lengths are filtered later (`filter_lengths`)."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"{path}: no such file")
    if path.is_dir():
        raise LmforgeError(f"{path}: a folder; parallel data is one .jsonl or .tsv file")
    fmt = pair_format(path)
    raw = _raw_pairs_jsonl(path, source_field, target_field) if fmt == "jsonl" else _raw_pairs_tsv(path)
    stats = stats or PairStats()
    seen: set[bytes] = set()
    out: list[Pair] = []
    for pair in raw:
        stats.read += 1
        stats.kept += 1
        if clean:
            src, tgt = _clean(pair.source, pair.where), _clean(pair.target, pair.where)
            stats.cleaned += (src, tgt) != (pair.source, pair.target)
            pair = Pair(src, tgt, pair.where)
        else:
            pair = Pair(pair.source.strip(), pair.target.strip(), pair.where)
        if not pair.source:
            stats.drop("empty_source")
            continue
        if not pair.target:
            stats.drop("empty_target")
            continue
        if dedup:
            # A digest, not the strings: a corpus of millions of pairs would hold every text twice.
            key = hashlib.blake2b(f"{pair.source}\x00{pair.target}".encode("utf-8"), digest_size=16).digest()
            if key in seen:
                stats.drop("duplicate")
                continue
            seen.add(key)
        out.append(pair)
    if stats.read == 0:
        raise LmforgeError(f"{path}: no pairs (the file is empty)")
    return out, stats


@dataclass
class LengthFilter:
    min_length: int = 1  # drop a pair with a side shorter than this
    max_length: int = 0  # drop a pair with a side longer than this (0 = no limit)
    max_ratio: float = 0.0  # drop when the longer side is more than this many times the shorter (0 = off)

    def reason(self, n_src: int, n_tgt: int) -> str | None:
        """Why a pair of these lengths is dropped, or None."""
        if min(n_src, n_tgt) < self.min_length:
            return "too_short"
        if self.max_length and max(n_src, n_tgt) > self.max_length:
            return "too_long"
        if self.max_ratio and max(n_src, n_tgt) > self.max_ratio * max(1, min(n_src, n_tgt)):
            return "length_ratio"
        return None


def filter_lengths(items: Sequence, lengths: Callable[[object], tuple[int, int]], rule: LengthFilter,
                   stats: PairStats) -> list:
    """The items whose (source, target) lengths pass `rule`; the others counted in `stats`."""
    kept = []
    for item in items:
        reason = rule.reason(*lengths(item))
        if reason is None:
            kept.append(item)
        else:
            stats.drop(reason)
    return kept


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A held-out val split: a seeded choice of round(val_fraction * n) items (at least one),
    the rest for training, both in file order."""
    import numpy as np

    n = len(pairs)
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise LmforgeError(f"{n} pairs are too few to hold out {n_val} for validation; add pairs, lower "
                           "--val-fraction or give --val-data")
    held = set(np.random.default_rng([seed, 0x5E9]).choice(n, n_val, replace=False).tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]
