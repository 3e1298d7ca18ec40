"""The generation loop: the one owner of the model while serving.

It takes requests from an inbox between steps — ("submit", key, sequences), ("cancel", key),
("stop", None) — feeds the ContinuousBatcher, and puts every Event in an outbox, flushed once per
step. `lmforge serve` runs it on the main thread of the main process, with the HTTP server in a
process of its own (serve.link): numba's OpenMP kernels spin-wait between parallel regions, and
on two cores an HTTP thread beside them in the same process waits on the GIL behind them — one
stream went from 75 to 4-15 tokens/s with 4 s to the first token; the same loop on a thread of
its own decoded at 33. In-process servers (tests, notebooks) run it on a thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Protocol

from lmforge.errors import LmforgeError
from lmforge.generate.batcher import ContinuousBatcher
from lmforge.generate.engine import Engine
from lmforge.generate.events import Event
from lmforge.generate.sampling import SamplingParams
from lmforge.serve.tickets import Failure, Sequence

log = logging.getLogger("lmforge.serve")


class Outbox(Protocol):
    def send(self, key: int, index: int, item: Event | Failure) -> None: ...

    def flush(self, batch_size: int, waiting: int, step_seconds: float | None) -> None: ...


class QueueInbox:
    """Requests from threads of the same process."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, message: tuple) -> None:
        self._queue.put(message)

    def get(self, timeout: float | None) -> tuple | None:
        try:
            return self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
        except queue.Empty:
            return None


class GenerationWorker:
    def __init__(self, engine: Engine, *, max_batch: int, max_len: int, prefill_chunk: int, reuse_prefix: bool = True):
        self.engine = engine
        self.max_batch, self.max_len, self.prefill_chunk = max_batch, max_len, prefill_chunk
        self.reuse_prefix = reuse_prefix
        self.batcher = self._new_batcher()
        self._owner: dict[int, tuple[int, int]] = {}  # batcher request id -> (request key, sequence index)
        self._requests: dict[int, list[int]] = {}  # request key -> its batcher request ids not finished
        self._stopped = False

    def warm_up(self) -> None:
        """Run one short generation before serving, so the first request does not pay for the
        decode kernels' compilation and the backend's timing (seconds on a cold start)."""
        ids = self.engine.encode("Hello")
        for n in (2, 3):  # two rows: a batched decode step too
            self.batcher.submit(ids, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
        while self.batcher.busy:
            self.batcher.step()

    def run(self, inbox, outbox: Outbox, until: Callable[[], bool] | None = None) -> None:
        """The loop, on the calling thread, until a "stop" message, a closed inbox or `until()`."""
        while not self._stopped and not (until and until()):
            if not self._take(inbox, outbox, block=not self.batcher.busy):
                break
            if not self.batcher.busy:
                outbox.flush(0, 0, None)  # a request refused while taking messages: its failure goes now
                continue
            started = time.perf_counter()
            try:
                events = self.batcher.step()
            except Exception as e:  # a bad request must not take the server down: fail the batch
                log.exception("generation step failed")
                self._fail_all(outbox, e)
                outbox.flush(0, 0, None)
                continue
            seconds = time.perf_counter() - started
            for event in events:
                self._route(outbox, event)
            outbox.flush(self.batcher.decoding, len(self.batcher.waiting) + len(self.batcher.prefilling), seconds)

    def _take(self, inbox, outbox: Outbox, block: bool) -> bool:
        """Apply every waiting message (waiting up to 0.5 s for one when idle); False once the
        inbox is closed (the HTTP side is gone)."""
        try:
            message = inbox.get(0.5 if block else None)
            while message is not None:
                kind, key, payload = message
                if kind == "submit":
                    self._start(key, payload, outbox)
                elif kind == "cancel":
                    for rid in self._requests.get(key, []):
                        self.batcher.cancel(rid)
                elif kind == "stop":
                    self._stopped = True
                message = inbox.get(None)
        except EOFError:
            return False
        return True

    def _start(self, key: int, sequences: list[Sequence], outbox: Outbox) -> None:
        rids = []
        for index, seq in enumerate(sequences):
            try:
                rid = self.batcher.submit(seq.prompt_ids, seq.params, seq.logprobs)
            except LmforgeError as e:  # checked by the HTTP side already; kept as a guard
                for started in rids:
                    self.batcher.cancel(started)
                outbox.send(key, -1, Failure(400, str(e), "invalid_request_error"))
                return
            self._owner[rid] = (key, index)
            rids.append(rid)
        self._requests[key] = rids

    def _route(self, outbox: Outbox, event: Event) -> None:
        owner = self._owner.get(event.request_id)
        if owner is None:
            return
        key, index = owner
        outbox.send(key, index, event)
        if event.finish_reason:
            del self._owner[event.request_id]
            rids = self._requests.get(key, [])
            if event.request_id in rids:
                rids.remove(event.request_id)
            if not rids:
                self._requests.pop(key, None)

    def _fail_all(self, outbox: Outbox, error: Exception) -> None:
        """After a failed step the batch's state is unknown: fail every request in it, start over."""
        for key in list(self._requests):
            outbox.send(key, -1, Failure(500, f"generation failed: {error}"))
        self._owner.clear()
        self._requests.clear()
        self.batcher = self._new_batcher()

    def _new_batcher(self) -> ContinuousBatcher:
        return ContinuousBatcher(self.engine, max_batch=self.max_batch, max_len=self.max_len,
                                 prefill_chunk=self.prefill_chunk, reuse_prefix=self.reuse_prefix)


def start_thread(worker: GenerationWorker, inbox: QueueInbox, outbox: Outbox) -> threading.Thread:
    thread = threading.Thread(target=worker.run, args=(inbox, outbox), name="lmforge-generation", daemon=True)
    thread.start()
    return thread
