"""`lmforge pretrain`: train a model from scratch on token shards, with the one Trainer.

A run dir holds: config.yaml (the fully resolved run config), metrics.csv, tensorboard/,
checkpoints/step-NNNNNN/ (model dir + optimizer + trainer state + manifest), latest (the newest
complete checkpoint's name), best/ (the model dir with the lowest val loss), report.md, loss.png
and summary.json. While a process owns it, `.RUN.lock` beside it says which (lmforge.train.runlock).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch
import yaml

import lmforge
from lmforge.data.loader import TokenShards
from lmforge.errors import LmforgeError
from lmforge.eval.baselines import uniform_cross_entropy, unigram_cross_entropy
from lmforge.fsutil import write_text_atomic
from lmforge.model.config import ModelConfig, get_preset
from lmforge.model.estimate import estimate_memory
from lmforge.model.gpt import GPT
from lmforge.model.io import load_model_dir, write_model_files
from lmforge.eval.perplexity import perplexity_from_nll as perplexity
from lmforge.report import write_training_report
from lmforge.runtime import available_memory_bytes
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.data import ShardBatches
from lmforge.train.distributed import Distributed, choose_strategy, describe_batch, follower_summary, launched_run
from lmforge.train.metrics import METRICS_FILE, read_metrics
from lmforge.train.runlock import RunDir
from lmforge.train.trainer import StepHook, Trainer, TrainResult, resume_checkpoint
from lmforge.yamlio import read_yaml

RUN_CONFIG = "config.yaml"
SUMMARY = "summary.json"
SAMPLE_PROMPTS = ("def fibonacci(n):",)


def resolve_model_config(spec: str, overrides: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """A preset name or a YAML/JSON file of ModelConfig fields (optionally `preset: NAME` as the
    base), then --model.* overrides; when training, the vocabulary comes from the tokenizer."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise LmforgeError(f"--model {spec}: no such file")
        fields = read_yaml(path, spec) or {}
        if not isinstance(fields, dict):
            raise LmforgeError(f"{spec}: expected a mapping of model settings")
        fields = fields.get("model", fields) if isinstance(fields.get("model"), dict) else fields
        base = get_preset(fields.pop("preset")).to_dict() if "preset" in fields else {}
        config = ModelConfig.from_dict({**base, **fields}, source=spec)
    else:
        config = get_preset(spec)
    changes = {**overrides, **({"vocab_size": vocab_size} if vocab_size is not None else {})}
    return ModelConfig.from_dict({**config.to_dict(), **changes}, source="--model options")


def check_memory(config: ModelConfig, cfg: TrainConfig, block_size: int, device: torch.device, shards: int = 1) -> dict:
    """The memory estimate of one process (`shards`: ranks the weights, gradients and optimizer
    state are split over, under FSDP), refused in one line when it does not fit the device."""
    est = estimate_memory(config, cfg.batch_size, block_size, optimizer=cfg.optimizer,
                          activation_checkpointing=cfg.activation_checkpointing)
    if shards > 1:
        for part in ("weights", "grads", "optimizer"):
            est["total"] -= est[part] - est[part] // shards
            est[part] //= shards
    free = available_memory_bytes(device)
    if est["total"] > 0.9 * free:
        gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
        raise LmforgeError(
            f"batch {cfg.batch_size} x {block_size} tokens on a {est['params'] / 1e6:.1f}M-parameter model needs about "
            f"{gb(est['total'])} (weights {gb(est['weights'])}, grads {gb(est['grads'])}, optimizer {gb(est['optimizer'])}, "
            f"activations {gb(est['activations'] + est['logits'])}) but {device} has {gb(free)} free; lower --batch-size "
            "or --block-size (raise --grad-accum to keep the effective batch)"
        )
    return est


def pretrain(
    data: str | Path,
    model: str,
    out: str | Path,
    cfg: TrainConfig,
    *,
    model_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    resume_from: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    sample_prompts: tuple[str, ...] = SAMPLE_PROMPTS,
    sample_tokens: int = 120,
    pause_at: int | None = None,
    on_step: StepHook | None = None,
    report: bool = True,
) -> dict:
    """Under torchrun, every rank calls this; rank 0 returns the summary, the others
    {"rank": r, "steps": ..., "signal": ...}. `on_step`: the Trainer's hook (lmforge.tune);
    `report=False` skips the baselines, samples and report.md (the summary is then the
    training's alone, with the checkpoint)."""
    cfg.check_schedule()
    with launched_run(out, "pretrain", cfg, new=not (resume or resume_from), overwrite=overwrite) as (run, job, device):
        return _pretrain(run, data, model, cfg, model_overrides, resume, resume_from, progress,
                         sample_prompts, sample_tokens, pause_at, job, device, on_step, report)


