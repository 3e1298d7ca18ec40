"""The engine -> HTTP pipe sends a stream's text a few tokens at a time (PipeOutbox), and the
HTTP side writes events that arrived together as one chunk per choice (completions.stream)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing

from lmforge.generate.events import Event
from lmforge.generate.sampling import SamplingParams
from lmforge.serve.completions import Plan, Shape, stream
from lmforge.serve.link import PipeOutbox
from lmforge.serve.tickets import Failure, Sequence, Ticket


def _messages(conn) -> list[tuple]:
    out = []
    while conn.poll(0.05):
        out.append(conn.recv())
    return out


def test_outbox_sends_first_token_and_end_at_once_and_holds_the_rest():
    here, there = multiprocessing.Pipe()
    outbox = PipeOutbox(here, interval=3600.0)
    outbox.send(1, 0, Event(7, "Hel", 10, sampled=1))  # the first token: urgent
    outbox.flush(1, 0, 0.01)
    first = _messages(there)
    assert len(first) == 1 and [item.text for _, _, item in first[0][1]] == ["Hel"]
    assert first[0][4] == [0.01]
    for piece in ("lo", ",", " wor"):  # held: the interval has not passed, nothing changed
        outbox.send(1, 0, Event(7, piece, 11, sampled=1))
        outbox.flush(1, 0, 0.02)
    assert _messages(there) == []
    outbox.send(1, 0, Event(7, "ld", 12, "length", sampled=1))  # the end: urgent, carries what was held
    outbox.flush(0, 0, 0.03)
    (message,) = _messages(there)
    assert "".join(item.text for _, _, item in message[1]) == "lo, world"
    assert message[4] == [0.02, 0.02, 0.02, 0.03]  # every step's time reaches the metrics


def test_outbox_with_zero_interval_sends_every_step_and_failures_at_once():
    here, there = multiprocessing.Pipe()
    outbox = PipeOutbox(here, interval=0.0)
    for i, piece in enumerate(("a", "b", "c")):
        outbox.send(1, 0, Event(7, piece, i, sampled=1))
        outbox.flush(1, 0, 0.01)
    assert len(_messages(there)) == 3
    held = PipeOutbox(here, interval=3600.0)
    held.send(2, 0, Event(8, "x", 1, sampled=1))
    held.flush(1, 0, None)
    _messages(there)
    held.send(2, -1, Failure(500, "boom"))  # a failure ends the whole request
    held.flush(1, 0, None)
    (message,) = _messages(there)
    assert isinstance(message[1][0][2], Failure)
    assert held._started == set()  # nothing kept for a request that is over


class _Tok:
    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)


def _stream_chunks(events: list[tuple[int, Event]], n: int = 1) -> list[dict]:
    async def run():
        plan = Plan([Sequence([1], SamplingParams()) for _ in range(n)], prompt_tokens=1, n=n)
        ticket = Ticket(plan.sequences)
        for item in events:  # all queued before the stream reads: they arrived together
            ticket.events.put_nowait(item)
        return [chunk async for chunk in stream(plan, ticket, Shape(False, _Tok(), "m"), include_usage=True)]

    chunks = asyncio.run(run())
    assert chunks[-1] == "data: [DONE]\n\n"
    return [json.loads(c[len("data: "):]) for c in chunks[:-1]]


def test_events_that_arrive_together_go_out_as_one_chunk_per_choice():
    events = [(0, Event(1, "The", 1, sampled=1)), (1, Event(2, "A", 1, sampled=1)), (0, Event(1, " cat", 2, sampled=1)),
              (1, Event(2, " dog", 2, sampled=1)), (0, Event(1, " sat", 3, "length", sampled=1)),
              (1, Event(2, "", None, "stop", sampled=1))]
    chunks = _stream_chunks(events, n=2)
    texts = [(c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["finish_reason"])
             for c in chunks if c["choices"]]
    # a choice's text goes out before its finish chunk, in one piece
    assert texts == [(0, "The cat sat", None), (0, "", "length"), (1, "A dog", None), (1, "", "stop")]
    assert chunks[-1]["usage"]["completion_tokens"] == 6
