"""Training a translator on parallel pairs (`lmforge pretrain --data pairs.jsonl|.tsv`), with the one Trainer:
an encoder-decoder (the default), or a decoder-only model (`--model` with arch decoder) trained
on `source <|sep|> target` with the loss on the target, the comparison the chapter invites.

    pairs file ─read/clean/dedup (lmforge.data.parallel)─▶ train / val pairs
        ─tokenizer(s) (joint or separate, lmforge.train.seq2seq_data)─▶ token pairs ─length filters─▶
        Seq2SeqBatches ─Trainer (teacher forcing, label smoothing)─▶ run dir

The run dir is pretraining's (config.yaml, metrics.csv with val_bleu/val_chrf beside the losses,
checkpoints/, best/, report.md, summary.json) plus data_stats.json (pairs read, kept, dropped per
reason). Every checkpoint and best/ is a model dir that lmforge.model.io loads as a Seq2Seq,
with its tokenizer(s) (seq2seq_data.PairTokenizers) and generation.json naming the decoder start
and stop tokens.

BLEU at every evaluation: a fixed sample of the val pairs (the first `bleu_samples`) translated
greedily through the Engine (lmforge.generate.translate.greedy_translations, batched by length)
and scored with sacrebleu's defaults (lmforge.eval.bleu). The best model is still chosen by val loss: BLEU on a few hundred greedy
sentences is noisier than the loss on the same data.

The Trainer calls `model(x, y, **extra)`; `TeacherForcing` maps that onto Seq2Seq.forward
(source, labels, decoder inputs, source mask) or GPT.forward (`source <sep> target`, labels) and
applies label smoothing in training mode only, so val loss stays the plain cross-entropy of the
target tokens, whose exp is a perplexity, for both kinds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import lmforge
from lmforge.data.parallel import PairStats, filter_lengths, read_pairs, split_pairs
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import perplexity_from_nll as perplexity
from lmforge.fsutil import write_text_atomic
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.model.io import load_model_dir, write_model_files
from lmforge.model.seq2seq import Seq2Seq
from lmforge.report import write_training_report
from lmforge.runtime import resolve_device
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import METRICS_FILE, read_metrics
from lmforge.train.pretrain import training_summary
from lmforge.train.distributed import launched_by_torchrun
from lmforge.train.runlock import RunDir, own_run_dir
from lmforge.train.seq2seq_data import (SEPARATOR_TOKEN, ConcatenatedPairBatches, PairTokenizers, Seq2SeqBatches,
                                        encode_pairs, train_pair_tokenizers)
from lmforge.train.trainer import ExtraEval, Trainer, TrainResult, resume_checkpoint
from lmforge.train.translation_config import TranslationConfig

RUN_CONFIG = "config.yaml"  # the same name as pretraining's: `--resume` reads it
SUMMARY = "summary.json"
DATA_STATS = "data_stats.json"
GENERATION_FILE = "generation.json"  # lmforge.interop.bundle.GENERATION_FILE
BLEU_COLUMNS = ("val_bleu", "val_chrf")
REPORT_SAMPLES = 5


class TeacherForcing(nn.Module):
    """A translator as the Trainer calls a model -> (logits, loss), label-smoothed in training mode
    only: a Seq2Seq's `(source ids, labels, tgt_ids=..., src_mask=...)`, or a decoder-only GPT's
    `(source <sep> target, labels)`. Holds no weights of its own."""

    def __init__(self, net: Seq2Seq | GPT, label_smoothing: float):
        super().__init__()
        self.net = net
        self.label_smoothing = label_smoothing

    @property
    def activation_checkpointing(self) -> bool:
        return self.net.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.net.activation_checkpointing = on

    def forward(self, x, labels, tgt_ids=None, src_mask=None):
        smoothing = self.label_smoothing if self.training else 0.0
        if tgt_ids is not None:
            return self.net(x, tgt_ids, src_mask, targets=labels, label_smoothing=smoothing)
        if not smoothing:
            return self.net(x, labels)
        logits, _ = self.net(x)  # GPT's loss has no smoothing: the same cross-entropy as Seq2Seq's, here
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=smoothing)
        return logits, loss


def separator_id(tokenizers: PairTokenizers, where: str = "the tokenizer") -> int:
    """The id of SEPARATOR_TOKEN, which a decoder-only translator's tokenizer must hold."""
    sep = tokenizers.target.hf.token_to_id(SEPARATOR_TOKEN)
    if sep is None or not tokenizers.joint:
        raise LmforgeError(f"{where}: a decoder-only translator needs one tokenizer holding the special token "
                           f"{SEPARATOR_TOKEN} (the one lmforge trains with --tokenizer joint)")
    return sep


