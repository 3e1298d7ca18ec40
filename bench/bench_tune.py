"""`lmforge tune` on nanoGPT's CPU configuration: the LR range test's picks and a sweep's best.

Each is set against the hand-set or default config trained on the same data in the same number of
steps (char-level Shakespeare, 4 layers, 4 heads, 128 wide, block 64, batch 12: the shards and
model of bench_train.py).

`--part lr`: the LR range test (lmforge.tune.lr_range, --range-steps steps from 1e-7 to 1 with
nanoGPT's other train settings: AdamW betas (0.9, 0.99), weight decay 0.1, clip 1.0, seed 1337),
its two suggested LRs (steepest descent; min-loss LR / 10) beside nanoGPT's hand-set 1e-3. Then
nanoGPT's schedule (linear warmup, cosine down to lr/10, the settings above) trained for --steps
steps at 1e-3 and at each suggested LR, same seed(s) and data: the val loss each reaches (final
and best; eval every --steps/5 steps on --eval-batches fixed val batches).

`--part sweep`: `lmforge tune sweep` (lmforge.tune.sweep.run_sweep on a generated CONFIG.yaml,
Optuna TPE + median pruner, the sweep's default sampler/pruner settings, sampler seed 0) of
--trials trials over lr (1e-4..1e-2, log), weight_decay (0..0.2) and warmup_steps
(0..--sweep-steps/5), each trial --sweep-steps steps at batch 12 x 64 with every other setting
TrainConfig's default; beside it the default TrainConfig itself (lr 1e-3, min_lr 1e-4, cosine,
warmup 10% of the steps, weight decay 0.1, betas (0.9, 0.95)) trained in the same steps on the
same data with the same seed (the trials' seed too). Best val loss of each, pruned trials, wall
time. The sweep picks its best on the very val batches it reports, so its figure is an optimistic
one by the noise of that choice.

Every run is a fresh process with 2 threads; wall_s counts from its start (interpreter, imports,
setup included). Progress goes to stderr, the JSON to stdout. Sized for the 2-core benchmark
machine: there a step is ~57 ms (bench/results/train.json) and a trial adds ~2 s of setup (the
matmul-peak probe for MFU, model build) and ~4 s of evaluations, so a 500-step trial is ~35 s and
20 trials ~12 min at most (pruned trials stop early); part lr (the range test and three 500-step
runs) ~2.5 min. Every run leaves its run dir under --out (up to ~300 MB in all).

    .venv/bin/python bench/bench_tune.py > bench/results/tune.json
    .venv/bin/python bench/bench_tune.py --quick          # a ~2 minute check that it all runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench_train import NANOGPT_MODEL, NANOGPT_TRAIN, SHAKESPEARE, lmforge_run, prepare
from benchutil import run_measured

CHILD_ENV = {"OMP_NUM_THREADS": "2"}
HAND_SET_LR = NANOGPT_TRAIN["lr"]  # nanoGPT's shakespeare_char config: 1e-3


def log(message: str) -> None:
    print(f"[bench_tune] {message}", file=sys.stderr, flush=True)


def child(call: str, show_stderr: bool = False) -> tuple[dict, float]:
    """bench_tune.<call> in a fresh process (2 threads); its JSON and the wall seconds."""
    t = time.perf_counter()
    result = run_measured(f"import json, bench_tune as b; print(json.dumps(b.{call}))", env=CHILD_ENV,
                          show_stderr=show_stderr)
    return result, round(time.perf_counter() - t, 1)


def write_model_file(path: Path) -> str:
    """nanoGPT's model as a model YAML (the way bench_train.lmforge_run writes it)."""
    import yaml

    path.write_text(yaml.safe_dump({"preset": "tiny", **NANOGPT_MODEL}))
    return str(path)


# ---- in the child processes ------------------------------------------------------------------

def range_test(shards: str, model_file: str, out: str, steps: int, min_lr: float, max_lr: float) -> dict:
    import torch

    from lmforge.train.config import TrainConfig
    from lmforge.tune.lr_range import lr_range

    torch.set_num_threads(2)
    # nanoGPT's batch, block, betas, weight decay, clip and seed; the test sets its own LR schedule.
    r = lr_range(shards, model_file, out, TrainConfig(**NANOGPT_TRAIN), min_lr=min_lr, max_lr=max_lr, steps=steps,
                 overwrite=True, progress=False)
    return {k: r[k] for k in ("min_lr", "max_lr", "steps_asked", "steps_run", "stopped_because", "diverged_at_step",
                              "suggested_lr", "min_loss_lr", "min_smoothed_loss", "plot")}


