"""What a serving step hands out per request (no torch import: the server's HTTP process reads
these without loading the model's libraries)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Event:
    """What one step produced for one request: new text (possibly empty: held back while it could
    start a stop string or ends in a partial UTF-8 character), and the finish reason at its end."""

    request_id: int
    text: str
    token_id: int | None  # the token added to the text (None: an end token, or no token)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    sampled: int = 0  # tokens the model produced in this event, an end token included (usage counts these)
    logprob: float | None = None  # log p(token_id) under the model's own distribution, when asked
    top_logprobs: list[tuple[int, float]] | None = None  # the k most likely (token, log p), when asked
    cached: int = 0  # on a sequence's first event: its prompt tokens found in the cache, not prefilled
