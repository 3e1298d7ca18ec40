"""What the Engine does differently for an encoder-decoder (lmforge.model.seq2seq.Seq2Seq).

The Engine stays one class: for an encoder-decoder model it hands the model-specific part of a
generation to a `Seq2SeqDecoding` and keeps everything else (the one `_pick` sampler, stop tokens
and strings, min_new_tokens, the beam search of lmforge.generate.beam, Completions, streaming).
What differs:

* the "prompts" are sources: right-padded into one batch with a padding mask, run through the
  encoder once; every decoder layer's cross-attention keys/values are computed once per source
  (Seq2Seq.new_cache) and kept for the whole generation;
* the decoder starts from one token, the decoder start id (generation.json's
  decoder_start_token_id, else the tokenizer's bos, else its eos: the rule the mBART export
  writes for transformers, lmforge.interop.hf_seq2seq.decoder_start_id), so every row is at the
  same target position and the decoder needs no padding mask;
* what the penalties and the no-repeat-n-gram ban read as a row's tokens is its decoder input,
  the start token followed by the generated tokens, as in transformers' generate for
  encoder-decoders (the source is not part of it);
* beam search expands each source's self-attention cache rows to its beams once; after that only
  they follow the beams: a beam's parent is always a beam of the same source. The
  cross-attention keys/values (the same for all beams of a source) are kept once per source and
  the decoder's cross-attention takes a source's beams as its query positions (one call for
  all of them, the same math per beam).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.beam import BeamSettings, Hypothesis, beam_search

if TYPE_CHECKING:
    from lmforge.generate.params import SamplingParams
    from lmforge.model.seq2seq import Seq2Seq, Seq2SeqCache

Pick = Callable[..., torch.Tensor]


def default_start_id(tokenizer, generation: dict | None = None) -> int:
    """The decoder start token of a model dir: generation.json's decoder_start_token_id, else the
    tokenizer's bos, else its eos (the rule the mBART export writes for transformers)."""
    from lmforge.interop.hf_seq2seq import decoder_start_id

    start = decoder_start_id(tokenizer, generation)
    if start is None:
        raise LmforgeError("an encoder-decoder needs a decoder start token: set decoder_start_token_id in "
                           "generation.json, or give the tokenizer a bos or eos token")
    return start


