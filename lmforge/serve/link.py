"""How the HTTP side reaches the generation loop (serve.worker): the same messages either way.

- `PipeLink`: `lmforge serve`. The HTTP server runs in a child process that never imports torch;
  the generation loop runs on the main thread of the main process; a pipe between them carries
  requests one way and each step's events the other (`PipeOutbox`, one message a step).
- `ThreadLink`: an in-process server (tests, notebooks): the loop on a thread, events handed to
  the event loop with `call_soon_threadsafe`.

The HTTP side keeps the tickets, the queue bound (Admission) and the metrics; the loop only
knows request keys.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time

from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.tickets import Admission, Failure, Ticket, deliver

log = logging.getLogger("lmforge.serve")


class _Link:
    def __init__(self, metrics: ServeMetrics, admission: Admission):
        self.metrics, self.admission = metrics, admission
        self.tickets: dict[int, Ticket] = {}
        self._keys = itertools.count(1)
        self.loop: asyncio.AbstractEventLoop | None = None

    def submit(self, ticket: Ticket) -> None:
        """Queue a request's sequences; 429 (ApiError) when the queue is full."""
        self.admission.take(ticket)
        ticket.key = next(self._keys)
        self.tickets[ticket.key] = ticket
        self.metrics.queue_depth.inc(len(ticket.sequences))
        self._post(("submit", ticket.key, ticket.sequences))

    def cancel(self, ticket: Ticket) -> None:
        """Stop generating for a request (a closed stream, a client gone): within one step."""
        if ticket.left > 0 and not ticket.cancelled:
            ticket.cancelled = True
            self._post(("cancel", ticket.key, None))

    def _deliver(self, key: int, index: int, item) -> None:
        ticket = self.tickets.get(key)
        if ticket is None:
            return
        deliver(ticket, index, item, self.metrics, self.admission)
        if ticket.left <= 0:
            del self.tickets[key]

    def _gauges(self, batch_size: int, waiting: int, step_seconds: list[float]) -> None:
        self.metrics.batch_size.set(batch_size)
        self.metrics.queue_depth.set(waiting)
        for seconds in step_seconds:
            self.metrics.step_seconds.observe(seconds)

    def _post(self, message: tuple) -> None:
        raise NotImplementedError


class ThreadLink(_Link):
    """The generation loop on a thread of this process; this object is its outbox too."""

    def __init__(self, inbox, metrics: ServeMetrics, admission: Admission):
        super().__init__(metrics, admission)
        self.inbox = inbox

    def _post(self, message: tuple) -> None:
        self.inbox.put(message)

    # -- the outbox, called on the generation thread --
    def send(self, key: int, index: int, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver, key, index, item)
        except RuntimeError:  # the event loop is closed: the server is going down
            pass

    def flush(self, batch_size: int, waiting: int, step_seconds: float | None) -> None:
        # prometheus_client's metrics are thread-safe
        self._gauges(batch_size, waiting, [] if step_seconds is None else [step_seconds])


class PipeLink(_Link):
    """The HTTP process's end of the pipe. Sends go through a thread of their own, so the event
    loop never blocks on a full pipe; replies are read on the loop when the pipe is readable."""

    def __init__(self, conn, metrics: ServeMetrics, admission: Admission, on_lost=None):
        super().__init__(metrics, admission)
        self.conn = conn
        self.on_lost = on_lost
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="lmforge-pipe-send", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._sender.start()
        loop.add_reader(self.conn.fileno(), self._readable)

    def close(self) -> None:
        self._outgoing.put(None)
        if self.loop is not None:
            self.loop.remove_reader(self.conn.fileno())

    def _post(self, message: tuple) -> None:
        self._outgoing.put(message)

    def _send_loop(self) -> None:
        while (message := self._outgoing.get()) is not None:
            try:
                self.conn.send(message)
            except OSError:  # the generation process is gone; _readable reports it
                return
        try:
            self.conn.send(("stop", 0, None))
        except OSError:
            pass

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                _, items, batch_size, waiting, steps = self.conn.recv()
                for key, index, item in items:
                    self._deliver(key, index, item)
                self._gauges(batch_size, waiting, steps)
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            log.error("the generation process stopped")
            for key in list(self.tickets):
                self._deliver(key, -1, Failure(503, "the generation process stopped"))
            if self.on_lost:
                self.on_lost()


class PipeOutbox:
    """The generation loop's end of the pipe: events go in one message per step, or fewer.

    Every message wakes the HTTP process, and on 2 cores that process runs on a core the decode
    kernels' threads are spinning on: each wake-up stalls a whole decode step's thread team
    (measured: 0.8 ms of HTTP-side CPU per streamed token cost 4 ms of decode time per token).
    So a step's text goes at once only when it matters to the client: a sequence's first token,
    its end, a failure. Other text waits until `interval` seconds have passed since the last
    message (a stream then carries a few tokens per chunk; 0 sends every step)."""

    def __init__(self, conn, interval: float = 0.0):
        self.conn = conn
        self.interval = interval
        self._items: list = []
        self._steps: list[float] = []
        self._urgent = False
        self._started: set[tuple[int, int]] = set()  # (request key, choice) that have sent a token
        self._last = None
        self._sent_at = 0.0

    def send(self, key: int, index: int, item) -> None:
        self._items.append((key, index, item))
        if isinstance(item, Failure):  # the whole request ends (index -1): forget all its choices
            self._urgent = True
            self._started = {started for started in self._started if started[0] != key}
        elif item.finish_reason:
            self._urgent = True
            self._started.discard((key, index))
        elif (key, index) not in self._started:
            self._started.add((key, index))
            self._urgent = True

    def flush(self, batch_size: int, waiting: int, step_seconds: float | None) -> None:
        if step_seconds is not None:
            self._steps.append(step_seconds)
        changed = (batch_size, waiting) != self._last
        if not (self._items or changed):
            return
        now = time.perf_counter()
        if not (self._urgent or changed or now - self._sent_at >= self.interval):
            return
        self.conn.send(("step", self._items, batch_size, waiting, self._steps))
        self._items, self._steps, self._urgent = [], [], False
        self._last, self._sent_at = (batch_size, waiting), now


class PipeInbox:
    """The generation loop's view of the requests coming through the pipe."""

    def __init__(self, conn):
        self.conn = conn

    def get(self, timeout: float | None) -> tuple | None:
        if not self.conn.poll(timeout or 0):
            return None
        return self.conn.recv()  # EOFError when the HTTP process is gone: the loop ends
