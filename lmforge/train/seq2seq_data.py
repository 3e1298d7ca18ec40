"""Tokenizers and batches for training an encoder-decoder (lmforge.model.seq2seq) on pairs.

Token layout for an encoder-decoder, the one the mBART export and transformers' generate use too:

    source ids   tokenizer.encode(source)                  (no special tokens, as AutoTokenizer
                                                             encodes with the exported tokenizer.json)
    decoder in   [start] + encode(target)                  start = decoder_start_id: bos, else eos
    labels       encode(target) + [eos]                    -100 on padding

One joint tokenizer (both sides; the model's one vocabulary) or two: the target's is the model
dir's tokenizer.json (the decoder's vocabulary, what generation decodes), the source's is kept in
`source_tokenizer/` beside it and sizes the model's separate source table (src_vocab_size).

A decoder-only model learns translation as a continuation (ConcatenatedPairBatches):

    input        encode(source) + [sep] + encode(target)
    labels       -100 on the source ... encode(target) + [eos]     (the loss on the target only)

Batches are a pure function of (step, micro), as ShardBatches' are, so a resumed run sees the
batches the uninterrupted run would have: epoch e's order is a permutation seeded by (seed, e);
with bucketing, pairs are sorted by length within chunks of that order and cut into batches
(fixed count or a token budget), and the batches of the epoch shuffled again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerTrainConfig, train_tokenizer

SOURCE_TOKENIZER_DIR = "source_tokenizer"
SEPARATOR_TOKEN = "<|sep|>"  # between source and target, for a decoder-only translator
# Chunk of the shuffled order sorted by length, in batches: big enough that neighbours have
# similar lengths, small enough that an epoch still mixes lengths batch to batch (fairseq and
# tensor2tensor bucket over the whole data set; a chunk keeps the plan cheap to recompute).
BUCKET_CHUNK_BATCHES = 100


@dataclass
class PairTokenizers:
    """The source and target tokenizers (the same object when joint)."""

    source: Tokenizer
    target: Tokenizer

    @property
    def joint(self) -> bool:
        return self.source is self.target or self.source.sha256 == self.target.sha256

    def save(self, folder: str | Path) -> None:
        """Into a model dir being written: the target's as its tokenizer, a separate source's below."""
        folder = Path(folder)
        self.target.save(folder)
        if not self.joint:
            self.source.save(folder / SOURCE_TOKENIZER_DIR)

    @classmethod
    def load(cls, folder: str | Path) -> "PairTokenizers":
        """A model dir's tokenizers: tokenizer.json, and source_tokenizer/ when it has one."""
        target = Tokenizer.load(folder)
        src_dir = Path(folder) / SOURCE_TOKENIZER_DIR
        return cls(Tokenizer.load(src_dir) if (src_dir / TOKENIZER_FILE).is_file() else target, target)

    def special_ids(self) -> tuple[int, int, int]:
        """(decoder start, eos, pad) of the target side; pad falls back to eos (padding is masked)."""
        from lmforge.interop.hf_seq2seq import decoder_start_id

        eos = self.target.require_eos("the target tokenizer")
        start = decoder_start_id(self.target)
        pad = self.target.pad_id if self.target.pad_id is not None else eos
        return start, eos, pad

    def source_pad_id(self) -> int:
        for i in (self.source.pad_id, self.source.eos_id):
            if i is not None:
                return i
        return 0  # masked out: any id the source table holds


def load_source_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer a model dir's encoder reads: source_tokenizer/ when trained separately, else
    the model's own tokenizer.json. For decoding code that must encode sources."""
    return PairTokenizers.load(model_dir).source


def translation_tokenizer_config(kind: str, vocab_size: int, separator: bool = False) -> TokenizerTrainConfig:
    # No chat tokens or template: a translation model has no turns. A decoder-only translator
    # reads `source <sep> target`: its tokenizer holds the separator as a special token.
    return TokenizerTrainConfig(kind=kind, vocab_size=vocab_size, chat_tokens=False,
                                extra_special_tokens=[SEPARATOR_TOKEN] if separator else [])