class Seq2SeqDecoding:
    def __init__(self, model: "Seq2Seq", start_id: int, pad_id: int):
        vocab = model.config.vocab_size
        if not 0 <= start_id < vocab:
            raise LmforgeError(f"decoder_start_token_id {start_id} is outside the model's vocabulary of {vocab}")
        self.model = model
        self.start_id = start_id
        self.pad_id = pad_id  # source padding (masked: any id does) and finished rows' picks

    @property
    def device(self) -> torch.device:
        return self.model.device

    def check_length(self, source: list[int], params: "SamplingParams", truncate: str | None = None) -> list[int]:
        """A source must fit the encoder's positions and the target the decoder's: the start token
        and max_new_tokens - 1 generated tokens are fed (the last one never is). A source is never
        cut: dropping the end of a sentence to translate changes what it says."""
        block = self.model.config.block_size
        if truncate is not None:
            raise LmforgeError(f"truncate={truncate!r}: an encoder-decoder's source is never cut (it would translate "
                               f"part of a sentence); split sources longer than {block} tokens")
        self.check_target(params)
        if not source:
            raise LmforgeError("empty source: give some text to translate")
        if len(source) > block:
            raise LmforgeError(f"source of {len(source)} tokens exceeds the model's block_size {block}; split it")
        return source

    def check_target(self, params: "SamplingParams") -> None:
        block = self.model.config.block_size
        if params.max_new_tokens > block:
            raise LmforgeError(f"max_new_tokens {params.max_new_tokens} exceeds the decoder's block_size {block}")

    # -- the encoder pass and the cache ---------------------------------------------------------
    def _encode(self, sources: Sequence[Sequence[int]], max_len: int) -> "Seq2SeqCache":
        """Right-pad the sources (a mask only when lengths differ), run the encoder once and build
        the decoder cache: cross-attention keys/values for every layer, room for max_len targets."""
        lengths = [len(s) for s in sources]
        if min(lengths) == 0:
            raise LmforgeError("empty source: give some text to translate")
        block = self.model.config.block_size
        if max(lengths) > block:
            raise LmforgeError(f"source of {max(lengths)} tokens exceeds the model's block_size {block}; split it")
        if max_len > block:
            raise LmforgeError(f"max_new_tokens {max_len} exceeds the decoder's block_size {block}")
        device, B, S = self.device, len(sources), max(lengths)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long, device=device)
        for row, s in enumerate(sources):
            ids[row, : len(s)] = torch.as_tensor(list(s), dtype=torch.long, device=device)
        mask = None
        if min(lengths) != S:
            mask = torch.arange(S, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        memory = self.model.encode(ids, mask)
        return self.model.new_cache(memory, mask, max_len=max_len)

    def _first_logits(self, cache: "Seq2SeqCache", rows: int) -> torch.Tensor:
        start = torch.full((rows, 1), self.start_id, dtype=torch.long, device=self.device)
        return self.model.decode(start, cache=cache)[:, -1]

    # -- sampling and greedy ----------------------------------------------------------------------
    def steps(self, sources: list[list[int]], params: "SamplingParams", pick: Pick, stop_ids: torch.Tensor,
              banned: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (next_ids [B], alive [B] before this step) once per decode step, as the Engine's
        decoder-only loop does; `pick` is the Engine's one sampler."""
        from lmforge.generate.engine import require_finite_logits

        device, B, V, T = self.device, len(sources), self.model.config.vocab_size, params.max_new_tokens
        generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        cache = self._encode(sources, T)
        logits = self._first_logits(cache, B)
        require_finite_logits(logits, "at generated token 1")
        rows = torch.arange(B, device=device)
        # The decoder's input so far (no-repeat n-grams): the start token, then each row's picks,
        # what transformers' penalties and n-gram ban read for an encoder-decoder.
        history = seen = counts = start = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros((B, V), dtype=torch.bool, device=device)
            seen[:, self.start_id] = True
        if params.counts_tokens:
            counts = torch.zeros((B, V), dtype=torch.float32, device=device)
        if params.no_repeat_ngram_size:
            history = torch.full((B, T + 1), self.start_id, dtype=torch.long, device=device)
            start = torch.zeros(B, dtype=torch.long, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)
        for step in range(T):
            hist = None if history is None else history[:, : step + 1]
            nxt = pick(logits, params, step, generator, seen, banned, counts, hist, start)
            nxt = torch.where(alive, nxt, torch.full_like(nxt, self.pad_id))
            yield nxt, alive
            if history is not None:
                history[:, step + 1] = nxt
            alive = alive & ~torch.isin(nxt, stop_ids)
            if seen is not None:
                seen[rows, nxt] = True
            if counts is not None:
                counts[rows, nxt] += alive.float()
            if step == T - 1 or not bool(alive.any()):
                break
            logits = self.model.decode(nxt[:, None], cache=cache)[:, -1]
            require_finite_logits(logits, f"at generated token {step + 2}")

    # -- beam search ------------------------------------------------------------------------------
    def beam_search(self, sources: list[list[int]], settings: BeamSettings) -> list[list[Hypothesis]]:
        """lmforge.generate.beam's search over B sources x num_beams rows: the encoder runs once
        per source, the start token's logits once per source, then each source's self-attention cache rows are
        copied to its beams and decode as one batch; the cross-attention keys/values stay one
        copy per source (Seq2SeqCache.share_beams)."""
        from lmforge.generate.engine import require_finite_logits

        B, k = len(sources), settings.num_beams
        cache = self._encode(sources, settings.max_new_tokens)
        first = self._first_logits(cache, B)
        require_finite_logits(first, "at generated token 1")
        # Each source -> its beams' self-attention rows; its cross-attention keys/values stay one
        # copy, which the decoder reads with the source's beams as query positions.
        cache.share_beams(k)
        made = [1]

        def step(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
            # Parents stay within their source's beams: the cross-attention rows are already right;
            # only the self-attention rows of beams that switched parents move.
            cache.self_attn.follow(parents)
            out = self.model.decode(tokens[:, None], cache=cache)[:, -1]
            made[0] += 1
            require_finite_logits(out, f"at generated token {made[0]}")
            return out

        return beam_search(first, step, settings, prefixes=[[self.start_id]] * B)
