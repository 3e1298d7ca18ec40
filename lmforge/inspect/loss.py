"""`lmforge inspect loss`: the loss of every token of a text, as one self-contained HTML page:
tokens coloured by their loss (which ones surprise the model), hover for the loss, the token's
probability and the model's top prediction there; the document's perplexity on top.

The numbers come from `lmforge eval ppl`'s sliding-window scorer (lmforge.eval.perplexity
.score_stream, the same windows and settings), which hands each window's per-token scores over:
the perplexity here is `eval ppl`'s, and a file longer than the context is read window by window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import PerplexityConfig, PerplexityResult
from lmforge.inspect.html import escape, page
from lmforge.inspect.inputs import token_label, token_text, token_texts


@dataclass
class TokenLosses:
    ids: list[int]
    texts: list[str]
    loss: list[float | None]  # nats; None for tokens no window scores (the first)
    top_ids: list[int | None]  # the model's most likely token at that position
    top_probs: list[float | None]
    result: PerplexityResult


def token_losses(engine, ids: list[int], config: PerplexityConfig, *, n_bytes: int | None = None,
                 progress=None) -> TokenLosses:
    """Every token's loss through score_stream, with `eval ppl`'s defaults (context: the model's;
    stride: half the context)."""
    from lmforge.eval.perplexity import score_stream

    if engine.config.is_encoder_decoder:
        raise LmforgeError("inspect loss scores a decoder-only model's text; this model is an encoder-decoder")
    context = config.context or engine.config.block_size
    stride = config.stride or max(1, context // 2)
    n = len(ids)
    loss: list[float | None] = [None] * n
    top_ids: list[int | None] = [None] * n
    top_probs: list[float | None] = [None] * n

    def keep(window, scores) -> None:
        for i, (lp, t, tp) in enumerate(zip(scores.logprobs.tolist(), scores.top_ids.tolist(),
                                            scores.top_logprobs.tolist())):
            pos = window.first_scored + i
            loss[pos], top_ids[pos], top_probs[pos] = -lp, t, math.exp(tp)

    result = score_stream(engine, ids, context, stride, batch_size=config.batch_size, n_bytes=n_bytes,
                          progress=progress, on_window=keep)
    return TokenLosses(list(ids), token_texts(engine.tokenizer, ids), loss, top_ids, top_probs, result)


CSS = """
.tok:hover { outline: 1px solid #333; }
.unscored { color: #999; }
.legend { display: inline-block; width: 14em; height: 0.9em; vertical-align: middle; margin: 0 0.4em;
  background: linear-gradient(to right, rgb(255,255,255), rgb(255,214,160), rgb(240,90,60), rgb(150,0,30)); border: 1px solid #ccc; }
table.facts td { padding: 0.1em 1em 0.1em 0; font-size: 0.9em; }
"""


def _colour(x: float) -> str:
    """x in [0, 1] -> white, orange, red, dark red (the legend's gradient)."""
    stops = [(255, 255, 255), (255, 214, 160), (240, 90, 60), (150, 0, 30)]
    x = min(max(x, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    f = x - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(stops[i], stops[i + 1]))
    return f"rgb({r},{g},{b})"


def render_page(tl: TokenLosses, tokenizer, *, model_name: str, source: str) -> str:
    r = tl.result
    scored = sorted(v for v in tl.loss if v is not None)
    # The colour scale ends at the 98th percentile (at least 1 nat): one absurd token does not wash out the rest.
    vmax = max(1.0, scored[min(len(scored) - 1, int(0.98 * len(scored)))])
    parts = []
    for pos, (text, loss, top, p) in enumerate(zip(tl.texts, tl.loss, tl.top_ids, tl.top_probs)):
        shown = escape(text)
        if loss is None:
            parts.append(f'<span class="tok unscored" title="token {pos}: not scored (no context before it)">{shown}</span>')
            continue
        top_text = token_label(token_text(tokenizer, top), 24)
        tip = (f"token {pos} {token_label(text, 24)}: loss {loss:.3f} nats (p = {math.exp(-loss):.4f}); "
               f"top prediction {top_text} (p = {p:.4f})")
        style = f"background:{_colour(loss / vmax)}" + (";color:#fff" if loss / vmax > 0.7 else "")
        parts.append(f'<span class="tok" style="{style}" title="{escape(tip)}">{shown}</span>')
    bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "—"
    facts = [("perplexity", f"{r.perplexity:.4f}"), ("mean loss (NLL)", f"{r.nll:.4f} nats/token"),
             ("bits per byte", bpb), ("tokens scored", f"{r.tokens:,} of {r.total_tokens:,}"),
             ("windows", f"{r.windows:,} (context {r.context} tokens, stride {r.stride})")]
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in facts)
    body = f"""<h1>Per-token loss: {escape(model_name)}</h1>
<p class="meta">{escape(source)}</p>
<table class="facts">{rows}</table>
<p class="meta">Each token is coloured by its loss, −log p(token | the text before it), in nats:
0<span class="legend"></span>{vmax:.2f}+ (the scale ends at the 98th percentile). Hover a token for its loss and the
model's top prediction at that place. The numbers are those of <code>lmforge eval ppl</code> with the same settings.</p>
<div class="tokens">{"".join(parts)}</div>"""
    return page(f"loss: {model_name}", body, css=CSS)


def inspect_loss(model_spec: str, data: str | Path, out: Path, config: PerplexityConfig | None = None, *,
                 device: str = "cpu", progress: bool = False) -> TokenLosses:
    """Load the model, read the file as `eval ppl` does (text, JSONL; --max-tokens), score every
    token and write the page to `out`."""
    from lmforge.eval.perplexity import _progress_bar, load_engine, load_stream
    from lmforge.fsutil import write_text_atomic

    config = config or PerplexityConfig()
    out = Path(out)
    if out.is_dir():
        raise LmforgeError(f"{out} is a folder: -o names the HTML file to write")
    if Path(data).is_dir():
        raise LmforgeError(f"{data} is a folder: inspect loss reads a text or JSONL file (shards hold no text to show)")
    engine, loaded = load_engine(model_spec, device)
    stream = load_stream(data, loaded.tokenizer, config.text_field, config.max_tokens)
    bar = _progress_bar(progress)
    try:
        tl = token_losses(engine, stream.ids, config, n_bytes=stream.n_bytes, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    write_text_atomic(out, render_page(tl, loaded.tokenizer, model_name=_name(model_spec, loaded), source=str(data)))
    return tl


def _name(spec: str, loaded) -> str:
    return loaded.model.config.name or str(spec)