def translation_engine(net: Seq2Seq | GPT, tokenizers: PairTokenizers):
    """An Engine translating with `net` as it is now (decoding in torch: the numpy decoder would
    pack a copy of weights that training goes on changing)."""
    from lmforge.generate.engine import Engine

    start, eos, _ = tokenizers.special_ids()
    if net.config.is_encoder_decoder:
        engine = Engine(net, tokenizers.target, stop_token_ids=[eos], decoder_start_id=start)
    else:
        engine = Engine(net, tokenizers.target, stop_token_ids=[eos], source_separator_id=separator_id(tokenizers))
    engine.backend = "torch"
    return engine


def greedy_translate(net: Seq2Seq | GPT, tokenizers: PairTokenizers, sources: Sequence[Sequence[int]], *,
                     batch_size: int = 32, max_new_tokens: int | None = None) -> list[str]:
    """Greedy translations of tokenized sources (in input order) by a model in training: the
    Engine's (generate.translate.greedy_translations); the model's train/eval mode is kept."""
    from lmforge.generate.translate import greedy_translations

    was_training = net.training
    try:
        return greedy_translations(translation_engine(net, tokenizers), sources, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens)
    finally:
        net.train(was_training)


class BleuProbe:
    """ExtraEval for the Trainer: BLEU and chrF of greedy translations of a fixed val sample."""

    def __init__(self, net: Seq2Seq | GPT, tokenizers: PairTokenizers, sources: list[Sequence[int]], references: list[str],
                 batch_size: int):
        self.net, self.tokenizers, self.sources, self.references = net, tokenizers, sources, references
        self.batch_size = batch_size

    def measure(self) -> dict:
        from lmforge.eval.bleu import score

        hyps = greedy_translate(self.net, self.tokenizers, self.sources, batch_size=self.batch_size)
        s = score(hyps, [[r] for r in self.references], hyp_source="greedy translations", ref_source="val pairs")
        return {"val_bleu": round(s.bleu, 4), "val_chrf": round(s.chrf, 4)}


def _load_pairs(path, tcfg: TranslationConfig, stats: PairStats):
    pairs, _ = read_pairs(path, source_field=tcfg.source_field, target_field=tcfg.target_field, clean=tcfg.clean,
                          dedup=tcfg.dedup, stats=stats)
    if tcfg.length_unit == "chars":
        pairs = filter_lengths(pairs, lambda p: (len(p.source), len(p.target)), tcfg.length_filter(), stats)
    return pairs


def _tokenizers(tcfg: TranslationConfig, train_pairs, notify, separator: bool) -> PairTokenizers:
    if tcfg.tokenizer in ("joint", "separate"):
        return train_pair_tokenizers([p.source for p in train_pairs], [p.target for p in train_pairs], mode=tcfg.tokenizer,
                                     kind=tcfg.tokenizer_kind, vocab_size=tcfg.vocab_size, notify=notify,
                                     separator=separator)
    path = Path(tcfg.tokenizer)
    if not path.exists():
        raise LmforgeError(f"--tokenizer {tcfg.tokenizer}: not joint or separate, and no such file or folder")
    tok = Tokenizer.load(path)
    return PairTokenizers(tok, tok)


def _token_filter(encoded, stats: PairStats, tcfg: TranslationConfig, block_size: int, concatenated: bool) -> list[int]:
    """Indices of the pairs that pass the configured length filters in tokens (when that is the
    unit) and fit the model's context: a source of at most block_size tokens, a target of at most
    block_size - 1 (the decoder also reads the start token / predicts eos); `concatenated`
    (decoder-only): source, separator and target in block_size. The rest counted."""
    rule = tcfg.length_filter() if tcfg.length_unit == "tokens" else None
    kept = []
    for i, (s, t) in enumerate(encoded):
        reason = rule.reason(len(s), len(t)) if rule is not None else None
        long = len(s) + len(t) + 1 > block_size if concatenated else len(s) > block_size or len(t) + 1 > block_size
        if reason is None and long:
            reason = "too_long"
        if reason is None:
            kept.append(i)
        else:
            stats.drop(reason)
    return kept


