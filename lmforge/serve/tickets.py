"""A request's journey between the HTTP side and the generation loop, in plain data (no torch):
its sequences, its ticket (where its events go), the bound on how many may wait, and what is
recorded when an event reaches the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from lmforge.generate.events import Event
from lmforge.generate.params import SamplingParams
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.protocol import ApiError


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None


@dataclass
class Failure:
    """An error the generation loop reports for a request (plain data: it may cross a pipe)."""

    status: int
    message: str
    type: str = "server_error"

    def error(self) -> ApiError:
        return ApiError(self.status, self.message, type=self.type)


@dataclass
class Ticket:
    """One HTTP request's sequences (n choices, several prompts). On the event-loop side, events
    arrive on `events` as (sequence index, Event), or (-1, ApiError) when the request failed."""

    sequences: list[Sequence]
    loop: asyncio.AbstractEventLoop | None = None
    key: int = 0  # the request's number on its link
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.perf_counter)
    ids: dict[int, int] = field(default_factory=dict)  # generation loop: batcher request id -> sequence index
    left: int = 0  # sequences not finished (event-loop side)
    cancelled: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None


class Admission:
    """The queue bound: at most `max_batch + max_queue` sequences running or waiting; past it a
    request is answered 429 with Retry-After (the caller retries shortly)."""

    def __init__(self, max_batch: int, max_queue: int):
        self.limit, self.max_batch, self.max_queue = max_batch + max_queue, max_batch, max_queue
        self.outstanding = 0
        self._lock = threading.Lock()

    def take(self, ticket: Ticket) -> None:
        n = len(ticket.sequences)
        with self._lock:
            if self.outstanding + n > self.limit:
                raise ApiError(429, f"the server is busy: {self.outstanding} sequences are running or queued "
                               f"(limit {self.max_batch} running + {self.max_queue} queued); retry shortly",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            self.outstanding += n
        ticket.left = n

    def release(self, n: int) -> None:
        with self._lock:
            self.outstanding -= n


def deliver(ticket: Ticket, index: int, item: Event | Failure, metrics: ServeMetrics, admission: Admission) -> None:
    """On the event loop: hand an event to its request, and count it."""
    now = time.perf_counter()
    if isinstance(item, Failure):
        if ticket.left > 0:
            admission.release(ticket.left)
            ticket.left = 0
            metrics.request_seconds.observe(now - ticket.created)
        ticket.events.put_nowait((-1, item.error()))
        return
    if item.cached:
        metrics.prompt_tokens_cached.inc(item.cached)
    if item.sampled:
        metrics.generation_tokens.inc(item.sampled)
        if ticket.first_token_at is None:
            ticket.first_token_at = now
            metrics.ttft.observe(now - ticket.created)
        elif ticket.last_token_at is not None:
            metrics.inter_token.observe(now - ticket.last_token_at)
        ticket.last_token_at = now
    if item.finish_reason and ticket.left > 0:
        ticket.left -= 1
        admission.release(1)
        if not ticket.left:
            metrics.request_seconds.observe(now - ticket.created)
    ticket.events.put_nowait((index, item))
