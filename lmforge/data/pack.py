"""`lmforge pack`: tokenize a corpus into binary token shards plus `meta.json`.

On disk (a "shards dir"):
  meta.json                 format, dtype, vocab size, eos id, tokenizer hash, per-split token counts
  tokenizer.json            the tokenizer that made the shards (+ tokenizer_config.json)
  train-00000.bin ...       raw little-endian uint16 (vocab <= 65536) or uint32 token ids
  val-00000.bin ...         documents are separated by the eos token
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

import lmforge
from lmforge.data.sources import DEFAULT_EXTENSIONS, DocumentReader, EncodingErrors
from lmforge.data.workers import spawn_pool
from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_dir, write_text_atomic
from lmforge.progress import progress_bar
from lmforge.tokenizer import Tokenizer

META_FILE = "meta.json"
FORMAT = "lmforge-token-shards"
FORMAT_VERSION = 1
SplitMode = Literal["document", "tail"]


@dataclass
class PackConfig:
    val_fraction: float = 0.01  # share of documents (or, with split=tail, of tokens) held out
    split: SplitMode = "document"  # "tail": the last tokens of the stream, as nanoGPT does for one-file corpora
    shard_tokens: int = 100_000_000  # tokens per .bin file
    workers: int = 0  # encoding processes; 0 = one per CPU core
    chunk_chars: int = 1_000_000  # text sent to a worker at a time

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise LmforgeError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.split not in ("document", "tail"):
            raise LmforgeError(f"--split must be 'document' or 'tail', got {self.split!r}")
        if self.shard_tokens < 1:
            raise LmforgeError(f"--shard-tokens must be positive, got {self.shard_tokens}")
        if self.workers < 0:
            raise LmforgeError(f"--workers must be >= 0 (0 = one per core), got {self.workers}")
        if self.chunk_chars < 1:
            raise LmforgeError(f"--chunk-chars must be positive, got {self.chunk_chars}")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_val_document(index: int, val_fraction: float) -> bool:
    """Spread held-out documents evenly: exactly round-down(N * fraction) of the first N."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


class ShardWriter:
    """Appends token arrays to `{split}-00000.bin`, `{split}-00001.bin`, ... of `shard_tokens` each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._file = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            self._file.write(part.tobytes())
            self.shards[-1]["tokens"] += len(part)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._file = open(self.folder / name, "wb")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


_worker_tok: Tokenizer | None = None
_worker_eos: int = 0


def _init_worker(tokenizer_json: bytes, eos: int) -> None:
    global _worker_tok, _worker_eos
    from tokenizers import Tokenizer as HFTokenizer

    # One Python process per core already; rayon threads inside each would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = Tokenizer(HFTokenizer.from_str(tokenizer_json.decode("utf-8")), raw_json=tokenizer_json)
    _worker_eos = eos


def _encode_chunk(chunk: tuple[str, list[str]]) -> tuple[str, np.ndarray, np.ndarray]:
    """Encode documents; return their concatenation (each followed by eos) and their lengths."""
    split, texts = chunk
    encoded = _worker_tok.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=np.uint32)
    pos = 0
    for ids in encoded:
        flat[pos : pos + len(ids)] = ids
        pos += len(ids)
        flat[pos] = _worker_eos
        pos += 1
    return split, flat, lengths


def _chunks(reader: DocumentReader, cfg: PackConfig) -> Iterator[tuple[str, list[str]]]:
    """Group documents into (split, texts) chunks of about `chunk_chars` characters."""
    pending: dict[str, list[str]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    for index, doc in enumerate(reader):
        split = "val" if cfg.split == "document" and is_val_document(index, cfg.val_fraction) else "train"
        pending[split].append(doc.text)
        sizes[split] += len(doc.text)
        if sizes[split] >= cfg.chunk_chars:
            yield split, pending[split]
            pending[split], sizes[split] = [], 0
    for split in ("train", "val"):
        if pending[split]:
            yield split, pending[split]


def pack_corpus(
    inputs: Sequence[str],
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,
    cfg: PackConfig = PackConfig(),
    *,
    text_field: str = "text",
    encoding_errors: EncodingErrors = "replace",
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    started = time.perf_counter()
    tok = Tokenizer.load(tokenizer)
    eos = tok.require_eos(str(tokenizer))
    dtype = token_dtype(tok.vocab_size)
    reader = DocumentReader(inputs, text_field=text_field, encoding_errors=encoding_errors, extensions=extensions)
    bar = progress_bar(total=reader.total_bytes(), unit="B", unit_scale=True, unit_divisor=1024, desc="pack", disable=not progress)
    reader.on_progress = bar.update
    workers = cfg.workers or os.cpu_count() or 1
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writers = {s: ShardWriter(tmp, s if cfg.split == "document" else "all", dtype, cfg.shard_tokens) for s in ("train", "val")}
        if cfg.split == "tail":
            writers["val"] = writers["train"]  # one stream, cut at the end
        doc_ends: list[int] = []  # token offsets where documents end, for tail-mode counts
        try:
            with spawn_pool(workers, _init_worker, (tok._raw_json, eos)) as pool:
                for split, flat, lengths in pool.imap(_encode_chunk, _chunks(reader, cfg)):
                    w = writers[split]
                    if cfg.split == "tail":
                        doc_ends.extend((w.tokens + np.cumsum(lengths)).tolist())
                    w.write(flat)
                    w.documents += len(lengths)
        finally:
            for w in writers.values():
                w.close()
            bar.close()
        if reader.stats.documents == 0:
            raise LmforgeError(f"{', '.join(map(str, inputs))}: no documents to pack")
        if cfg.split == "tail":
            splits = _cut_tail(tmp, writers["train"], cfg, dtype, doc_ends)
        else:
            splits = {s: w.summary() for s, w in writers.items()}
        if cfg.val_fraction > 0 and splits["val"]["tokens"] == 0:
            raise LmforgeError(
                f"{', '.join(map(str, inputs))}: the val split is empty ({reader.stats.documents} documents, "
                f"--val-fraction {cfg.val_fraction}); raise --val-fraction, add documents, or use --split tail"
            )
        tok.save(tmp)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eos_id": eos,
            "tokenizer": {"sha256": tok.sha256, "source": str(tokenizer), "kind": tok.kind},
            "split": {"mode": cfg.split, "val_fraction": cfg.val_fraction},
            "splits": splits,
            "documents": reader.stats.documents,
            "source_bytes": reader.stats.bytes_read,
            "decode_replacements": reader.stats.decode_replacements,
            "seconds": round(time.perf_counter() - started, 3),
            "created_by": f"lmforge {lmforge.__version__}",
        }
        write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=2))
    return meta


def _cut_tail(folder: Path, stream: ShardWriter, cfg: PackConfig, dtype: np.dtype, doc_ends: list[int]) -> dict:
    """Split the single token stream into train (head) and val (tail) shard files."""
    total = stream.tokens
    n_val = int(total * cfg.val_fraction)
    n_train = total - n_val
    out = {s: ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    pos = 0
    for shard in stream.shards:
        path = folder / shard["file"]
        data = np.fromfile(path, dtype=dtype)
        head = max(0, min(len(data), n_train - pos))
        out["train"].write(data[:head])
        out["val"].write(data[head:])
        pos += len(data)
        path.unlink()
    for w in out.values():
        w.close()
    ends = np.asarray(doc_ends)
    out["train"].documents = int((ends <= n_train).sum())
    out["val"].documents = len(ends) - out["train"].documents
    return {s: w.summary() for s, w in out.items()}