def _pretrain(run: RunDir, data, model, cfg, model_overrides, resume, resume_from, progress,
              sample_prompts, sample_tokens, pause_at, job: Distributed, device: torch.device,
              on_step: StepHook | None = None, report: bool = True) -> dict:
    run_dir = run.path
    from lmforge.data.parallel import is_pair_file

    if is_pair_file(data):
        raise LmforgeError(f"{data}: a file of translation pairs; those train an encoder-decoder "
                           "(`lmforge pretrain --model seq2seq-tiny --data PAIRS`, lmforge.train.translation.train_translation)")
    shards = TokenShards(data)
    tokenizer = Tokenizer.load(data)
    if tokenizer.sha256 != shards.tokenizer_sha256:
        raise LmforgeError(f"{data}: its tokenizer.json does not match the hash in meta.json; re-pack the shards")
    ckpt = resume_checkpoint(run_dir, resume, resume_from) if (resume or resume_from) else None
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        net, model_config = load_model_dir(ckpt)
        ckpt_tok = Tokenizer.load(ckpt)
        if ckpt_tok.sha256 != shards.tokenizer_sha256:
            raise LmforgeError(
                f"{data}: shards were made with tokenizer {shards.tokenizer_sha256[:12]}, but checkpoint {ckpt} "
                f"uses {ckpt_tok.sha256[:12]}; resume on shards packed with the run's tokenizer"
            )
    else:
        model_config = resolve_model_config(model, model_overrides or {}, tokenizer.vocab_size)
        if model_config.is_encoder_decoder:
            raise LmforgeError(f"--model {model} is an encoder-decoder ({model_config.name}): it trains on translation pairs "
                               f"(--data pairs.jsonl or pairs.tsv), not on token shards ({data})")
        net = GPT(model_config)
    if shards.vocab_size > model_config.vocab_size:
        raise LmforgeError(f"{data}: vocab of {shards.vocab_size} tokens exceeds the model's {model_config.vocab_size}")
    block_size = cfg.block_size or model_config.block_size
    if block_size > model_config.block_size:
        raise LmforgeError(f"--block-size {block_size} exceeds the model's context (block_size {model_config.block_size})")
    job, estimate = choose_strategy(job, cfg, lambda shards: check_memory(model_config, cfg, block_size, device, shards))
    train_split, val_split = shards.split("train"), shards.split("val")
    if val_split.tokens < block_size + 1:
        raise LmforgeError(f"{data}: the val split has {val_split.tokens} tokens, fewer than one window of {block_size + 1}")
    if ckpt is None:
        run.start_new()  # everything is validated: only now may an old run be moved aside
    job.barrier()  # the other ranks wait for rank 0 to have set the run dir up

    run_config = {
        "lmforge_version": lmforge.__version__,
        "data": str(Path(data).resolve()),
        "model": model_config.to_dict(),
        "train": {**dataclasses.asdict(cfg), "block_size": block_size},
    }
    if job.is_main:
        write_text_atomic(run_dir / RUN_CONFIG, yaml.safe_dump(run_config, sort_keys=False))

    run_extra = {"run": {"data": run_config["data"]}}  # config.json's note of the data the weights came from
    n_params = net.param_count()  # before the Trainer wraps (under FSDP: shards) the model
    batches = ShardBatches(train_split, val_split, batch_size=cfg.batch_size, block_size=block_size,
                           grad_accum=cfg.grad_accum, seed=cfg.seed, eval_batches=cfg.eval_batches,
                           rank=job.rank, world_size=job.world_size)
    trainer = Trainer(
        net, cfg, batches, run_dir,
        write_model=functools.partial(write_model_files, net, tokenizer=tokenizer, extra_config=run_extra),
        write_model_meta=functools.partial(write_model_files, net, tokenizer=tokenizer, extra_config=run_extra,
                                           with_weights=False),
        param_groups=net.configure_optimizer_groups(cfg.weight_decay),
        flops_per_token=net.flops_per_token(block_size),
        tokens_per_step=cfg.batch_size * block_size * cfg.grad_accum * job.world_size,
        progress=progress,
        on_checkpoint=run.checkpointed,
        job=job, device=device, on_step=on_step,
    )
    if job.is_main:
        print(f"[pretrain] {model_config.name}: {n_params / 1e6:.2f}M parameters, {net.flops_per_token(block_size) / 1e6:.1f} "
              f"MFLOP/token; {describe_batch(cfg, block_size, job)} on {trainer.device} "
              f"({trainer.precision}); est. memory {estimate['total'] / 2**30:.2f} GB{' per rank' if job.active else ''}", flush=True)
    result = trainer.fit(resume_from=ckpt, pause_at=pause_at)
    if not job.is_main:
        return follower_summary(job, result)
    if not report:
        summary = {**training_summary(result, n_params), "checkpoint": str(result.checkpoint) if result.checkpoint else None}
        write_text_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2))
        return summary
    return finish_run(run_dir, result, net, tokenizer, shards, n_params, sample_prompts, sample_tokens)


