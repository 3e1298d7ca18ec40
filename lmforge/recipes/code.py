"""`lmforge recipe run code`: code generation, judged by running the code. Pretrain a small model on
the Python standard library's source (the quickstart's data, a longer budget), then score it and
SmolLM2-135M-Instruct on HumanEval with execution-based pass@1/pass@10 (`lmforge eval code`:
each completion runs in the sandbox against the problem's tests).

Prompt formats (`lmforge eval code --prompt-format`): our model, a base model, gets the problem's
prompt as it is (signature + docstring) and a completion ends before the first of HumanEval's stop
sequences ("\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"); the compared model, an instruct
model, is asked through its chat template for the whole function in a ```python block
(`compare_prompt`, "raw" to prompt it as ours), whose code is run. The program run is prompt +
completion + the problem's test + a call of check(entry_point).

The budget is the whole recipe's. Stages (each resumable): data -> eval-<compare model> (its
cost does not depend on training, so it runs first and is timed) -> pretrain (the budget less
what was spent and our model's evaluation, predicted by timing decode steps of an untrained model
of the preset) -> eval-ours -> report.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmforge.errors import LmforgeError
from lmforge.recipes import RECIPES
from lmforge.recipes.stages import RecipeDir, resuming, saved_max_steps

OURS = "ours"


@dataclass
class CodeRecipeConfig:
    out: Path = Path("runs/recipe-code")
    budget: float = RECIPES["code"].budget  # minutes for the whole recipe (pretraining gets what the evaluations leave)
    max_steps: int = 0  # a fixed step count instead of the budget (tests)
    preset: str = "tiny"
    vocab_size: int = 4096
    batch_size: int = 16
    block_size: int = 256
    inputs: tuple[str, ...] = ()  # corpus files/folders (default: the standard library's source)
    compare: str = "smollm2-135m-instruct"  # scored beside ours ("" = none)
    compare_prompt: str = "chat"  # how the compared model is prompted: chat (its template) or raw, as ours
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
    recipe = RecipeDir(cfg.out, "code", cfg.recorded(), overwrite=cfg.overwrite, echo=echo, budget_minutes=cfg.budget)
    out = recipe.out
    data = recipe.stage("data", lambda: _data(cfg, out, echo))
    compared = {}
    if cfg.compare:
        name = file_label(cfg.compare)
        compared[name] = recipe.stage(f"eval-{name}", lambda: _evaluate(cfg, out, name, cfg.compare, echo))
    trained = recipe.stage("pretrain", lambda: _pretrain(cfg, recipe, data, compared, echo))
    evals = {OURS: recipe.stage(f"eval-{OURS}", lambda: _evaluate(cfg, out, OURS, trained["model"], echo)), **compared}
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


def _pretrain(cfg: CodeRecipeConfig, recipe: RecipeDir, data: dict, compared: dict[str, dict],
              echo: Callable[[str], None]) -> dict:
    from lmforge.quickstart import time_one_step, training_plan
    from lmforge.train.pretrain import pretrain

    out = recipe.out
    run_dir, shards = out / "run", Path(data["shards"])
    resume = resuming(run_dir)
    minutes, predicted = cfg.budget, None
    if resume:  # the plan the interrupted run was started with, not a new timing
        steps = saved_max_steps(run_dir)
    elif cfg.max_steps:
        steps = cfg.max_steps
    else:  # as the quickstart plans: 85% of what the budget leaves in steps, the rest for evaluations
        predicted = predict_eval_seconds(cfg, shards, next(iter(compared.values()), None))
        minutes = recipe.training_minutes(predicted["seconds"], "our model's evaluation")
        steps = max(20, int(0.85 * minutes * 60 / time_one_step(shards, cfg.preset, cfg.batch_size, cfg.block_size)))
    tc = training_plan(steps, cfg.batch_size, cfg.block_size, minutes)
    echo(f"[recipe] pretrain: {cfg.preset}, {tc.max_steps} steps of {cfg.batch_size} x {cfg.block_size} tokens"
         + (" (continuing from its checkpoint)" if resume else ""))
    summary = pretrain(str(shards), cfg.preset, run_dir, tc, resume=resume, overwrite=not resume, progress=cfg.progress,
                       sample_prompts=("def fibonacci(n):",))
    return {"model": str(run_dir), "preset": cfg.preset, "params": summary["params"], "steps": summary["steps"],
            "train_seconds": summary["train_seconds"], "best_val_loss": summary["best_val_loss"],
            "unigram_val_loss": summary["unigram_val_loss"], "tokens_seen": summary["tokens_seen"],
            "train_minutes": round(minutes, 2), "predicted_eval": predicted}


# A program's run in the sandbox when no evaluation has been timed yet: the 164 canonical HumanEval
# solutions take 6 s on 2 cores (0.04 s each); samples that loop until their timeout cost more.
EXECUTE_SECONDS_PER_PROGRAM = 0.1


def predict_eval_seconds(cfg: CodeRecipeConfig, shards: Path, compared: dict | None) -> dict:
    """What evaluating our model will take, before it exists: every batch of samples generates
    max_new_tokens (an upper bound: stop sequences end most completions early) at the decode step
    time of an untrained model of the preset, timed here at the evaluation's batch and a full
    context; executing the programs takes what it took for the compared model (as many programs),
    else EXECUTE_SECONDS_PER_PROGRAM each."""
    import math

    from lmforge.eval.code import CodeEvalConfig, load_problems
    from lmforge.generate.engine import Engine
    from lmforge.model.gpt import GPT
    from lmforge.model.measure import time_decode
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.pretrain import resolve_model_config

    tokenizer = Tokenizer.load(shards)
    config = resolve_model_config(cfg.preset, {"block_size": cfg.block_size}, tokenizer.vocab_size)
    eval_cfg = CodeEvalConfig(samples=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    problems = len(load_problems(cfg.problems, cfg.limit))
    batches = math.ceil(problems / eval_cfg.problems_per_batch)
    new = min(cfg.max_new_tokens, config.block_size - 2)
    timed = time_decode(Engine(GPT(config), tokenizer), cfg.samples, config.block_size - new - 1, min(16, new), repeats=2)
    generate = batches * (timed["prefill_seconds"] + new * timed["step_seconds"])
    programs = problems * cfg.samples
    execute = compared["seconds"]["execute"] if compared and compared.get("seconds") else programs * EXECUTE_SECONDS_PER_PROGRAM
    return {"seconds": round(generate + execute, 1), "generate_seconds": round(generate, 3),
            "execute_seconds": round(execute, 3), "decode_step_seconds": round(timed["step_seconds"], 5),
            "batches": batches}


def _evaluate(cfg: CodeRecipeConfig, out: Path, name: str, spec: str, echo: Callable[[str], None]) -> dict:
    from lmforge.eval.code import CodeEvalConfig, evaluate_code
    from lmforge.eval.results import write_result

    prompt_format = "raw" if name == OURS else cfg.compare_prompt
    result = evaluate_code(spec, cfg.problems, CodeEvalConfig(samples=cfg.samples, temperature=cfg.temperature,
                                                         max_new_tokens=cfg.max_new_tokens, limit=cfg.limit,
                                                         prompt_format=prompt_format),
                      progress=cfg.progress, warn=echo)
    write_result(result, out / f"eval-{name}.json")  # `lmforge eval compare` reads these
    echo(f"[recipe] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["pass_at_k"].items()))
    problems = result["details"]["problems"]
    # The report shows one sample: a passing one where there is one, else the first.
    example = next((p for p in problems if p["correct"]), problems[0] if problems else None)
    # The metrics sit at the top level of a result (lmforge.eval.results).
    outcomes = {"passed": result["passed"], **result["failures"]}
    return {"model": spec, "pass_at_k": result["pass_at_k"], "outcomes": outcomes, "problems": result["problems"],
            "seconds": result["seconds"], "prompt_format": prompt_format,
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
        rows.append([name, e["model"], e.get("prompt_format", "raw"),
                     *(f"{m[k]:.3f}" if m.get(k) is not None else "-" for k in ("pass@1", "pass@10")),
                     f"{len(e['solved'])} of {e['problems']}"])
    scope = f"the first {cfg.limit} problems" if cfg.limit else "all problems"
    lines = [f"# Recipe: code generation ({Path(cfg.problems).name}, {scope})", "",
             f"Our model: {pre['preset']}, {pre['params'] / 1e6:.2f}M parameters, {pre['steps']} steps "
             f"({pre['train_seconds']:.0f} s) on {results['data']['train_tokens']:,} tokens of Python; best val loss "
             f"{pre['best_val_loss']:.4f} (unigram baseline {pre['unigram_val_loss']:.4f}).", "",
             f"{cfg.samples} samples per problem at temperature {cfg.temperature}, at most {cfg.max_new_tokens} new tokens; "
             "prompt raw: the problem's prompt as it is, cut at HumanEval's stop sequences; chat: the model's chat template "
             "asked for the whole function in a ```python block, its code run. Each program ran in the sandbox.", "",
             markdown_table(["model", "spec", "prompt", "pass@1", "pass@10", "problems solved"], rows), "",
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
