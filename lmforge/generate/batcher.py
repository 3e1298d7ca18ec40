"""Continuous batching on the Engine: requests join the running decode batch between steps and
leave it when done, each with its own sampling parameters, seed and stop conditions.

The batch is a cache of `max_batch` rows (slots). A newcomer is prefilled alone into a free slot
(`KVCache.rows`), exactly as `Engine.generate_ids` prefills one prompt; every step then decodes
one token for every busy slot, each row at its own length (`NumpyDecoder.step(lengths=)`), and a
row's logits are the same bits as its sequence decoded alone — so a request's text does not
depend on who else is being served. Models the numpy decoder does not run (LoRA layers, GPUs)
decode row by row in torch on the same slots.

Prefix reuse: a slot's cache keeps what its last request wrote after the request ends, and a
newcomer takes the free slot whose kept tokens share the longest prefix with its prompt (a chat's
system prompt, or the whole earlier conversation), prefilling only the rest. This holds where
the numpy decoder prefills the prompt (a quantized model's prompt of up to
`numpy_decode.PREFILL_TOKENS` tokens): there every position's keys and values are the same bits
however the prompt was split, so the reply is still the one `Engine.generate_ids` gives.

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
from lmforge.generate.events import Event
from lmforge.generate.sampling import SamplingParams
from lmforge.runtime import inference_backend


@dataclass
class _Sequence:
    """One request's decoding state: its slot, sampling state and the text it has emitted."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None  # None: no log-probs; k: the picked token's and the top k
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the slot's cache
    reused: int = 0  # of those, the ones a finished request left there (prefix reuse)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the text already handed out
    generator: torch.Generator | None = None
    ending: set[int] = field(default_factory=set)
    banned: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    cancelled: bool = False


