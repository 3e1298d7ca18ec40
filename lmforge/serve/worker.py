"""The generation thread: the one owner of the model while serving.

HTTP handlers never touch the model. They hand a `Ticket` (one request's sequences) to
`GenerationWorker.submit`, which is thread-safe; the worker thread feeds the ContinuousBatcher
from its inbox between steps and sends every Event back to the handler's asyncio queue through
the event loop (`call_soon_threadsafe`), so the loop never waits on a decode step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.generate.batcher import ContinuousBatcher, Event
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.protocol import ApiError

log = logging.getLogger("lmforge.serve")


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None


@dataclass
class Ticket:
    """One HTTP request's sequences (n choices, several prompts). Events arrive on `events` as
    (sequence index, Event), or (-1, exception) when the worker failed the request."""

    sequences: list[Sequence]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.perf_counter)
    ids: dict[int, int] = field(default_factory=dict)  # batcher request id -> sequence index
    left: int = 0  # sequences not finished
    cancelled: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None


class GenerationWorker:
    def __init__(self, engine: Engine, *, max_batch: int, max_len: int, max_queue: int, prefill_chunk: int,
                 metrics: ServeMetrics):
        self.engine = engine
        self.max_batch, self.max_len, self.max_queue, self.prefill_chunk = max_batch, max_len, max_queue, prefill_chunk
        self.metrics = metrics
        self.batcher = ContinuousBatcher(engine, max_batch=max_batch, max_len=max_len, prefill_chunk=prefill_chunk)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0  # sequences submitted and not finished: the bound on the queue
        self._owner: dict[int, Ticket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-generation", daemon=True)
        self._order = itertools.count()

    # -- called from the event loop ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def warm_up(self) -> None:
        """Run one short generation before serving, so the first request does not pay for the
        decode kernels' compilation and the backend's timing (seconds on a cold start)."""
        ids = self.engine.encode("Hello")
        rid = self.batcher.submit(ids, SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True))
        rid2 = self.batcher.submit(ids, SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
        done = set()
        while self.batcher.busy:
            done.update(e.request_id for e in self.batcher.step() if e.finish_reason)
        assert done == {rid, rid2}

    def submit(self, ticket: Ticket) -> None:
        """Queue a request's sequences; 429 when the queue is full (the caller tells the client
        when to retry)."""
        n = len(ticket.sequences)
        with self._lock:
            if self._outstanding + n > self.max_batch + self.max_queue:
                raise ApiError(429, f"the server is busy: {self._outstanding} sequences are running or queued "
                               f"(limit {self.max_batch} running + {self.max_queue} queued); retry shortly",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            self._outstanding += n
        ticket.left = n
        self.metrics.queue_depth.set(self.waiting())
        self._inbox.put(("submit", ticket))

    def cancel(self, ticket: Ticket) -> None:
        """Stop generating for a request (a closed stream, a client gone): within one step."""
        if not ticket.cancelled and ticket.left:
            ticket.cancelled = True
            self._inbox.put(("cancel", ticket))

    def waiting(self) -> int:
        with self._lock:
            return max(0, self._outstanding - self.batcher.decoding)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    # -- the generation thread --------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox(block=not self.batcher.busy)
            if not self.batcher.busy:
                continue
            started = time.perf_counter()
            try:
                events = self.batcher.step()
            except Exception as e:  # a bad request must not take the server down: fail the batch
                log.exception("generation step failed")
                self._fail_all(e)
                continue
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            now = time.perf_counter()
            for event in events:
                self._dispatch(event, now)
            self.metrics.batch_size.set(self.batcher.decoding)
            self.metrics.queue_depth.set(self.waiting())

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, ticket = item
            if kind == "submit":
                self._start(ticket)
            elif kind == "cancel":
                for rid in ticket.ids:
                    self.batcher.cancel(rid)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _start(self, ticket: Ticket) -> None:
        if ticket.cancelled:
            self._finished(ticket, len(ticket.sequences))
            return
        for index, seq in enumerate(ticket.sequences):
            try:
                rid = self.batcher.submit(seq.prompt_ids, seq.params, seq.logprobs)
            except LmforgeError as e:  # checked by the handler already; kept as a guard
                for started in ticket.ids:
                    self.batcher.cancel(started)
                self._send(ticket, -1, ApiError(400, str(e)))
                self._finished(ticket, len(ticket.sequences) - index)
                return
            ticket.ids[rid] = index
            self._owner[rid] = ticket

    def _dispatch(self, event: Event, now: float) -> None:
        ticket = self._owner.get(event.request_id)
        if ticket is None:
            return
        if event.sampled:
            self.metrics.generation_tokens.inc(event.sampled)
            if ticket.first_token_at is None:
                ticket.first_token_at = now
                self.metrics.ttft.observe(now - ticket.created)
            elif ticket.last_token_at is not None:
                self.metrics.inter_token.observe(now - ticket.last_token_at)
            ticket.last_token_at = now
        self._send(ticket, ticket.ids[event.request_id], event)
        if event.finish_reason:
            del self._owner[event.request_id]
            self._finished(ticket, 1)

    def _finished(self, ticket: Ticket, n: int) -> None:
        ticket.left -= n
        with self._lock:
            self._outstanding -= n
        if ticket.left <= 0:
            self.metrics.request_seconds.observe(time.perf_counter() - ticket.created)

    def _fail_all(self, error: Exception) -> None:
        """After a failed step the batch's state is unknown: fail every request in it, start over."""
        for rid, ticket in list(self._owner.items()):
            self._send(ticket, -1, ApiError(500, f"generation failed: {error}", type="server_error"))
            del self._owner[rid]
            self._finished(ticket, 1)
        self.batcher = ContinuousBatcher(self.engine, max_batch=self.max_batch, max_len=self.max_len,
                                         prefill_chunk=self.prefill_chunk)

    @staticmethod
    def _send(ticket: Ticket, index: int, item) -> None:
        try:
            ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, (index, item))
        except RuntimeError:  # the loop is closed: the server is going down
            pass
