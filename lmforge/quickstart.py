"""`lmforge quickstart`: the whole pipeline on the embedded corpus, in one command.

Stages (each writes a folder under OUT): clean -> tokenizer -> shards -> run (pretraining,
evaluation against the unigram baseline, samples from `def fibonacci(n):`, report.md).
"""

from __future__ import annotations

import time

import torch
from pathlib import Path
from typing import Sequence

from lmforge.data.clean import CleanConfig, clean_corpus
from lmforge.data.embedded import stdlib_dir, stdlib_files
from lmforge.data.pack import PackConfig, pack_corpus
from lmforge.data.sources import DocumentReader
from lmforge.fsutil import check_output_free
from lmforge.data.loader import TokenShards
from lmforge.model.config import get_preset
from lmforge.model.gpt import GPT
from lmforge.tokenizer import TokenizerTrainConfig, save_tokenizer_dir, train_tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.pretrain import describe, pretrain, resolve_model_config


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def run_quickstart(
    out: str | Path,
    *,
    inputs: Sequence[str] | None = None,
    vocab_size: int = 4096,
    model: str = "tiny",
    minutes: float = 5.0,
    batch_size: int = 16,
    block_size: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    out = Path(out)
    check_output_free(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    shards_dir, data = build_corpus(out, inputs, vocab_size, progress, say=_say)
    timings = data.pop("timings")
    stats, meta = data["clean"], data["shards"]

    t = time.perf_counter()
    cfg = plan_training(shards_dir, model, minutes, batch_size, block_size)
    _say(f"pretrain: {model} for about {minutes:g} minutes ({cfg.max_steps} steps of {batch_size} x {block_size} tokens)")
    summary = pretrain(shards_dir, model, out / "run", cfg, overwrite=True, progress=progress)
    timings["pretrain_s"] = time.perf_counter() - t
    _say(describe(summary))
    best, unigram = summary["best_val_loss"], summary["unigram_val_loss"]
    if best is None:  # interrupted before its first evaluation
        _say(f"no val loss to compare with the unigram baseline ({unigram:.4f}): the run stopped "
             f"({summary['stopped_because']}) before its first evaluation")
    else:
        _say(f"val loss {best:.4f} vs unigram baseline {unigram:.4f}: "
             + (f"{unigram - best:.3f} nats/token better" if best < unigram else "NOT below the baseline"))
    return {"clean": stats, "shards": meta, "pretrain": summary, "timings": timings}


def build_corpus(out: Path, inputs: Sequence[str] | None, vocab_size: int, progress: bool,
                 say=_say) -> tuple[Path, dict]:
    """clean -> tokenizer -> shards under `out` (the standard library's source when no inputs):
    the data half of the quickstart, which the code recipe shares. Returns the shards dir and
    {"clean": stats, "shards": meta, "timings": {...}}."""
    if inputs:
        sources = list(inputs)
        say(f"corpus: {', '.join(sources)}")
    else:
        sources = [str(p) for p in stdlib_files()]
        say(f"corpus: the Python standard library at {stdlib_dir()} ({len(sources)} .py files)")
    timings = {}

    t = time.perf_counter()
    clean_dir = out / "clean"
    stats = clean_corpus(sources, clean_dir, CleanConfig(), overwrite=True, progress=progress)
    timings["clean_s"] = time.perf_counter() - t
    say(f"clean: kept {stats['output']['documents']} of {stats['input']['documents']} documents "
        f"({stats['mb_per_s']:.2f} MB/s) -> {clean_dir}")

    t = time.perf_counter()
    tok_dir = out / "tokenizer"
    reader = DocumentReader([clean_dir])
    tok = train_tokenizer((d.text for d in reader), TokenizerTrainConfig(vocab_size=vocab_size),
                          source=str(clean_dir), show_progress=progress)
    save_tokenizer_dir(tok, tok_dir, overwrite=True)
    timings["tokenizer_s"] = time.perf_counter() - t
    say(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens -> {tok_dir}")

    t = time.perf_counter()
    shards_dir = out / "shards"
    meta = pack_corpus([clean_dir], tok_dir, shards_dir, PackConfig(val_fraction=0.02), overwrite=True, progress=progress)
    timings["pack_s"] = time.perf_counter() - t
    s = meta["splits"]
    say(f"pack: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens -> {shards_dir}")
    return shards_dir, {"clean": stats, "shards": meta, "timings": timings}


def plan_training(shards_dir: Path, model: str, minutes: float, batch_size: int, block_size: int) -> TrainConfig:
    """Choose max_steps so the learning-rate schedule completes within the time budget: time a few
    steps of the real model on this machine first (the budget also stops the run as a backstop)."""
    step_s = time_one_step(shards_dir, model, batch_size, block_size)
    # Evaluation and checkpoints take time too: plan for 85% of the budget in steps.
    return training_plan(max(20, int(0.85 * minutes * 60 / step_s)), batch_size, block_size, minutes)


def time_one_step(shards_dir: Path, model: str, batch_size: int, block_size: int) -> float:
    """Seconds per optimizer step of `model` at this batch on this machine (the median of three
    after a first step that pays one-off allocation costs)."""
    shards = TokenShards(shards_dir)
    config = resolve_model_config(model, {"block_size": max(block_size, get_preset(model).block_size)}, shards.vocab_size)
    net = GPT(config)
    opt = torch.optim.AdamW(net.configure_optimizer_groups(0.1), lr=1e-4, fused=True)
    x = torch.randint(0, shards.vocab_size, (batch_size, block_size + 1))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        _, loss = net(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[1]


def training_plan(max_steps: int, batch_size: int, block_size: int, minutes: float) -> TrainConfig:
    """The quickstart's schedule for `max_steps` (warmup, evaluations, checkpoints scale with it);
    the budget stops the run as a backstop."""
    return TrainConfig(
        max_steps=max_steps, batch_size=batch_size, block_size=block_size, lr=2e-3, min_lr=2e-4,
        warmup_steps=min(max_steps, max(10, max_steps // 20)), eval_every=max(10, max_steps // 10), eval_batches=10,
        checkpoint_every=max(10, max_steps // 4), log_every=max(1, max_steps // 100), time_budget=minutes * 60,
    )
