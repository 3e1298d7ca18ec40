"""Continuous batching on the Engine: requests join the running decode batch between steps and
leave it when done, each with its own sampling parameters, seed and stop conditions.

The batch is a cache of `max_batch` rows (slots). A newcomer is prefilled alone into a free slot
(`KVCache.rows`), exactly as `Engine.generate_ids` prefills one prompt; every step then decodes
one token for every busy slot, each row at its own length (`NumpyDecoder.step(lengths=)`), and a
row's logits are the same bits as its sequence decoded alone — so a request's text does not
depend on who else is being served. Models the numpy decoder does not run (LoRA layers, GPUs)
decode row by row in torch on the same slots.

Tokens are picked by the Engine's own `_pick` and text is held back by the same rule as
`Engine.stream_ids` (`_safe_end`), so stopping and sampling behave as everywhere else.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine, _find_stop, _safe_end
from lmforge.generate.sampling import SamplingParams


@dataclass
class Event:
    """What one step produced for one request: new text (possibly empty: held back while it could
    start a stop string or ends in a partial UTF-8 character), and the finish reason at its end."""

    request_id: int
    text: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"


@dataclass
class _Sequence:
    """One request's decoding state: its slot, sampling state and the text it has emitted."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the text already handed out
    generator: torch.Generator | None = None
    ending: set[int] = field(default_factory=set)
    banned: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    cancelled: bool = False


class ContinuousBatcher:
    """Owns the Engine's model for serving: `submit` requests, call `step` until they finish.
    Not thread-safe by itself: one generation thread calls submit/cancel/step (the server puts
    requests on a queue that thread drains)."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_len: int | None = None):
        if max_batch < 1:
            raise LmforgeError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self.max_len = max_len or engine.config.block_size
        self.cache = self.model.new_cache(max_batch, self.max_len)
        self.lengths = np.zeros(max_batch, np.int64)
        self.free = list(range(max_batch))
        self.waiting: list[_Sequence] = []
        self.active: dict[int, _Sequence] = {}  # slot -> sequence
        self.next_token: dict[int, int] = {}  # slot -> token to feed at the next step
        self._ids = itertools.count()
        self._decoder = None
        self._decoder_checked = False

    # -- requests ------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a request; returns its id. Refuses one that cannot fit a slot."""
        if not prompt_ids:
            raise LmforgeError("empty prompt")
        if len(prompt_ids) + params.max_new_tokens > self.max_len:
            raise LmforgeError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                               f"the context of {self.max_len} tokens")
        seq = _Sequence(next(self._ids), list(prompt_ids), params)
        self.waiting.append(seq)
        return seq.request_id

    def cancel(self, request_id: int) -> None:
        """Drop a request (waiting or running) at the next step; its slot is freed then."""
        for seq in [*self.waiting, *self.active.values()]:
            if seq.request_id == request_id:
                seq.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Admit newcomers into free slots (their prefill yields their first token), then one
        decode step for every other busy slot. Returns the events of this step."""
        events: list[Event] = []
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            events.append(Event(seq.request_id, "", None, "cancelled"))
        for slot, seq in list(self.active.items()):
            if seq.cancelled:
                events.append(Event(seq.request_id, "", None, "cancelled"))
                self._release(slot)
        running = sorted(self.active)  # slots decoding this step (before newcomers join)
        with torch.inference_mode():
            if running:
                logits = self._decode(running)
                for row, slot in enumerate(running):
                    events.append(self._advance(self.active[slot], logits[row]))
            while self.waiting and self.free:
                seq = self.waiting.pop(0)
                events.append(self._admit(seq))
        return events

    def _admit(self, seq: _Sequence) -> Event:
        engine, p = self.engine, seq.params
        seq.slot = self.free.pop(0)
        self.active[seq.slot] = seq
        device = engine.device
        seq.generator = torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
        seq.ending = set(engine._ending_ids(p))
        seq.banned = engine._banned(p)
        if p.repetition_penalty != 1.0:
            seq.seen = torch.zeros((1, engine.config.vocab_size), dtype=torch.bool, device=device)
            seq.seen[0, torch.tensor(seq.prompt_ids, device=device)] = True
        view = self.cache.rows(seq.slot, seq.slot + 1)
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=device)
        logits, _ = self.model(ids, cache=view, logits_to_keep=1)
        self.lengths[seq.slot] = len(seq.prompt_ids)
        return self._advance(seq, logits[0, -1])

    def _decode(self, slots: list[int]) -> torch.Tensor:
        """Logits [len(slots), vocab] for the tokens waiting in `slots` (sorted), each at its own
        length. The numpy decoder takes the span of rows slots[0]..slots[-1] in one step: a free
        row inside it decodes a dummy token at its position 0 (overwritten by the next prefill
        there), which costs little beside reading every weight once for all rows."""
        first, last = slots[0], slots[-1] + 1
        decoder = self._numpy_decoder()
        if decoder is not None:
            tokens = torch.zeros((last - first, 1), dtype=torch.long, device=self.engine.device)
            for s in slots:
                tokens[s - first, 0] = self.next_token[s]
            out = decoder.step(tokens, self.cache.rows(first, last), lengths=self.lengths[first:last])
            out = out[[s - first for s in slots]]
        else:  # the torch forward has one position per call: row by row
            rows = []
            for s in slots:
                view = self.cache.rows(s, s + 1)
                view.pos = int(self.lengths[s])
                token = torch.tensor([[self.next_token[s]]], dtype=torch.long, device=self.engine.device)
                rows.append(self.model(token, cache=view, logits_to_keep=1)[0])
            out = torch.cat(rows)
        for s in slots:
            self.lengths[s] += 1
        return out[:, -1]

    def _numpy_decoder(self):
        if not self._decoder_checked:
            self._decoder_checked = True
            self._decoder = self.engine._decoder()
        return self._decoder

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> Event:
        """Sample seq's next token from its logits [vocab]; emit text; finish or keep the slot."""
        p, engine = seq.params, self.engine
        tok = int(engine._pick(logits[None], p, len(seq.generated), seq.generator, seq.seen, seq.banned)[0])
        if seq.seen is not None:
            seq.seen[0, tok] = True
        if tok in seq.ending:
            return self._finish(seq, tok, "stop", include=False)
        seq.generated.append(tok)
        text = engine.tokenizer.decode(seq.generated)
        floor = engine._stop_floor(seq.generated, p) if p.stop else None
        cut = _find_stop(text, p.stop, floor) if floor is not None else None
        if cut is not None:
            piece = text[seq.emitted : cut] if cut > seq.emitted else ""
            seq.emitted = max(seq.emitted, cut)
            return self._finish(seq, tok, "stop", include=False, text=piece)
        if len(seq.generated) >= p.max_new_tokens:
            return self._finish(seq, tok, "length", include=True)
        safe = _safe_end(text, p.stop)
        piece = text[seq.emitted : safe] if safe > seq.emitted else ""
        seq.emitted = max(seq.emitted, safe)
        self.next_token[seq.slot] = tok
        return Event(seq.request_id, piece, tok)

    def _finish(self, seq: _Sequence, tok: int, reason: str, *, include: bool, text: str | None = None) -> Event:
        if text is None:
            full = self.engine.tokenizer.decode(seq.generated)
            text = full[seq.emitted :]
            seq.emitted = len(full)
        self._release(seq.slot)
        return Event(seq.request_id, text, tok if include else None, reason)

    def _release(self, slot: int) -> None:
        self.active.pop(slot, None)
        self.next_token.pop(slot, None)
        self.lengths[slot] = 0
        self.free.append(slot)
        self.free.sort()
