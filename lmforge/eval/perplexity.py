"""Perplexity with a sliding window, defined once for all of lmforge.

The window follows transformers' guide "Perplexity of fixed-length models": windows of `context`
tokens start every `stride` tokens; each scores only the tokens that are new since the previous
window (the last `stride` of a full window), every one conditioned on all the window's earlier
tokens; the first window scores all but its first token, which has no context. With
stride < context every token but the first gets at least `context - stride` tokens of context;
with stride == context the windows are disjoint and each window's first token goes unscored.

    perplexity    = exp(mean NLL per scored token)       (NLL in nats)
    bits_per_byte = total NLL / ln 2 / UTF-8 bytes of the text

Bits per byte does not depend on the tokenizer, so it compares models that tokenize differently;
perplexity only compares models that share a tokenizer.

The pretraining and fine-tuning reports compute their perplexity figures with
`perplexity_from_nll`, so "perplexity" means one thing everywhere.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from lmforge.errors import LmforgeError, check_counts

if TYPE_CHECKING:
    from lmforge.generate.engine import Engine, TokenScores


def perplexity_from_nll(nll: float | None) -> float | None:
    """exp(mean NLL per token in nats); infinite rather than an overflow for a hopeless model."""
    if nll is None:
        return None
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def bits_per_byte(total_nll: float, n_bytes: int) -> float | None:
    return None if n_bytes <= 0 else total_nll / math.log(2) / n_bytes


@dataclass
class PerplexityConfig:
    context: int = 0  # window length in tokens (0 = the model's context)
    stride: int = 0  # tokens each window advances; < context gives every token more context (0 = context / 2)
    batch_size: int = 4  # windows scored together
    max_tokens: int = 0  # evaluate only the first N tokens of the data (0 = all)
    text_field: str = "text"  # JSONL field holding the text (documents are joined with a blank line)

    def __post_init__(self) -> None:
        check_counts(self, at_least_0=("context", "stride", "max_tokens"), at_least_1=("batch_size",))


@dataclass
class Window:
    begin: int  # first token of the window in the token stream
    end: int  # one past its last token
    first_scored: int  # first token it scores (absolute index)


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The sliding windows over a stream of n_tokens, exactly as in transformers' guide."""
    if context < 2:
        raise LmforgeError(f"--context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise LmforgeError(f"--stride must be in [1, context={context}], got {stride} "
                           "(a stride beyond the context would skip tokens)")
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        # The window's first token is never scored: nothing in the window precedes it.
        first = max(prev_end, begin + 1)
        if first < end:
            out.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    total_tokens: int  # tokens in the evaluated stream
    total_nll: float  # nats, summed over scored tokens
    bits_per_byte: float | None
    bytes: int | None  # UTF-8 bytes of the evaluated text (None when unknown)
    windows: int
    context: int
    stride: int
    seconds: float
    tokens_per_s: float
    window_nll: list[float] = field(default_factory=list)  # mean NLL of each window's scored tokens
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def score_stream(engine: "Engine", ids: Sequence[int], context: int, stride: int, *, batch_size: int = 4,
                 n_bytes: int | None = None, progress: Callable[[int, int], None] | None = None,
                 on_window: Callable[[Window, "TokenScores"], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity of a token stream through the Engine's scorer. on_window(w, s) is
    given each window's scores: s.logprobs[i] is that of token w.first_scored + i (per-token
    views, such as `lmforge inspect loss`, read them there)."""
    if len(ids) < 2:
        raise LmforgeError(f"need at least 2 tokens to measure perplexity, the text has {len(ids)}")
    if context > engine.config.block_size:
        raise LmforgeError(f"--context {context} exceeds the model's context of {engine.config.block_size} tokens")
    if batch_size < 1:
        raise LmforgeError(f"--batch-size must be positive, got {batch_size}")
    plan = windows(len(ids), context, stride)
    started = time.perf_counter()
    total, count, per_window = 0.0, 0, []
    for i in range(0, len(plan), batch_size):
        chunk = plan[i : i + batch_size]
        scored = engine.score([ids[w.begin : w.end] for w in chunk], [w.first_scored - w.begin for w in chunk],
                              batch_tokens=batch_size * context)
        for w, s in zip(chunk, scored):
            if on_window is not None:
                on_window(w, s)
            nll = -float(s.logprobs.double().sum())
            total += nll
            count += len(s.logprobs)
            per_window.append(nll / len(s.logprobs))
        if progress is not None:
            progress(min(i + batch_size, len(plan)), len(plan))
    seconds = time.perf_counter() - started
    mean = total / count
    if not math.isfinite(perplexity_from_nll(mean)):  # a result of null/Infinity is no measurement
        raise LmforgeError(f"mean NLL {mean:.4g} nats/token: the perplexity is not a finite number; "
                           "the model's logits are extreme (corrupt or diverged weights)")
    return PerplexityResult(
        perplexity=perplexity_from_nll(mean), nll=mean, tokens=count, total_tokens=len(ids), total_nll=total,
        bits_per_byte=None if n_bytes is None else bits_per_byte(total, n_bytes), bytes=n_bytes,
        windows=len(plan), context=context, stride=stride, seconds=seconds,
        tokens_per_s=count / seconds if seconds > 0 else 0.0, window_nll=per_window,
    )


# -- inputs ----------------------------------------------------------------------------------------
@dataclass
class TokenStream:
    ids: list[int]
    n_bytes: int | None  # UTF-8 bytes of the text the ids encode (None: unknown)
    format: str  # text / jsonl / shards
    notes: list[str] = field(default_factory=list)


def load_stream(data: str | Path, tokenizer, text_field: str = "text", max_tokens: int = 0) -> TokenStream:
    """A text file (.txt, .md, .py, ...: the whole file), a JSONL file (its documents' `text_field`,
    joined with a blank line as transformers' guide joins WikiText) or a shards dir (its val split,
    which must come from the model's tokenizer)."""
    from lmforge.eval.io import is_jsonl, read_text
    from lmforge.jsonio import read_jsonl

    path = Path(data)
    if path.is_dir():
        return _shard_stream(path, tokenizer, max_tokens)
    if is_jsonl(path):
        docs = []
        for lineno, obj in read_jsonl(path):
            value = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise LmforgeError(f"{path}:{lineno}: expected an object with a string {text_field!r} field "
                                   "(--text-field names another)")
            docs.append(value)
        text, fmt = "\n\n".join(docs), "jsonl"
        if not text.strip():
            raise LmforgeError(f"{path}: every {text_field!r} is empty")
    else:
        text, fmt = read_text(path), "text"
    ids = tokenizer.encode(text)
    notes = []
    if max_tokens and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        # The bytes that the kept tokens stand for (exact for byte-level BPE, close otherwise).
        n_bytes = len(tokenizer.decode(ids).encode("utf-8"))
        notes.append(f"evaluated the first {max_tokens} tokens; bytes counted on their decoded text")
    else:
        n_bytes = len(text.encode("utf-8"))
    return TokenStream(ids, n_bytes, fmt, notes)


def _shard_stream(path: Path, tokenizer, max_tokens: int) -> TokenStream:
    import numpy as np

    from lmforge.data.loader import TokenShards

    shards = TokenShards(path, expect_tokenizer_sha256=tokenizer.sha256)
    split = shards.split("val")
    if split.tokens == 0:
        raise LmforgeError(f"{path}: the val split is empty; re-pack with --val-fraction > 0")
    parts, left = [], max_tokens or split.tokens
    for shard in split.shards:
        take = np.asarray(shard[: min(len(shard), left)], dtype=np.int64)
        parts.append(take)
        left -= len(take)
        if left <= 0:
            break
    ids = np.concatenate(parts).tolist()
    # Shards hold token ids, not text: the byte count comes from decoding them again, which
    # reproduces the text exactly only for lossless (byte-level) tokenizers.
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    notes = [f"shards: val split ({len(ids)} of {split.tokens} tokens); bits per byte counts the UTF-8 bytes of "
             "the decoded tokens (exact for byte-level BPE, approximate for lossy tokenizers)"]
    return TokenStream(ids, len(decoded.encode("utf-8")), "shards", notes)


def evaluate_perplexity(model_spec: str, data: str | Path, config: PerplexityConfig | None = None, *,
                        device: str = "cpu", progress: bool = False) -> dict:
    """`lmforge eval ppl`: load the model, read and tokenize the data, score it; a result dict
    (see lmforge.eval.results) with `perplexity`, `nll`, `tokens` and `bits_per_byte`."""
    config = config or PerplexityConfig()
    engine, loaded = load_engine(model_spec, device)
    return perplexity_with(engine, loaded, model_spec, data, config, progress=progress)


def perplexity_with(engine, loaded, model_spec: str, data: str | Path, config: PerplexityConfig, *,
                    progress: bool = False) -> dict:
    """`evaluate_perplexity` on a model already loaded (`load_engine`'s pair): a caller that also
    generates or scores with it loads it once."""
    from lmforge.eval.io import fingerprint
    from lmforge.eval.results import make_result, model_info

    block = engine.config.block_size
    context = config.context or block
    stride = config.stride or max(1, context // 2)
    stream = load_stream(data, loaded.tokenizer, config.text_field, config.max_tokens)
    bar = _progress_bar(progress)
    res = score_stream(engine, stream.ids, context, stride, batch_size=config.batch_size, n_bytes=stream.n_bytes,
                       progress=bar)
    if bar is not None:
        bar.close()
    res.notes = stream.notes + res.notes
    if len(stream.ids) > context:
        res.notes.append(f"text of {len(stream.ids)} tokens scored in {res.windows} windows of {context} (stride {stride})")
    metrics = {"perplexity": res.perplexity, "nll": res.nll, "tokens": res.tokens, "bits_per_byte": res.bits_per_byte,
               "bytes": res.bytes, "total_tokens": res.total_tokens, "total_nll": res.total_nll,
               "windows": res.windows, "seconds": round(res.seconds, 3), "tokens_per_s": round(res.tokens_per_s, 1)}
    return make_result(
        "ppl", model=model_info(model_spec, loaded), data={**fingerprint(data), "format": stream.format},
        settings={"context": context, "stride": stride, "batch_size": config.batch_size,
                  "max_tokens": config.max_tokens, "text_field": config.text_field, "device": str(engine.device)},
        metrics=metrics, details={"window_nll": res.window_nll}, notes=res.notes,
    )


def load_engine(model_spec: str, device: str = "cpu", dequantize: bool = False):
    """(Engine, LoadedModel) for a model spec (model dir, run dir, known name, ...): what every
    eval scores and generates with. dequantize: a quantized model's fp32 values (what
    fine-tuning starts from), to compare it with a model tuned from it on equal terms."""
    from lmforge.generate.engine import Engine
    from lmforge.interop.registry import load_model
    from lmforge.runtime import resolve_device

    loaded = load_model(model_spec, device=resolve_device(device), dequantize=dequantize)
    return Engine.for_loaded(loaded), loaded


class _Bar:
    def __init__(self):
        from lmforge.progress import progress_bar

        self.bar = progress_bar(total=0, unit="window", desc="perplexity", leave=False)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _progress_bar(enabled: bool):
    return _Bar() if enabled else None
