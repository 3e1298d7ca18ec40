"""The one training loop. Pretraining and fine-tuning both run it; what differs between them is
the batches (`BatchSource`), which parameters train, and how the model is written to disk.

Per optimizer step: `grad_accum` micro-batches forward/backward (under autocast when bf16),
gradient clipping, a finite-loss check, the optimizer step with the scheduled learning rate.
The loss of a step is the mean over every token under the loss in its micro-batches together
(each micro-batch's mean is weighted by its token count), so accumulating variable-length SFT
batches gives the gradient of one large batch.
Around it: metrics every `log_every` steps, evaluation every `eval_every` (best model kept in
RUN/best unless the caller hands over the final step instead), checkpoints every
`checkpoint_every`, early stopping, a time budget, and a clean stop with a final checkpoint on
SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from torch import nn
from tqdm import tqdm

from lmforge.allocator import HEAP_POLICIES
from lmforge.train.saved_pool import SavedActivationPool
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import perplexity_from_nll
from lmforge.fsutil import atomic_dir
from lmforge.manifest import write_manifest
from lmforge.progress import progress_bar
from lmforge.runtime import autocast, measured_peak_flops, resolve_device, resolve_precision
from lmforge.train.checkpoint import checkpoint_name, latest_checkpoint, list_checkpoints, load_checkpoint_state, save_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import (SINGLE, Distributed, full_tensor, gathered, gradient_sync, rebind_param_groups, reshard,
                                       wrap_model)
from lmforge.train.metrics import MetricsLog
from lmforge.train.optim import build_optimizer, lr_at, set_lr

BEST_DIR = "best"


class BatchSource(Protocol):
    """Where batches come from. Batches are a pure function of (step, micro) so that a resumed
    run sees exactly the batches the uninterrupted run would have."""

    def train_batch(self, step: int, micro: int) -> tuple:
        """(inputs, targets) int64 [B, T], targets -100 where no loss is taken; optionally a third
        item, tensors the model takes as keyword arguments: {"positions": [B, T], "attn_mask":
        [B, 1, T, T]} for packed rows, {"tgt_ids": [B, T], "src_mask": [B, S]} for an
        encoder-decoder (inputs are then the source ids, lmforge.train.seq2seq_data)."""

    def val_batches(self) -> Iterable[tuple]:
        """The same fixed batches at every evaluation, so evaluations compare."""


@dataclass
class TrainResult:
    step: int
    stopped_because: str  # max_steps | early_stop | time_budget | interrupted | paused | an on_step hook's reason
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    tokens_seen: int
    train_seconds: float
    tokens_per_s: float
    mfu: float | None
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    retention_start: float | None = None
    signal: int | None = None  # the signal that stopped the run (stopped_because "interrupted")
    retention_warned_at: int | None = None  # the first step whose retention loss passed the tolerance


@dataclass
class ExtraEval:
    """More metrics at every evaluation, beside val loss: `measure()` returns {column: value} for
    the metrics row (e.g. {"val_bleu": 31.2}); `columns` names them up front, for metrics.csv's
    header. It runs under the run's autocast, sets the model's mode itself (the Trainer puts it back
    in training mode after), and must consume no random
    numbers the training run draws (or a resumed run would differ)."""

    columns: tuple[str, ...]
    measure: Callable[[], dict]


@dataclass
class RetentionCheck:
    """A second held-out set that measures drift, not progress: its loss, scored at every
    evaluation, should rise by at most `tolerance` (nats per token) over its value before
    training. Passing it prints one warning. With `guard`, an evaluation past it is also never
    kept as the best model and counts toward early stopping, however much val loss fell.
    Fine-tuning uses the base model's own replies to general prompts (lmforge.train.replay)."""

    data: "BatchSource"  # only its val_batches() are read
    tolerance: float
    guard: bool = False


