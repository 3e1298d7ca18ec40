"""`lmforge inspect attention|logit-lens|loss`: parse, call lmforge.inspect, print. The heavy
modules (torch, matplotlib) are imported inside the commands so that `lmforge --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli_options import with_config
from lmforge.eval.perplexity import PerplexityConfig

inspect_app = typer.Typer(
    help="Look inside a model: attention maps, the logit lens, per-token loss.",
    no_args_is_help=True, rich_markup_mode=None,
)

ModelArg = Annotated[str, typer.Argument(help="A model dir, a run dir (its best model) or a known model name.", show_default=False)]
TextArg = Annotated[str, typer.Argument(help="The text to run through the model (an encoder-decoder's decoder input).", show_default=False)]
SourceOpt = Annotated[Optional[str], typer.Option("--source", help="An encoder-decoder's source text (the encoder input).", show_default=False)]
OutDir = Annotated[Path, typer.Option("-o", "--out", help="Output folder (each file written atomically).", show_default=False)]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")]


def _load(model: str, device: str):
    """The model in fp32 (a quantized dir on fp32 copies of its weights), in eval mode."""
    from lmforge.interop.registry import load_model
    from lmforge.runtime import resolve_device

    loaded = load_model(model, device=resolve_device(device), dequantize=True)
    loaded.model.eval()
    return loaded


def _name(model: str, loaded) -> str:
    return loaded.model.config.name or model


@inspect_app.command("attention")
def attention(
    model: ModelArg,
    text: TextArg,
    out: OutDir,
    layer: Annotated[Optional[int], typer.Option("--layer", help="Only this layer (0-based; -1 the last). Default: all.", show_default=False)] = None,
    head: Annotated[Optional[int], typer.Option("--head", help="Only this head (0-based). Default: all.", show_default=False)] = None,
    source: SourceOpt = None,
    device: Device = "cpu",
):
    """Attention maps per layer and head: OUT/attention-layerL.png grids and OUT/attention.html (hover a token)."""
    from lmforge.inspect.attention import attention_maps, write_attention

    loaded = _load(model, device)
    am = attention_maps(loaded, text, source, layer=layer, head=head)
    files = write_attention(am, out, model_name=_name(model, loaded), n_head=loaded.model.config.n_head)
    kinds = ", ".join(f"{kind} ({len(layers)} layer{'s' if len(layers) != 1 else ''})" for kind, layers in am.maps.items())
    src = f" and {len(am.inputs.src_ids)} source tokens" if am.inputs.src_ids else ""
    typer.echo(f"attention of {len(am.inputs.ids)} tokens{src}, {len(am.heads)} head(s): {kinds}")
    typer.echo(f"wrote {len(files) - 1} PNG file(s) and {files[-1]}")


@inspect_app.command("logit-lens")
def logit_lens(
    model: ModelArg,
    text: TextArg,
    out: OutDir,
    top: Annotated[int, typer.Option("--top", help="Tokens kept per layer and position (in the CSV).")] = 5,
    source: SourceOpt = None,
    device: Device = "cpu",
):
    """Top tokens predicted from each layer's residual stream (final norm + head): OUT/logit-lens.{md,csv,png}."""
    from lmforge.inspect.inputs import token_label
    from lmforge.inspect.lens import logit_lens as run_lens, write_lens

    loaded = _load(model, device)
    lens = run_lens(loaded, text, source, top=top)
    files = write_lens(lens, out, _name(model, loaded))
    last = " ".join(token_label(pos[0], 12) for pos in lens.top_texts[-1])
    typer.echo(f"logit lens over {lens.top_ids.shape[0]} residual streams x {lens.top_ids.shape[1]} positions; "
               f"the output's top tokens: {last}")
    typer.echo("wrote " + ", ".join(str(f) for f in files))


@inspect_app.command("loss")
@with_config(config=PerplexityConfig)
def loss(
    model: ModelArg,
    data: Annotated[str, typer.Argument(help="A text file (.txt, .md, .py, ...) or a JSONL file (--text-field).", show_default=False)],
    config: PerplexityConfig,
    out: Annotated[Path, typer.Option("-o", "--out", help="The HTML page to write (atomically).", show_default=False)],
    device: Device = "cpu",
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
):
    """Per-token loss of a text as an HTML heat map, with its perplexity (eval ppl's sliding window)."""
    from lmforge.inspect.loss import inspect_loss

    tl = inspect_loss(model, data, out, config, device=device, progress=progress)
    r = tl.result
    typer.echo(f"perplexity {r.perplexity:.4f} (NLL {r.nll:.4f} nats/token over {r.tokens:,} tokens; "
               f"context {r.context}, stride {r.stride}, {r.windows} window(s))")
    typer.echo(f"wrote {out}")
