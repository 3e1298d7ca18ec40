"""`lmforge inspect attention`: the attention maps of one forward, per layer and head, as PNG grids
(OUT/attention-layerL.png; an encoder-decoder's OUT/attention-{encoder,decoder,cross}-layerL.png)
and one self-contained page (OUT/attention.html)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.inspect.capture import KIND_TITLES, capture_attention
from lmforge.inspect.inputs import Inputs, check_head, prepare_inputs, token_label

LABELLED_TOKENS = 48  # axes name their tokens up to this many; beyond, only positions
# The most weights one page holds (~3 characters each in its JSON): beyond, a browser struggles.
MAX_WEIGHTS = 8_000_000


@dataclass
class AttentionMaps:
    """maps[kind]: {layer index: probabilities [n_head, T, S]} (T queries, S keys); the layers
    and heads kept (--layer/--head), the inputs and the model's logits."""

    maps: dict[str, dict[int, torch.Tensor]]
    heads: list[int]
    inputs: Inputs
    logits: torch.Tensor
    n_kv_head: int = 0
    files: list[Path] = field(default_factory=list)

    def sides(self, kind: str) -> tuple[list[str], list[str]]:
        """(query token texts, key token texts) of an attention kind."""
        tgt, src = self.inputs.texts, self.inputs.src_texts
        return {"self": (tgt, tgt), "decoder": (tgt, tgt), "encoder": (src, src), "cross": (tgt, src)}[kind]


def _pick_layers(n_layers: dict[str, int], layer: int | None) -> dict[str, list[int]]:
    """The layers of each stack that --layer names (all without it; negative counts from the end).
    A stack too short for it is left out; a layer no stack has is an error."""
    if layer is None:
        return {kind: list(range(n)) for kind, n in n_layers.items()}
    picked = {kind: [layer % n] for kind, n in n_layers.items() if -n <= layer < n}
    if not picked:
        sizes = ", ".join(f"{kind} {n}" for kind, n in n_layers.items())
        most = max(n_layers.values())
        raise LmforgeError(f"--layer {layer} is out of range: the model has {most} layers (0..{most - 1}"
                           + (f"; {sizes})" if len(n_layers) > 1 else ")"))
    return picked


def attention_maps(loaded, text: str, source: str | None = None, *, layer: int | None = None,
                   head: int | None = None) -> AttentionMaps:
    """Run the model once on the text (an encoder-decoder: `source` into the encoder, the text into
    the decoder) and keep the attention probabilities of the layers and heads asked for."""
    model = loaded.model
    config = model.config
    n_layers = ({"encoder": config.n_encoder_layer, "decoder": config.n_layer, "cross": config.n_layer}
                if config.is_encoder_decoder else {"self": config.n_layer})
    layers = _pick_layers(n_layers, layer)
    head = check_head(head, config.n_head)
    inputs = prepare_inputs(loaded, text, source)
    heads = list(range(config.n_head)) if head is None else [head]
    T, S = len(inputs.ids), len(inputs.src_ids or inputs.ids)
    sizes = {"self": T * T, "decoder": T * T, "encoder": S * S, "cross": T * S}
    weights = sum(len(idx) * len(heads) * sizes[kind] for kind, idx in layers.items())
    if weights > MAX_WEIGHTS:
        raise LmforgeError(f"{weights:,} attention weights ({T} tokens) are too many for one page (at most "
                           f"{MAX_WEIGHTS:,}): pick a layer (--layer) or a head (--head), or a shorter text")
    captured, logits = capture_attention(model, inputs, layers)
    maps = {kind: {i: probs[heads] for i, probs in captured[kind].items()} for kind in layers}
    return AttentionMaps(maps, heads, inputs, logits, n_kv_head=config.n_kv_head)


def plot_layer(am: AttentionMaps, kind: str, layer: int, path: Path, n_head: int) -> Path:
    """One layer's heads in a grid: queries down, keys across, each head on its own colour scale."""
    from lmforge.report import save_png, subplots

    probs = am.maps[kind][layer]
    queries, keys = am.sides(kind)
    T, S = len(queries), len(keys)
    n = len(am.heads)
    ncols = min(n, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    labelled = max(T, S) <= LABELLED_TOKENS
    side = min(7.0, max(2.6, 0.17 * max(T, S) + (1.2 if labelled else 0.6)))
    fig, axes = subplots(nrows, ncols, figsize=(side * ncols + 0.4, side * nrows + 0.6), squeeze=False)
    group = max(1, n_head // am.n_kv_head) if am.n_kv_head else 1
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for ax, h, p in zip(axes.flat, am.heads, probs):
        ax.imshow(p.numpy(), cmap="Blues", vmin=0.0, vmax=max(float(p.max()), 1e-6), interpolation="nearest")
        ax.set_title(f"head {h}" + (f" (kv {h // group})" if group > 1 else ""), fontsize=9)
        if labelled:
            ax.set_xticks(range(S), [token_label(t, 10) for t in keys], rotation=90, fontsize=6)
            ax.set_yticks(range(T), [token_label(t, 10) for t in queries], fontsize=6)
        else:
            ax.tick_params(labelsize=6)
    fig.suptitle(f"{KIND_TITLES[kind]}, layer {layer}: rows = queries, columns = keys (each head scaled to its maximum)",
                 fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def png_name(kind: str, layer: int) -> str:
    return f"attention-layer{layer}.png" if kind == "self" else f"attention-{kind}-layer{layer}.png"


def write_attention(am: AttentionMaps, out: Path, *, model_name: str, n_head: int) -> list[Path]:
    """OUT/attention-*.png per layer and OUT/attention.html; returns the files written."""
    from lmforge.fsutil import write_text_atomic
    from lmforge.inspect.attention_page import render_page

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out} exists and is not a folder: -o names the folder the maps go to")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    import warnings

    with warnings.catch_warnings():  # a token in a script the plot font lacks draws as a box; say nothing
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        for kind, layers in am.maps.items():
            for layer in layers:
                files.append(plot_layer(am, kind, layer, out / png_name(kind, layer), n_head))
    html_path = out / "attention.html"
    write_text_atomic(html_path, render_page(am, model_name))
    files.append(html_path)
    am.files = files
    return files
