"""The Engine: prefill + decode with a KV cache for any lmforge model. Chat, eval, the pipeline
and the server all generate through it, so sampling and stopping behave the same everywhere.

Batches of prompts of different lengths are left-padded: a key-padding mask hides the pads and
each row's positions start at 0 at its first real token, so a batched result equals the same
prompt run alone.

An encoder-decoder model runs through the same Engine: its prompts are sources, and the part
that differs (the encoder pass, the cross-attention cache, the decoder start token) is
lmforge.generate.seq2seq_decode's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.beam import BeamSettings, beam_search, ngram_ban_mask
from lmforge.generate.sampling import SamplingParams, apply_presence_frequency, apply_repetition_penalty, next_tokens
from lmforge.model.gpt import GPT, KVCache
from lmforge.generate.backend import choose_inference_backend
from lmforge.runtime import inference_backend
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:  # numpy_decode loads numba: imported where a decoder is built
    from lmforge.generate.numpy_decode import NumpyDecoder


def require_finite_logits(logits: torch.Tensor, where: str) -> None:
    """Refuse NaN/Inf logits: sampling from them picks token 0 or garbage, and scores turn NaN,
    so a corrupt model would otherwise "work" and print empty text or a null perplexity."""
    # The smallest and largest value are finite iff all are (NaN propagates through both): two
    # numbers to check instead of a mask of every logit (0.64 -> 0.08 ms for 8 x 49152 logits).
    if not all(bool(torch.isfinite(v)) for v in torch.aminmax(logits)):
        raise LmforgeError(f"the model produced non-finite logits (NaN or Inf) {where}: its weights are corrupt "
                           f"or overflow in {logits.dtype}; check the model dir, or load it in float32")


@dataclass
class _Batch:
    ids: torch.Tensor  # [B, longest] left-padded prompt ids
    total: int  # longest prompt + max_new_tokens: the cache length needed
    pad: int
    key_mask: torch.Tensor | None = None  # [B, total] True on real tokens (only when lengths differ)
    positions: torch.Tensor | None = None  # [B, longest] each row's positions, 0 at its first token
    next_pos: torch.Tensor | None = None  # [B] position of each row's next token
    seen: torch.Tensor | None = None  # [B, V] tokens seen so far (repetition penalty)
    counts: torch.Tensor | None = None  # [B, V] float: tokens generated so far (presence/frequency penalty)
    history: torch.Tensor | None = None  # [B, total] prompt + generated tokens, left-padded (no-repeat n-grams)
    start: torch.Tensor | None = None  # [B] where each row's own tokens start in `history`


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # generated tokens, the stop token excluded
    text: str  # decoded generated text, cut before a stop string
    finish_reason: str  # "stop" (eos / stop token / stop string) or "length"
    score: float | None = None  # beam search: the hypothesis' score, sum of log-probs / length ** length_penalty


@dataclass
class TokenScores:
    """What the model thinks of each token of a sequence from `start` on, given all before it."""

    logprobs: torch.Tensor  # [n] float32: log p(ids[i] | ids[:i]) for i in start..len-1
    greedy: torch.Tensor  # [n] bool: ids[i] was the model's most likely next token
    top_ids: torch.Tensor | None = None  # [n] int64: the model's most likely token at each of those positions
    top_logprobs: torch.Tensor | None = None  # [n] float32: its log-probability

    @property
    def total(self) -> float:
        return float(self.logprobs.double().sum())

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, *, stop_token_ids: Sequence[int] = (),
                 int8_activations: bool = False, decoder_start_id: int | None = None,
                 source_separator_id: int | None = None):
        """int8_activations: decode a quantized model with its products' inputs rounded to int8
        per block (as llama.cpp does; lmforge.quant.kernels): faster batched steps, text that
        leaves the exact model's after some tokens. Refused for models it cannot apply to.

        An encoder-decoder (Seq2Seq) generates through the same methods: its prompts are sources,
        encoded once each; the model-specific part is lmforge.generate.seq2seq_decode's.
        decoder_start_id: the token its decoder starts from (default: the tokenizer's bos, else
        its eos; a model dir's generation.json may name it: `seq2seq_decode.default_start_id`).
        source_separator_id: makes a decoder-only model a translator (lmforge.generate.translate):
        it was trained on `source <sep> target <eos>`, so a source is prompted as `source <sep>`
        (generation.json's source_separator_token_id)."""
        self._s2s = None
        if model.config.is_encoder_decoder:
            from lmforge.generate.seq2seq_decode import Seq2SeqDecoding, default_start_id

            if int8_activations:
                raise LmforgeError("int8_activations is for quantized decoder-only models, not an encoder-decoder")
            start = default_start_id(tokenizer) if decoder_start_id is None else decoder_start_id
            pad = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
            self._s2s = Seq2SeqDecoding(model, start, pad)
        elif decoder_start_id is not None:
            raise LmforgeError("decoder_start_id is for encoder-decoder models; this one is decoder-only")
        if source_separator_id is not None:
            if model.config.is_encoder_decoder:
                raise LmforgeError("source_separator_id is for decoder-only translators; an encoder-decoder reads its source apart")
            if not 0 <= source_separator_id < model.config.vocab_size:
                raise LmforgeError(f"source_separator_id {source_separator_id} is outside the vocabulary of {model.config.vocab_size}")
        self.source_separator_id = source_separator_id
        self.model = model.eval()
        self.int8_activations = int8_activations
        if int8_activations:
            from lmforge.generate.numpy_decode import check_int8_activations

            check_int8_activations(self.model)
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
        # The numpy decoder and its timing are GPT's: an encoder-decoder decodes in torch.
        self._backend: str | None = "torch" if self._s2s is not None else None

    @classmethod
    def for_loaded(cls, loaded, **kwargs) -> "Engine":
        """An Engine for a registry LoadedModel: its generation.json's stop tokens and, for an
        encoder-decoder, its decoder start token (decoder_start_token_id, else bos, else eos);
        for a decoder-only translator, its source_separator_token_id."""
        if loaded.model.config.is_encoder_decoder and "decoder_start_id" not in kwargs:
            from lmforge.generate.seq2seq_decode import default_start_id

            kwargs["decoder_start_id"] = default_start_id(loaded.tokenizer, loaded.generation)
        sep = loaded.generation.get("source_separator_token_id")
        if sep is not None and "source_separator_id" not in kwargs and not loaded.model.config.is_encoder_decoder:
            if not isinstance(sep, int) or isinstance(sep, bool):
                raise LmforgeError(f"{loaded.path}: generation.json's source_separator_token_id must be a token id, got {sep!r}")
            kwargs["source_separator_id"] = sep
        return cls(loaded.model, loaded.tokenizer, stop_token_ids=loaded.generation.get("stop_token_ids", ()), **kwargs)

    @property
    def backend(self) -> str:
        """The decode backend, measured on first use (backend.choose_inference_backend): an Engine
        that only scores never times decode steps nor loads the decoder's kernels."""
        if self._backend is None:
            self._backend = choose_inference_backend(self.model)
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value

    @property
    def decode_backend_used(self) -> str | None:
        """The decode backend this Engine's generations ran with (for results to record), None
        while it has not generated: scoring never depends on it."""
        return self._backend

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_encoder_decoder(self) -> bool:
        return self._s2s is not None

    @property
    def translates(self) -> bool:
        """An encoder-decoder, or a decoder-only model trained on `source <sep> target`."""
        return self._s2s is not None or self.source_separator_id is not None

    def require_translator(self) -> None:
        if not self.translates:
            raise LmforgeError(f"{self.config.name}: translation needs an encoder-decoder model, or a decoder-only one trained "
                               "on `source <sep> target` pairs (generation.json's source_separator_token_id); this one "
                               "continues a prompt: use generate or pipeline('text-generation')")

    def translation_prompt(self, source_ids: Sequence[int]) -> list[int]:
        """What a translator is given for a tokenized source: the source itself (an encoder-decoder
        encodes it), or `source <sep>` (a decoder-only translator continues it with the target)."""
        self.require_translator()
        ids = list(source_ids)
        return ids if self._s2s is not None else ids + [self.source_separator_id]

    @property
    def decoder_start_id(self) -> int | None:
        """The encoder-decoder's decoder start token (None for a decoder-only model)."""
        return None if self._s2s is None else self._s2s.start_id

    def _decoder_only(self, what: str) -> None:
        if self._s2s is not None:
            raise LmforgeError(f"{self.config.name}: {what} is for decoder-only models; an encoder-decoder "
                               "generates from a source (generate_ids, beam_search, translate)")

    def _cache_for(self, batch_size: int, max_len: int) -> KVCache:
        """Reuse the preallocated cache when it is large enough; grow it otherwise."""
        c = self._cache
        if c is None or c.batch_size != batch_size or c.max_len < max_len:
            self._cache = None  # free the old one before allocating
            self._cache = self.model.new_cache(batch_size, max_len)
        self._cache.reset()
        return self._cache

    def encode(self, prompt: str) -> list[int]:
        """A prompt's token ids; an encoder-decoder's source as transformers' tokenizer(text)
        encodes it, with whatever its tokenizer.json's post-processor adds (e.g. an eos)."""
        if not prompt:
            raise LmforgeError("empty source: give some text to translate" if self._s2s is not None
                               else "empty prompt: give some text to continue")
        if self._s2s is not None:
            return self.tokenizer.hf.encode(prompt, add_special_tokens=True).ids
        return self.tokenizer.encode(prompt)

    def check_length(self, prompt_ids: list[int], params: SamplingParams, truncate: str | None = None) -> list[int]:
        """Refuse (or cut from the left, with truncate='left') a prompt that leaves no room. An
        encoder-decoder's source and target have their own room: see Seq2SeqDecoding.check_length."""
        if self._s2s is not None:
            return self._s2s.check_length(prompt_ids, params, truncate)
        room = self.config.block_size - params.max_new_tokens
        if len(prompt_ids) > room:
            if truncate == "left" and room > 0:
                return prompt_ids[-room:]
            raise LmforgeError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                f"model's context of {self.config.block_size} tokens; shorten it or use --truncate left"
            )
        return prompt_ids

    def _ending_ids(self, params: SamplingParams) -> list[int]:
        """The token ids that end this generation. ignore_eos drops the model's own (eos,
        end-of-turn, generation.json's) and keeps the request's stop_token_ids, as vLLM does."""
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids.update(self.stop_token_ids)
        return sorted(ids)

    def _stop_floor(self, ids: list[int], params: SamplingParams) -> int | None:
        """Stop strings count only from min_new_tokens on, and only those ending in the text of
        token min_new_tokens or later (vLLM's rule): the length of the text before that token,
        or None while fewer tokens are out."""
        n = params.min_new_tokens
        if len(ids) < n:
            return None
        return len(self.tokenizer.decode(ids[: n - 1])) if n > 1 else 0

    def _banned_ids(self, params: SamplingParams) -> list[int]:
        """min_new_tokens keeps every stop token out of the first picks, even one ignore_eos lets
        through (as vLLM)."""
        return sorted(i for i in set(self.stop_token_ids) | set(params.stop_token_ids) if 0 <= i < self.config.vocab_size)

    def _banned(self, params: SamplingParams) -> torch.Tensor | None:
        """min_new_tokens: a [vocab] mask of `_banned_ids`; None without it."""
        if not params.min_new_tokens:
            return None
        banned = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.device)
        banned[torch.tensor(self._banned_ids(params), dtype=torch.long, device=self.device)] = True
        return banned

    @staticmethod
    def _pick(last: torch.Tensor, params: SamplingParams, step: int, generator: torch.Generator | None,
              seen: torch.Tensor | None, banned: torch.Tensor | None,
              counts: torch.Tensor | None = None, history: torch.Tensor | None = None,
              start: torch.Tensor | None = None) -> torch.Tensor:
        """The next token of each row from its logits [B, vocab], all rows at generated token
        `step` + 1: the one place logits are turned into tokens, for every caller (the Engine's
        batches, the serving batcher's rows). history [B, L] (each row's tokens so far, its own
        from start[b] on) is needed with no_repeat_ngram_size."""
        require_finite_logits(last, f"at generated token {step + 1}")
        if seen is not None:
            last = apply_repetition_penalty(last.float(), seen, params.repetition_penalty)
        if counts is not None:
            last = apply_presence_frequency(last.float(), counts, params)
        if banned is not None and step < params.min_new_tokens:
            last = last.masked_fill(banned, float("-inf"))
        if params.no_repeat_ngram_size:
            if history is None:
                raise LmforgeError("no_repeat_ngram_size needs each row's tokens so far")
            ban = ngram_ban_mask(history, params.no_repeat_ngram_size, last.shape[-1], start)
            if ban is not None:
                last = last.masked_fill(ban, float("-inf"))
        return next_tokens(last, params, generator)

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
        if params.repetition_penalty != 1.0 and not params.beam:  # beam search keeps its own
            batch.seen = torch.zeros((B, self.config.vocab_size), dtype=torch.bool, device=device)
            for row, p in enumerate(prompts):
                batch.seen[row, torch.tensor(p, device=device)] = True
        if params.counts_tokens:
            batch.counts = torch.zeros((B, self.config.vocab_size), dtype=torch.float32, device=device)
        if params.no_repeat_ngram_size and not params.beam:  # beam search keeps its own (lmforge.generate.beam)
            batch.history = torch.zeros((B, total), dtype=torch.long, device=device)
            batch.history[:, :longest] = ids
            batch.start = torch.tensor([longest - n for n in lengths], dtype=torch.long, device=device)
        return batch

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (next_ids [B], alive [B] before this step) once per decode step."""
        if not prompts:
            return
        if self._s2s is not None:
            stop_ids = torch.tensor(self._ending_ids(params), dtype=torch.long, device=self.device)
            steps = self._s2s.steps(prompts, params, self._pick, stop_ids, self._banned(params))
            while True:  # inference mode only while a step runs, as below
                with torch.inference_mode():
                    try:
                        item = next(steps)
                    except StopIteration:
                        return
                yield item
        batch = self._prepare(prompts, params)
        decoder = self._decoder()
        steps = self._steps(batch, params, decoder)
        # The first step is the prefill: compute-bound, where torch's GEMM on all threads beats
        # numpy's BLAS beside a one-thread torch (512 tokens of SmolLM2: ~540 vs ~470 tokens/s).
        backend = "torch"
        while True:
            # Inference mode and the BLAS backend hold only while a step runs, never while the
            # caller holds control between tokens (a streaming consumer may run torch code).
            # With the decoder, torch's layers never run a decode step: no BLAS switch to flip.
            with torch.inference_mode(), inference_backend(self.model, backend, switch_layers=decoder is None):
                try:
                    item = next(steps)
                except StopIteration:
                    return
            backend = self.backend
            yield item

    def _decoder(self) -> "NumpyDecoder | None":
        """The NumpyDecoder for decode steps where the "numpy" backend measured faster, else None.
        Built while torch still has all its threads: the decoder's kernels take that many."""
        from lmforge.generate import numpy_decode  # imported on use: it loads numba

        if self.int8_activations:  # the numpy decoder's arithmetic, whatever the timing said
            decoder = numpy_decode.decoder_for(self.model, int8_activations=True)
        elif self.backend != "numpy":
            return None
        else:
            decoder = numpy_decode.decoder_for(self.model)
        if decoder is not None:
            if getattr(self, "_governor", None) is None or self._governor.full != decoder.threads:
                self._governor = decoder.governor
            decoder.governor = self._governor
        return decoder

    def _steps(self, b: "_Batch", params: SamplingParams,
               decoder: "NumpyDecoder | None") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device, B = self.device, b.ids.shape[0]
        generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        stop_ids = torch.tensor(self._ending_ids(params), dtype=torch.long, device=device)
        banned = self._banned(params)
        alive = torch.ones(B, dtype=torch.bool, device=device)
        cache = self._cache_for(B, b.total)
        longest = b.ids.shape[1]
        if B == 1 and b.key_mask is None and decoder is not None and decoder.prefills(longest):
            # A quantized model's short prompt: the decoder's prefill, as the serving batcher's
            logits = decoder.prefill(b.ids[0].tolist(), cache)[None, None]
        else:
            logits, _ = self.model(b.ids, positions=b.positions, cache=cache, logits_to_keep=1,
                                   attn_mask=None if b.key_mask is None else b.key_mask[:, :longest])
        for step in range(params.max_new_tokens):
            history = None if b.history is None else b.history[:, : longest + step]
            nxt = self._pick(logits[:, -1, :], params, step, generator, b.seen, banned, b.counts, history, b.start)
            nxt = torch.where(alive, nxt, torch.full_like(nxt, b.pad))
            yield nxt, alive
            if b.history is not None:
                b.history[:, longest + step] = nxt
            alive = alive & ~torch.isin(nxt, stop_ids)
            if b.seen is not None:
                b.seen[torch.arange(B, device=device), nxt] = True
            if b.counts is not None:  # finished rows pick pads: not counted, they pick nothing more
                b.counts[torch.arange(B, device=device), nxt] += alive.float()
            if step == params.max_new_tokens - 1 or not bool(alive.any()):
                break
            positions = mask = None
            if b.key_mask is not None:  # left-padded rows: each has its own position
                b.key_mask[:, cache.pos] = True
                positions, mask = b.next_pos[:, None], b.key_mask[:, : cache.pos + 1]
            if decoder is not None:
                logits = decoder.step(nxt[:, None], cache, positions=positions, attn_mask=mask)
            else:
                logits, _ = self.model(nxt[:, None], positions=positions, cache=cache, logits_to_keep=1, attn_mask=mask)
            if positions is not None:
                b.next_pos += 1

    # -- public API ----------------------------------------------------------------------
    def generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Generate for a batch of token-id prompts: params.num_return_sequences Completions per
        prompt (one by default), each prompt's next to each other. With num_beams > 1 they are
        the best hypotheses of a beam search, best first (`beam_search`, flattened); else
        independent samples (each prompt's rows repeated in the batch)."""
        if params.beam:
            return [c for group in self.beam_search(prompts, params) for c in group]
        if params.num_return_sequences > 1:
            prompts = [p for p in prompts for _ in range(params.num_return_sequences)]
        B = len(prompts)
        out: list[list[int]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        done = [False] * B
        stop_set = set(self._ending_ids(params))
        for nxt, alive in self._run(prompts, params):
            for row, (tok, live) in enumerate(zip(nxt.tolist(), alive.tolist())):
                if not live or done[row]:
                    continue
                if tok in stop_set:
                    done[row], reasons[row] = True, "stop"
                    continue
                out[row].append(tok)
                floor = self._stop_floor(out[row], params) if params.stop else None
                if floor is not None and _find_stop(self.tokenizer.decode(out[row]), params.stop, floor) is not None:
                    done[row], reasons[row] = True, "stop"
            if params.stop and all(done):
                break
        completions = []
        for row in range(B):
            text = self.tokenizer.decode(out[row])
            floor = self._stop_floor(out[row], params) if params.stop else None
            cut = _find_stop(text, params.stop, floor) if floor is not None else None
            if cut is not None:
                text = text[:cut]
            completions.append(Completion(list(prompts[row]), out[row], text, reasons[row]))
        return completions

    def generate(self, prompts: list[str], params: SamplingParams, truncate: str | None = None) -> list[Completion]:
        ids = [self.check_length(self.encode(p), params, truncate) for p in prompts]
        return self.generate_ids(ids, params)

    def beam_search(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Beam search for a batch of token-id prompts: for each prompt its best
        params.num_return_sequences hypotheses, best first, each a Completion with its `score`
        (transformers' `sequences_scores`). The algorithm is lmforge.generate.beam's, the same as
        transformers' generate(num_beams=..., do_sample=False); this supplies the decoder-only
        step: the prompts are prefilled once (left-padded, as in generate_ids), their cache rows
        copied to B x num_beams rows that decode as one batch, and before each step the rows are
        reordered in place to follow the beams that continue. Decode steps run where
        generate_ids' do (the numpy decoder where it measured faster). With num_beams 1: the
        generate_ids result, grouped per prompt.

        Refused with beams: stop strings (use stop_token_ids), presence/frequency penalties
        (OpenAI's, for sampling). The repetition penalty applies to the log-probabilities, as in
        transformers' beam search."""
        if not params.beam:
            flat = self.generate_ids(prompts, params)
            n = params.num_return_sequences
            return [flat[i : i + n] for i in range(0, len(flat), n)]
        if params.stop:
            raise LmforgeError("stop strings are not supported with beam search (a hypothesis ends on a token); "
                               "use stop_token_ids")
        if params.counts_tokens:
            raise LmforgeError("presence_penalty / frequency_penalty apply to sampling, not to beam search")
        if not prompts:
            return []
        settings = BeamSettings(
            num_beams=params.num_beams, max_new_tokens=params.max_new_tokens, length_penalty=params.length_penalty,
            early_stopping=params.early_stopping_value, num_return_sequences=params.num_return_sequences,
            end_ids=tuple(self._ending_ids(params)), min_new_tokens=params.min_new_tokens,
            min_banned=tuple(self._banned_ids(params)), no_repeat_ngram_size=params.no_repeat_ngram_size,
            repetition_penalty=params.repetition_penalty)
        if self._s2s is not None:
            with torch.inference_mode():
                return self._completions(prompts, self._s2s.beam_search(prompts, settings))
        batch = self._prepare(prompts, params)
        decoder = self._decoder()
        model, device = self.model, self.device
        B, longest = batch.ids.shape
        R = B * params.num_beams
        rows = torch.arange(B, device=device).repeat_interleave(params.num_beams)  # row -> its prompt
        identity = torch.arange(R, device=device)
        with torch.inference_mode():
            # The prefill runs once per prompt, in torch on all threads, as in generate_ids.
            first = model.new_cache(B, longest)
            logits, _ = model(batch.ids, positions=batch.positions, cache=first, logits_to_keep=1,
                              attn_mask=None if batch.key_mask is None else batch.key_mask[:, :longest])
            require_finite_logits(logits, "at generated token 1")
            cache = self._cache_for(R, batch.total)
            cache.k[:, :, :, :longest] = first.k.index_select(1, rows)
            cache.v[:, :, :, :longest] = first.v.index_select(1, rows)
            cache.pos = longest
            del first
            key_mask = None if batch.key_mask is None else batch.key_mask.index_select(0, rows)
            next_pos = None if batch.next_pos is None else batch.next_pos.index_select(0, rows)
            made = [1]  # tokens generated so far, for the error message

            def step(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
                if not torch.equal(parents, identity):
                    cache.reorder(parents)
                positions = mask = None
                if key_mask is not None:  # the rows of a prompt share its padding and positions
                    key_mask[:, cache.pos] = True
                    positions, mask = next_pos[:, None], key_mask[:, : cache.pos + 1]
                with inference_backend(model, self.backend, switch_layers=decoder is None):
                    if decoder is not None:
                        out = decoder.step(tokens[:, None], cache, positions=positions, attn_mask=mask)
                    else:
                        out, _ = model(tokens[:, None], positions=positions, cache=cache, logits_to_keep=1, attn_mask=mask)
                if next_pos is not None:
                    next_pos.add_(1)
                made[0] += 1
                require_finite_logits(out, f"at generated token {made[0]}")
                return out[:, -1]

            found = beam_search(logits[:, -1], step, settings, prefixes=prompts)
        return self._completions(prompts, found)

    def _completions(self, prompts: list[list[int]], found) -> list[list[Completion]]:
        """Beam search's hypotheses as Completions, the end token dropped."""
        out = []
        for prompt, hyps in zip(prompts, found):
            group = []
            for h in hyps:
                ids = h.ids[:-1] if h.ended else h.ids
                group.append(Completion(list(prompt), ids, self.tokenizer.decode(ids), "stop" if h.ended else "length",
                                        score=h.score))
            out.append(group)
        return out

    def stream_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the generated text in pieces as it is produced (batch of one).

        Text is held back while it ends in an incomplete UTF-8 character (byte-level tokens can
        split one) or could be the start of a stop string, so what is yielded is never taken back.
        """
        if params.beam:
            raise LmforgeError("beam search cannot stream: which hypothesis wins is known only at the end "
                               "(generate without streaming)")
        if params.num_return_sequences > 1:
            raise LmforgeError("streaming gives one sequence: num_return_sequences must be 1")
        stop_set = set(self._ending_ids(params))
        generated: list[int] = []
        emitted = 0
        for nxt, _alive in self._run([prompt_ids], params):
            tok = int(nxt[0])
            if tok in stop_set:
                break
            generated.append(tok)
            text = self.tokenizer.decode(generated)
            floor = self._stop_floor(generated, params) if params.stop else None
            cut = _find_stop(text, params.stop, floor) if floor is not None else None
            if cut is not None:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = _safe_end(text, params.stop)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = self.tokenizer.decode(generated)
        if len(text) > emitted:
            yield text[emitted:]

    def stream(self, prompt: str, params: SamplingParams, truncate: str | None = None) -> Iterator[str]:
        return self.stream_ids(self.check_length(self.encode(prompt), params, truncate), params)

    # -- scoring (evaluation) ------------------------------------------------------------
    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int] | None = None, *,
              batch_tokens: int = 8192, logit_bytes: int = 256 << 20) -> list[TokenScores]:
        """Log-probabilities of each sequence's tokens [start, len) (start defaults to 1), each
        conditioned on every token before it; perplexity, task harnesses and lm-eval build on this.
        The last token is only ever a target, never an input, so a sequence may hold up to
        block_size + 1 tokens.

        Sequences are sorted by length and scored in right-padded batches of at most
        `batch_tokens` tokens: under plain causal attention a real token never sees the pads
        after it, so no mask is needed and the fused attention path runs. Logits are computed
        only from the first scored position on, and at most `logit_bytes` of them at a time
        (a [tokens, vocab] fp32 block is the largest tensor of a forward).
        """
        self._decoder_only("score")
        n = len(sequences)
        starts = [1] * n if starts is None else list(starts)
        if len(starts) != n:
            raise LmforgeError(f"score: {n} sequences but {len(starts)} start positions")
        block = self.config.block_size
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            if len(seq) > block + 1:
                raise LmforgeError(f"score: sequence {i} has {len(seq)} tokens, more than the model's context of "
                                   f"{block} (+1 for the last target); window it (see lmforge.eval.perplexity)")
            if not 1 <= start < len(seq):
                raise LmforgeError(f"score: sequence {i} of {len(seq)} tokens has nothing to score from position {start} "
                                   "(the first token has no context; start must be in [1, len))")
        vocab = self.config.vocab_size
        logit_rows = max(1, logit_bytes // (4 * vocab))
        order = sorted(range(n), key=lambda i: (-len(sequences[i]), starts[i]))
        results: list[TokenScores | None] = [None] * n
        i = 0
        while i < n:
            longest = len(sequences[order[i]])
            group = [order[i]]
            first = starts[order[i]] - 1  # earliest position whose logits the batch needs
            for j in order[i + 1:]:
                f = min(first, starts[j] - 1)
                if (len(group) + 1) * (longest - 1) > batch_tokens or (len(group) + 1) * (longest - 1 - f) > logit_rows:
                    break
                group.append(j)
                first = f
            i += len(group)
            # Scoring runs torch's forward only, never a backend chosen by timing: the same eval
            # must give bit-identical results on every run.
            with torch.inference_mode():
                for row, scored in zip(group, self._score_batch([sequences[k] for k in group],
                                                                [starts[k] for k in group], longest, first)):
                    results[row] = scored
        return results  # type: ignore[return-value]

    def _score_batch(self, seqs: list[Sequence[int]], starts: list[int], longest: int, first: int) -> list[TokenScores]:
        device = self.device
        ids = torch.zeros((len(seqs), longest), dtype=torch.long, device=device)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long, device=device)
        # Position p predicts token p + 1, so the model reads all but the last token, and only the
        # logits of positions [first, longest - 1) are computed.
        logits, _ = self.model(ids[:, :-1], logits_to_keep=longest - 1 - first)
        require_finite_logits(logits, "while scoring")
        out = []
        for row, (seq, start) in enumerate(zip(seqs, starts)):
            rows = logits[row, start - 1 - first : len(seq) - 1 - first].float()
            targets = ids[row, start : len(seq)]
            picked = rows.gather(-1, targets[:, None]).squeeze(-1)
            lse = torch.logsumexp(rows, dim=-1)
            logprobs = picked - lse
            top = rows.argmax(-1)
            top_logprobs = rows.gather(-1, top[:, None]).squeeze(-1) - lse
            out.append(TokenScores(logprobs.cpu(), (top == targets).cpu(), top.cpu(), top_logprobs.cpu()))
        return out

    def score_continuations(self, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *,
                            batch_tokens: int = 4096, logit_bytes: int = 256 << 20) -> list[list[TokenScores]]:
        """For each (context, [continuation, ...]): the scores of every continuation's tokens, each
        given the context and the continuation's earlier tokens — what `score` gives for
        context + continuation from len(context) on, but the context runs once and its KV cache
        serves all its continuations (a multiple-choice item's choices: ~4x fewer tokens).

        Contexts are left-padded into one prefill; the cache rows are then copied once per
        continuation and the continuations (right-padded, all but their last token) run as one
        chunk on top. A context + continuation longer than the model's context is refused: cut
        it first, or use `score`.
        """
        self._decoder_only("score_continuations")
        block = self.config.block_size
        for i, (ctx, conts) in enumerate(requests):
            if not ctx or not conts or any(len(c) == 0 for c in conts):
                raise LmforgeError(f"score_continuations: request {i} needs a non-empty context and continuations")
            if len(ctx) + max(len(c) for c in conts) - 1 > block:
                raise LmforgeError(f"score_continuations: request {i} is longer than the model's context of {block}")
        logit_rows = max(1, logit_bytes // (4 * self.config.vocab_size))
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        results: list[list[TokenScores] | None] = [None] * len(requests)
        i = 0
        while i < len(order):
            head = order[i]
            lc = len(requests[head][0])  # the longest context of the batch (sorted)
            group, rows, tc = [head], len(requests[head][1]), max(len(c) for c in requests[head][1])
            for j in order[i + 1:]:
                r2, t2 = rows + len(requests[j][1]), max(tc, max(len(c) for c in requests[j][1]))
                if r2 * (lc + t2 - 1) > batch_tokens or r2 * (t2 - 1) > logit_rows or lc + t2 - 1 > block:
                    break
                group.append(j)
                rows, tc = r2, t2
            i += len(group)
            with torch.inference_mode():  # torch only, as in `score`
                out = self._score_shared([requests[k][0] for k in group], [requests[k][1] for k in group])
            for k, scores in zip(group, out):
                results[k] = scores
        return results  # type: ignore[return-value]

    def _score_shared(self, ctxs: list[Sequence[int]], conts: list[Sequence[Sequence[int]]]) -> list[list[TokenScores]]:
        device, model = self.device, self.model
        B, lc = len(ctxs), max(len(c) for c in ctxs)
        ids = torch.zeros((B, lc), dtype=torch.long, device=device)
        key = torch.zeros((B, lc), dtype=torch.bool, device=device)
        for g, ctx in enumerate(ctxs):
            ids[g, lc - len(ctx):] = torch.as_tensor(list(ctx), dtype=torch.long, device=device)
            key[g, lc - len(ctx):] = True
        ragged = any(len(c) != lc for c in ctxs)
        positions = (key.long().cumsum(-1) - 1).clamp(min=0) if ragged else None
        cache = model.new_cache(B, lc)
        first, _ = model(ids, positions=positions, attn_mask=key if ragged else None, cache=cache, logits_to_keep=1)
        first = first[:, -1].float()  # [B, V]: each context's prediction of its continuations' first token
        require_finite_logits(first, "while scoring")
        flat = [(g, list(c)) for g, cs in enumerate(conts) for c in cs]
        tc = max(len(c) for _, c in flat)
        step = None
        if tc > 1:
            R = len(flat)
            owner = torch.tensor([g for g, _ in flat], dtype=torch.long, device=device)
            big = model.new_cache(R, lc + tc - 1)
            big.k[:, :, :, :lc] = cache.k.index_select(1, owner)
            big.v[:, :, :, :lc] = cache.v.index_select(1, owner)
            big.pos = lc
            inp = torch.zeros((R, tc - 1), dtype=torch.long, device=device)
            for r, (_, c) in enumerate(flat):
                inp[r, : len(c) - 1] = torch.as_tensor(c[:-1], dtype=torch.long, device=device)
            if ragged:
                lengths = torch.tensor([len(ctxs[g]) for g, _ in flat], dtype=torch.long, device=device)
                pos = lengths[:, None] + torch.arange(tc - 1, device=device)[None, :]
                mask = torch.cat([key.index_select(0, owner), torch.ones((R, tc - 1), dtype=torch.bool, device=device)], 1)
                step, _ = model(inp, positions=pos, attn_mask=mask, cache=big)
            else:
                step, _ = model(inp, cache=big)
            require_finite_logits(step, "while scoring")
        out: list[list[TokenScores]] = [[] for _ in ctxs]
        for r, (g, c) in enumerate(flat):
            rows = first[g : g + 1] if step is None or len(c) == 1 else torch.cat([first[g : g + 1], step[r, : len(c) - 1].float()])
            targets = torch.as_tensor(c, dtype=torch.long, device=device)
            picked = rows.gather(-1, targets[:, None]).squeeze(-1)
            logprobs = picked - torch.logsumexp(rows, dim=-1)
            out[g].append(TokenScores(logprobs.cpu(), (rows.argmax(-1) == targets).cpu()))
        return out


def _find_stop(text: str, stops: Sequence[str], floor: int = 0) -> int | None:
    """Where the first stop string ending after text[:floor] begins, None if none does."""
    hits = [i for i in (text.find(s, max(0, floor - len(s) + 1)) for s in stops if s) if i != -1]
    return min(hits) if hits else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of a growing generated text can be handed out for good: not a trailing partial
    UTF-8 character (byte-level tokens can split one) nor a possible start of a stop string."""
    safe = len(text)
    if text.endswith("\ufffd"):
        safe = text.rfind("\ufffd")
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
    return min(safe, _stop_prefix_start(text, stops))


def _stop_prefix_start(text: str, stops: Sequence[str]) -> int:
    """Where a possible partial stop string at the end of `text` begins (len(text) if none)."""
    start = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                start = min(start, len(text) - k)
                break
    return start
