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
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of this size (prompt included), with or without beams (0 = off)
    num_beams: int = 1  # beam search with this many beams (1 = off): deterministic, so no temperature (the default is not applied)
    length_penalty: float = 1.0  # beam search: a hypothesis scores sum(log-probs) / length ** length_penalty (> 0 favours longer ones)
    early_stopping: str = "false"  # beam search, transformers' rule: true (stop once num_beams hypotheses are finished), false (also stop when a better one is unlikely) or never (only when none can be better)
    num_return_sequences: int = 1  # sequences per prompt: the best of the beams (<= num_beams), or independent samples

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
        for name in ("no_repeat_ngram_size", "num_beams", "num_return_sequences"):
            value = getattr(self, name)
            low = 0 if name == "no_repeat_ngram_size" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LmforgeError(f"{name} must be an integer >= {low}, got {value!r}")
        # transformers' early_stopping is True, False or "never": a string here, so that one
        # option takes all three on the command line; the booleans are accepted and normalised.
        stopping = self.early_stopping
        if isinstance(stopping, bool):
            stopping = "true" if stopping else "false"
        if not isinstance(stopping, str) or stopping.lower() not in ("true", "false", "never"):
            raise LmforgeError(f"early_stopping must be true, false or never, got {self.early_stopping!r}")
        self.early_stopping = stopping.lower()
        if self.num_beams > 1:
            if self.temperature > 0:
                raise LmforgeError(f"beam search is deterministic: num_beams {self.num_beams} with temperature "
                                   f"{self.temperature} (sampling) is refused; drop the temperature / do_sample, "
                                   "or use num_beams 1 to sample")
            if self.num_return_sequences > self.num_beams:
                raise LmforgeError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                                   f"({self.num_beams}): beam search returns its best finished beams")
        elif self.num_return_sequences > 1 and self.greedy:
            raise LmforgeError("greedy decoding returns one sequence: sample (temperature > 0) or use num_beams "
                               f">= {self.num_return_sequences} for num_return_sequences > 1")

    @property
    def counts_tokens(self) -> bool:
        """Whether picking a token needs the counts of the tokens generated so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def beam(self) -> bool:
        """Whether this is a beam search (num_beams > 1)."""
        return self.num_beams > 1

    @property
    def early_stopping_value(self) -> bool | str:
        """early_stopping as transformers takes it: True, False or "never"."""
        return {"true": True, "false": False}.get(self.early_stopping, self.early_stopping)
