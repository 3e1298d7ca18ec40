"""Read token shards through memory maps: random training windows and sequential eval windows.

Random batches are a pure function of (seed, step, rank), so a resumed run needs only the step
to continue exactly where it stopped, and data-parallel ranks draw disjoint random streams.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.data.pack import FORMAT, FORMAT_VERSION, META_FILE
from lmforge.errors import LmforgeError
from lmforge.jsonio import read_json_object


@dataclass
class Split:
    name: str
    shards: list[np.memmap]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.shards)


def check_meta(meta: dict, meta_file: Path) -> None:
    """Every entry the readers use, with its type, so that a hand-edited or damaged meta.json is
    one line naming the entry, not a KeyError (or a shard path outside the folder)."""

    def need(cond: bool, entry: str, what: str) -> None:
        if not cond:
            raise LmforgeError(f"{meta_file}: {entry} must be {what}; the shards dir is damaged (re-run `lmforge pack`)")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    need(meta.get("dtype") in ("uint16", "uint32"), "'dtype'", "uint16 or uint32")
    need(count(meta.get("vocab_size")) and meta["vocab_size"] > 0, "'vocab_size'", "a positive integer")
    need(count(meta.get("documents")), "'documents'", "an integer >= 0")
    tok = meta.get("tokenizer")
    need(isinstance(tok, dict) and isinstance(tok.get("sha256"), str) and isinstance(tok.get("kind"), str),
         "'tokenizer'", "an object with strings 'sha256' and 'kind'")
    splits = meta.get("splits")
    need(isinstance(splits, dict) and "train" in splits, "'splits'", "an object with a 'train' split")
    for name, info in splits.items():
        # a key may hold any character, a newline too: quoted unless a plain name
        entry = f"splits.{name}" if name.isidentifier() else f"splits[{name!r}]"
        need(isinstance(info, dict) and count(info.get("documents")) and isinstance(info.get("shards"), list),
             entry, "an object with 'documents' (an integer >= 0) and 'shards' (a list)")
        for i, shard in enumerate(info["shards"]):
            need(isinstance(shard, dict) and isinstance(shard.get("file"), str) and count(shard.get("tokens"))
                 and shard["file"] == Path(shard["file"]).name and shard["file"] not in ("", ".", ".."),
                 f"{entry}.shards[{i}]", "an object with 'file' (a file name in the folder) and 'tokens' (an integer >= 0)")


class TokenShards:
    """A shards dir written by `lmforge pack`, validated on open (format, sizes, tokenizer)."""

    def __init__(self, path: str | os.PathLike, expect_tokenizer_sha256: str | None = None):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.exists():
            raise LmforgeError(f"{self.path}: not a shards dir (no {META_FILE}); make one with `lmforge pack`")
        self.meta = read_json_object(meta_file, META_FILE)
        if self.meta.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise LmforgeError(
                f"{meta_file}: unsupported format {self.meta.get('format')!r} v{self.meta.get('version')} "
                f"(this lmforge reads {FORMAT} v{FORMAT_VERSION})"
            )
        check_meta(self.meta, meta_file)
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
                raise LmforgeError(f"{self.path}: no split {name!r} (has {', '.join(map(repr, self.meta['splits']))})")
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
    split: Split, batch_size: int, block_size: int, *, seed: int, step: int, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """`batch_size` windows of `block_size + 1` tokens at random offsets, as int64 [B, T+1]: rank
    `rank`'s slice of the `batch_size * world_size` windows of the global batch of `step`, which
    depends on (seed, step) only, so one process with batch 8 and two with batch 4 see the same
    windows.

    A window never crosses a shard boundary; shards are chosen in proportion to how many
    windows they hold, so every start offset is equally likely.
    """
    if not 0 <= rank < world_size:
        raise LmforgeError(f"rank {rank} is outside a world of {world_size} processes")
    need = block_size + 1
    usable = [s for s in split.shards if len(s) >= need]
    if not usable:
        raise LmforgeError(
            f"split {split.name!r} has {split.tokens} tokens in shards too short for one window of "
            f"{need} (block size {block_size} + 1)"
        )
    starts = np.array([len(s) - need + 1 for s in usable], dtype=np.int64)
    # The key's trailing 0 keeps the stream of runs made before the global batch was drawn here.
    rng = np.random.default_rng([seed, step, 0])
    picks = rng.integers(0, starts.sum(), size=batch_size * world_size)[rank * batch_size : (rank + 1) * batch_size]
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

    Window k goes to rank k % world_size, so ranks cover the split once between them; every rank
    gets the same number (the last windows that do not make a full round are left out), because
    under FSDP each forward pass is a collective. `limit` caps the number of windows overall
    (before sharding across ranks).
    """
    need = block_size + 1
    available = sum(max(0, (len(s) - need) // block_size + 1) for s in split.shards)
    total = available if limit is None else min(limit, available)
    total -= total % world_size
    k = 0
    for shard in split.shards:
        for start in range(0, len(shard) - need + 1, block_size):
            if k >= total:
                return
            if k % world_size == rank:
                yield np.asarray(shard[start : start + need], dtype=np.int64)
            k += 1
