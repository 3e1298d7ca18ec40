"""`lmforge recipe run style`: content creation in one style. LoRA-fine-tune a pretrained model on a
text (tinyshakespeare for the demo, any text file for users), then put the base and the tuned
model side by side on the same prompts at several sampling settings, so that a reader sees both
what the fine-tune changed and what the sampling controls do:

- each sample's perplexity under the tuned model (how much it reads like the text) and distinct-1/2
  (the share of unique unigrams/bigrams over the setting's samples: diversity);
- the held-out text's perplexity under both models (the headline figure).

The budget is the whole recipe's. Stages (each resumable): data -> base (the base model's samples
and held-out perplexity, timed) -> finetune (the budget less what was spent and the tuned model's
turn, predicted from the base model's) -> tuned (its samples and perplexity, and every sample
scored under it) -> report.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmforge.errors import LmforgeError
from lmforge.recipes import RECIPES
from lmforge.recipes.stages import RecipeDir, resuming, saved_max_steps, steps_for_budget

DEMO_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclass(frozen=True)
class Setting:
    name: str
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


# From deterministic to loose: greedy repeats itself, high temperature without a cut-off wanders.
SETTINGS = (
    Setting("greedy", 0.0),
    Setting("T=0.7 top-p 0.9", 0.7, top_p=0.9),
    Setting("T=1.0", 1.0),
    Setting("T=1.0 min-p 0.1 rep 1.1", 1.0, min_p=0.1, repetition_penalty=1.1),
    Setting("T=1.5", 1.5),
)


@dataclass
class StyleConfig:
    out: Path = Path("runs/recipe-style")
    model: str = "smollm2-135m-instruct"
    text: Path | None = None  # the text in the target style (default: tinyshakespeare, where present)
    budget: float = RECIPES["style"].budget  # minutes for the whole recipe (fine-tuning gets what the samples and scoring leave)
    max_steps: int = 0  # a fixed step count instead of the budget (tests)
    val_fraction: float = 0.05  # the text's tail held out for perplexity
    max_train_chars: int = 400_000  # the head of a long text is plenty for a style
    max_val_chars: int = 12_000  # the held-out tail's start: every evaluation scores all of it
    block_size: int = 128
    batch_size: int = 4
    lr: float = 1e-3
    lora_rank: int = 16
    prompts: int = 4  # prompts: the first words of this many held-out passages
    seeds: int = 2  # samples per prompt and setting
    max_new_tokens: int = 48
    settings: tuple[Setting, ...] = SETTINGS
    overwrite: bool = False
    progress: bool = True
    calibration_steps: int = 8  # timed to turn minutes into steps (each step of SmolLM2 is seconds on 2 cores)

    def recorded(self) -> dict:
        """What decides the results: a continued run must have the same."""
        skip = {"out", "overwrite", "progress"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def resolve_text(text: Path | None) -> Path:
    if text is not None:
        if not Path(text).is_file():
            raise LmforgeError(f"{text}: no such text file")
        return Path(text)
    if DEMO_TEXT.is_file():
        return DEMO_TEXT
    raise LmforgeError(f"no text given and the demo's {DEMO_TEXT} is not here: pass --data FILE (any text in one style)")


def split_text(text: str, val_fraction: float, max_train_chars: int, max_val_chars: int = 0) -> tuple[str, str]:
    """(train, val): the tail is held out, cut at a line break so that no line is split; each
    part is then capped (at a line break) at its maximum length (0 = no cap)."""
    if len(text) < 2000:
        raise LmforgeError(f"the text has {len(text)} characters; a style needs at least 2,000")
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
    train, val = text[:cut], text[cut:]
    return _cap(train, max_train_chars), _cap(val, max_val_chars)


def _cap(text: str, limit: int) -> str:
    if not limit or len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit)
    return text[:end + 1] if end > 0 else text[:limit]


def pick_prompts(val: str, n: int, seed: int = 0) -> list[str]:
    """The opening words (up to ~6) of n passages of the held-out text that start a line."""
    lines = [ln.strip() for ln in val.splitlines() if len(ln.split()) >= 4]
    if len(lines) < n:
        raise LmforgeError(f"the held-out text has {len(lines)} lines of 4+ words; {n} prompts need as many")
    rng = random.Random(seed)
    return [" ".join(ln.split()[:6]) for ln in rng.sample(lines, n)]


def distinct_n(texts: list[str], n: int) -> float | None:
    """Unique n-grams / all n-grams over the texts (whitespace words): 1.0 = no repeats."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def run_style(cfg: StyleConfig, echo: Callable[[str], None] = print) -> dict:
    recipe = RecipeDir(cfg.out, "style", cfg.recorded(), overwrite=cfg.overwrite, echo=echo, budget_minutes=cfg.budget)
    out = recipe.out
    data = recipe.stage("data", lambda: _data(cfg, out))
    base = recipe.stage("base", lambda: _samples_and_perplexity(cfg, "base", cfg.model, data))
    tuned = recipe.stage("finetune", lambda: _finetune(cfg, recipe, data, base, echo))
    scores = recipe.stage("tuned", lambda: _score(cfg, data, tuned["model"], base))
    plot = plot_settings(scores["by_setting"], out / "style.png")
    results = {"data": data, "finetune": tuned, "val_perplexity": scores["val_perplexity"],
               "by_setting": scores["by_setting"], "samples": scores["samples"], "plot": str(plot)}
    return recipe.finish(results, style_report(cfg, results))