def finish_run(run_dir: Path, result: TrainResult, net: GPT, tokenizer: Tokenizer, shards: TokenShards,
               n_params: int, sample_prompts: tuple[str, ...], sample_tokens: int) -> dict:
    """Baselines, samples from the best model, report.md + loss.png, summary.json."""
    from lmforge.generate.engine import Engine
    from lmforge.generate.sampling import SamplingParams

    unigram = unigram_cross_entropy(shards.split("train"), shards.split("val"), shards.vocab_size)
    uniform = uniform_cross_entropy(shards.vocab_size)
    best_model = load_model_dir(run_dir / "best")[0] if (run_dir / "best").exists() else net
    engine = Engine(best_model.to("cpu"), tokenizer)
    samples = []
    for prompt in sample_prompts:
        params = SamplingParams(max_new_tokens=min(sample_tokens, best_model.config.block_size - len(tokenizer.encode(prompt))),
                                temperature=0.8, top_k=50, seed=0)
        samples.append((prompt, prompt + engine.generate([prompt], params)[0].text))
    summary = {
        **training_summary(result, n_params),
        "unigram_val_loss": unigram,
        "unigram_val_ppl": perplexity(unigram),
        "uniform_loss": uniform,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "samples": [{"prompt": p, "text": t} for p, t in samples],
    }
    write_text_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2))
    rows = read_metrics(run_dir / METRICS_FILE)
    facts = [
        ("model", f"{net.config.name} ({n_params / 1e6:.2f}M parameters)"),
        ("steps", f"{result.step} ({result.stopped_because})"),
        ("tokens seen", result.tokens_seen),
        ("training time", f"{result.train_seconds:.1f} s"),
        ("throughput", f"{result.tokens_per_s:,.0f} tokens/s"),
        ("MFU (vs measured matmul peak)", None if result.mfu is None else f"{result.mfu * 100:.2f}%"),
        ("best val loss / perplexity", f"{result.best_val_loss:.4f} / {perplexity(result.best_val_loss):.2f} (step {result.best_step})"
         if result.best_val_loss is not None else None),
        ("unigram baseline loss / perplexity", f"{unigram:.4f} / {perplexity(unigram):.2f}"),
        ("uniform baseline loss (log V)", f"{uniform:.4f}"),
    ]
    report = write_training_report(run_dir, "Pretraining report", facts, rows,
                                   baselines={"unigram": unigram}, samples=samples)
    summary["report"] = str(report)
    return summary


def training_summary(result: TrainResult, n_params: int) -> dict:
    """The fields every training run's summary.json starts with (pretraining, translation)."""
    return {
        "steps": result.step,
        "stopped_because": result.stopped_because,
        "signal": result.signal,
        "params": n_params,
        "tokens_seen": result.tokens_seen,
        "train_seconds": round(result.train_seconds, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "mfu": result.mfu,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "best_val_loss": result.best_val_loss,
        "best_val_ppl": perplexity(result.best_val_loss),
        "best_step": result.best_step,
    }


def describe(summary: dict) -> str:
    best = summary["best_val_loss"]
    lines = [
        f"steps {summary['steps']} ({summary['stopped_because']}), {summary['tokens_seen']:,} tokens in "
        f"{summary['train_seconds']:.0f} s ({summary['tokens_per_s']:,.0f} tokens/s)",
        f"val loss {best:.4f} (perplexity {perplexity(best):.2f}) vs unigram baseline {summary['unigram_val_loss']:.4f} "
        f"(perplexity {summary['unigram_val_ppl']:.2f})" if best is not None else "no evaluation ran",
    ]
    for s in summary["samples"]:
        lines += ["--- sample ---", s["text"]]
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)