def train_run(shards: str, out: str, train: dict) -> dict:
    """bench_train.lmforge_run (nanoGPT's model), a non-finite loss reported instead of raised."""
    from lmforge.train.trainer import TrainingDiverged

    try:
        r = lmforge_run(shards, out, NANOGPT_MODEL, train)
    except TrainingDiverged as e:
        return {"diverged_at_step": e.step}
    return {"val_loss_final": r["val_loss_final"], "val_loss_best": min(v for _, v in r["val_steps"]),
            "val_steps": r["val_steps"], "ms_per_iter": round(r["ms_per_iter"], 2)}


def sweep_run(config: str, trials: int, out: str) -> dict:
    import optuna
    import torch

    from lmforge.tune.sweep import STUDY_FILE, STUDY_NAME, run_sweep

    torch.set_num_threads(2)
    r = run_sweep(config, trials, out, progress=False, echo=lambda s: print(s, file=sys.stderr, flush=True))
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{Path(out) / STUDY_FILE}")
    seconds = sorted(t.duration.total_seconds() for t in study.trials if t.duration is not None)
    r.pop("table", None)
    r["trial_seconds"] = {"median": round(seconds[len(seconds) // 2], 1), "max": round(seconds[-1], 1),
                          "sum": round(sum(seconds), 1)} if seconds else None
    # value: the best val loss of a complete trial; a pruned one's last reported val loss
    r["trial_list"] = [{"trial": t.number, "state": t.state.name.lower(), "params": t.params,
                        "value": t.value if t.value is not None else
                        (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
                        "steps": t.user_attrs.get("steps"),
                        "seconds": round(t.duration.total_seconds(), 1) if t.duration is not None else None}
                       for t in study.trials]
    return r


# ---- in the parent ---------------------------------------------------------------------------

def part_lr(args, work: Path, shards: str, model_file: str) -> dict:
    log(f"LR range test: {args.range_steps} steps from {args.range_min_lr:g} to {args.range_max_lr:g}")
    rng, wall = child(f"range_test({shards!r}, {model_file!r}, {str(work / 'lr-range')!r}, {args.range_steps}, "
                      f"{args.range_min_lr!r}, {args.range_max_lr!r})")
    rng["wall_s"] = wall
    s = rng["suggested_lr"]
    log(f"  {rng['steps_run']} steps ({rng['stopped_because']}) in {wall} s: steepest {s['steepest']:.3g}, "
        f"min/10 {s['min_div10']:.3g}; nanoGPT's {HAND_SET_LR:g}")
    warmup = min(NANOGPT_TRAIN["warmup_steps"], args.steps // 5)
    runs, done = [], {}
    for rule, lr in (("nanogpt_hand_set", HAND_SET_LR), ("steepest", s["steepest"]), ("min_div10", s["min_div10"])):
        if lr in done:  # two rules on the same LR: trained once
            runs.append({**done[lr], "rule": rule})
            continue
        per_seed = []
        for seed in range(NANOGPT_TRAIN["seed"], NANOGPT_TRAIN["seed"] + args.seeds):
            train = {**NANOGPT_TRAIN, "lr": lr, "min_lr": lr / 10, "max_steps": args.steps, "warmup_steps": warmup,
                     "eval_every": max(1, args.steps // 5), "eval_batches": args.eval_batches, "seed": seed}
            log(f"training {args.steps} steps at lr {lr:.3g} ({rule}), seed {seed}")
            r, wall = child(f"train_run({shards!r}, {str(work / f'lr-{rule}-{seed}')!r}, {train!r})")
            r["seed"], r["wall_s"] = seed, wall
            per_seed.append(r)
            log("  " + (f"diverged at step {r['diverged_at_step']}" if "diverged_at_step" in r else
                        f"val loss {r['val_loss_final']:.4f} (best {r['val_loss_best']:.4f}) in {wall} s"))
        ok = [r for r in per_seed if "val_loss_final" in r]
        row = {"rule": rule, "lr": lr, "min_lr": lr / 10,
               "val_loss_final": round(sum(r["val_loss_final"] for r in ok) / len(ok), 4) if ok else None,
               "val_loss_best": round(sum(r["val_loss_best"] for r in ok) / len(ok), 4) if ok else None,
               "diverged_seeds": len(per_seed) - len(ok), "runs": per_seed}
        runs.append(row)
        done[lr] = row
    return {"range_test": rng, "hand_set_lr": HAND_SET_LR, "suggested_lr": s,
            "train": {"steps": args.steps, "warmup_steps": warmup, "eval_every": max(1, args.steps // 5),
                      "eval_batches": args.eval_batches, "seeds": args.seeds,
                      "note": "val loss: mean over seeds; min_lr = lr / 10 (nanoGPT's 1e-3 -> 1e-4)"},
            "runs": runs}


def part_sweep(args, work: Path, shards: str, model_file: str) -> dict:
    import yaml

    steps = args.sweep_steps
    # Fixed: the model, batch 12 x 64, the step budget, the eval cadence, the seed; all else TrainConfig's default.
    train = {"max_steps": steps, "batch_size": NANOGPT_TRAIN["batch_size"], "block_size": NANOGPT_TRAIN["block_size"],
             "eval_every": max(1, steps // 5), "eval_batches": args.eval_batches, "checkpoint_every": 0,
             "seed": NANOGPT_TRAIN["seed"]}
    search = {"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}, "weight_decay": {"low": 0.0, "high": 0.2},
              "warmup_steps": {"low": 0, "high": max(1, steps // 5)}}
    sweep_dir = work / "sweep"
    if (sweep_dir / "study.db").exists():  # a sweep left by an earlier run with this --out: start afresh
        import shutil

        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    config = sweep_dir / "config.yaml"
    config.write_text(yaml.safe_dump({"data": shards, "model": model_file, "train": train, "search": search,
                                      "sweep": {"seed": 0}}, sort_keys=False))
    log(f"sweep: {args.trials} trials of {steps} steps over {', '.join(search)} ({config})")
    sw, sweep_wall = child(f"sweep_run({str(config)!r}, {args.trials}, {str(sweep_dir)!r})", show_stderr=True)
    best = sw.get("best_value")
    log(f"  best val loss {'none' if best is None else f'{best:.4f}'}, {sw['pruned']} pruned, {sw['failed']} failed, "
        f"in {sweep_wall} s")
    log(f"default TrainConfig: {steps} steps")
    base, base_wall = child(f"train_run({shards!r}, {str(work / 'sweep-default')!r}, {train!r})")
    log("  " + (f"diverged at step {base['diverged_at_step']}" if "diverged_at_step" in base else
                f"best val loss {base['val_loss_best']:.4f} (final {base['val_loss_final']:.4f}) in {base_wall} s"))
    return {
        "trials": sw["trials"], "complete": sw["complete"], "pruned": sw["pruned"], "failed": sw["failed"],
        "max_steps": steps, "search": search, "fixed_train": train,
        "best_val_loss": round(best, 4) if best is not None else None, "best_trial": sw.get("best_trial"),
        "best_params": sw.get("best_params"), "wall_s": sweep_wall, "trial_seconds": sw["trial_seconds"],
        "trial_list": sw["trial_list"],
        "peak_rss_mb": sw["peak_rss_mb"], "results": sw["results"], "plot": sw.get("plot"),
        "default_config": {"val_loss_best": base.get("val_loss_best"), "val_loss_final": base.get("val_loss_final"),
                           "val_steps": base.get("val_steps"), "diverged_at_step": base.get("diverged_at_step"),
                           "ms_per_iter": base.get("ms_per_iter"), "wall_s": base_wall,
                           "train": "the fixed_train settings, all else TrainConfig's defaults"},
        "best_minus_default": (round(best - base["val_loss_best"], 4)
                               if best is not None and "val_loss_best" in base else None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("lr", "sweep", "all"), default="all")
    ap.add_argument("--out", type=Path, default=None, help="work folder (shards, runs, sweep); default a temp dir")
    ap.add_argument("--data", type=Path, default=SHAKESPEARE)
    ap.add_argument("--quick", action="store_true", help="tiny step counts and 3 trials: checks that it runs (~2 min)")
    ap.add_argument("--range-steps", type=int, default=300, help="LR range test steps")
    ap.add_argument("--range-min-lr", type=float, default=1e-7)
    ap.add_argument("--range-max-lr", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=500, help="training steps of each LR compared (part lr)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per LR compared (part lr)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--sweep-steps", type=int, default=500, help="max_steps of each trial and of the default config")
    ap.add_argument("--eval-batches", type=int, default=40, help="fixed val batches (12 x 64 tokens) per evaluation")
    args = ap.parse_args()
    if args.quick:
        args.range_steps, args.range_min_lr, args.steps, args.seeds = 60, 1e-5, 40, 1
        args.trials, args.sweep_steps, args.eval_batches = 3, 40, 5
    work = (args.out or Path(tempfile.mkdtemp(prefix="lmforge-bench-tune-"))).resolve()  # children run in the repo root
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder {work}")
    t = time.perf_counter()
    shards = str(prepare(work, args.data))
    model_file = write_model_file(work / "nanogpt.model.yaml")
    result: dict = {"quick": args.quick, "out": str(work)}
    if args.part in ("lr", "all"):
        result["lr"] = part_lr(args, work, shards, model_file)
    if args.part in ("sweep", "all"):
        result["sweep"] = part_sweep(args, work, shards, model_file)
    result["wall_s"] = round(time.perf_counter() - t, 1)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
