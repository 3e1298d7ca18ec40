"""`lmforge tune lr-range`: the learning-rate range test (Smith 2015, "Cyclical Learning Rates for
Training Neural Networks", section 3.3; fastai's lr_find).

A short pretraining run through the one Trainer (lmforge.train.pretrain) whose learning rate rises
by a constant factor every step, from --min-lr to --max-lr (TrainConfig schedule "exponential").
The loss of every step is smoothed (an exponential moving average, bias-corrected as Adam's
moments are); the run stops once the smoothed loss passes 4 times its minimum, or at the first
non-finite loss. Two rules read a learning rate off the curve, and both are shown:

The smoothing factor defaults to 0.9 (an average over about the last 10 steps); fastai's 0.98
lags a few hundred steps' curve by a good part of a decade, moving both picks to the right.

- steepest descent: where the smoothed loss falls fastest per decade of learning rate, among the
  points before its minimum (the first tenth skipped: its average has seen few steps);
- minimum / 10: a tenth of the learning rate at the smoothed loss's minimum (there the loss has
  stopped improving; an order of magnitude below is still on the slope).

Beside them, the largest batch size that fits the device by lmforge's memory estimate
(lmforge.model.estimate, as `lmforge estimate` and pretrain's own check use it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.fsutil import write_text_atomic
from lmforge.train.config import TrainConfig

RESULT_FILE = "lr-range.json"
PLOT_FILE = "lr-range.png"
RUN_DIR = "run"


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction: avg_i / (1 - beta^(i+1))."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, Any]:
    """Both rules on a (smoothed) loss curve: {"steepest": lr, "min_div10": lr, "min_loss_lr": lr,
    "min_loss": loss, "steepest_index": i, "min_index": j}."""
    if len(lrs) != len(smoothed) or len(lrs) < 3:
        raise LmforgeError(f"the LR range test recorded {len(lrs)} steps; it needs at least 3 to suggest a learning rate "
                           "(raise --steps, or lower --min-lr if the loss diverged at once)")
    j = min(range(len(smoothed)), key=smoothed.__getitem__)
    start = len(smoothed) // 10 if j - len(smoothed) // 10 >= 2 else 0
    logs = [math.log10(lr) for lr in lrs]
    # Slope per decade between neighbours, taken at the left point; over the descent [start, j].
    slopes = [(smoothed[i + 1] - smoothed[i]) / (logs[i + 1] - logs[i]) for i in range(start, max(start + 1, j))]
    i = start + min(range(len(slopes)), key=slopes.__getitem__)
    return {"steepest": lrs[i], "steepest_index": i, "min_div10": lrs[j] / 10, "min_loss_lr": lrs[j],
            "min_loss": smoothed[j], "min_index": j}


class RangeRecorder:
    """The Trainer's on_step hook: records (lr, loss) and asks to stop once the smoothed loss passes
    `factor` times its minimum."""

    def __init__(self, factor: float = 4.0, beta: float = 0.9):
        self.factor, self.beta = factor, beta
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self._avg = 0.0
        self.best = math.inf

    def __call__(self, step: int, seen: dict) -> str | None:
        loss = seen["train_loss"]
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smoothed = self._avg / (1 - self.beta ** (len(self.losses) + 1))
        self.lrs.append(seen["lr"])
        self.losses.append(loss)
        self.smoothed.append(smoothed)
        self.best = min(self.best, smoothed)
        return "diverged" if smoothed > self.factor * self.best else None


def largest_batch(model_config, cfg: TrainConfig, block_size: int, device, limit: int = 1 << 16) -> dict:
    """The largest batch size whose estimated training memory (lmforge.model.estimate) is within
    90% of the device's free memory, as pretrain's check requires; 0 when not even 1 fits."""
    from lmforge.model.estimate import estimate_memory
    from lmforge.runtime import available_memory_bytes

    free = available_memory_bytes(device)

    def need(b: int) -> int:
        return estimate_memory(model_config, b, block_size, optimizer=cfg.optimizer,
                               activation_checkpointing=cfg.activation_checkpointing)["total"]

    if need(1) > 0.9 * free:
        return {"batch_size": 0, "block_size": block_size, "free_bytes": free, "needed_bytes": need(1)}
    low, high = 1, 2
    while high <= limit and need(high) <= 0.9 * free:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # need(low) fits, need(high) does not (or is past the limit)
        mid = (low + high) // 2
        low, high = (mid, high) if need(mid) <= 0.9 * free else (low, mid)
    return {"batch_size": low, "block_size": block_size, "free_bytes": free, "needed_bytes": need(low)}


def range_config(cfg: TrainConfig, min_lr: float, max_lr: float, steps: int) -> TrainConfig:
    """`cfg` turned into the range test's: the exponential schedule from min_lr to max_lr over
    `steps` steps, no warmup, metrics every step, no evaluation or checkpoint before the end."""
    if not (0 < min_lr < max_lr) or not math.isfinite(max_lr):
        raise LmforgeError(f"--min-lr ({min_lr}) and --max-lr ({max_lr}) must satisfy 0 < min < max")
    if steps < 3:
        raise LmforgeError(f"--steps must be at least 3, got {steps}")
    return dataclasses.replace(cfg, schedule="exponential", lr=max_lr, min_lr=min_lr, max_steps=steps, warmup_steps=0,
                               log_every=1, eval_every=0, checkpoint_every=0, early_stop=0, time_budget=0.0)


def lr_range(data: str | Path, model: str, out: str | Path, cfg: TrainConfig, *, min_lr: float = 1e-7,
             max_lr: float = 1.0, steps: int = 200, factor: float = 4.0, smoothing: float = 0.9, model_overrides: dict | None = None,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Run the range test; writes OUT/lr-range.json, OUT/lr-range.png and OUT/run/ (the run's
    config.yaml and metrics.csv; its weights, trained past divergence, are deleted)."""
    from lmforge.runtime import resolve_device
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.pretrain import pretrain, resolve_model_config
    from lmforge.train.trainer import TrainingDiverged

    out = Path(out)
    if Path(model).is_dir():
        raise LmforgeError(f"--model {model}: a model dir; lr-range trains a fresh model from a preset or model YAML on "
                           "token shards (fine-tuning data is not supported yet)")
    if not (Path(data) / "meta.json").is_file():
        raise LmforgeError(f"--data {data}: lr-range needs token shards made by `lmforge pack` "
                           "(fine-tuning data is not supported yet)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LmforgeError(f"{out} exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = range_config(cfg, min_lr, max_lr, steps)
    if not 0 <= smoothing < 1 or not factor > 1:
        raise LmforgeError(f"--smoothing must be in [0, 1) and --stop-factor above 1, got {smoothing} and {factor}")
    recorder = RangeRecorder(factor, smoothing)
    stopped, diverged_at = "max_steps", None
    try:
        summary = pretrain(data, model, out / RUN_DIR, run_cfg, model_overrides=model_overrides, overwrite=True,
                           progress=progress, on_step=recorder, report=False)
        stopped = summary["stopped_because"]
    except TrainingDiverged as e:
        stopped, diverged_at = "not_finite", e.step
    for name in ("checkpoints", "best", "latest"):
        path = out / RUN_DIR / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    picks = suggest(recorder.lrs, recorder.smoothed)
    model_config = resolve_model_config(model, model_overrides or {}, Tokenizer.load(data).vocab_size)
    block_size = run_cfg.block_size or model_config.block_size
    fits = largest_batch(model_config, run_cfg, block_size, resolve_device(run_cfg.device))
    result = {
        "data": str(Path(data).resolve()), "model": model, "min_lr": min_lr, "max_lr": max_lr, "steps_asked": steps,
        "steps_run": len(recorder.lrs), "stopped_because": stopped, "diverged_at_step": diverged_at,
        "stop_factor": factor, "smoothing": smoothing, "batch_size": run_cfg.batch_size, "block_size": block_size,
        "suggested_lr": {"steepest": picks["steepest"], "min_div10": picks["min_div10"]},
        "min_loss_lr": picks["min_loss_lr"], "min_smoothed_loss": picks["min_loss"],
        "largest_batch_size": fits,
        "curve": [{"step": i + 1, "lr": lr, "loss": loss, "smoothed": s}
                  for i, (lr, loss, s) in enumerate(zip(recorder.lrs, recorder.losses, recorder.smoothed))],
    }
    write_text_atomic(out / RESULT_FILE, json.dumps(result, indent=2))
    plot_range(recorder, picks, out / PLOT_FILE)
    result["plot"] = str(out / PLOT_FILE)
    return result


def plot_range(recorder: RangeRecorder, picks: dict, path: Path) -> Path:
    """Loss (raw, faint; smoothed, solid) against the learning rate on a log axis, both picks marked."""
    from lmforge.report import save_png, subplots

    fig, ax = subplots(1, 1, figsize=(8, 4.5))
    ax.plot(recorder.lrs, recorder.losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(recorder.lrs, recorder.smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    i, j = picks["steepest_index"], picks["min_index"]
    ax.plot([recorder.lrs[i]], [recorder.smoothed[i]], "o", color="tab:red",
            label=f"steepest descent: {picks['steepest']:.2e}")
    ax.axvline(picks["min_div10"], color="tab:green", linestyle="--",
               label=f"min-loss LR / 10: {picks['min_div10']:.2e}")
    ax.plot([recorder.lrs[j]], [recorder.smoothed[j]], "s", color="tab:green", label=f"minimum at {recorder.lrs[j]:.2e}")
    ax.set_xscale("log")
    low, high = min(recorder.smoothed), max(recorder.smoothed[: j + 1])
    # The descent fills the plot; the divergence past the minimum leaves through the top.
    pad = 0.1 * (high - low) or 0.1 * abs(high) or 0.1
    ax.set_ylim(low - pad, high + 2.5 * pad)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title("LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def describe(result: dict) -> str:
    s, fits = result["suggested_lr"], result["largest_batch_size"]
    why = {"diverged": f"smoothed loss passed {result['stop_factor']:g}x its minimum",
           "not_finite": f"loss not finite at step {result['diverged_at_step']}",
           "max_steps": "reached --max-lr"}.get(result["stopped_because"], result["stopped_because"])
    gb = lambda b: f"{b / 2**30:.2f} GB"  # noqa: E731
    batch = (f"largest batch that fits: {fits['batch_size']} x {fits['block_size']} tokens (est. {gb(fits['needed_bytes'])} "
             f"of {gb(fits['free_bytes'])} free)" if fits["batch_size"] else
             f"not even batch 1 x {fits['block_size']} tokens fits (est. {gb(fits['needed_bytes'])}, {gb(fits['free_bytes'])} free)")
    return "\n".join([
        f"{result['steps_run']} of {result['steps_asked']} steps, LR {result['min_lr']:.1e} -> "
        f"{result['curve'][-1]['lr']:.2e} ({why}); batch {result['batch_size']} x {result['block_size']} tokens",
        f"min smoothed loss {result['min_smoothed_loss']:.4f} at LR {result['min_loss_lr']:.2e}",
        f"suggested LR (steepest descent): {s['steepest']:.2e}",
        f"suggested LR (min-loss LR / 10): {s['min_div10']:.2e}",
        batch,
    ])