def train_pair_tokenizers(sources: Sequence[str], targets: Sequence[str], *, mode: str, kind: str, vocab_size: int,
                          show_progress: bool = False, notify=None, separator: bool = False) -> PairTokenizers:
    """One tokenizer on both sides ("joint") or one per side ("separate"), trained on these texts;
    `separator`: with SEPARATOR_TOKEN (joint only: a decoder-only model has one vocabulary)."""
    cfg = translation_tokenizer_config(kind, vocab_size, separator)
    if separator and mode != "joint":
        raise LmforgeError(f"--tokenizer {mode}: a decoder-only model reads source and target with one vocabulary; "
                           "use --tokenizer joint (or a tokenizer file)")
    if mode == "joint":
        tok = train_tokenizer([*sources, *targets], cfg, source="the pairs (both sides)", show_progress=show_progress,
                              notify=notify)
        return PairTokenizers(tok, tok)
    if mode == "separate":
        return PairTokenizers(train_tokenizer(sources, cfg, source="the source side", show_progress=show_progress, notify=notify),
                              train_tokenizer(targets, cfg, source="the target side", show_progress=show_progress, notify=notify))
    raise LmforgeError(f"--tokenizer must be joint, separate or a tokenizer dir/tokenizer.json, got {mode!r}")


def encode_pairs(tokenizers: PairTokenizers, sources: Sequence[str], targets: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(source ids, target ids) per pair, int32, without special tokens."""
    src = tokenizers.source.encode_batch(list(sources))
    tgt = tokenizers.target.encode_batch(list(targets))
    return [(np.asarray(s, dtype=np.int32), np.asarray(t, dtype=np.int32)) for s, t in zip(src, tgt)]


class Seq2SeqBatches:
    """The Trainer's BatchSource for pairs: (source ids, labels, {"tgt_ids", "src_mask"}).

    `max_tokens` > 0: a micro-batch holds as many pairs as fit that many padded positions
    (rows x (longest source + longest target + 1)), else `batch_size` pairs. `bucket`: pairs of
    similar length share batches (see the module docstring)."""

    def __init__(self, train: list[tuple[np.ndarray, np.ndarray]], val: list[tuple[np.ndarray, np.ndarray]], *,
                 batch_size: int, grad_accum: int, seed: int, eval_batches: int, start_id: int, eos_id: int,
                 pad_id: int, src_pad_id: int, max_tokens: int = 0, bucket: bool = True):
        if not train:
            raise LmforgeError("no training pairs left after filtering")
        if not val:
            raise LmforgeError("no validation pairs left after filtering")
        self.train, self.val = train, val
        self.batch_size, self.grad_accum, self.seed, self.eval_batches = batch_size, grad_accum, seed, eval_batches
        self.start_id, self.eos_id, self.pad_id, self.src_pad_id = start_id, eos_id, pad_id, src_pad_id
        self.max_tokens, self.bucket = max_tokens, bucket
        # Lengths as padded: the source as is, the target with its start (decoder in) / eos (labels).
        self.src_len = np.array([len(s) for s, _ in train], dtype=np.int64)
        self.tgt_len = np.array([len(t) + 1 for _, t in train], dtype=np.int64)
        self._epoch_sizes: list[int] = []  # batches per epoch, filled as epochs are planned
        self._cached: tuple[int, list[np.ndarray]] | None = None

    # -- the plan -------------------------------------------------------------------------
    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        if not self.max_tokens:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches, start, long_s, long_t = [], 0, 0, 0
        for k, i in enumerate(order):
            s, t = max(long_s, self.src_len[i]), max(long_t, self.tgt_len[i])
            if k > start and (k - start + 1) * (s + t) > self.max_tokens:
                batches.append(order[start:k])
                start, s, t = k, self.src_len[i], self.tgt_len[i]
            long_s, long_t = s, t
        batches.append(order[start:])
        return batches

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """Epoch `epoch`'s micro-batches, each an array of indices into the training pairs."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.train))
        if not self.bucket:
            plan = self._cut(order)
        else:
            chunk = BUCKET_CHUNK_BATCHES * self.batch_size
            plan = []
            for c in range(0, len(order), chunk):
                part = order[c : c + chunk]
                # Stable: pairs of equal lengths keep the shuffled order.
                part = part[np.lexsort((self.tgt_len[part], self.src_len[part]))]
                plan += self._cut(part)
            plan = [plan[i] for i in rng.permutation(len(plan))]  # else every chunk runs short to long
        self._cached = (epoch, plan)
        return plan

    def _locate(self, k: int) -> np.ndarray:
        """The k-th micro-batch of the whole run (epochs laid end to end)."""
        epoch, base = 0, 0
        while True:
            if epoch == len(self._epoch_sizes):
                self._epoch_sizes.append(len(self.epoch_plan(epoch)))
            size = self._epoch_sizes[epoch]
            if k < base + size:
                return self.epoch_plan(epoch)[k - base]
            base += size
            epoch += 1

    def pad_share(self, epoch: int = 0) -> float:
        """Share of the padded positions (source and target) of an epoch's batches that are padding."""
        total = real = 0
        for idx in self.epoch_plan(epoch):
            s, t = self.src_len[idx], self.tgt_len[idx]
            total += len(idx) * (int(s.max()) + int(t.max()))
            real += int(s.sum() + t.sum())
        return 1.0 - real / total

    def mean_target_tokens(self) -> float:
        """Target tokens under the loss per micro-batch, on average over epoch 0."""
        plan = self.epoch_plan(0)
        return float(self.tgt_len.sum()) / len(plan)

    def longest(self) -> int:
        return int(max(self.src_len.max(), self.tgt_len.max()))

    # -- batches --------------------------------------------------------------------------
    def collate(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple:
        B = len(pairs)
        S = max(len(s) for s, _ in pairs)
        T = max(len(t) for _, t in pairs) + 1
        src = torch.full((B, S), self.src_pad_id, dtype=torch.long)
        mask = torch.zeros((B, S), dtype=torch.bool)
        tgt_in = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        for b, (s, t) in enumerate(pairs):
            src[b, : len(s)] = torch.from_numpy(s.astype(np.int64))
            mask[b, : len(s)] = True
            tt = torch.from_numpy(t.astype(np.int64))
            tgt_in[b, 0] = self.start_id
            tgt_in[b, 1 : len(t) + 1] = tt
            labels[b, : len(t)] = tt
            labels[b, len(t)] = self.eos_id
        return src, labels, {"tgt_ids": tgt_in, "src_mask": mask}

    def train_batch(self, step: int, micro: int) -> tuple:
        idx = self._locate(step * self.grad_accum + micro)
        return self.collate([self.train[i] for i in idx])

    def val_batches(self) -> Iterator[tuple]:
        """The first eval_batches x batch_size val pairs, by length (less padding), every time."""
        pairs = self.val[: self.eval_batches * self.batch_size]
        pairs = sorted(pairs, key=lambda p: (len(p[0]), len(p[1])))
        for i in range(0, len(pairs), self.batch_size):
            yield self.collate(pairs[i : i + self.batch_size])


class ConcatenatedPairBatches(Seq2SeqBatches):
    """Seq2SeqBatches for a decoder-only model: each pair one right-padded row `source <sep>
    target`, labels the next token on the target's positions only (source and padding -100),
    so the model is trained on what it generates. (input, labels, {}) as pretraining's batches."""

    def __init__(self, train, val, *, sep_id: int, **kwargs):
        super().__init__(train, val, **kwargs)
        self.sep_id = sep_id

    def pad_share(self, epoch: int = 0) -> float:
        total = real = 0
        for idx in self.epoch_plan(epoch):
            rows = self.src_len[idx] + self.tgt_len[idx]  # source, sep and target (the eos is only a label)
            total += len(idx) * int(rows.max())
            real += int(rows.sum())
        return 1.0 - real / total

    def longest(self) -> int:
        return int((self.src_len + self.tgt_len).max())

    def collate(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple:
        B = len(pairs)
        L = max(len(s) + len(t) + 1 for s, t in pairs)
        x = torch.full((B, L), self.pad_id, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, (s, t) in enumerate(pairs):
            n, m = len(s), len(t)
            seq = torch.from_numpy(np.concatenate([s, [self.sep_id], t, [self.eos_id]]).astype(np.int64))
            x[b, : n + m + 1] = seq[:-1]
            labels[b, n : n + m + 1] = seq[n + 1 :]
        return x, labels, {}