def sized_for(config: ModelConfig, tokenizers: PairTokenizers) -> ModelConfig:
    """The model to train: vocabularies from the tokenizers (a decoder-only model has one)."""
    if not config.is_encoder_decoder:
        return config.replace(vocab_size=tokenizers.target.vocab_size)
    return config.replace(vocab_size=tokenizers.target.vocab_size,
                          src_vocab_size=0 if tokenizers.joint else tokenizers.source.vocab_size)


def count_params(config: ModelConfig) -> int:
    from lmforge.model.io import model_class

    with torch.device("meta"):  # exact, allocating nothing
        return model_class(config)(config).param_count()


def decoder_only_twin(config: ModelConfig) -> ModelConfig:
    """The decoder-only model of an encoder-decoder's size, for the comparison: the same width,
    heads, MLP, norms, positions and vocabulary; the number of layers that brings its parameter
    count nearest; a context twice as long (it reads source, separator and target as one)."""
    if not config.is_encoder_decoder:
        raise LmforgeError(f"{config.name} is already decoder-only")
    target = count_params(config)
    best = None
    for n in range(1, 2 * (config.n_layer + config.n_encoder_layer) + 1):
        cand = config.replace(name=f"{config.name}-decoder-only", arch="decoder", n_encoder_layer=0, src_vocab_size=0,
                              n_layer=n, block_size=2 * config.block_size)
        gap = abs(count_params(cand) - target)
        if best is None or gap < best[0]:
            best = (gap, cand)
    return best[1]


def train_translation(
    data: str | Path,
    model: str,
    out: str | Path,
    cfg: TrainConfig,
    tcfg: TranslationConfig | None = None,
    *,
    model_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    resume_from: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    pause_at: int | None = None,
) -> dict:
    """Train an encoder-decoder (a preset like seq2seq-tiny / transformer-base, or a model file
    with arch encoder-decoder), or a decoder-only model on `source <sep> target` (a decoder
    preset or file), on a pairs file; returns the summary (also RUN/summary.json).
    cfg.time_budget bounds the training time (seconds; the run is then evaluated and saved)."""
    tcfg = tcfg or TranslationConfig()
    cfg.check_schedule()
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        # Its batches are length buckets with no per-rank slicing yet: N ranks would train N copies.
        raise LmforgeError(f"--data {data}: training on translation pairs runs on one process; under torchrun, "
                           "pretrain on token shards or finetune")
    if cfg.strategy in ("ddp", "fsdp"):
        raise LmforgeError(f"--strategy {cfg.strategy}: training on translation pairs runs on one process")
    with own_run_dir(out, "pretrain", new=not (resume or resume_from), overwrite=overwrite) as run:
        return _train(run, Path(data), model, cfg, tcfg, model_overrides or {}, resume, resume_from, progress, pause_at)


