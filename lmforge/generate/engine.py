"""The Engine: prefill + decode with a KV cache for any lmforge model. Chat, eval, the pipeline
and the server all generate through it, so sampling and stopping behave the same everywhere.

Batches of prompts of different lengths are left-padded: a key-padding mask hides the pads and
each row's positions start at 0 at its first real token, so a batched result equals the same
prompt run alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.sampling import SamplingParams, apply_repetition_penalty, next_tokens
from lmforge.model.gpt import GPT, KVCache
from lmforge.runtime import choose_inference_backend, inference_backend
from lmforge.tokenizer import Tokenizer


@dataclass
class _Batch:
    ids: torch.Tensor  # [B, longest] left-padded prompt ids
    total: int  # longest prompt + max_new_tokens: the cache length needed
    pad: int
    key_mask: torch.Tensor | None = None  # [B, total] True on real tokens (only when lengths differ)
    positions: torch.Tensor | None = None  # [B, longest] each row's positions, 0 at its first token
    next_pos: torch.Tensor | None = None  # [B] position of each row's next token
    seen: torch.Tensor | None = None  # [B, V] tokens seen so far (repetition penalty)


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # generated tokens, the stop token excluded
    text: str  # decoded generated text, cut before a stop string
    finish_reason: str  # "stop" (eos / stop token / stop string) or "length"


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, *, stop_token_ids: Sequence[int] = ()):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        # One place decides what ends a generation: the tokenizer's eos and end-of-turn tokens,
        # plus whatever the model dir's generation defaults name.
        stops = set(stop_token_ids)
        if tokenizer.eos_id is not None:
            stops.add(tokenizer.eos_id)
        end_of_turn = tokenizer.hf.token_to_id("<|im_end|>")
        if end_of_turn is not None:
            stops.add(end_of_turn)
        self.stop_token_ids = sorted(stops)
        self._cache: KVCache | None = None
        self.backend = choose_inference_backend(model)

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    def _cache_for(self, batch_size: int, max_len: int) -> KVCache:
        """Reuse the preallocated cache when it is large enough; grow it otherwise."""
        c = self._cache
        if c is None or c.batch_size != batch_size or c.max_len < max_len:
            self._cache = None  # free the old one before allocating
            self._cache = self.model.new_cache(batch_size, max_len)
        self._cache.reset()
        return self._cache

    def encode(self, prompt: str) -> list[int]:
        if not prompt:
            raise LmforgeError("empty prompt: give some text to continue")
        return self.tokenizer.encode(prompt)

    def check_length(self, prompt_ids: list[int], params: SamplingParams, truncate: str | None = None) -> list[int]:
        """Refuse (or cut from the left, with truncate='left') a prompt that leaves no room."""
        room = self.config.block_size - params.max_new_tokens
        if len(prompt_ids) > room:
            if truncate == "left" and room > 0:
                return prompt_ids[-room:]
            raise LmforgeError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                f"model's context of {self.config.block_size} tokens; shorten it or use --truncate left"
            )
        return prompt_ids

    # -- the core loop -------------------------------------------------------------------
    def _prepare(self, prompts: list[list[int]], params: SamplingParams) -> "_Batch":
        """Left-pad the prompts; build the padding mask and positions when lengths differ."""
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise LmforgeError("empty prompt: give some text to continue")
        longest = max(lengths)
        total = longest + params.max_new_tokens
        if total > self.config.block_size:
            raise LmforgeError(
                f"prompt of {longest} tokens + max_new_tokens {params.max_new_tokens} exceeds the model's "
                f"context of {self.config.block_size} tokens"
            )
        device, B = self.device, len(prompts)
        pad = self.stop_token_ids[0] if self.stop_token_ids else 0
        ids = torch.full((B, longest), pad, dtype=torch.long, device=device)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        batch = _Batch(ids=ids, total=total, pad=pad)
        if min(lengths) != longest:
            batch.key_mask = torch.zeros((B, total), dtype=torch.bool, device=device)
            for row, n in enumerate(lengths):
                batch.key_mask[row, longest - n : longest] = True
            batch.positions = (batch.key_mask[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
            batch.next_pos = torch.tensor(lengths, dtype=torch.long, device=device)
        if params.repetition_penalty != 1.0:
            batch.seen = torch.zeros((B, self.config.vocab_size), dtype=torch.bool, device=device)
            for row, p in enumerate(prompts):
                batch.seen[row, torch.tensor(p, device=device)] = True
        return batch

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (next_ids [B], alive [B] before this step) once per decode step."""
        if not prompts:
            return
        batch = self._prepare(prompts, params)
        steps = self._steps(batch, params)
        while True:
            # Inference mode and the BLAS backend hold only while a step runs, never while the
            # caller holds control between tokens (a streaming consumer may run torch code).
            with torch.inference_mode(), inference_backend(self.model, self.backend):
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item

    def _steps(self, b: "_Batch", params: SamplingParams) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device, B = self.device, b.ids.shape[0]
        generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        stop_ids = torch.tensor(self.stop_token_ids + list(params.stop_token_ids), dtype=torch.long, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)
        cache = self._cache_for(B, b.total)
        longest = b.ids.shape[1]
        logits, _ = self.model(b.ids, positions=b.positions, cache=cache, logits_to_keep=1,
                               attn_mask=None if b.key_mask is None else b.key_mask[:, :longest])
        for step in range(params.max_new_tokens):
            last = logits[:, -1, :]
            if b.seen is not None:
                last = apply_repetition_penalty(last.float(), b.seen, params.repetition_penalty)
            nxt = next_tokens(last, params, generator)
            nxt = torch.where(alive, nxt, torch.full_like(nxt, b.pad))
            yield nxt, alive
            alive = alive & ~torch.isin(nxt, stop_ids)
            if b.seen is not None:
                b.seen[torch.arange(B, device=device), nxt] = True
            if step == params.max_new_tokens - 1 or not bool(alive.any()):
                break
            if b.key_mask is not None:
                b.key_mask[:, cache.pos] = True
                logits, _ = self.model(nxt[:, None], positions=b.next_pos[:, None], cache=cache, logits_to_keep=1,
                                       attn_mask=b.key_mask[:, : cache.pos + 1])
                b.next_pos += 1
            else:
                logits, _ = self.model(nxt[:, None], cache=cache, logits_to_keep=1)

    # -- public API ----------------------------------------------------------------------
    def generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Generate for a batch of token-id prompts; one Completion per prompt."""
        B = len(prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        done = [False] * B
        stop_set = set(self.stop_token_ids) | set(params.stop_token_ids)
        for nxt, alive in self._run(prompts, params):
            for row, (tok, live) in enumerate(zip(nxt.tolist(), alive.tolist())):
                if not live or done[row]:
                    continue
                if tok in stop_set:
                    done[row], reasons[row] = True, "stop"
                    continue
                out[row].append(tok)
                if params.stop and _find_stop(self.tokenizer.decode(out[row]), params.stop) is not None:
                    done[row], reasons[row] = True, "stop"
            if params.stop and all(done):
                break
        completions = []
        for row in range(B):
            text = self.tokenizer.decode(out[row])
            cut = _find_stop(text, params.stop) if params.stop else None
            if cut is not None:
                text = text[:cut]
            completions.append(Completion(list(prompts[row]), out[row], text, reasons[row]))
        return completions

    def generate(self, prompts: list[str], params: SamplingParams, truncate: str | None = None) -> list[Completion]:
        ids = [self.check_length(self.encode(p), params, truncate) for p in prompts]
        return self.generate_ids(ids, params)

    def stream_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the generated text in pieces as it is produced (batch of one).

        Text is held back while it ends in an incomplete UTF-8 character (byte-level tokens can
        split one) or could be the start of a stop string, so what is yielded is never taken back.
        """
        stop_set = set(self.stop_token_ids) | set(params.stop_token_ids)
        generated: list[int] = []
        emitted = 0
        for nxt, _alive in self._run([prompt_ids], params):
            tok = int(nxt[0])
            if tok in stop_set:
                break
            generated.append(tok)
            text = self.tokenizer.decode(generated)
            cut = _find_stop(text, params.stop) if params.stop else None
            if cut is not None:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = len(text)
            if text.endswith("\ufffd"):
                safe = text.rfind("\ufffd")
                while safe > 0 and text[safe - 1] == "\ufffd":
                    safe -= 1
            safe = min(safe, _stop_prefix_start(text, params.stop))
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = self.tokenizer.decode(generated)
        if len(text) > emitted:
            yield text[emitted:]

    def stream(self, prompt: str, params: SamplingParams, truncate: str | None = None) -> Iterator[str]:
        return self.stream_ids(self.check_length(self.encode(prompt), params, truncate), params)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i != -1]
    return min(hits) if hits else None


def _stop_prefix_start(text: str, stops: Sequence[str]) -> int:
    """Where a possible partial stop string at the end of `text` begins (len(text) if none)."""
    start = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                start = min(start, len(text) - k)
                break
    return start