def _data(cfg: StyleConfig, out: Path) -> dict:
    from lmforge.fsutil import write_text_atomic

    source = resolve_text(cfg.text)
    text = source.read_text(encoding="utf-8", errors="strict")
    train, val = split_text(text, cfg.val_fraction, cfg.max_train_chars, cfg.max_val_chars)
    (out / "data").mkdir(exist_ok=True)
    write_text_atomic(out / "data" / "train.txt", train)
    write_text_atomic(out / "data" / "val.txt", val)
    return {"text": str(source), "chars": len(text), "train_chars": len(train), "val_chars": len(val),
            "train": str(out / "data" / "train.txt"), "val": str(out / "data" / "val.txt"),
            "prompts": pick_prompts(val, cfg.prompts)}


# The tuned model's turn after fine-tuning = the base model's (the same samples and perplexity, both
# in fp32, the adapter merged into the same shapes) + scoring every sample under it: a fifth more.
TUNED_TURN_PER_BASE = 1.2


def _finetune(cfg: StyleConfig, recipe: RecipeDir, data: dict, base: dict, echo: Callable[[str], None]) -> dict:
    from lmforge.model.lora import LoRAConfig
    from lmforge.train.config import FinetuneConfig, FinetuneTrainConfig
    from lmforge.train.finetune import finetune

    def train_config(max_steps: int, calibrating: bool = False, clock: float = 0.0) -> FinetuneTrainConfig:
        # The calibration times bare steps: no evaluations or checkpoints inside its window.
        every = 0 if calibrating else max(1, max_steps // 8)
        return FinetuneTrainConfig(max_steps=max_steps, batch_size=cfg.batch_size, block_size=cfg.block_size, lr=cfg.lr,
                                   min_lr=cfg.lr / 10, warmup_steps=max(1, min(10, max_steps // 10)),
                                   eval_every=every, eval_batches=8, checkpoint_every=every, log_every=1,
                                   time_budget=clock)

    # No replay of the base model's chat replies and no retention check: moving away from the base
    # is the point here.
    ft = FinetuneConfig(method="lora", data_format="text", select="best", replay=0.0, retention_tolerance=0.0)
    lora = LoRAConfig(rank=cfg.lora_rank)
    out = recipe.out
    run_dir = out / "run"

    def train(folder: Path, max_steps: int, progress: bool = False, resume: bool = False, calibrating: bool = False,
              clock: float = 0.0) -> dict:
        return finetune(cfg.model, data["train"], folder, ft, train_config(max_steps, calibrating, clock), lora,
                        val_data=data["val"], resume=resume, overwrite=not resume, progress=progress, sample_count=0)

    minutes, clock = None, 0.0  # clock: the training's own, a backstop where steps run slower than timed
    if cfg.max_steps:
        steps = cfg.max_steps
    elif resuming(run_dir):
        steps = saved_max_steps(run_dir)
    else:
        minutes = recipe.training_minutes(TUNED_TURN_PER_BASE * base["stage_seconds"], "the tuned model's samples and scoring")
        plan = steps_for_budget(lambda folder, n: train(folder, n, calibrating=True), out / "run.calibration", minutes,
                                 steps=cfg.calibration_steps, window=(2, cfg.calibration_steps - 2), echo=echo)
        steps, clock = plan.steps, plan.seconds
    summary = train(run_dir, steps, progress=cfg.progress, resume=resuming(run_dir), clock=clock)
    return {"model": str(run_dir), "base": cfg.model, "steps": summary["steps"], "lora_rank": cfg.lora_rank,
            "train_seconds": summary.get("train_seconds"), "best_val_loss": summary.get("best_val_loss"),
            "tokens_seen": summary.get("tokens_seen"), "train_minutes": minutes}


def _samples_and_perplexity(cfg: StyleConfig, which: str, spec: str, data: dict, engine=None, loaded=None) -> dict:
    """One model's samples (every prompt x setting x seed; one batched Engine call per setting
    and seed) and the held-out text's perplexity under it. Both models run in fp32: the base's
    quantized weights are dequantized, as fine-tuning does, so that the comparison measures the
    fine-tune alone (and the base's turn costs what the tuned one will: the budget's prediction)."""
    from lmforge.eval.perplexity import PerplexityConfig, load_engine, perplexity_with
    from lmforge.generate.sampling import SamplingParams

    if engine is None:
        engine, loaded = load_engine(spec, dequantize=True)
    rows = []
    for s in cfg.settings:
        for seed in range(cfg.seeds if s.temperature > 0 else 1):
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                    top_k=s.top_k, min_p=s.min_p, repetition_penalty=s.repetition_penalty, seed=seed)
            for prompt, done in zip(data["prompts"], engine.generate(data["prompts"], params)):
                rows.append({"model": which, "setting": s.name, "seed": seed, "prompt": prompt, "text": done.text})
    ppl = perplexity_with(engine, loaded, spec, data["val"], PerplexityConfig())["perplexity"]
    return {"rows": rows, "val_perplexity": round(ppl, 2)}


def _score(cfg: StyleConfig, data: dict, tuned: str, base: dict) -> dict:
    """The tuned model's samples and perplexity; then each sample's (both models') continuation
    scored under the tuned model, and distinct-n per (model, setting)."""
    from lmforge.eval.perplexity import load_engine
    from lmforge.eval.tasks import encode_pair, loglikelihoods

    engine, loaded = load_engine(tuned, dequantize=True)
    mine = _samples_and_perplexity(cfg, "tuned", tuned, data, engine, loaded)
    val = {"base": base["val_perplexity"], "tuned": mine["val_perplexity"]}
    rows = [dict(r) for r in base["rows"] + mine["rows"] if r["text"].strip()]
    pairs = [encode_pair(loaded.tokenizer, r["prompt"], r["text"]) for r in rows]
    for r, (_, cont), (total, _, _) in zip(rows, pairs, loglikelihoods(engine, pairs)):
        r["tuned_ppl"] = round(math.exp(-total / len(cont)), 2)
    by_setting = []
    for which in ("base", "tuned"):
        for s in cfg.settings:
            group = [r for r in rows if r["model"] == which and r["setting"] == s.name]
            texts = [r["text"] for r in group]
            ppls = sorted(r["tuned_ppl"] for r in group)
            by_setting.append({"model": which, "setting": s.name, "temperature": s.temperature, "samples": len(group),
                               "median_tuned_ppl": ppls[len(ppls) // 2] if ppls else None,
                               "distinct_1": _round(distinct_n(texts, 1)), "distinct_2": _round(distinct_n(texts, 2))})
    return {"by_setting": by_setting, "samples": rows, "val_perplexity": val}


def _round(x: float | None) -> float | None:
    return round(x, 3) if x is not None else None


def plot_settings(by_setting: list[dict], path: Path) -> Path:
    """Per sampling setting: the samples' median perplexity under the tuned model (left) and
    distinct-2 (right), base and tuned side by side."""
    from lmforge.report import grouped_bars, save_png, subplots

    names = list(dict.fromkeys(r["setting"] for r in by_setting))
    fig, axes = subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "median_tuned_ppl", "median perplexity under the tuned model"),
                           (axes[1], "distinct_2", "distinct-2 (unique bigrams / all)")):
        grouped_bars(ax, names, {which: [next((r[key] for r in by_setting if r["model"] == which and r["setting"] == n), None)
                                          or 0 for n in names] for which in ("base", "tuned")}, ylabel=label, rotate=True)
    axes[0].set_yscale("log")
    fig.tight_layout()
    return save_png(fig, path)


def style_report(cfg: StyleConfig, results: dict) -> str:
    from lmforge.report import markdown_table

    ft, val = results["finetune"], results["val_perplexity"]
    lines = [f"# Recipe: style — {Path(results['data']['text']).name}", "",
             f"LoRA (rank {ft['lora_rank']}) on {cfg.model}: {ft['steps']} steps, best val loss {ft['best_val_loss']:.4f}, "
             f"{results['data']['train_chars']:,} training characters.", "",
             f"Held-out text perplexity: base {val['base']}, tuned {val['tuned']}.", "",
             "## Sampling settings", "",
             markdown_table(["model", "setting", "samples", "median ppl (tuned model)", "distinct-1", "distinct-2"],
                            [[r["model"], r["setting"], r["samples"], r["median_tuned_ppl"], r["distinct_1"], r["distinct_2"]]
                             for r in results["by_setting"]]), "",
             f"![perplexity and diversity per setting]({Path(results['plot']).name})", "", "## Side by side", ""]
    for prompt in results["data"]["prompts"]:
        lines += [f"### {prompt}", ""]
        for s in cfg.settings:
            cells = []
            for which in ("base", "tuned"):
                row = next((r for r in results["samples"] if r["model"] == which and r["setting"] == s.name
                            and r["prompt"] == prompt and r["seed"] == 0), None)
                cells.append(_one_line(row["text"]) if row else "(empty)")
            lines.append(f"- **{s.name}** — base: {cells[0]}  \n  tuned: {cells[1]}")
        lines.append("")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ⏎ ".join(part for part in text.strip().splitlines() if part.strip()).replace("|", "\\|")