def _train(run: RunDir, data: Path, model: str, cfg: TrainConfig, tcfg: TranslationConfig, overrides: dict,
           resume: bool, resume_from: str | None, progress: bool, pause_at: int | None) -> dict:
    run_dir = run.path
    stats = PairStats()
    pairs = _load_pairs(data, tcfg, stats)
    if tcfg.val_data:
        val_stats = PairStats()
        train_pairs, val_pairs = pairs, _load_pairs(tcfg.val_data, tcfg, val_stats)
    else:
        if not pairs:
            raise LmforgeError(f"{data}: no pairs left after cleaning and filtering ({stats.describe()})")
        train_pairs, val_pairs = split_pairs(pairs, tcfg.val_fraction, cfg.seed)
        val_stats = None
    ckpt = resume_checkpoint(run_dir, resume, resume_from) if (resume or resume_from) else None
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        tokenizers = PairTokenizers.load(ckpt)
        net, model_config = load_model_dir(ckpt)
    else:
        if not train_pairs:
            raise LmforgeError(f"{data}: no training pairs left after cleaning and filtering ({stats.describe()})")
        from lmforge.train.pretrain import resolve_model_config

        base = resolve_model_config(model, overrides)  # its arch decides whether the tokenizer needs a separator
        tokenizers = _tokenizers(tcfg, train_pairs, notify=lambda m: print(f"lmforge: warning: {m}", flush=True),
                                 separator=not base.is_encoder_decoder)
        model_config = sized_for(base, tokenizers)
        net = Seq2Seq(model_config) if model_config.is_encoder_decoder else GPT(model_config)
    concatenated = not model_config.is_encoder_decoder
    sep = separator_id(tokenizers, str(ckpt or tcfg.tokenizer)) if concatenated else None
    block = cfg.block_size or model_config.block_size  # --block-size caps each side below the model's context
    if block > model_config.block_size:
        raise LmforgeError(f"--block-size {block} exceeds the model's context (block_size {model_config.block_size})")
    encoded = encode_pairs(tokenizers, [p.source for p in train_pairs], [p.target for p in train_pairs])
    train = [encoded[i] for i in _token_filter(encoded, stats, tcfg, block, concatenated)]
    val_encoded = encode_pairs(tokenizers, [p.source for p in val_pairs], [p.target for p in val_pairs])
    val_keep = _token_filter(val_encoded, val_stats or stats, tcfg, block, concatenated)
    val = [val_encoded[i] for i in val_keep]
    val_refs = [val_pairs[i].target for i in val_keep]
    if not train:
        raise LmforgeError(f"{data}: no training pairs left after filtering ({stats.describe()})")
    if not val:
        raise LmforgeError(f"{tcfg.val_data or data}: no validation pairs left after filtering")
    start, eos, pad = tokenizers.special_ids()
    plan = dict(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed, eval_batches=cfg.eval_batches,
                start_id=start, eos_id=eos, pad_id=pad, src_pad_id=tokenizers.source_pad_id(), max_tokens=tcfg.max_tokens,
                bucket=tcfg.bucket)
    batches = ConcatenatedPairBatches(train, val, sep_id=sep, **plan) if concatenated else Seq2SeqBatches(train, val, **plan)
    device = resolve_device(cfg.device)
    if not tcfg.max_tokens:
        from lmforge.train.pretrain import check_memory

        estimate = check_memory(model_config, cfg, batches.longest(), device)
    if ckpt is None:
        run.start_new()

    # `data`: what became of --data's pairs (the held-out ones included); `val_data`: of --val-data's.
    data_stats = {"train_pairs": len(train), "val_pairs": len(val), "data": stats.to_dict(),
                  "val_data": val_stats.to_dict() if val_stats else None}
    write_text_atomic(run_dir / DATA_STATS, json.dumps(data_stats, indent=2))
    run_config = {
        "lmforge_version": lmforge.__version__,
        "task": "translation",
        "data": str(data.resolve()),
        "model": model_config.to_dict(),
        "train": dataclasses.asdict(cfg),
        "translation": dataclasses.asdict(tcfg),
    }
    write_text_atomic(run_dir / RUN_CONFIG, yaml.safe_dump(run_config, sort_keys=False))
    # hf_seq2seq.load_hf_dir's keys; Engine.for_loaded's for a decoder-only translator
    generation = ({"stop_token_ids": [eos], "source_separator_token_id": sep} if concatenated
                  else {"decoder_start_token_id": start, "stop_token_ids": [eos]})

    def write_model(folder: Path) -> None:
        write_model_files(net, folder, None, {"run": {"data": run_config["data"], "task": "translation"}})
        tokenizers.save(folder)
        write_text_atomic(folder / GENERATION_FILE, json.dumps(generation, indent=2) + "\n")

    probe = None
    if tcfg.bleu_samples:
        sample = list(range(min(tcfg.bleu_samples, len(val))))
        probe = BleuProbe(net, tokenizers, [val[i][0] for i in sample], [val_refs[i] for i in sample],
                          batch_size=max(cfg.batch_size, 32))
    tokens_per_step = max(1, round(batches.mean_target_tokens() * cfg.grad_accum))
    trainer = Trainer(
        TeacherForcing(net, tcfg.label_smoothing), cfg, batches, run_dir,
        write_model=write_model,
        param_groups=net.configure_optimizer_groups(cfg.weight_decay),
        flops_per_token=net.flops_per_token(batches.longest()),
        tokens_per_step=tokens_per_step,
        progress=progress,
        on_checkpoint=run.checkpointed,
        extra_eval=ExtraEval(BLEU_COLUMNS, probe.measure) if probe else None,
    )
    n_params = net.param_count()
    vocab = (f"joint vocabulary {tokenizers.target.vocab_size}" if tokenizers.joint else
             f"vocabularies {tokenizers.source.vocab_size} (source) / {tokenizers.target.vocab_size} (target)")
    kind = "decoder-only, on source <|sep|> target" if concatenated else "encoder-decoder"
    print(f"[pretrain] {model_config.name} ({kind}): {n_params / 1e6:.2f}M parameters, {vocab}; "
          f"{len(train)} train / {len(val)} val pairs ({stats.describe()}); "
          f"{'bucketed ' if tcfg.bucket else ''}batches of "
          f"{f'<= {tcfg.max_tokens} tokens' if tcfg.max_tokens else f'{cfg.batch_size} pairs'}, pad share "
          f"{batches.pad_share():.1%}; label smoothing {tcfg.label_smoothing}; on {trainer.device} ({trainer.precision})"
          + (f"; est. memory {estimate['total'] / 2**30:.2f} GB" if not tcfg.max_tokens else ""), flush=True)
    result = trainer.fit(resume_from=ckpt, pause_at=pause_at)
    return _finish(run_dir, result, net, tokenizers, val, val_refs, n_params, data_stats, batches.pad_share())


