"""Typed configs for a training run; the CLI generates its options from these fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Literal

from lmforge.errors import LmforgeError

OptimizerName = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "linear", "constant", "exponential"]
Precision = Literal["auto", "fp32", "bf16"]
Heap = Literal["keep", "release", "pool"]
Strategy = Literal["auto", "none", "ddp", "fsdp"]


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps to run (the schedule decays over these)
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    block_size: int = 0  # training sequence length; 0 = the model's context length
    optimizer: OptimizerName = "adamw"  # adamw (decoupled weight decay) or sgd (with momentum)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the decay
    warmup_steps: int | None = None  # linear warmup from 0 to lr (default: 10% of max_steps, at most 100)
    schedule: Schedule = "cosine"  # decay after warmup: cosine, linear, or constant; exponential rises from --min-lr to --lr instead (the LR range test, `lmforge tune lr-range`)
    weight_decay: float = 0.1  # on 2-D weights only; never on norms, biases, embeddings
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    momentum: float = 0.9  # SGD momentum
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    eval_every: int = 100  # evaluate on the val split every N steps (0 = only at the end)
    eval_batches: int = 20  # batches per evaluation
    checkpoint_every: int = 500  # save a resumable checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept (older ones are deleted; the best model is kept apart)
    early_stop: int = 0  # stop after N evaluations without val improvement (0 = off)
    log_every: int = 10  # write metrics.csv / TensorBoard every N steps
    seed: int = 1337  # seeds init, data order and dropout: same seed, same run
    precision: Precision = "auto"  # auto = bf16 autocast where the hardware supports it, else fp32
    compile: bool = False  # torch.compile the model (first steps are slow while it compiles)
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% more compute
    loss_chunk: int = 0  # compute the loss over this many tokens at a time (0 = all at once): big vocabularies need it
    time_budget: float = 0.0  # stop after this many seconds of training (0 = no limit)
    # keep: no page faults, but the heap's holes between kept activations count as resident;
    # release: resident = live memory, for the page faults of re-mapping big buffers every step;
    # pool: lmforge.train.saved_pool
    heap: Heap = "keep"  # keep: freed memory stays mapped for the next step (fastest); release: buffers >= 1 MB are returned when freed; pool: saved activations in one reused buffer, the heap trimmed after each step (CPU)
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...; under torchrun, cuda is each rank's own GPU
    strategy: Strategy = "auto"  # under torchrun: auto (several processes: ddp), ddp (each rank a whole replica), fsdp (FSDP2: parameters, gradients and optimizer state split across ranks); one process: auto/none
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks before the run fails (torchrun)

    def __post_init__(self) -> None:
        if self.warmup_steps is None and isinstance(self.max_steps, int) and not isinstance(self.max_steps, bool):
            # Resolved here, so config.yaml records the number and a resumed run keeps its schedule.
            self.warmup_steps = min(100, self.max_steps // 10)
        for f in fields(self):
            value = getattr(self, f.name)
            rule = _RULES.get(f.name)
            if rule is None:
                continue
            kind, check, what = rule
            ok_type = (isinstance(value, int) if kind is int else isinstance(value, (int, float))) and not isinstance(value, bool)
            # `check` is written so that NaN fails it; an infinite value is no setting either.
            if not ok_type or not math.isfinite(value) or not check(value):
                raise LmforgeError(f"{train_flag(f.name)} must be {what}, got {value!r}")
        if self.schedule == "exponential" and not self.min_lr > 0:
            raise LmforgeError(f"--schedule exponential rises from {train_flag('min_lr')} to {train_flag('lr')}: "
                               f"{train_flag('min_lr')} must be above 0, got {self.min_lr!r}")
        if self.min_lr > self.lr:
            raise LmforgeError(f"{train_flag('min_lr')} ({self.min_lr}) must not exceed {train_flag('lr')} ({self.lr})")
        for name, allowed in (("optimizer", ("adamw", "sgd")), ("schedule", ("cosine", "linear", "constant", "exponential")),
                              ("precision", ("auto", "fp32", "bf16")), ("heap", ("keep", "release", "pool")),
                              ("strategy", ("auto", "none", "ddp", "fsdp"))):
            if getattr(self, name) not in allowed:
                raise LmforgeError(f"{train_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def check_schedule(self) -> None:
        """Settings that only make sense together, checked once the run's config is final (a resumed
        run merges its saved settings after the options are parsed, so not in __post_init__)."""
        if self.warmup_steps > self.max_steps:
            raise LmforgeError(
                f"{train_flag('warmup_steps')} ({self.warmup_steps}) exceeds {train_flag('max_steps')} ({self.max_steps}): "
                "the learning rate would never reach --lr; lower --warmup-steps"
            )


def train_flag(name: str) -> str:
    """How the user names a TrainConfig field: `--train.eps/--eps`."""
    flag = name.replace("_", "-")
    return f"--train.{flag}/--{flag}"


def _at_least(n: float) -> Callable[[float], bool]:
    return lambda v: v >= n


def _unit(v: float) -> bool:
    return 0.0 <= v < 1.0


# Field -> (type, check, what the message says it must be). Every numeric field has a rule.
_RULES: dict[str, tuple[type, Callable[[float], bool], str]] = {
    **{name: (int, _at_least(1), "an integer >= 1")
       for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every", "keep_last")},
    **{name: (int, _at_least(0), "an integer >= 0")
       for name in ("block_size", "warmup_steps", "eval_every", "checkpoint_every", "early_stop", "loss_chunk", "seed")},
    "lr": (float, lambda v: v > 0, "a positive number"),
    "eps": (float, lambda v: v > 0, "a positive number"),
    **{name: (float, _at_least(0), "a number >= 0") for name in ("min_lr", "weight_decay", "grad_clip", "time_budget")},
    "dist_timeout": (float, lambda v: v > 0, "a positive number of seconds"),
    **{name: (float, _unit, "in [0, 1)") for name in ("beta1", "beta2", "momentum")},
}


DataFormat = Literal["auto", "text", "instruction", "chat"]
Overlong = Literal["truncate", "drop"]
Method = Literal["full", "lora"]
Select = Literal["final", "best"]


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """TrainConfig with defaults for fine-tuning a pretrained model on a small data set."""

    # Measured on a 28-chat fact set with SmolLM2-135M (README, "inject facts"): at lr 1e-3 the
    # facts and the damage to unrelated answers arrive in the same ~10 steps; at 3e-4 with replay
    # 7 of 8 held-out facts are in at step 30 with unrelated answers intact, 8 of 8 at step 35
    # with one of 6 broken.
    max_steps: int = 40
    batch_size: int = 8
    block_size: int = 512
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 5
    weight_decay: float = 0.0
    eval_every: int = 5
    eval_batches: int = 50
    checkpoint_every: int = 20
    # Off: the run hands over its final step (--select final), so stopping early would only cut
    # short what the user asked for; --select best --early-stop N is the classic pairing.
    early_stop: int = 0
    log_every: int = 1
    # Off by default: `finetune` turns it on when the batch's activations would pass 2 GiB or a
    # quarter of the free memory.
    activation_checkpointing: bool = False
    # A chunk's logits, their log-softmax and both gradients live at once in backward: 4 x 256 x
    # 49152 floats = 200 MB for SmolLM2 (800 MB at 1024), at the same speed.
    loss_chunk: int = 256
    # LoRA on SmolLM2-135M, 16 chats (bench/bench_finetune.py --part peer): peak RSS 3.53 GB with the
    # heap kept, 2.23 GB with the saved activations pooled, at the same speed (lmforge.train.saved_pool).
    heap: Heap = "pool"


@dataclass
class FinetuneConfig:
    method: Method = "lora"  # lora (adapters on a frozen base) or full (every weight trains)
    data_format: DataFormat = "auto"  # auto-detect per record, or insist on text / instruction / chat
    val_fraction: float = 0.1  # held-out share of the examples (ignored with --val-data)
    overlong: Overlong = "truncate"  # an example longer than --block-size: truncate it or drop it (counted)
    pack: bool = False  # pack short examples into shared rows (each still attends only to itself)
    select: Select = "final"  # the checkpoint the run hands over (what loading RUN loads): final (the last step) or best (lowest val loss, kept as RUN/best)
    retention_tolerance: float = 0.25  # warn when the loss on held-out base-model replies rises more than this (nats/token) above its start (0 = do not measure)
    retention_guard: bool = False  # with --select best: a checkpoint past the tolerance is never kept as best, and counts toward --early-stop
    replay: float = 0.3  # share of training chats that are the base model's own replies to general prompts (against forgetting; 0 = off)

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora"):
            raise LmforgeError(f"--method must be full or lora, got {self.method!r}")
        if self.select not in ("final", "best"):
            raise LmforgeError(f"--select must be final or best, got {self.select!r}")
        if not self.retention_tolerance >= 0:
            raise LmforgeError(f"--retention-tolerance must be >= 0, got {self.retention_tolerance}")
        # The guard vetoes checkpoints from best/; the final step is handed over whatever it measures.
        if self.retention_guard and self.select != "best":
            raise LmforgeError("--retention-guard chooses among checkpoints, so it needs --select best "
                               "(the final step is handed over whatever its retention loss)")
        if self.retention_guard and self.retention_tolerance <= 0:
            raise LmforgeError("--retention-guard needs a --retention-tolerance above 0")
        if not 0.0 <= self.replay < 1.0:
            raise LmforgeError(f"--replay must be in [0, 1), got {self.replay}")
