"""TranslationConfig: how parallel pairs become training data for an encoder-decoder.

Apart from lmforge.train.translation (which imports torch) so that the CLI can build its options
from these fields without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.data.parallel import LengthFilter, LengthUnit
from lmforge.errors import LmforgeError
from lmforge.tokenizer import TokenizerKind


@dataclass
class TranslationConfig:
    """How pairs become training data for an encoder-decoder; the rest is TrainConfig."""

    source_field: str = "source"  # JSONL field holding the source text
    target_field: str = "target"  # JSONL field holding the target text
    val_data: str = ""  # a separate pairs file to validate on (default: hold out --val-fraction of --data)
    val_fraction: float = 0.05  # share of the pairs held out for validation when there is no --val-data
    clean: bool = True  # clean both sides as `lmforge clean` does (mojibake, NFC, control characters, whitespace)
    dedup: bool = True  # drop exact repeats of a (source, target) pair
    length_unit: LengthUnit = "tokens"  # what --min-length, --max-length and --max-ratio count: tokens or chars
    min_length: int = 1  # drop pairs with a side shorter than this
    max_length: int = 0  # drop pairs with a side longer than this (0 = no limit but the model's context, which always applies, in tokens)
    max_ratio: float = 3.0  # drop pairs whose longer side is more than this times the shorter (0 = off)
    tokenizer: str = "joint"  # joint (one tokenizer trained on both sides), separate (one per side) or a tokenizer dir / tokenizer.json for both
    tokenizer_kind: TokenizerKind = "bpe"  # kind of the tokenizer(s) trained: bpe, wordpiece, unigram, word, char
    vocab_size: int = 8192  # vocabulary of each trained tokenizer, special tokens included
    label_smoothing: float = 0.1  # share of each target's probability spread over the vocabulary (Vaswani et al.: 0.1)
    max_tokens: int = 0  # micro-batch token budget: rows x (longest source + longest target), padding included (0 = --batch-size pairs)
    bucket: bool = True  # batch pairs of similar length together (sorted within chunks of 100 batches): less padding
    bleu_samples: int = 200  # val pairs translated greedily at every evaluation for BLEU and chrF (0 = off)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise LmforgeError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.length_unit not in ("tokens", "chars"):
            raise LmforgeError(f"--length-unit must be tokens or chars, got {self.length_unit!r}")
        for name in ("min_length", "max_length", "max_tokens", "bleu_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise LmforgeError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        if self.vocab_size < 1:
            raise LmforgeError(f"--vocab-size must be positive, got {self.vocab_size}")
        if self.max_length and self.max_length < self.min_length:
            raise LmforgeError(f"--max-length ({self.max_length}) is below --min-length ({self.min_length})")
        if not (self.max_ratio == 0 or self.max_ratio >= 1):
            raise LmforgeError(f"--max-ratio must be 0 (off) or >= 1, got {self.max_ratio}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise LmforgeError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.source_field or not self.target_field:
            raise LmforgeError("--source-field and --target-field must be non-empty")

    def length_filter(self) -> LengthFilter:
        return LengthFilter(self.min_length, self.max_length, self.max_ratio)
