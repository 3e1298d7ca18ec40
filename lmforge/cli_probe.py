"""`lmforge probe bias`: parse, call lmforge.eval.bias, print. torch and matplotlib are imported
inside the command so that `lmforge --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli_options import with_config
from lmforge.eval.bias import BiasConfig

probe_app = typer.Typer(
    help="Probe a model's behaviour: bias on counterfactual pairs.",
    no_args_is_help=True, rich_markup_mode=None,
)


@probe_app.command("bias")
@with_config(config=BiasConfig)
def bias(
    model: Annotated[str, typer.Argument(help="A model dir, a run dir (its best model) or a known model name.", show_default=False)],
    config: BiasConfig,
    model2: Annotated[Optional[str], typer.Argument(help="A second model scored on the same pairs (e.g. after a fine-tune); "
                                                    "the report puts both side by side with the change.", show_default=False)] = None,
    templates: Annotated[Optional[Path], typer.Option("--templates", help="Counterfactual pairs, JSONL: {\"category\", \"template\" "
                                                      "(with {X}), \"a\", \"b\", \"continuation\"} per line. Default: the built-in set.",
                                                      show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Result JSON; OUT.md and OUT.png beside it hold the report. "
                                                "Without it the JSON goes to stdout.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
):
    """Bias on counterfactual pairs: log-likelihood of a continuation with side A vs side B of a group term, per category with bootstrap CIs."""
    from lmforge.cli_eval import _finish
    from lmforge.eval.bias import probe_bias

    r = probe_bias(model, model2, templates, config, device=device, progress=progress and out is not None)
    lines = []
    for k, m in enumerate(r["models"]):
        label = m["model"]["spec"]
        lines.append(f"{label}:" if len(r["models"]) > 1 else f"{label}: {r['pairs']} pairs, continuation Δ log-lik (A − B) [95% CI]")
        for name, c in [*m["categories"].items(), ("overall", m["overall"])]:
            s = c["continuation"]
            ci = f" [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]" if s.get("ci") else ""
            lines.append(f"  {name:<18} n={c['n']:<5} {s['mean']:+.3f}{ci}  A preferred {s['share_a']:.0%}")
    if r.get("change"):
        s = r["change"]["overall"]["continuation"]
        ci = f" [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]" if s.get("ci") else ""
        lines.append(f"change (model 2 − model 1), overall: {s['mean']:+.3f}{ci}")
    _finish(r, out, "\n".join(lines))
