"""Translate many sources with an encoder-decoder through the Engine: what `lmforge translate`,
pipeline("translation") and `lmforge eval bleu --model` share.

Sources are sorted by length and generated in batches of `batch_size` (similar lengths waste
less encoder work on padding; a batched source gives what it gives alone), and come back in
input order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.generate.engine import Completion, Engine
    from lmforge.generate.params import SamplingParams

PROGRESS_FROM = 64  # sources: fewer finish before a bar is worth drawing


def _require_encoder_decoder(engine: "Engine") -> None:
    if not engine.is_encoder_decoder:
        raise LmforgeError(f"{engine.config.name}: translation needs an encoder-decoder model (arch encoder-decoder); "
                           "a decoder-only model continues a prompt: use generate or pipeline('text-generation')")


def translate_ids(engine: "Engine", sources: Sequence[list[int]], params: "SamplingParams", *, batch_size: int = 16,
                  progress: bool = False) -> list[list["Completion"]]:
    """params.num_return_sequences Completions per source (beam search: best first), in input order."""
    _require_encoder_decoder(engine)
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
            done = engine.generate_ids([sources[i] for i in group], params)
            for j, i in enumerate(group):
                out[i] = done[j * n : (j + 1) * n]
            if bar is not None:
                bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
    return out


def translate_texts(engine: "Engine", texts: Sequence[str], params: "SamplingParams", *, batch_size: int = 16,
                    progress: bool = False) -> list[list[str]]:
    """Each text's translations (num_return_sequences of them), stripped of surrounding spaces."""
    _require_encoder_decoder(engine)
    engine._s2s.check_target(params)  # before any source: the error is not one source's
    sources = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise LmforgeError(f"source {i + 1}: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise LmforgeError(f"source {i + 1} is empty: give some text to translate")
        try:
            sources.append(engine.check_length(engine.encode(text), params))
        except LmforgeError as e:
            raise LmforgeError(f"source {i + 1}: {e}") from None
    done = translate_ids(engine, sources, params, batch_size=batch_size, progress=progress)
    return [[c.text.strip() for c in group] for group in done]


def translate_lines(engine: "Engine", lines: Sequence[str], params: "SamplingParams", *, batch_size: int = 16,
                    progress: bool = False) -> list[str]:
    """One translation per line (a file's sources): blank lines stay blank, so that line i of
    the output is the translation of line i of the input."""
    if params.num_return_sequences != 1:
        raise LmforgeError(f"one translation per line: num_return_sequences must be 1, got {params.num_return_sequences}")
    kept = [i for i, line in enumerate(lines) if line.strip()]
    done = translate_texts(engine, [lines[i] for i in kept], params, batch_size=batch_size, progress=progress)
    out = [""] * len(lines)
    for i, group in zip(kept, done):
        out[i] = group[0]
    return out