class ContinuousBatcher:
    """Owns the Engine's model for serving: `submit` requests, call `step` until they finish.
    Not thread-safe by itself: one generation thread calls submit/cancel/step (the server puts
    requests on a queue that thread drains).

    Prefill is chunked so that a long prompt does not stall the running requests: each step
    prefills at most `prefill_chunk` prompt tokens besides its decode step. A prompt of up to
    `prefill_chunk` tokens is prefilled whole in one step (never split: its cache is then the
    same bits as `Engine.generate_ids` computes); a longer one in pieces of `prefill_chunk`.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_len: int | None = None, prefill_chunk: int = 512,
                 reuse_prefix: bool = True):
        engine._decoder_only("continuous batching (serve)")
        if max_batch < 1:
            raise LmforgeError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise LmforgeError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self.max_len = min(max_len or engine.config.block_size, engine.config.block_size)
        self.prefill_chunk = prefill_chunk
        self.cache = self.model.new_cache(max_batch, self.max_len)
        self.lengths = np.zeros(max_batch, np.int64)
        self.free = list(range(max_batch))
        self.waiting: list[_Sequence] = []
        self.prefilling: list[_Sequence] = []  # holding a slot, prompt partly in its cache
        self.active: dict[int, _Sequence] = {}  # slot -> sequence (prefilling ones included)
        self.next_token: dict[int, int] = {}  # slot -> token to feed at the next step
        self._ids = itertools.count()
        self._decoder = None
        self._decoder_checked = False
        self.reuse_prefix = reuse_prefix
        # Per slot, the tokens whose keys/values its cache row holds at positions [0, len): kept
        # after its request ends, for the next one with the same prefix.
        self.held: list[list[int]] = [[] for _ in range(max_batch)]

    # -- requests ------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None) -> int:
        """Queue a request; returns its id. Refuses one that cannot fit a slot."""
        if not prompt_ids:
            raise LmforgeError("empty prompt")
        if len(prompt_ids) + params.max_new_tokens > self.max_len:
            raise LmforgeError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                               f"the context of {self.max_len} tokens")
        if logprobs is not None and not 0 <= logprobs <= self.engine.config.vocab_size:
            raise LmforgeError(f"logprobs must be in [0, vocab size], got {logprobs}")
        if params.beam or params.num_return_sequences > 1:
            raise LmforgeError("the batcher decodes one sequence per request: submit n requests for n sequences; "
                               "beam search runs in Engine.generate_ids")
        seq = _Sequence(next(self._ids), list(prompt_ids), params, logprobs)
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

    @property
    def decoding(self) -> int:
        """Requests in the decode batch now (prefilled, not finished)."""
        return len(self.next_token)

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One decode step for every request past its prefill, then prefill (up to
        `prefill_chunk` prompt tokens) of newcomers, whose last piece yields their first token.
        Returns the events of this step."""
        events: list[Event] = []
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            events.append(Event(seq.request_id, "", None, "cancelled"))
        for slot, seq in list(self.active.items()):
            if seq.cancelled:
                events.append(Event(seq.request_id, "", None, "cancelled"))
                self._release(slot)
        running = sorted(self.next_token)  # slots decoding this step (before newcomers join)
        with torch.inference_mode():
            if running:
                logits = self._decode(running)
                for row, slot in enumerate(running):
                    events.append(self._advance(self.active[slot], logits[row]))
            budget = self.prefill_chunk
            while budget:
                seq = self.prefilling[0] if self.prefilling else (self.waiting[0] if self.waiting and self.free else None)
                if seq is None:
                    break
                left = len(seq.prompt_ids) - seq.prefilled
                # A piece never splits a prompt that fits one chunk; a longer prompt goes in whole
                # chunks, one a step at most.
                piece = left if left <= self.prefill_chunk else self.prefill_chunk
                if piece > budget:
                    break
                budget -= piece
                if seq.slot < 0:
                    self._take_slot(self.waiting.pop(0))
                    left = len(seq.prompt_ids) - seq.prefilled  # less after a reused prefix
                    piece = min(piece, left)
                logits = self._prefill(seq, piece)
                if seq.prefilled < len(seq.prompt_ids):
                    if seq not in self.prefilling:
                        self.prefilling.append(seq)
                    break
                if seq in self.prefilling:
                    self.prefilling.remove(seq)
                events.append(event := self._advance(seq, logits))
                event.cached = seq.reused
        return events

    def _take_slot(self, seq: _Sequence) -> None:
        engine, p = self.engine, seq.params
        shared = [0] * len(self.free)
        best = 0  # the lowest free slot
        if self.reuse_prefix and self._numpy_prefill(seq):
            shared = [_shared_prefix(self.held[slot], seq.prompt_ids) for slot in self.free]
            # The longest shared prefix; on ties the slot holding the fewest tokens (the others'
            # may serve a later request), then the lowest.
            best = max(range(len(self.free)), key=lambda i: (shared[i], -len(self.held[self.free[i]]), -i))
        seq.slot = self.free.pop(best)
        # At least the last prompt token is prefilled: its logits give the first token.
        seq.prefilled = seq.reused = min(shared[best], len(seq.prompt_ids) - 1)
        self.held[seq.slot] = seq.prompt_ids[: seq.prefilled]
        self.lengths[seq.slot] = seq.prefilled
        self.active[seq.slot] = seq
        device = engine.device
        seq.generator = torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
        seq.ending = set(engine._ending_ids(p))
        seq.banned = engine._banned(p)
        if p.repetition_penalty != 1.0:
            seq.seen = torch.zeros((1, engine.config.vocab_size), dtype=torch.bool, device=device)
            seq.seen[0, torch.tensor(seq.prompt_ids, device=device)] = True
        if p.counts_tokens:
            seq.counts = torch.zeros((1, engine.config.vocab_size), dtype=torch.float32, device=device)

    def _numpy_prefill(self, seq: _Sequence) -> bool:
        """Whether seq's prompt is prefilled by the numpy decoder: by the same rule as
        `Engine.generate_ids`, so that its cache holds the same bits."""
        decoder = self._numpy_decoder()
        return decoder is not None and decoder.prefills(len(seq.prompt_ids))

    def _prefill(self, seq: _Sequence, n: int) -> torch.Tensor:
        """Run the next n prompt tokens of seq into its slot; the last position's logits [vocab]."""
        view = self.cache.rows(seq.slot, seq.slot + 1)
        view.pos = seq.prefilled
        piece = seq.prompt_ids[seq.prefilled : seq.prefilled + n]
        if self._numpy_prefill(seq):
            logits = self._numpy_decoder().prefill(piece, view)
        else:
            ids = torch.tensor([piece], dtype=torch.long, device=self.engine.device)
            logits = self.model(ids, cache=view, logits_to_keep=1)[0][0, -1]
        seq.prefilled += n
        if self.reuse_prefix:
            self.held[seq.slot] = seq.prompt_ids[: seq.prefilled]
        self.lengths[seq.slot] = seq.prefilled
        return logits

    def _decode(self, slots: list[int]) -> torch.Tensor:
        """Logits [len(slots), vocab] for the tokens waiting in `slots` (sorted), each at its own
        length. The numpy decoder takes just those rows of the cache in one step, wherever they
        are (prefix reuse picks slots by what they hold, not by place)."""
        decoder = self._numpy_decoder()
        # As in Engine._run: torch keeps one thread during steps run by numpy's kernels.
        with inference_backend(self.model, self.engine.backend, switch_layers=decoder is None):
            if decoder is not None:
                tokens = torch.tensor([[self.next_token[s]] for s in slots], dtype=torch.long)
                out = decoder.step(tokens, self.cache, lengths=self.lengths[slots], rows=np.array(slots, np.int64))
            else:  # the torch forward has one position per call: row by row
                rows = []
                for s in slots:
                    view = self.cache.rows(s, s + 1)
                    view.pos = int(self.lengths[s])
                    token = torch.tensor([[self.next_token[s]]], dtype=torch.long, device=self.engine.device)
                    rows.append(self.model(token, cache=view, logits_to_keep=1)[0])
                out = torch.cat(rows)
        # Keys/values a decode step wrote are prefill's bits too, except with int8 activations.
        keep = self.reuse_prefix and decoder is not None and not decoder.int8
        for s in slots:
            if keep:
                self.held[s].append(self.next_token[s])
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
        history = None
        if p.no_repeat_ngram_size:
            history = torch.tensor([seq.prompt_ids + seq.generated], dtype=torch.long, device=logits.device)
        tok = int(engine._pick(logits[None], p, len(seq.generated), seq.generator, seq.seen, seq.banned,
                               seq.counts, history)[0])
        logprob = top = None
        if seq.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            logprob = float(lp[tok])
            if seq.logprobs:
                values, ids = torch.topk(lp, seq.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        if seq.seen is not None:
            seq.seen[0, tok] = True
        if seq.counts is not None:
            seq.counts[0, tok] += 1
        if tok in seq.ending:
            return self._finish(seq, tok, "stop", include=False)
        seq.generated.append(tok)
        text = engine.tokenizer.decode(seq.generated)
        floor = engine._stop_floor(seq.generated, p) if p.stop else None
        cut = _find_stop(text, p.stop, floor) if floor is not None else None
        if cut is not None:
            piece = text[seq.emitted : cut] if cut > seq.emitted else ""
            seq.emitted = max(seq.emitted, cut)
            return self._finish(seq, tok, "stop", include=True, text=piece, logprob=logprob, top=top)
        if len(seq.generated) >= p.max_new_tokens:
            return self._finish(seq, tok, "length", include=True, logprob=logprob, top=top)
        safe = _safe_end(text, p.stop)
        piece = text[seq.emitted : safe] if safe > seq.emitted else ""
        seq.emitted = max(seq.emitted, safe)
        self.next_token[seq.slot] = tok
        return Event(seq.request_id, piece, tok, sampled=1, logprob=logprob, top_logprobs=top)

    def _finish(self, seq: _Sequence, tok: int, reason: str, *, include: bool, text: str | None = None,
                logprob: float | None = None, top: list | None = None) -> Event:
        if text is None:
            full = self.engine.tokenizer.decode(seq.generated)
            text = full[seq.emitted :]
            seq.emitted = len(full)
        self._release(seq.slot)
        return Event(seq.request_id, text, tok if include else None, reason, sampled=1,
                     logprob=logprob if include else None, top_logprobs=top if include else None)

    def _release(self, slot: int) -> None:
        seq = self.active.pop(slot, None)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self.next_token.pop(slot, None)
        self.lengths[slot] = 0
        self.free.append(slot)
        self.free.sort()


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share (64 at a time while they agree: a slot may hold a
    conversation of 2,000 tokens, compared for every newcomer)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i : i + 64] == b[i : i + 64]:
        i += 64
    i = min(i, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i
