"""`lmforge recipe translation`: German-English sentence pairs from Debian's Ding dictionary
(trans-de-en); a small encoder-decoder and a decoder-only model of the same parameter count
(trained on `source <|sep|> target`), each trained for the same time budget on the same pairs;
BLEU/chrF on the test split (greedy and beam-4), a plot of val BLEU over training for both, and
OUT/results.json."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lmforge.data.ding import DEFAULT_DING, DingConfig
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.recipes.stages import BudgetPlan
    from lmforge.train.config import TrainConfig

APT_PACKAGE = "trans-de-en"
DEFAULT_PRESET = "seq2seq-tiny"
# 3.93M parameters with a 4,000-token joint BPE vocabulary, dropout 0.1: ~7.5 steps/s of 32 pairs
# on 2 CPU cores. Measured at 15 minutes: val loss 3.91, test BLEU 0.54 / chrF 12.3 (README).
DEFAULT_OVERRIDES = {"n_embd": 192, "intermediate_size": 768, "n_encoder_layer": 3, "n_layer": 3, "n_head": 4,
                     "n_kv_head": 4, "block_size": 128, "dropout": 0.1}


# Scoring a model on the test split (greedy and beam-4), as a share of a whole-recipe budget, until
# the first model's scoring has been timed.
SCORING_SHARE = 0.05


@dataclass
class RecipeConfig:
    out: Path = Path("runs/recipe-translation")
    minutes: float = 15.0  # training time budget per model (minutes); used when budget is 0
    budget: float = 0.0  # minutes for the whole recipe (`lmforge recipe run translation`): the models share what data and scoring leave
    preset: str = DEFAULT_PRESET
    model_overrides: dict = field(default_factory=lambda: dict(DEFAULT_OVERRIDES))
    vocab_size: int = 4000
    reverse: bool = False  # English -> German
    install: bool = True  # apt-get install trans-de-en when the dictionary is missing
    ding_path: Path = Path(DEFAULT_DING)
    overwrite: bool = False
    test_limit: int = 500  # test pairs scored (0 = all)
    batch_size: int = 32
    lr: float = 3e-3
    eval_every: int = 0  # steps between evaluations (val loss, val BLEU on bleu_samples pairs); 0 = about 12 in all
    warmup_steps: int = 100
    max_steps: int = 0  # 0 = as many as the time budget allows
    bleu_samples: int = 100
    max_new_tokens: int = 64  # tokens generated per test sentence at most
    decoder_only: bool = True  # also train and score the decoder-only model of the same size
    phrases: bool = False  # also train on the dictionary's phrase pairs (3+ words, not sentences); val/test stay sentences
    progress: bool = True


def _ding_file(path: Path) -> Path:
    """The dictionary's text file: a path to a file, or the package's directory (its *.txt / de-en file)."""
    if path.is_file():
        return path
    if path.is_dir():
        for cand in sorted(path.iterdir()):
            if cand.is_file():
                return cand
    return path


def ensure_dictionary(path: Path, install: bool, echo: Callable[[str], None] = print,
                      runner: Callable[[list[str]], int] | None = None) -> Path:
    """The Ding file, installing trans-de-en with apt-get when allowed and missing."""
    if path.exists():
        return path
    cmd = ["apt-get", "install", "-y", APT_PACKAGE]
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        cmd = ["sudo", *cmd]
    if not install:
        raise LmforgeError(f"{path} is missing; install it with: {' '.join(cmd)}")
    echo(f"{path} is missing: running {' '.join(cmd)}")
    runner = runner or (lambda c: subprocess.call(c))
    try:
        rc = runner(cmd) if shutil.which(cmd[0]) or runner is not None else 127
    except OSError:
        rc = 127
    if rc != 0 or not path.exists():
        raise LmforgeError(f"could not install {APT_PACKAGE} (exit {rc}); run: {' '.join(cmd)}")
    return path


def add_phrase_pairs(data: Path, ding: Path, cfg: RecipeConfig) -> tuple[Path, dict]:
    """data/train_plus.jsonl: the sentence pairs of train.jsonl, then the dictionary's phrase pairs
    (3+ words on both sides, not ending like a sentence: `lmforge data ding --no-sentence-end`'s
    extra pairs) that share neither side with a val or test pair. Val and test stay sentences."""
    from lmforge.data.ding import read_ding
    from lmforge.fsutil import write_text_atomic

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (data / name).read_text(encoding="utf-8").splitlines() if line]

    train, held_rows = rows("train.jsonl"), rows("val.jsonl") + rows("test.jsonl")
    held = {r[side] for r in held_rows for side in ("source", "target")}
    have = {(r["source"], r["target"]) for r in train + held_rows}  # the sentence pairs, wherever they went
    pairs, _ = read_ding(ding, DingConfig(reverse=cfg.reverse, sentence_end=False))
    extra, touching = [], 0
    for de, en in pairs:
        source, target = (en, de) if cfg.reverse else (de, en)
        if (source, target) in have:
            continue
        if source in held or target in held:
            touching += 1
            continue
        have.add((source, target))
        extra.append({"source": source, "target": target})
    out = data / "train_plus.jsonl"
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train + extra))
    return out, {"sentence_pairs": len(train), "phrase_pairs": len(extra), "dropped_sharing_a_side_with_val_or_test": touching}


def plot_bleu(curves: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Val BLEU (solid) and chrF (dashed) over training steps, one colour per model."""
    from lmforge.report import save_png, subplots
    from lmforge.train.metrics import column

    fig, ax = subplots(1, 1, figsize=(7, 4))
    for k, (model, rows) in enumerate(curves.items()):
        colour = f"C{k}"
        for name, style in (("val_bleu", "o-"), ("val_chrf", "s--")):
            steps, values = column(rows, name)
            if steps:
                ax.plot(steps, values, style, color=colour, label=f"{model}: {name.replace('val_', '')}", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("score (val sample, greedy)")
    ax.set_title(title or "val BLEU over training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


def _train_config(cfg: RecipeConfig, max_steps: int, time_budget: float = 0.0) -> "TrainConfig":
    from lmforge.train.config import TrainConfig

    eval_every = cfg.eval_every or max(1, max_steps // 12)  # about 12 evaluations
    return TrainConfig(max_steps=max_steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr / 20,
                       warmup_steps=max(1, min(cfg.warmup_steps, max_steps // 10)), schedule="cosine",
                       eval_every=eval_every, eval_batches=10, checkpoint_every=0, log_every=10,
                       time_budget=time_budget, weight_decay=0.01)


def _steps_for_budget(model: str, overrides: dict, train_file: Path, tcfg, cfg: RecipeConfig, scratch: Path,
                      minutes: float, echo: Callable[[str], None]) -> "BudgetPlan":
    """The step count that fills the time budget (lmforge.recipes.stages.steps_for_budget), timed on
    a throwaway run without evaluations."""
    from lmforge.recipes.stages import steps_for_budget
    from lmforge.train.translation import train_translation

    def probe(folder: Path, steps: int) -> None:
        p = _train_config(cfg, steps)
        p.eval_every, p.warmup_steps = 0, 1
        train_translation(train_file, model, folder, p, dataclasses.replace(tcfg, bleu_samples=0),
                          model_overrides=overrides, overwrite=True, progress=False)

    return steps_for_budget(probe, scratch, minutes, echo=echo)


def _train_and_score(name: str, model: str, overrides: dict, run_dir: Path, data: Path, train_file: Path,
                     cfg: RecipeConfig, minutes: Callable[[], float], echo: Callable[[str], None]) -> dict:
    """Train one model on `train_file` for `minutes()` (asked only when a budget plans the run),
    score it on data/test.jsonl (greedy and beam-4)."""
    from lmforge.eval.bleu import BleuGenerateConfig, generate_and_score
    from lmforge.model.io import read_model_config
    from lmforge.train.metrics import METRICS_FILE, read_metrics
    from lmforge.train.translation import train_translation
    from lmforge.train.translation_config import TranslationConfig

    from lmforge.recipes.stages import resuming, saved_max_steps

    tcfg = TranslationConfig(val_data=str(data / "val.jsonl"), vocab_size=cfg.vocab_size, bleu_samples=cfg.bleu_samples)
    resume = resuming(run_dir)  # an interrupted recipe: the run continues from its checkpoint, as planned
    planned = None
    if cfg.max_steps:
        tc = _train_config(cfg, cfg.max_steps)
    elif resume:  # as the interrupted run was planned; its clock backstop is off
        tc = _train_config(cfg, saved_max_steps(run_dir))
    else:  # the budget's steps, cosine over them; the clock still stops a run the calibration misjudged
        planned = minutes()
        plan = _steps_for_budget(model, overrides, train_file, tcfg, cfg, run_dir.with_name(run_dir.name + ".calibration"),
                                 planned, echo)
        tc = _train_config(cfg, plan.steps, time_budget=plan.seconds)
    if resume:
        echo(f"{name}: continuing {run_dir} from its last checkpoint")
    t0 = time.time()
    summary = train_translation(train_file, model, run_dir, tc, tcfg, model_overrides=overrides,
                                resume=resume, overwrite=not resume, progress=cfg.progress)
    train_wall = time.time() - t0
    scoring_started = time.time()
    test = data / "test.jsonl"
    scores, examples = {}, []
    for decoding, beams in (("greedy", 1), ("beam4", 4)):
        r = generate_and_score(str(run_dir), test, BleuGenerateConfig(num_beams=beams, target_field="target",
                                                                     limit=cfg.test_limit, batch_size=32,
                                                                     max_new_tokens=cfg.max_new_tokens))
        scores[decoding] = {"bleu": round(r["bleu"], 2), "chrf": round(r["chrf"], 2), "ter": round(r["ter"], 2),
                            "segments": r["segments"]}
        echo(f"{name} test {decoding}: BLEU {r['bleu']:.2f}  chrF {r['chrf']:.2f}  ({r['segments']} segments)")
        if decoding == "greedy":
            hyps = (r.get("details") or {}).get("hypotheses", [])[:5]
            pairs = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()[:len(hyps)]]
            examples = [{"source": p["source"], "reference": p["target"], "hypothesis": h} for p, h in zip(pairs, hyps)]
    rows = read_metrics(run_dir / METRICS_FILE)  # a resumed run's file holds every step, from the start
    num = lambda v: float(v) if v not in (None, "") else None  # noqa: E731  (metrics.csv holds strings)
    curve = [{"step": int(r["step"]), "val_bleu": num(r["val_bleu"]), "val_chrf": num(r.get("val_chrf"))}
             for r in rows if r.get("val_bleu") not in (None, "")]
    config, _ = read_model_config(run_dir / "best")
    return {
        "status": "run",
        "model": {"name": config.name, "arch": config.arch, "params": summary["params"],
                  "layers": f"{config.n_encoder_layer}+{config.n_layer}" if config.is_encoder_decoder else str(config.n_layer),
                  "n_embd": config.n_embd, "vocab_size": config.vocab_size, "block_size": config.block_size},
        "training": {"minutes": planned, "steps": summary["steps"], "stopped_because": summary["stopped_because"],
                     "train_seconds": summary["train_seconds"], "wall_seconds": round(train_wall, 1),
                     "best_val_loss": summary["best_val_loss"], "val_bleu": summary["val_bleu"],
                     "val_chrf": summary["val_chrf"], "run": str(run_dir)},
        "test": {"limit": cfg.test_limit, **scores, "seconds": round(time.time() - scoring_started, 1)},
        "bleu_curve": curve,
        "examples": examples,
    }


def run_recipe(cfg: RecipeConfig, echo: Callable[[str], None] = print, runner=None) -> dict:
    """Data -> train (encoder-decoder, then the decoder-only twin) -> test BLEU/chrF ->
    OUT/results.json + OUT/report.md + OUT/bleu.png; returns the results. Each stage is kept
    when done (lmforge.recipes.stages), so the same call continues an interrupted recipe."""
    import yaml

    from lmforge.data.ding import describe, extract_ding
    from lmforge.fsutil import write_text_atomic
    from lmforge.model.io import read_model_config
    from lmforge.recipes.stages import RecipeDir
    from lmforge.train.metrics import METRICS_FILE, read_metrics
    from lmforge.train.translation import decoder_only_twin

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "overwrite", "progress", "install")}
    recipe = RecipeDir(cfg.out, "translation", settings, overwrite=cfg.overwrite, echo=echo, budget_minutes=cfg.budget)
    out = recipe.out
    ding = _ding_file(ensure_dictionary(Path(cfg.ding_path), cfg.install, echo, runner))

    # 1. data
    def extract() -> dict:
        data = out / "data"
        stats = extract_ding(data, ding, DingConfig(reverse=cfg.reverse), overwrite=True)
        echo(describe(stats, data))
        ding_cfg = json.loads((data / "stats.json").read_text(encoding="utf-8"))["config"]
        echo("filter: " + ", ".join(f"{k}={v}" for k, v in ding_cfg.items()))
        train_file, mix = data / "train.jsonl", None
        if cfg.phrases:
            train_file, mix = add_phrase_pairs(data, ding, cfg)
            echo(f"training on {mix['sentence_pairs']} sentence pairs + {mix['phrase_pairs']} phrase pairs (3+ words, "
                 f"not sentences; {mix['dropped_sharing_a_side_with_val_or_test']} more left out for sharing a side with "
                 "val/test): " + str(train_file))
        return {"dictionary": str(ding), "direction": stats.direction, "pairs": stats.pairs, "splits": dict(stats.splits),
                "filter": ding_cfg, "train_file": str(train_file), "train_mix": mix}

    data_info = recipe.stage("data", extract)
    data, train_file = out / "data", Path(data_info["train_file"])

    # 2. the encoder-decoder, 3. the decoder-only model of its size, on the same pairs and budget.
    # With a whole-recipe budget the models share what is left after the data, less each one's
    # scoring: guessed for the first (SCORING_SHARE of the budget), measured for the second.
    count = 2 if cfg.decoder_only else 1

    def first_minutes() -> float:
        if not cfg.budget:
            return cfg.minutes
        scoring = SCORING_SHARE * cfg.budget * 60
        share = (cfg.budget * 60 - recipe.seconds_spent() - count * scoring) / count
        return recipe.training_minutes(count * scoring + (count - 1) * share,
                                       "scoring both models and training the second" if count == 2 else "scoring")

    models = {"encoder-decoder": recipe.stage("encoder-decoder", lambda: _train_and_score(
        "encoder-decoder", cfg.preset, cfg.model_overrides, out / "run", data, train_file, cfg, first_minutes, echo))}
    runs = {"encoder-decoder": out / "run"}
    if cfg.decoder_only:
        def twin_stage() -> dict:
            twin = decoder_only_twin(read_model_config(out / "run" / "best")[0])
            spec = out / "decoder_only_model.yaml"
            write_text_atomic(spec, yaml.safe_dump(twin.to_dict(), sort_keys=False))
            echo(f"decoder-only twin: {twin.n_layer} layers of width {twin.n_embd}, context {twin.block_size} "
                 "(the parameter count nearest the encoder-decoder's)")
            scoring = models["encoder-decoder"]["test"].get("seconds", SCORING_SHARE * cfg.budget * 60)
            first = models["encoder-decoder"]["training"].get("minutes")

            def minutes() -> float:
                if not cfg.budget:
                    return cfg.minutes
                left = recipe.training_minutes(scoring, "its scoring")
                # The two are compared on equal time: when the encoder-decoder's planned steps
                # ended early, what it left is not handed to its twin.
                if first and left > first:
                    echo(f"[recipe] decoder-only: {first:.1f} min to train, as the encoder-decoder "
                         f"({left:.1f} are left in the budget)")
                    return first
                return left

            return _train_and_score("decoder-only", str(spec), {}, out / "run-decoder-only", data, train_file, cfg,
                                    minutes, echo)

        models["decoder-only"] = recipe.stage("decoder-only", twin_stage)
        runs["decoder-only"] = out / "run-decoder-only"
    for m in models.values():
        m.pop("stage_seconds", None)

    # 4. plot, results, report
    plot = plot_bleu({name: read_metrics(run / METRICS_FILE) for name, run in runs.items()}, out / "bleu.png",
                     title=f"{data_info['direction']}: val BLEU over training")
    enc = models["encoder-decoder"]
    results = {
        "direction": data_info["direction"],
        "data": {k: v for k, v in data_info.items() if k != "direction"},
        "tokenizer": {"kind": "joint bpe", "vocab_size": cfg.vocab_size},
        # The encoder-decoder's figures at the top level, as before the comparison existed.
        "model": {"preset": cfg.preset, "overrides": cfg.model_overrides, **enc["model"]},
        "training": enc["training"],
        "test": enc["test"],
        "bleu_curve": enc["bleu_curve"],
        "examples": enc["examples"],
        "plot": str(plot),
        "decoder_only": models.get("decoder-only") or {"status": "not run", "reason": "disabled with --no-decoder-only"},
    }
    table = summary_table(results)
    report = "\n".join([f"# Recipe: translation ({data_info['direction']})", "", table, "",
                         f"![val BLEU over training]({plot.name})", "", "## Examples (encoder-decoder, greedy)", "",
                         *[f"- {e['source']}  \n  reference: {e['reference']}  \n  output: {e['hypothesis']}"
                           for e in enc["examples"]], ""])
    results = recipe.finish(results, report)
    echo(table)
    return results


def summary_table(results: dict) -> str:
    from lmforge.report import markdown_table

    rows = []
    for name, m in (("encoder-decoder", results), ("decoder-only", results["decoder_only"])):
        if m.get("status", "run") != "run":
            continue
        t, test = m["training"], m["test"]
        rows.append([name, m["model"]["layers"], f"{m['model']['params'] / 1e6:.2f}M", t["steps"], f"{t['train_seconds']:.0f}",
                     test["greedy"]["bleu"], test["greedy"]["chrf"], test["beam4"]["bleu"], test["beam4"]["chrf"]])
    return markdown_table(["model", "layers", "params", "steps", "train s", "BLEU greedy", "chrF greedy", "BLEU beam4",
                           "chrF beam4"], rows)
