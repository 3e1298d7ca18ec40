"""Read token shards through memory maps: random training windows and sequential eval windows.

Random batches are a pure function of (seed, step, rank), so a resumed run needs only the step
to continue exactly where it stopped, and data-parallel ranks draw disjoint random streams.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.data.pack import FORMAT, FORMAT_VERSION, META_FILE
from lmforge.errors import LmforgeError


@dataclass
class Split:
    name: str
    shards: list[np.memmap]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.shards)


class TokenShards:
    """A shards dir written by `lmforge pack`, validated on open (format, sizes, tokenizer)."""

    def __init__(self, path: str | os.PathLike, expect_tokenizer_sha256: str | None = None):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.exists():
            raise LmforgeError(f"{self.path}: not a shards dir (no {META_FILE}); make one with `lmforge pack`")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{meta_file}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise LmforgeError(
                f"{meta_file}: unsupported format {self.meta.get('format')!r} v{self.meta.get('version')} "
                f"(this lmforge reads {FORMAT} v{FORMAT_VERSION})"
            )
        self.dtype = np.dtype(self.meta["dtype"])
        if expect_tokenizer_sha256 is not None and self.tokenizer_sha256 != expect_tokenizer_sha256:
            raise LmforgeError(
                f"{meta_file}: shards were made with tokenizer {self.tokenizer_sha256[:12]}, not the given "
                f"tokenizer {expect_tokenizer_sha256[:12]}; re-pack with the model's tokenizer"
            )
        self._splits: dict[str, Split] = {}

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def split(self, name: str) -> Split:
        if name not in self._splits:
            info = self.meta["splits"].get(name)
            if info is None:
                raise LmforgeError(f"{self.path}: no split {name!r} (has {', '.join(self.meta['splits'])})")
            shards = []
            for shard in info["shards"]:
                f = self.path / shard["file"]
                expected = shard["tokens"] * self.dtype.itemsize
                if not f.exists():
                    raise LmforgeError(f"{f}: shard listed in {META_FILE} is missing")
                if f.stat().st_size != expected:
                    raise LmforgeError(
                        f"{f}: {f.stat().st_size} bytes, but {META_FILE} promises {expected}; the shard is truncated or corrupt"
                    )
                if shard["tokens"]:
                    shards.append(np.memmap(f, dtype=self.dtype, mode="r"))
            self._splits[name] = Split(name, shards)
        return self._splits[name]


def random_batch(
    split: Split, batch_size: int, block_size: int, *, seed: int, step: int, rank: int = 0
) -> np.ndarray:
    """`batch_size` windows of `block_size + 1` tokens at random offsets, as int64 [B, T+1].

    A window never crosses a shard boundary; shards are chosen in proportion to how many
    windows they hold, so every start offset is equally likely.
    """
    need = block_size + 1
    usable = [s for s in split.shards if len(s) >= need]
    if not usable:
        raise LmforgeError(
            f"split {split.name!r} has {split.tokens} tokens in shards too short for one window of "
            f"{need} (block size {block_size} + 1)"
        )
    starts = np.array([len(s) - need + 1 for s in usable], dtype=np.int64)
    rng = np.random.default_rng([seed, step, rank])
    picks = rng.integers(0, starts.sum(), size=batch_size)
    bounds = np.cumsum(starts)
    shard_ids = np.searchsorted(bounds, picks, side="right")
    offsets = picks - (bounds[shard_ids] - starts[shard_ids])
    out = np.empty((batch_size, need), dtype=np.int64)
    for row, (sid, off) in enumerate(zip(shard_ids, offsets)):
        out[row] = usable[sid][off : off + need]
    return out


def sequential_windows(
    split: Split, block_size: int, *, rank: int = 0, world_size: int = 1, limit: int | None = None
) -> Iterator[np.ndarray]:
    """Non-overlapping windows of `block_size + 1` tokens (stride `block_size`) in corpus order.

    Window k goes to rank k % world_size, so ranks cover the split once between them.
    `limit` caps the number of windows overall (before sharding across ranks).
    """
    need = block_size + 1
    k = 0
    for shard in split.shards:
        for start in range(0, len(shard) - need + 1, block_size):
            if limit is not None and k >= limit:
                return
            if k % world_size == rank:
                yield np.asarray(shard[start : start + need], dtype=np.int64)
            k += 1