def _finish(run_dir: Path, result: TrainResult, net: Seq2Seq | GPT, tokenizers: PairTokenizers, val, val_refs,
            n_params: int, data_stats: dict, pad_share: float) -> dict:
    """summary.json, report.md (+ loss.png) with sample translations from the best model."""
    best = load_model_dir(run_dir / "best")[0] if (run_dir / "best").exists() else net
    best = best.to(net.device)
    k = min(REPORT_SAMPLES, len(val))
    hyps = greedy_translate(best, tokenizers, [val[i][0] for i in range(k)])
    samples = [{"source": tokenizers.source.decode(val[i][0].tolist()), "reference": val_refs[i], "translation": hyps[i]}
               for i in range(k)]
    last_bleu = next((r for r in reversed(result.history) if "val_bleu" in r), {})
    summary = {
        "task": "translation",
        **training_summary(result, n_params),
        "val_bleu": last_bleu.get("val_bleu"),
        "val_chrf": last_bleu.get("val_chrf"),
        "pad_share": round(pad_share, 4),
        "data": data_stats,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "samples": samples,
    }
    write_text_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False))
    rows = read_metrics(run_dir / METRICS_FILE)
    facts = [
        ("model", f"{net.config.name} ({n_params / 1e6:.2f}M parameters, "
                  + (f"{net.config.n_encoder_layer}+{net.config.n_layer} layers)" if net.config.is_encoder_decoder else
                     f"{net.config.n_layer} decoder-only layers, on source <|sep|> target)")),
        ("pairs", f"{data_stats['train_pairs']} train / {data_stats['val_pairs']} val "
                  f"(read {data_stats['data']['read']}, dropped {data_stats['data']['dropped'] or 'none'})"),
        ("steps", f"{result.step} ({result.stopped_because})"),
        ("target tokens seen (approx.)", result.tokens_seen),
        ("training time", f"{result.train_seconds:.1f} s"),
        ("pad share of batches", f"{pad_share:.1%}"),
        ("best val loss / perplexity", f"{result.best_val_loss:.4f} / {perplexity(result.best_val_loss):.2f} (step {result.best_step})"
         if result.best_val_loss is not None else None),
        ("last val BLEU / chrF", f"{summary['val_bleu']:.2f} / {summary['val_chrf']:.2f}" if summary["val_bleu"] is not None else None),
    ]
    report = write_training_report(run_dir, "Translation training report", facts, rows,
                                   samples=[(s["source"], f"{s['translation']}\n(reference: {s['reference']})") for s in samples])
    summary["report"] = str(report)
    return summary


def describe(summary: dict) -> str:
    best = summary["best_val_loss"]
    lines = [
        f"steps {summary['steps']} ({summary['stopped_because']}), ~{summary['tokens_seen']:,} target tokens in "
        f"{summary['train_seconds']:.0f} s",
        f"val loss {best:.4f} (perplexity {perplexity(best):.2f})" if best is not None else "no evaluation ran",
    ]
    if summary.get("val_bleu") is not None:
        lines.append(f"val BLEU {summary['val_bleu']:.2f}, chrF {summary['val_chrf']:.2f} (greedy, sacrebleu defaults)")
    for s in summary["samples"]:
        lines += [f"--- {s['source']}", f"  -> {s['translation']}", f"  ref {s['reference']}"]
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)
