"""Translate many sources through the Engine: what `lmforge translate`, pipeline("translation"),
`lmforge eval bleu --model` and the BLEU of translation training share.

A translator is an encoder-decoder, or a decoder-only model trained on `source <sep> target`
(lmforge.train.translation): Engine.translation_prompt gives each what it reads.

Sources are sorted by length and generated in batches of `batch_size` (similar lengths waste
less encoder work on padding; a batched source gives what it gives alone), and come back in
input order.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.generate.engine import Completion, Engine
    from lmforge.generate.params import SamplingParams

PROGRESS_FROM = 64  # sources: fewer finish before a bar is worth drawing


def fits_context(engine: "Engine", params: "SamplingParams", longest_prompt: int, cap: bool) -> "SamplingParams":
    """The params a batch of prompts runs with. A decoder-only translator holds source and
    translation in one context: with `cap` (max_new_tokens is a default, not the user's), it is
    lowered to the room the batch's longest prompt leaves, else too little room is refused. An
    encoder-decoder's target has a context of its own."""
    if engine.is_encoder_decoder:
        return params
    block = engine.config.block_size
    room = block - longest_prompt
    if room < 1:
        raise LmforgeError(f"a source of {longest_prompt - 1} tokens leaves no room to translate in the model's context "
                           f"of {block} tokens; split it")
    if params.max_new_tokens <= room:
        return params
    if cap:
        return dataclasses.replace(params, max_new_tokens=room)
    raise LmforgeError(f"a source of {longest_prompt - 1} tokens, its separator and max_new_tokens {params.max_new_tokens} "
                       f"exceed the model's context of {block} tokens (a decoder-only translator reads them as one); "
                       f"ask for at most {room} new tokens")


def translate_ids(engine: "Engine", sources: Sequence[list[int]], params: "SamplingParams", *, batch_size: int = 16,
                  progress: bool = False, cap_to_context: bool = False) -> list[list["Completion"]]:
    """params.num_return_sequences Completions per source (beam search: best first), in input
    order. `sources` are translation prompts (Engine.translation_prompt), length-checked;
    cap_to_context: see fits_context."""
    engine.require_translator()
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    n = params.num_return_sequences
    out: list[list[Completion]] = [[] for _ in sources]
    bar = None
    if progress and len(sources) >= PROGRESS_FROM:
        from lmforge.progress import progress_bar

        bar = progress_bar(total=len(sources), unit="sentence", desc="translating", leave=False)
    try:
        for k in range(0, len(order), batch_size):
            group = order[k : k + batch_size]
            batch = [sources[i] for i in group]
            done = engine.generate_ids(batch, fits_context(engine, params, max(map(len, batch)), cap_to_context))
            for j, i in enumerate(group):
                out[i] = done[j * n : (j + 1) * n]
            if bar is not None:
                bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
    return out


def translate_texts(engine: "Engine", texts: Sequence[str], params: "SamplingParams", *, batch_size: int = 16,
                    progress: bool = False, cap_to_context: bool = False) -> list[list[str]]:
    """Each text's translations (num_return_sequences of them), stripped of surrounding spaces.
    cap_to_context: max_new_tokens is a default, lowered where a decoder-only translator's
    context has less room (fits_context)."""
    engine.require_translator()
    if engine.is_encoder_decoder:
        engine._s2s.check_target(params)  # before any source: the error is not one source's
    sources = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise LmforgeError(f"source {i + 1}: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise LmforgeError(f"source {i + 1} is empty: give some text to translate")
        try:
            prompt = engine.translation_prompt(engine.encode(text))
            sources.append(engine.check_length(prompt, fits_context(engine, params, len(prompt), cap_to_context)))
        except LmforgeError as e:
            raise LmforgeError(f"source {i + 1}: {e}") from None
    done = translate_ids(engine, sources, params, batch_size=batch_size, progress=progress, cap_to_context=cap_to_context)
    return [[c.text.strip() for c in group] for group in done]


def translate_lines(engine: "Engine", lines: Sequence[str], params: "SamplingParams", *, batch_size: int = 16,
                    progress: bool = False, cap_to_context: bool = False) -> list[str]:
    """One translation per line (a file's sources): blank lines stay blank, so that line i of
    the output is the translation of line i of the input."""
    if params.num_return_sequences != 1:
        raise LmforgeError(f"one translation per line: num_return_sequences must be 1, got {params.num_return_sequences}")
    kept = [i for i, line in enumerate(lines) if line.strip()]
    done = translate_texts(engine, [lines[i] for i in kept], params, batch_size=batch_size, progress=progress,
                           cap_to_context=cap_to_context)
    out = [""] * len(lines)
    for i, group in zip(kept, done):
        out[i] = group[0]
    return out


def greedy_translations(engine: "Engine", sources: Sequence[Sequence[int]], *, batch_size: int = 32,
                        max_new_tokens: int | None = None) -> list[str]:
    """Greedy translations of tokenized sources (in input order), for scoring a model in training:
    batched by length, each batch allowed at most `max_new_tokens`, by default twice its longest
    source plus 10 tokens (a barely trained model that never says eos would otherwise run to
    the end of the context every evaluation), within the model's context."""
    from lmforge.generate.params import SamplingParams

    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out = [""] * len(sources)
    block = engine.config.block_size
    for k in range(0, len(order), batch_size):
        group = order[k : k + batch_size]
        prompts = [engine.translation_prompt(sources[i]) for i in group]
        longest = max(len(sources[i]) for i in group)
        room = block if engine.is_encoder_decoder else block - max(len(p) for p in prompts)
        if room < 1:
            raise LmforgeError(f"a source of {longest} tokens leaves no room in the model's context of {block}")
        limit = min(max_new_tokens or 2 * longest + 10, room)
        done = engine.generate_ids(prompts, SamplingParams(temperature=0.0, max_new_tokens=limit))
        for i, c in zip(group, done):
            out[i] = c.text.strip()
    return out
