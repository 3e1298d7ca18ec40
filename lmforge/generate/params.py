"""Sampling parameters (no torch import: the CLI builds its options from this dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import LmforgeError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128  # tokens to generate at most
    temperature: float = 0.8  # 0 = greedy; higher = more random
    top_k: int = 50  # keep only the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1 = off)
    min_p: float = 0.0  # drop tokens less likely than min_p x the top token's probability (0 = off)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text (CTRL-style)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already generated (-2..2)
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per earlier occurrence in the generated text (-2..2)
    stop: list[str] = field(default_factory=list)  # stop when the text contains any of these
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end generation
    seed: int | None = None  # same seed, same text
    min_new_tokens: int = 0  # no stop token or stop string ends the text before this many tokens
    ignore_eos: bool = False  # go on past the model's eos / end-of-turn tokens (kept in the text) to max_new_tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise LmforgeError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LmforgeError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LmforgeError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise LmforgeError(f"min_p must be in [0, 1), got {self.min_p}")
        if isinstance(self.min_new_tokens, bool) or not isinstance(self.min_new_tokens, int) \
                or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise LmforgeError(f"min_new_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], "
                               f"got {self.min_new_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise LmforgeError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise LmforgeError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise LmforgeError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    @property
    def counts_tokens(self) -> bool:
        """Whether picking a token needs the counts of the tokens generated so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
