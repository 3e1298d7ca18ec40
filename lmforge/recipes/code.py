"""`lmforge recipe run code`: code generation, judged by running the code. Pretrain a small model on
the Python standard library's source (the quickstart's data, a longer budget), then score it and
SmolLM2-135M-Instruct on HumanEval with execution-based pass@1/pass@10 (`lmforge eval code`:
each completion runs in the sandbox against the problem's tests).

Prompt format: the problem's prompt as it is (signature + docstring, no chat template); a
completion ends before the first of HumanEval's stop sequences ("\\nclass", "\\ndef", "\\n#",
"\\nif", "\\nprint"). The program run is prompt + completion + the problem's test + a call of
check(entry_point).

Stages (each resumable): data -> pretrain -> eval-ours -> eval-<compare model> -> report.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmforge.errors import LmforgeError
from lmforge.recipes.stages import RecipeDir, resuming, saved_max_steps

OURS = "ours"


@dataclass
class CodeRecipeConfig:
    out: Path = Path("runs/recipe-code")
    budget: float = 20.0  # minutes of pretraining
    max_steps: int = 0  # a fixed step count instead of the budget (tests)
    preset: str = "tiny"
    vocab_size: int = 4096
    batch_size: int = 16
    block_size: int = 256
    inputs: tuple[str, ...] = ()  # corpus files/folders (default: the standard library's source)
    compare: str = "smollm2-135m-instruct"  # scored beside ours ("" = none)
    problems: str = "humaneval"  # or a JSONL of problems in HumanEval's shape
    limit: int = 40  # the first N problems (0 = all 164: SmolLM2 then needs ~an hour on 2 cores)
    samples: int = 10  # per problem: pass@1 and pass@10 from the unbiased estimator
    temperature: float = 0.8
    max_new_tokens: int = 128
    overwrite: bool = False
    progress: bool = True

    def recorded(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "overwrite", "progress")}


def run_code(cfg: CodeRecipeConfig, echo: Callable[[str], None] = print) -> dict:
    recipe = RecipeDir(cfg.out, "code", cfg.recorded(), overwrite=cfg.overwrite, echo=echo)
    out = recipe.out
    data = recipe.stage("data", lambda: _data(cfg, out, echo))
    trained = recipe.stage("pretrain", lambda: _pretrain(cfg, out, data, echo))
    models = {OURS: trained["model"], **({file_label(cfg.compare): cfg.compare} if cfg.compare else {})}
    evals = {name: recipe.stage(f"eval-{name}", lambda spec=spec, name=name: _evaluate(cfg, out, name, spec, echo))
             for name, spec in models.items()}
    plot = plot_failures(evals, out / "failures.png")
    results = {"data": data, "pretrain": trained, "evals": evals, "plot": str(plot)}
    return recipe.finish(results, code_report(cfg, results))


def file_label(spec: str) -> str:
    """A model spec as a file-name part: a known name as it is, a path by its last component."""
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec).name or spec).strip("-.")
    if not label or label == OURS:
        raise LmforgeError(f"--model {spec!r}: cannot name its results file (give a model name or a folder with a name)")
    return label


def _data(cfg: CodeRecipeConfig, out: Path, echo: Callable[[str], None]) -> dict:
    from lmforge.quickstart import build_corpus

    shards, info = build_corpus(out, list(cfg.inputs) or None, cfg.vocab_size, cfg.progress, say=echo)
    s = info["shards"]["splits"]
    return {"shards": str(shards), "documents": info["clean"]["output"]["documents"],
            "train_tokens": s["train"]["tokens"], "val_tokens": s["val"]["tokens"], "timings": info["timings"]}


def _pretrain(cfg: CodeRecipeConfig, out: Path, data: dict, echo: Callable[[str], None]) -> dict:
    from lmforge.quickstart import time_one_step, training_plan
    from lmforge.train.pretrain import pretrain

    run_dir, shards = out / "run", Path(data["shards"])
    resume = resuming(run_dir)
    if resume:  # the plan the interrupted run was started with, not a new timing
        steps = saved_max_steps(run_dir)
    elif cfg.max_steps:
        steps = cfg.max_steps
    else:  # as the quickstart plans: 85% of the budget in steps, the rest for evaluations
        steps = max(20, int(0.85 * cfg.budget * 60 / time_one_step(shards, cfg.preset, cfg.batch_size, cfg.block_size)))
    tc = training_plan(steps, cfg.batch_size, cfg.block_size, cfg.budget)
    echo(f"[recipe] pretrain: {cfg.preset}, {tc.max_steps} steps of {cfg.batch_size} x {cfg.block_size} tokens"
         + (" (continuing from its checkpoint)" if resume else ""))
    summary = pretrain(str(shards), cfg.preset, run_dir, tc, resume=resume, overwrite=not resume, progress=cfg.progress,
                       sample_prompts=("def fibonacci(n):",))
    return {"model": str(run_dir), "preset": cfg.preset, "params": summary["params"], "steps": summary["steps"],
            "train_seconds": summary["train_seconds"], "best_val_loss": summary["best_val_loss"],
            "unigram_val_loss": summary["unigram_val_loss"], "tokens_seen": summary["tokens_seen"]}


def _evaluate(cfg: CodeRecipeConfig, out: Path, name: str, spec: str, echo: Callable[[str], None]) -> dict:
    from lmforge.eval.code import CodeEvalConfig, evaluate_code
    from lmforge.eval.results import write_result

    result = evaluate_code(spec, cfg.problems, CodeEvalConfig(samples=cfg.samples, temperature=cfg.temperature,
                                                         max_new_tokens=cfg.max_new_tokens, limit=cfg.limit),
                      progress=cfg.progress, warn=echo)
    write_result(result, out / f"eval-{name}.json")  # `lmforge eval compare` reads these
    echo(f"[recipe] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["pass_at_k"].items()))
    problems = result["details"]["problems"]
    # The report shows one sample: a passing one where there is one, else the first.
    example = next((p for p in problems if p["correct"]), problems[0] if problems else None)
    # The metrics sit at the top level of a result (lmforge.eval.results).
    outcomes = {"passed": result["passed"], **result["failures"]}
    return {"model": spec, "pass_at_k": result["pass_at_k"], "outcomes": outcomes, "problems": result["problems"],
            "samples": result["samples"], "notes": result.get("notes", []), "file": str(out / f"eval-{name}.json"),
            "solved": [p["task_id"] for p in problems if p["correct"]], "example": example}


def plot_failures(evals: dict[str, dict], path: Path) -> Path:
    """How the samples failed, per model: one bar per outcome (passed, assertion, syntax error...)."""
    from lmforge.report import grouped_bars, save_png, subplots

    outcomes = list(dict.fromkeys(k for e in evals.values() for k in e["outcomes"]))
    fig, ax = subplots(1, 1, figsize=(8, 4))
    grouped_bars(ax, outcomes, {name: [e["outcomes"].get(o, 0) for o in outcomes] for name, e in evals.items()},
                 ylabel="samples", title="how the samples ended", rotate=True)
    fig.tight_layout()
    return save_png(fig, path)


def code_report(cfg: CodeRecipeConfig, results: dict) -> str:
    from lmforge.report import markdown_table

    pre = results["pretrain"]
    rows = []
    for name, e in results["evals"].items():
        m = e["pass_at_k"]
        rows.append([name, e["model"], *(f"{m[k]:.3f}" if m.get(k) is not None else "-" for k in ("pass@1", "pass@10")),
                     f"{len(e['solved'])} of {e['problems']}"])
    scope = f"the first {cfg.limit} problems" if cfg.limit else "all problems"
    lines = [f"# Recipe: code generation ({Path(cfg.problems).name}, {scope})", "",
             f"Our model: {pre['preset']}, {pre['params'] / 1e6:.2f}M parameters, {pre['steps']} steps "
             f"({pre['train_seconds']:.0f} s) on {results['data']['train_tokens']:,} tokens of Python; best val loss "
             f"{pre['best_val_loss']:.4f} (unigram baseline {pre['unigram_val_loss']:.4f}).", "",
             f"{cfg.samples} samples per problem at temperature {cfg.temperature}, at most {cfg.max_new_tokens} new tokens, "
             "the prompt as it is (no chat template), cut at HumanEval's stop sequences; each program ran in the sandbox.", "",
             markdown_table(["model", "spec", "pass@1", "pass@10", "problems solved"], rows), "",
             f"![how the samples ended]({Path(results['plot']).name})", ""]
    for name, e in results["evals"].items():
        ex = e.get("example")
        if ex and ex["samples"]:
            s = next((s for s in ex["samples"] if s["status"] == "passed"), ex["samples"][0])
            lines += [f"## {name}: {ex['task_id']}, first sample ({s.get('failure') or 'passed'})", "", "```python",
                      (s.get("completion") or "").rstrip(), "```", ""]
        for note in e.get("notes") or []:
            lines.append(f"- note ({name}): {note}")
    return "\n".join(lines) + "\n"