class TrainingDiverged(LmforgeError):
    """The loss of a step was not finite (NaN or infinite); `step` is that step (1-based)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# Told of every optimizer step: (step, {"train_loss", "lr"} and "val_loss" at an evaluation).
# It returns None to go on, or a reason (a word, e.g. "pruned") to stop after this step: the run
# then ends as a stop for any other reason does (final checkpoint, TrainResult.stopped_because
# the reason). lmforge.tune uses it to stop an LR range test past divergence and to prune trials.
# Under several ranks every rank calls it with the same (agreed) losses; it must answer alike on all.
StepHook = Callable[[int, dict], "str | None"]


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second Ctrl-C forces it."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum
        print(f"\n[lmforge] {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def exit_if_signalled(summary: dict) -> None:
    """End the process with 128 + the signal (130 for SIGINT, 143 for SIGTERM), as a shell would,
    when the run was stopped by one: its final checkpoint is written, but a script must be able to
    tell a stopped run from a finished one."""
    if summary.get("signal"):
        name = signal.Signals(summary["signal"]).name
        print(f"lmforge: stopped by {name} at step {summary['steps']}; checkpoint {summary['checkpoint']} "
              "(continue with --resume)", file=sys.stderr, flush=True)
        raise SystemExit(128 + summary["signal"])


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        data: BatchSource,
        run_dir: str | Path,
        *,
        write_model: Callable[[Path], None],
        write_model_meta: Callable[[Path], None] | None = None,
        param_groups: list[dict],
        flops_per_token: float,
        tokens_per_step: int,
        progress: bool = True,
        retention: RetentionCheck | None = None,
        keep_best: bool = True,
        on_checkpoint: Callable[[Path], None] | None = None,
        extra_eval: ExtraEval | None = None,
        job: Distributed = SINGLE,
        device: torch.device | None = None,
        on_step: StepHook | None = None,
    ):
        self.model = model
        self.on_step = on_step
        self.job = job  # several ranks: each runs this loop on its slice of every batch (lmforge.train.distributed)
        self.extra_eval = extra_eval
        self.retention = retention
        # False when the caller hands over the final step: best/ would then be a second,
        # unasked-for model that loading the run dir picks up first.
        self.keep_best = keep_best
        self.cfg = cfg
        self.data = data
        self.run_dir = Path(run_dir)
        self.write_model = write_model
        self.write_model_meta = write_model_meta  # given: FSDP checkpoints write the weights' shards (no gather)
        self.device = device if device is not None else resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.progress = progress
        self.on_checkpoint = on_checkpoint  # told of each checkpoint once it is complete (runlock.RunDir.checkpointed)
        self.model.to(self.device)
        if hasattr(model, "activation_checkpointing"):
            model.activation_checkpointing = cfg.activation_checkpointing
        if hasattr(model, "loss_chunk"):
            model.loss_chunk = cfg.loss_chunk
        if job.strategy == "fsdp" and cfg.heap == "pool":
            # The pool tells weights from activations by storage; FSDP gathers and frees the weights
            # inside every pass, so they would be taken for activations.
            raise LmforgeError("--heap pool does not work with --strategy fsdp; use --heap keep or --heap release")
        names = {id(p): n for n, p in model.named_parameters()}
        # The module the step calls (DDP's wrapper; under FSDP the model itself, sharded in place).
        self.wrapped = wrap_model(model, job, self.device)
        if job.strategy == "fsdp":
            param_groups = rebind_param_groups(param_groups, model, names)
        self.params = [p for g in param_groups for p in g["params"]]
        self.optimizer = build_optimizer(param_groups, cfg, self.device)
        self.forward_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: "BatchSource | None" = None) -> float:
        """Mean loss per target token over `data`'s (default: the run's) val batches."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in (data or self.data).val_batches():
            x, y, extra = self._to_device(batch)
            with autocast(self.device, self.precision):
                _, loss = self.forward_model(x, y, **extra)
            n = int((y != -100).sum())
            total += float(loss) * n
            count += n
        self.model.train()
        reshard(self.model, self.job)
        if self.job.active:  # every rank scored its share: the same mean on all of them
            total, count = self.job.all_reduce(torch.tensor([total, count], dtype=torch.float64)).tolist()
        if count == 0:
            raise LmforgeError("the val split yields no batches to evaluate on")
        return total / count

    def _to_device(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(inputs, targets) or (inputs, targets, {positions, attn_mask}) on the training device."""
        x, y, *rest = batch
        extra = {k: v.to(self.device, non_blocking=True) for k, v in (rest[0] if rest else {}).items()}
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), extra

    def _drift_warning(self, step: int, retention: float, start: float) -> str:
        then = ("checkpoints past it are not kept as best (--retention-guard)" if self.retention.guard else
                "training goes on (--retention-guard with --select best makes this a veto)")
        return (f"[lmforge] warning: step {step}: retention loss {retention:.4f} rose {retention - start:.4f} above its "
                f"start {start:.4f} (tolerance {self.retention.tolerance}): replies to general prompts are drifting "
                f"from the base model's; {then}")

    def _save_best(self) -> None:
        with gathered(self.model, self.job):  # on every rank; rank 0 writes
            if self.job.is_main:
                with atomic_dir(self.run_dir / BEST_DIR, overwrite=True) as tmp:
                    self.write_model(tmp)
                    write_manifest(tmp)

    # -- the loop ------------------------------------------------------------------------
    def fit(self, resume_from: Path | None = None, pause_at: int | None = None) -> TrainResult:
        cfg = self.cfg
        state = {"tokens_seen": 0, "best_val_loss": None, "best_step": None, "evals_since_best": 0, "train_seconds": 0.0,
                 "retention_start": None, "retention_warned_at": None}
        step = 0
        if resume_from is not None:
            state.update(load_checkpoint_state(resume_from, self.model, self.optimizer, self.job))
            step = state.pop("step")
        if self.retention is not None and state["retention_start"] is None:
            state["retention_start"] = self.evaluate(self.retention.data)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Rank 0 alone writes metrics and shows progress.
        log = (MetricsLog(self.run_dir, resume_step=step if resume_from is not None else None,
                          extra_columns=self.extra_eval.columns if self.extra_eval is not None else ())
               if self.job.is_main else _NoLog())
        peak = measured_peak_flops(str(self.device), self.precision)
        history: list[dict] = []
        last_ckpt = resume_from
        stopped = "max_steps"
        train_loss = val_loss = None
        window_tokens, window_seconds = 0, 0.0  # training time only: evals and checkpoints excluded
        tokens_per_s = mfu = None
        # Under a time budget the step count is not known: no step ETA, the budget left instead.
        bar = progress_bar(total=None if cfg.time_budget else cfg.max_steps, initial=step, unit="step", desc="train",
                           disable=not (self.progress and self.job.is_main))
        run_start = time.perf_counter() - state["train_seconds"]
        self.model.train()

        def checkpoint() -> Path:
            state["train_seconds"] = time.perf_counter() - run_start
            reshard(self.model, self.job)
            folder = save_checkpoint(self.run_dir, step, self.write_model, self.model, self.optimizer, state, cfg.keep_last,
                                     self.job, gather=lambda: gathered(self.model, self.job),
                                     write_model_meta=self.write_model_meta)
            if self.on_checkpoint is not None and self.job.is_main:
                self.on_checkpoint(folder)
            return folder

        # With activation checkpointing the blocks keep only their inputs, in the checkpoint's own
        # hooks: nothing worth pooling, and "pool" is "keep".
        use_pool = cfg.heap == "pool" and self.device.type == "cpu" and not cfg.activation_checkpointing
        pool = SavedActivationPool(self.model) if use_pool else None
        pooled = pool.recording if pool is not None else contextlib.nullcontext
        with _StopFlag() as stop, HEAP_POLICIES[cfg.heap]():
            try:
                while step < cfg.max_steps:
                    step_start = time.perf_counter()
                    lr = lr_at(step, cfg)
                    set_lr(self.optimizer, lr)
                    loss_sum = torch.zeros((), device=self.device)
                    micro_batches = [self.data.train_batch(step, micro) for micro in range(cfg.grad_accum)]
                    weights = _token_weights(micro_batches, self.job)
                    for micro, (batch, weight) in enumerate(zip(micro_batches, weights)):
                        if weight == 0.0 and not self.job.active:
                            continue  # no token under the loss: its mean would be 0/0
                        x, y, extra = self._to_device(batch)
                        if weight == 0.0:
                            # Several ranks run every micro-batch, so that their collectives pair up; one
                            # with no token under the loss scores a stand-in target, times 0.
                            y = y.clone()
                            y.view(-1)[0] = 0
                        sync = gradient_sync(self.wrapped, self.job, sync=micro == len(weights) - 1)
                        with sync, pooled(), autocast(self.device, self.precision):
                            _, loss = self.forward_model(x, y, **extra)
                        # weight is exactly 1.0 when micro-batches hold equal token counts
                        # (pretraining), which keeps those losses and gradients bit-identical.
                        (loss * weight / cfg.grad_accum).backward()
                        loss_sum += loss.detach() * weight
                    grad_norm = None
                    if cfg.grad_clip > 0:
                        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True))
                    # Several ranks agree in one reduction on the loss (the mean over all of them, so a
                    # non-finite one stops every rank at the same step) and on whether any rank was
                    # signalled or ran out of time (then all stop after this same step).
                    over_budget = bool(cfg.time_budget) and time.perf_counter() - run_start >= cfg.time_budget
                    stop_requested = stop.requested
                    loss_total = float(loss_sum)
                    if self.job.active:
                        agreed = self.job.all_reduce(torch.tensor([loss_total, stop_requested, over_budget], dtype=torch.float64))
                        loss_total, stop_requested, over_budget = float(agreed[0]), bool(agreed[1]), bool(agreed[2])
                    train_loss = loss_total / (cfg.grad_accum * self.job.world_size)
                    if not math.isfinite(train_loss):
                        good = list_checkpoints(self.run_dir)
                        raise TrainingDiverged(
                            f"training diverged: loss is {train_loss} at step {step + 1}; "
                            f"the last good checkpoint is {good[-1] if good else 'none (none was saved yet)'}; "
                            "lower --lr or raise --warmup-steps", step + 1)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if pool is not None:
                        pool.after_step()
                    step += 1
                    state["tokens_seen"] += self.tokens_per_step
                    window_tokens += self.tokens_per_step
                    window_seconds += time.perf_counter() - step_start
                    bar.update(1)

                    row: dict = {}
                    if step % cfg.log_every == 0 or step == cfg.max_steps or stop_requested:
                        tokens_per_s = window_tokens / max(window_seconds, 1e-9)
                        mfu = self.flops_per_token * tokens_per_s / (peak * self.job.world_size)
                        window_tokens, window_seconds = 0, 0.0
                        row.update(train_loss=train_loss, lr=lr, tokens_per_s=round(tokens_per_s, 1), mfu=round(mfu, 5),
                                   grad_norm=None if grad_norm is None else round(float(grad_norm), 5))
                    stop_now = False
                    # A run stopped by its time budget is evaluated like one that reached max_steps:
                    # else a budget shorter than eval_every leaves no val loss and no best model.
                    if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps or over_budget:
                        val_loss = self.evaluate()
                        row.update(val_loss=val_loss, val_ppl=perplexity_from_nll(val_loss))
                        if self.extra_eval is not None:
                            with autocast(self.device, self.precision):
                                row.update(self.extra_eval.measure())
                            self.model.train()
                        vetoed = False
                        if self.retention is not None:
                            retention = self.evaluate(self.retention.data)
                            row["retention_loss"] = retention
                            drifted = retention > state["retention_start"] + self.retention.tolerance
                            vetoed = drifted and self.retention.guard
                            if drifted and state["retention_warned_at"] is None:
                                state["retention_warned_at"] = step
                                if self.job.is_main:
                                    tqdm.write(self._drift_warning(step, retention, state["retention_start"]))
                        if not vetoed and (state["best_val_loss"] is None or val_loss < state["best_val_loss"]):
                            state.update(best_val_loss=val_loss, best_step=step, evals_since_best=0)
                            if self.keep_best:
                                self._save_best()
                        else:
                            state["evals_since_best"] += 1
                            # At the last requested step nothing is cut short: that is max_steps.
                            if cfg.early_stop and state["evals_since_best"] >= cfg.early_stop and step < cfg.max_steps:
                                stopped, stop_now = "early_stop", True
                    if row:
                        row.update(tokens_seen=state["tokens_seen"], elapsed_s=round(time.perf_counter() - run_start, 3))
                        log.log(step, **row)
                        history.append({"step": step, **row})
                        left = cfg.time_budget - (time.perf_counter() - run_start) if cfg.time_budget else None
                        bar.set_postfix(loss=f"{train_loss:.4f}", **({"val": f"{val_loss:.4f}"} if val_loss is not None else {}),
                                        tok_s=f"{tokens_per_s or 0:,.0f}", mfu=f"{(mfu or 0) * 100:.1f}%",
                                        **({"budget_left": f"{max(0.0, left):.0f}s"} if left is not None else {}))
                    if self.on_step is not None:
                        seen = {"train_loss": train_loss, "lr": lr, **({"val_loss": row["val_loss"]} if "val_loss" in row else {})}
                        reason = self.on_step(step, seen)
                        if reason and step < cfg.max_steps:
                            stopped, stop_now = reason, True
                    if over_budget and step < cfg.max_steps:
                        stopped, stop_now = "time_budget", True
                    if stop_requested:
                        stopped, stop_now = "interrupted", True
                    if pause_at is not None and step >= pause_at and step < cfg.max_steps:
                        stopped, stop_now = "paused", True
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not stop_now:
                        last_ckpt = checkpoint()
                    if stop_now:
                        break
                if last_ckpt is None or last_ckpt.name != checkpoint_name(step):
                    last_ckpt = checkpoint()
            finally:
                bar.close()
                log.close()
        train_seconds = time.perf_counter() - run_start
        return TrainResult(
            step=step, stopped_because=stopped, train_loss=train_loss, val_loss=val_loss,
            best_val_loss=state["best_val_loss"], best_step=state["best_step"], tokens_seen=state["tokens_seen"],
            retention_start=state["retention_start"], retention_warned_at=state["retention_warned_at"],
            train_seconds=train_seconds, tokens_per_s=state["tokens_seen"] / max(train_seconds, 1e-9) if step else 0.0,
            mfu=mfu, checkpoint=last_ckpt, history=history, signal=stop.signum if stopped == "interrupted" else None,
        )


def _token_weights(micro_batches: list[tuple], job: Distributed = SINGLE) -> list[float]:
    """Per micro-batch: its tokens under the loss x grad_accum x ranks / all of the step's such
    tokens on all ranks. A micro-batch's loss is a mean over its own tokens; scaled by this and
    divided by grad_accum (and averaged over ranks by DDP/FSDP), the step's loss is
    sum(token losses) / all tokens, as one large batch would give (averaging the micro-batch means
    instead over-weights the tokens of short examples)."""
    counts = [int((batch[1] != -100).sum()) for batch in micro_batches]
    everyone = job.all_gather(torch.tensor(counts, dtype=torch.float64)).tolist() if job.active else counts
    total, low, high = int(sum(everyone)), min(everyone), max(everyone)
    if total == 0 or low == high:
        return [1.0] * len(counts)
    return [n * len(counts) * job.world_size / total for n in counts]


class _NoLog:
    """The metrics log of a rank other than 0: nothing is written."""

    def log(self, step: int, **row) -> None:
        pass

    def close(self) -> None:
        pass


def resume_checkpoint(run_dir: Path, resume: bool, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from: an explicit one, RUN/latest, or none."""
    if resume_from:
        folder = Path(resume_from)
        if not folder.is_dir():
            raise LmforgeError(f"--resume-from {folder}: no such checkpoint folder")
        return folder
    if resume:
        return latest_checkpoint(run_dir)
    return None
