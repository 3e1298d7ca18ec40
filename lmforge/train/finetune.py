"""`lmforge finetune`: adapt a model to a task or domain, full or LoRA, with the one Trainer.

What differs from pretraining is only the data (SFT examples with a loss mask), which parameters
train (all, or LoRA adapters on a frozen base) and what a checkpoint holds (a full model dir, or
the adapters alone plus the name of the base). The loop, checkpoints, exact resume, logs and the
report are the pretraining ones.

What a run hands over (what loading the run dir loads) is its final step by default, as the HF
Trainer and litgpt do: the user asked for those steps. `--select best` hands over the lowest val
loss instead (RUN/best). The retention loss (drift from the base model's answers) is a proxy, so
it is measured and warned about, and vetoes checkpoints only when asked (`--retention-guard`).
summary.json's `handed_over` says which checkpoint that is and why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import torch
import yaml

import lmforge
from lmforge.errors import LmforgeError
from lmforge.fsutil import write_text_atomic
from lmforge.interop.registry import GENERATION_FILE, LoadedModel, base_model_name, load_model
from lmforge.model.estimate import estimate_memory
from lmforge.model.io import is_quantized_dir, load_model_dir, write_model_files
from lmforge.model.lora import LoRAConfig, apply_lora, count_parameters, load_adapter, save_adapter
from lmforge.eval.perplexity import perplexity_from_nll as perplexity
from lmforge.report import write_training_report
from lmforge.runtime import available_memory_bytes
from lmforge.train.config import FinetuneConfig, TrainConfig
from lmforge.train.metrics import METRICS_FILE, read_metrics
from lmforge.train.pretrain import RUN_CONFIG, SUMMARY
from lmforge.train.distributed import Distributed, choose_strategy, describe_batch, follower_summary, launched_run
from lmforge.train.runlock import RunDir
from lmforge.train.sft import SFTBatches, load_examples, split_examples
from lmforge.train.trainer import BEST_DIR, RetentionCheck, Trainer, TrainResult, resume_checkpoint

def write_generation_defaults(loaded: LoadedModel, folder: Path) -> None:
    if loaded.generation:
        write_text_atomic(folder / GENERATION_FILE, json.dumps(loaded.generation, indent=2))


def _rehearsal(run_dir: Path, ft: FinetuneConfig, data_format: str, n_train: int, loaded: LoadedModel,
               block_size: int, reuse: bool) -> tuple[list, list]:
    """(replay, retention) examples (see lmforge.train.replay), written by the base model before
    training, or read back from the run dir when resuming."""
    from lmforge.train.replay import REPLAY_FILE, RETENTION_FILE, replay_count, write_replay, write_retention

    if ft.replay <= 0 and ft.retention_tolerance <= 0:
        return [], []
    if data_format not in ("chat", "instruction"):
        print(f"[finetune] replay and retention check off: they rehearse chats, and this is {data_format} data", flush=True)
        return [], []
    engine = None

    def build(path: Path, write) -> list:
        nonlocal engine
        if not (reuse and path.is_file()):
            if engine is None:
                from lmforge.generate.engine import Engine

                engine = Engine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.generation.get("stop_token_ids", ()))
            write(engine, path)
        if not path.read_text(encoding="utf-8").strip():
            print(f"[finetune] {path.name}: the base model finished none of its replies to the general prompts", flush=True)
            return []
        return load_examples(path, loaded.tokenizer, block_size=block_size, fmt="chat", overlong="drop")[0]

    replay = build(run_dir / REPLAY_FILE, lambda e, p: write_replay(e, replay_count(ft.replay, n_train), p)) if ft.replay > 0 else []
    retention = build(run_dir / RETENTION_FILE, write_retention) if ft.retention_tolerance > 0 else []
    if replay:
        print(f"[finetune] replay: {len(replay)} chats of the base model's own replies to general prompts "
              f"({100 * len(replay) / (n_train + len(replay)):.0f}% of training examples; {run_dir / REPLAY_FILE})", flush=True)
    if retention:
        then = "never kept as best beyond that (--retention-guard)" if ft.retention_guard else "a warning beyond that"
        print(f"[finetune] retention check: loss on {len(retention)} held-out replies of the base model, scored at every "
              f"evaluation; tolerance +{ft.retention_tolerance} nats/token, {then} ({run_dir / RETENTION_FILE})", flush=True)
    return replay, retention


# Bytes of saved activations (as estimate_memory counts them) above which fine-tuning recomputes
# them in backward. Resident memory runs ~2x the count (short-lived buffers, the heap): LoRA on
# SmolLM2-135M at 4 x 512 tokens counts 2.1 GB and peaked at 4.3 GB without recomputation.
ACTIVATION_BUDGET = 3 << 29  # 1.5 GiB


def _auto_activation_checkpointing(net, cfg: TrainConfig, longest: int, block_size: int, pack: bool, device) -> TrainConfig:
    """Short chats fit in memory as they are and train ~30% faster without recomputation; long
    rows (sequence 512 x batch 4 on a 135M model: 2.1 GB counted) do not. Turned on, with a notice, when
    the activations of a full batch of the longest example would pass ACTIVATION_BUDGET or a
    quarter of the free memory."""
    if cfg.activation_checkpointing:
        return cfg
    seq = block_size if pack else min(longest, block_size)
    need = estimate_memory(net.config, cfg.batch_size, seq)["activations"]
    budget = min(ACTIVATION_BUDGET, available_memory_bytes(device) // 4)
    if need <= budget:
        return cfg
    print(f"[finetune] activation checkpointing on: batch {cfg.batch_size} x {seq} tokens would hold "
          f"{need / 2**30:.1f} GB of activations (over {budget / 2**30:.1f} GB)", flush=True)
    return dataclasses.replace(cfg, activation_checkpointing=True)


def _check_memory(model, cfg: TrainConfig, block_size: int, trainable: int, total: int, device, shards: int = 1) -> dict:
    """One rank's memory (`shards`: ranks the weights, gradients and optimizer state are split over,
    under FSDP), refused in one line when it does not fit."""
    est = estimate_memory(model.config, cfg.batch_size, block_size, optimizer=cfg.optimizer,
                          activation_checkpointing=cfg.activation_checkpointing)
    share = trainable / max(total, 1)
    logits = est["logits"] if not cfg.loss_chunk else est["logits"] * min(1.0, cfg.loss_chunk / (cfg.batch_size * block_size))
    need = (est["weights"] + (est["grads"] + est["optimizer"]) * share) / shards + est["activations"] + logits
    free = available_memory_bytes(device)
    if need > 0.9 * free:
        raise LmforgeError(
            f"fine-tuning at batch {cfg.batch_size} x {block_size} needs about {need / 2**30:.1f} GB but {device} has "
            f"{free / 2**30:.1f} GB free; lower --batch-size or --block-size, or use --method lora"
        )
    return {"estimated_bytes": int(need)}


def finetune(
    model: str,
    data: str | Path,
    out: str | Path,
    ft: FinetuneConfig,
    cfg: TrainConfig,
    lora: LoRAConfig,
    *,
    val_data: str | Path | None = None,
    resume: bool = False,
    resume_from: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    sample_count: int = 3,
    pause_at: int | None = None,
) -> dict:
    """Under torchrun, every rank calls this; rank 0 returns the summary, the others
    {"rank": r, "steps": ..., "signal": ...}."""
    cfg.check_schedule()
    with launched_run(out, "finetune", cfg, new=not (resume or resume_from), overwrite=overwrite) as (run, job, device):
        return _finetune(run, model, data, ft, cfg, lora, val_data=val_data, resume=resume, resume_from=resume_from,
                         progress=progress, sample_count=sample_count, pause_at=pause_at, job=job, device=device)


def _finetune(run: RunDir, model: str, data: str | Path, ft: FinetuneConfig, cfg: TrainConfig, lora: LoRAConfig, *,
              val_data, resume, resume_from, progress, sample_count, pause_at, job: Distributed, device: torch.device) -> dict:
    run_dir = run.path
    ckpt = resume_checkpoint(run_dir, resume, resume_from) if (resume or resume_from) else None
    # Training runs on fp32 weights: a quantized base is dequantized (the values it stores, exactly).
    loaded = load_model(model, dequantize=True)
    if is_quantized_dir(loaded.path):
        print(f"[finetune] {loaded.path} holds quantized weights: training on their fp32 values "
              "(the result is an fp32 model; `lmforge quantize` it again to ship it quantized)", flush=True)
    base_name = base_model_name(model, loaded.path)
    net, tok = loaded.model, loaded.tokenizer
    block_size = min(cfg.block_size or net.config.block_size, net.config.block_size)
    examples, stats = load_examples(data, tok, block_size=block_size, fmt=ft.data_format, overlong=ft.overlong)
    if val_data:
        val, vstats = load_examples(val_data, tok, block_size=block_size, fmt=ft.data_format, overlong=ft.overlong)
        train = examples
    else:
        train, val = split_examples(examples, ft.val_fraction)
    print(f"[finetune] {stats.format} data: {len(train)} train / {len(val)} val examples, {stats.trained_tokens:,} of "
          f"{stats.total_tokens:,} tokens under the loss; {stats.truncated} truncated, {stats.dropped} dropped "
          f"(longer than {block_size} tokens)", flush=True)

    if ckpt is None:
        run.start_new()  # model and data are validated: only now may an old run be moved aside
    # Rank 0 writes the base model's rehearsal chats; the other ranks read them once written.
    if job.is_main:
        replay, retention = _rehearsal(run_dir, ft, stats.format, len(train), loaded, block_size, reuse=ckpt is not None)
    job.barrier()
    if not job.is_main:
        replay, retention = _rehearsal(run_dir, ft, stats.format, len(train), loaded, block_size, reuse=True)
    train = train + replay

    torch.manual_seed(cfg.seed)
    if ft.method == "lora":
        if ckpt is not None:
            load_adapter(net, ckpt)
        else:
            apply_lora(net, lora)
    elif ckpt is not None:
        net, _ = load_model_dir(ckpt)
    trainable, total = count_parameters(net)
    cfg = _auto_activation_checkpointing(net, cfg, max(len(e.ids) for e in train), block_size, ft.pack, device)
    job, _ = choose_strategy(job, cfg, lambda shards: _check_memory(net, cfg, block_size, trainable, total, device, shards))
    print(f"[finetune] {ft.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)", flush=True)

    run_config = {
        "lmforge_version": lmforge.__version__, "base_model": base_name, "data": str(Path(data).resolve()),
        "val_data": str(Path(val_data).resolve()) if val_data else None, "finetune": dataclasses.asdict(ft),
        "lora": dataclasses.asdict(lora) if ft.method == "lora" else None,
        "train": {**dataclasses.asdict(cfg), "block_size": block_size},
    }
    if job.is_main:
        write_text_atomic(run_dir / RUN_CONFIG, yaml.safe_dump(run_config, sort_keys=False))

    def write_model(folder: Path, with_weights: bool = True) -> None:
        if ft.method == "lora":  # the adapter alone: small, written whole
            save_adapter(net, folder, lora, base=base_name)
            tok.save(folder)
        else:
            write_model_files(net, folder, tok, with_weights=with_weights)
        write_generation_defaults(loaded, folder)

    batches = SFTBatches(train, val, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         pad_id=tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0), seed=cfg.seed,
                         pack=ft.pack, block_size=block_size, rank=job.rank, world_size=job.world_size)
    check = None
    if retention:
        check = RetentionCheck(SFTBatches(retention, retention, batch_size=cfg.batch_size, grad_accum=1,
                                          pad_id=batches.pad_id, seed=cfg.seed), ft.retention_tolerance, ft.retention_guard)
    if ft.select == "final" and (run_dir / BEST_DIR).exists() and job.is_main:
        # Left by an earlier --select best leg of this run: loading the run dir would pick it first.
        print(f"[finetune] --select final: removing {run_dir / BEST_DIR} so that the run dir loads its final step", flush=True)
        shutil.rmtree(run_dir / BEST_DIR)
    mean_len = sum(len(e.ids) for e in train) / len(train)
    trainer = Trainer(
        net, cfg, batches, run_dir, write_model=write_model,
        write_model_meta=None if ft.method == "lora" else functools.partial(write_model, with_weights=False),
        param_groups=net.configure_optimizer_groups(cfg.weight_decay),
        # LoRA computes no weight gradients for the frozen base: ~4N of the 6N FLOPs per token.
        flops_per_token=net.flops_per_token(block_size) * (4 / 6 if ft.method == "lora" else 1.0),
        tokens_per_step=int(cfg.batch_size * cfg.grad_accum * job.world_size * mean_len), progress=progress, retention=check,
        keep_best=ft.select == "best", on_checkpoint=run.checkpointed, job=job, device=device,
    )
    if job.is_main and job.active:
        print(f"[finetune] {describe_batch(cfg, block_size, job)}", flush=True)
    start_val = trainer.evaluate() if ckpt is None else None
    result = trainer.fit(resume_from=ckpt, pause_at=pause_at)
    if not job.is_main:
        return follower_summary(job, result)
    summary = {
        "method": ft.method, "base_model": base_name, "trainable_params": trainable, "total_params": total,
        "examples": {"train": len(train) - len(replay), "replay": len(replay), "val": len(val), "truncated": stats.truncated, "dropped": stats.dropped},
        "steps": result.step, "stopped_because": result.stopped_because, "signal": result.signal,
        "start_val_loss": start_val,
        "best_val_loss": result.best_val_loss, "best_step": result.best_step, "val_loss": result.val_loss,
        "retention_start": result.retention_start,
        "retention_end": next((h["retention_loss"] for h in reversed(result.history) if "retention_loss" in h), None),
        "retention_tolerance": ft.retention_tolerance if retention else None,
        "retention_warned_at": result.retention_warned_at,
        "tokens_seen": result.tokens_seen, "train_seconds": round(result.train_seconds, 2),
        "tokens_per_s": round(result.tokens_per_s, 1), "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "handed_over": handed_over(run_dir, ft, result),
    }
    samples = _samples(run_dir, val, tok, sample_count)
    summary["samples"] = [{"prompt": p, "reply": r} for p, r in samples]
    write_text_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2))
    facts = [
        ("base model", base_name), ("method", ft.method),
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"),
        ("examples (train + replay / val)", f"{len(train) - len(replay)} + {len(replay)} / {len(val)} "
                                           f"({stats.truncated} truncated, {stats.dropped} dropped)"),
        ("steps", f"{result.step} ({result.stopped_because})"),
        ("handed over", f"{summary['handed_over']['checkpoint']}: {summary['handed_over']['why']}"),
        ("val loss before / best", f"{start_val:.4f} / {result.best_val_loss:.4f} (step {result.best_step})"
         if start_val is not None and result.best_val_loss is not None else None),
        ("val perplexity before / best", f"{perplexity(start_val):.2f} / {perplexity(result.best_val_loss):.2f}"
         if start_val is not None and result.best_val_loss is not None else None),
        ("retention loss start / end", f"{summary['retention_start']:.4f} / {summary['retention_end']:.4f} (tolerance "
         f"+{ft.retention_tolerance}; " + (f"passed at step {result.retention_warned_at})" if result.retention_warned_at
                                          else "never passed)") if summary["retention_end"] is not None else None),
        ("throughput", f"{result.tokens_per_s:,.0f} tokens/s"),
    ]
    report = write_training_report(run_dir, "Fine-tuning report", facts, read_metrics(run_dir / METRICS_FILE),
                                   baselines={"val before": start_val} if start_val is not None else None,
                                   samples=[(p, r) for p, r in samples])
    summary["report"] = str(report)
    return summary


def handed_over(run_dir: Path, ft: FinetuneConfig, result: TrainResult) -> dict:
    """Which checkpoint loading the run dir gives (RUN/best if it exists, else RUN/latest's
    checkpoint: see interop.registry.resolve_model_dir), and why that one."""
    final = result.checkpoint.name if result.checkpoint else None
    if ft.select == "best" and (run_dir / BEST_DIR).exists():
        why = f"lowest val loss ({result.best_val_loss:.4f} at step {result.best_step}; --select best"
        why += ", among checkpoints within the retention tolerance)" if ft.retention_guard else ")"
        return {"checkpoint": BEST_DIR, "step": result.best_step, "why": why}
    if ft.select == "best":
        why = ("no evaluation was kept as best (each passed the retention tolerance; --retention-guard), so the "
               "last step" if ft.retention_guard else "no evaluation ran, so the last step")
    elif result.stopped_because == "max_steps":
        why = "final step (--select final)"
    else:
        why = f"last step: the run stopped before --max-steps ({result.stopped_because}) (--select final)"
    return {"checkpoint": f"checkpoints/{final}", "step": result.step, "why": why}


def _samples(run_dir: Path, val, tok, count: int) -> list[tuple[str, str]]:
    """Greedy replies of the handed-over model to the first held-out prompts."""
    from lmforge.generate.engine import Engine
    from lmforge.generate.sampling import SamplingParams

    if not val or count <= 0:
        return []
    model = load_model(run_dir).model
    engine = Engine(model, tok)
    out = []
    for e in val[:count]:
        first = e.mask.index(True) if True in e.mask else len(e.ids)
        prompt = e.ids[:first]
        if not prompt:
            continue
        reply = engine.generate_ids([prompt], SamplingParams(max_new_tokens=48, temperature=0.0))[0].text
        out.append((tok.decode(prompt), reply))
    return out


def describe(summary: dict) -> str:
    lines = [
        f"{summary['method']} fine-tune of {summary['base_model']}: {summary['trainable_params']:,} trainable parameters",
        f"steps {summary['steps']} ({summary['stopped_because']}), {summary['tokens_per_s']:,.0f} tokens/s",
    ]
    start, best, last = summary["start_val_loss"], summary["best_val_loss"], summary["val_loss"]
    if start is not None and best is not None:
        lines.append(f"val loss {start:.4f} -> best {best:.4f} at step {summary['best_step']}"
                     + (f", last {last:.4f}" if last is not None else "")
                     + f" (perplexity {perplexity(start):.2f} -> {perplexity(best):.2f})")
    if summary.get("retention_end") is not None:
        lines.append(f"retention loss {summary['retention_start']:.4f} -> {summary['retention_end']:.4f} (tolerance "
                     f"+{summary['retention_tolerance']}" + (f"; passed at step {summary['retention_warned_at']})"
                                                             if summary["retention_warned_at"] else ")"))
    h = summary["handed_over"]
    lines.append(f"handed over: {h['checkpoint']} (step {h['step']}): {h['why']}")
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def merge_adapter(adapter: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """`lmforge merge`: the adapter's base with the adapters folded in, written as a model dir."""
    from lmforge.fsutil import atomic_dir, check_output_free
    from lmforge.manifest import write_manifest
    from lmforge.interop.registry import _is_adapter_dir, resolve_model_dir
    from lmforge.model.lora import read_adapter_config

    path = resolve_model_dir(adapter)
    if not _is_adapter_dir(path):
        raise LmforgeError(f"{adapter}: not a LoRA run or adapter dir (no adapter_config.json + adapter.safetensors "
                           f"in {path}); nothing to merge")
    out = Path(out)
    check_output_free(out, overwrite)
    meta = read_adapter_config(path)
    loaded = load_model(path, merge=True)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model_files(loaded.model, tmp, loaded.tokenizer,
                          extra_config={"source": {"format": "lmforge-lora-merged", "adapter": str(path.resolve()),
                                                           "base_model": meta.get("base_model")}})
        write_generation_defaults(loaded, tmp)
        write_manifest(tmp)
    return {"adapter": str(path), "base_model": meta.get("base_model"), "output": str(out),
            "adapters": len(meta.get("targets", [])), "params": loaded.model.param_count()}
