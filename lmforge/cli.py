"""`lmforge <command>`: parses arguments, calls the library, prints results. No logic lives here."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli_options import Spec, given_on_command_line, keep_given, load_yaml_defaults, saved_run_config, with_config
from lmforge.data.clean import CleanConfig
from lmforge.data.pack import PackConfig
from lmforge.data.sources import DEFAULT_EXTENSIONS, EncodingErrors
from lmforge.errors import LmforgeError
from lmforge.generate.params import SamplingParams
from lmforge.model.config import ModelConfig
from lmforge.model.hardware import GPUS
from lmforge.tokenizer import TokenizerTrainConfig
from lmforge.train.config import TrainConfig
from lmforge.train.translation_config import TranslationConfig


app = typer.Typer(
    name="lmforge",
    help="lmforge: build language models end to end — clean text, train tokenizers, pack shards, "
    "pretrain, fine-tune, evaluate, generate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: compact, greppable, the same in a pipe and a terminal
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
tokenizer_app = typer.Typer(help="Train, apply and inspect tokenizers.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tokenizer_app, name="tokenizer")
from lmforge.cli_eval import eval_app  # noqa: E402  (its module imports no torch)

app.add_typer(eval_app, name="eval")
from lmforge.cli_data import data_app  # noqa: E402  (imports no torch)

app.add_typer(data_app, name="data")
from lmforge.cli_recipe import recipe_app  # noqa: E402  (imports no torch)

app.add_typer(recipe_app, name="recipe")
from lmforge.cli_inspect import inspect_app  # noqa: E402  (imports no torch)

app.add_typer(inspect_app, name="inspect")
from lmforge.cli_probe import probe_app  # noqa: E402  (imports no torch)

app.add_typer(probe_app, name="probe")

from lmforge.cli_tune import tune_app  # noqa: E402  (imports no torch)

app.add_typer(tune_app, name="tune")

Inputs = Annotated[list[str], typer.Argument(help="Files, folders (walked recursively) or globs.", show_default=False)]
Out = Annotated[Path, typer.Option("-o", "--out", help="Output folder (written atomically).", show_default=False)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]
TextField = Annotated[str, typer.Option(help="JSONL field / Parquet column holding the text.")]
EncodingOpt = Annotated[
    EncodingErrors, typer.Option(help="Invalid UTF-8: 'replace' with U+FFFD (counted) or 'strict' (error).")
]
Extensions = Annotated[
    list[str], typer.Option("--ext", help="Extensions picked up when walking folders (repeat the flag).")
]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]


def _warn(message: str) -> None:
    print(f"lmforge: warning: {message}", file=sys.stderr, flush=True)


def _echo_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


@app.command()
@with_config(config=CleanConfig)
def clean(
    inputs: Inputs,
    out: Out,
    config: CleanConfig,
    text_field: TextField = "text",
    encoding_errors: EncodingOpt = "replace",
    ext: Extensions = list(DEFAULT_EXTENSIONS),
    skip_bad_files: Annotated[bool, typer.Option(help="Skip unreadable/binary files (listed in stats.json) instead of failing.")] = False,
    shard_mb: Annotated[float, typer.Option(help="Size of each output JSONL shard in MB.")] = 64.0,
    workers: Annotated[int, typer.Option(help="Cleaning processes (0 = one per core).")] = 0,
    overwrite: Overwrite = False,
    progress: Progress = True,
):
    """Clean raw text (txt/md/html/jsonl/parquet, .gz too) into deduplicated JSONL documents."""
    from lmforge.data.clean import clean_corpus

    stats = clean_corpus(
        inputs, out, config, text_field=text_field, encoding_errors=encoding_errors, extensions=ext,
        skip_bad_files=skip_bad_files, shard_mb=shard_mb, workers=workers or None, overwrite=overwrite, progress=progress,
    )
    inp, outp = stats["input"], stats["output"]
    typer.echo(f"read {inp['documents']} documents from {inp['files']} files ({inp['bytes_read'] / 1e6:.1f} MB, "
               f"{stats['mb_per_s']:.2f} MB/s); kept {outp['documents']}")
    for reason, n in sorted(stats["removed"].items(), key=lambda kv: -kv[1]):
        typer.echo(f"  removed {n:>7}  {reason}")
    if inp["decode_replacements"]:
        typer.echo(f"  {inp['decode_replacements']} invalid UTF-8 bytes replaced with U+FFFD")
    if inp["skipped_files"]:
        typer.echo(f"  skipped {len(inp['skipped_files'])} unreadable files (see stats.json)")
    typer.echo(f"wrote {out}/ ({len(outp['shards'])} shards, stats.json)")


@tokenizer_app.command("train")
@with_config(config=TokenizerTrainConfig)
def tokenizer_train(
    inputs: Inputs,
    out: Out,
    config: TokenizerTrainConfig,
    text_field: TextField = "text",
    encoding_errors: EncodingOpt = "replace",
    ext: Extensions = list(DEFAULT_EXTENSIONS),
    overwrite: Overwrite = False,
    progress: Progress = True,
):
    """Train a BPE/WordPiece/Unigram/word/char tokenizer; writes OUT/tokenizer.json."""
    from lmforge.tokenizer import inspect_tokenizer, save_tokenizer_dir, train_tokenizer
    from lmforge.data.sources import DocumentReader

    reader = DocumentReader(inputs, text_field=text_field, encoding_errors=encoding_errors, extensions=ext)
    tok = train_tokenizer((d.text for d in reader), config, source=", ".join(inputs), show_progress=progress,
                          notify=_warn)
    save_tokenizer_dir(tok, out, overwrite=overwrite)
    report = inspect_tokenizer(tok)
    typer.echo(f"trained a {config.kind} tokenizer with {tok.vocab_size} tokens on {reader.stats.documents} documents "
               f"({reader.stats.bytes_read / 1e6:.1f} MB); special tokens: {', '.join(report.special_tokens)}")
    typer.echo(f"wrote {out}/tokenizer.json")


TokenizerArg = Annotated[str, typer.Argument(help="A tokenizer.json, or a folder holding one (tokenizer or model dir).")]


@tokenizer_app.command("encode")
def tokenizer_encode(
    tokenizer: TokenizerArg,
    text: Annotated[Optional[str], typer.Argument(help="Text to encode (or use --file).")] = None,
    file: Annotated[Optional[Path], typer.Option(help="Encode this file's contents instead.")] = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="Also print each token as text.")] = False,
):
    """Print the token ids of a text."""
    from lmforge.tokenizer import Tokenizer

    if (text is None) == (file is None):
        raise LmforgeError("give either TEXT or --file, not both or neither")
    if file is not None:
        if not file.is_file():
            raise LmforgeError(f"{file}: no such file")
        from lmforge.jsonio import strict_decode

        text = strict_decode(file.read_bytes(), str(file))
    tok = Tokenizer.load(tokenizer)
    ids = tok.encode(text)
    typer.echo(" ".join(map(str, ids)))
    if tokens:
        typer.echo(" ".join(json.dumps(tok.decode([i]), ensure_ascii=False) for i in ids))


@tokenizer_app.command("decode")
def tokenizer_decode(
    tokenizer: TokenizerArg,
    ids: Annotated[list[int], typer.Argument(help="Token ids.", show_default=False)],
    skip_special: Annotated[bool, typer.Option("--skip-special", help="Drop special tokens.")] = False,
):
    """Print the text of token ids."""
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise LmforgeError(f"token ids out of range 0..{tok.vocab_size - 1}: {bad[:10]}")
    typer.echo(tok.decode(ids, skip_special_tokens=skip_special))


@tokenizer_app.command("inspect")
def tokenizer_inspect(
    tokenizer: TokenizerArg,
    sample: Annotated[Optional[list[str]], typer.Option(help="Files/folders to measure compression and token frequency on.")] = None,
    sample_mb: Annotated[float, typer.Option(help="Read at most this much of the sample.")] = 5.0,
    top: Annotated[int, typer.Option(help="How many frequent / longest tokens to list.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Show vocab size, special tokens, longest and most frequent tokens, bytes per token."""
    from itertools import takewhile

    from lmforge.data.sources import DocumentReader
    from lmforge.tokenizer import Tokenizer, inspect_tokenizer

    tok = Tokenizer.load(tokenizer)
    texts = []
    if sample:
        budget = [sample_mb * 1e6]

        def within_budget(doc) -> bool:
            budget[0] -= len(doc.text.encode("utf-8"))
            return budget[0] + len(doc.text.encode("utf-8")) > 0

        texts = [d.text for d in takewhile(within_budget, DocumentReader(sample))]
    report = inspect_tokenizer(tok, texts, top=top)
    if as_json:
        _echo_json(report.to_dict())
        return
    typer.echo(f"kind: {report.kind}   vocab size: {report.vocab_size}")
    typer.echo("roles: " + ", ".join(f"{r}={t}" for r, t in report.roles.items() if t))
    typer.echo("special tokens: " + ", ".join(f"{t}={i}" for t, i in report.special_tokens.items()))
    typer.echo("longest tokens: " + "  ".join(report.longest_tokens))
    if report.sample_tokens:
        typer.echo(f"sample: {report.sample_bytes} bytes -> {report.sample_tokens} tokens = "
                   f"{report.bytes_per_token:.3f} bytes/token")
        typer.echo("most frequent: " + "  ".join(f"{t}×{n}" for t, n in report.most_frequent))


@app.command()
@with_config(config=PackConfig)
def pack(
    inputs: Inputs,
    tokenizer: Annotated[str, typer.Option(help="tokenizer.json or a folder holding one.", show_default=False)],
    out: Out,
    config: PackConfig,
    text_field: TextField = "text",
    encoding_errors: EncodingOpt = "replace",
    ext: Extensions = list(DEFAULT_EXTENSIONS),
    overwrite: Overwrite = False,
    progress: Progress = True,
):
    """Tokenize a corpus into train/val token shards (.bin + meta.json) for pretraining."""
    from lmforge.data.pack import pack_corpus

    meta = pack_corpus(
        inputs, tokenizer, out, config, text_field=text_field, encoding_errors=encoding_errors,
        extensions=ext, overwrite=overwrite, progress=progress,
    )
    s = meta["splits"]
    typer.echo(f"packed {meta['documents']} documents ({meta['source_bytes'] / 1e6:.1f} MB) in {meta['seconds']:.1f} s: "
               f"train {s['train']['tokens']} tokens, val {s['val']['tokens']} tokens ({meta['dtype']})")
    typer.echo(f"wrote {out}/ (meta.json, tokenizer.json, {sum(len(v['shards']) for v in s.values())} shards)")


@app.command()
def shards(
    path: Annotated[Path, typer.Argument(help="A shards dir made by `lmforge pack`.", show_default=False)],
    tokenizer: Annotated[Optional[str], typer.Option(help="Check the shards were made with this tokenizer.")] = None,
    sample_tokens: Annotated[int, typer.Option(help="Decode this many tokens from the start of train.")] = 64,
):
    """Show a shards dir: token counts per split, its tokenizer, a decoded sample."""
    from lmforge.data.loader import TokenShards
    from lmforge.tokenizer import Tokenizer

    expected = Tokenizer.load(tokenizer).sha256 if tokenizer else None
    ts = TokenShards(path, expect_tokenizer_sha256=expected)
    meta = ts.meta
    typer.echo(f"{path}: {meta['documents']} documents, vocab {meta['vocab_size']}, {meta['dtype']}, "
               f"tokenizer {ts.tokenizer_sha256[:12]} ({meta['tokenizer']['kind']})")
    for name, info in meta["splits"].items():
        split = ts.split(name)
        typer.echo(f"  {name}: {split.tokens} tokens, {info['documents']} documents, {len(info['shards'])} shards")
    if expected:
        typer.echo(f"  tokenizer matches {tokenizer}")
    train = ts.split("train")
    if sample_tokens > 0 and train.shards:
        tok = Tokenizer.load(path)
        typer.echo("sample: " + json.dumps(tok.decode(train.shards[0][:sample_tokens].tolist()), ensure_ascii=False))


@app.command()
@with_config(cfg=Spec(TrainConfig, "train.", alias=True), model_overrides=Spec(ModelConfig, "model.", overrides=True),
             translation=Spec(TranslationConfig, "translation.", alias=True))
def pretrain(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Option(help="A shards dir made by `lmforge pack` (its tokenizer is the model's), or for an encoder-decoder a pairs file: .jsonl ({\"source\": ..., \"target\": ...} a line) or .tsv (source<TAB>target a line).", show_default=False)] = None,
    model: Annotated[str, typer.Option(help="A preset (see `lmforge models --presets`) or a YAML/JSON file of model settings. Default: tiny; seq2seq-tiny for a pairs file.")] = "tiny",
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Run dir: checkpoints, metrics.csv, report.", show_default=False)] = None,
    cfg: TrainConfig = None,
    model_overrides: dict = None,
    translation: TranslationConfig = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="YAML run config ({data, model, out, train: {...}, translation: {...}}); flags override it.", is_eager=True, callback=load_yaml_defaults)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint (its saved config is the default).")] = False,
    resume_from: Annotated[Optional[str], typer.Option(help="Continue from this checkpoint folder instead.")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
):
    """Pretrain a model from scratch on token shards, or an encoder-decoder on translation pairs (checkpoints, exact resume)."""
    from lmforge.data.parallel import is_pair_file
    from lmforge.train.pretrain import RUN_CONFIG, describe, pretrain as run_pretrain
    from lmforge.train.trainer import exit_if_signalled

    if out is None:
        raise LmforgeError("--out is required: the run dir to write (or resume)")
    saved = saved_run_config(out, RUN_CONFIG) if resume or resume_from else None
    if saved is not None:
        cfg = keep_given(ctx, cfg, saved.get("train"), "train__")
        if saved.get("translation"):
            translation = keep_given(ctx, translation, saved["translation"], "translation__")
        if data is None and saved.get("data"):
            data = Path(saved["data"])
    if data is None:
        raise LmforgeError("--data is required: a shards dir made by `lmforge pack`, or a pairs file (.jsonl/.tsv) for an encoder-decoder")
    if is_pair_file(data):
        from lmforge.train.translation import describe as describe_translation, train_translation

        # Pairs train an encoder-decoder: without --model, the small one rather than the decoder-only default.
        spec = model if given_on_command_line(ctx, "model") else "seq2seq-tiny"
        summary = train_translation(data, spec, out, cfg, translation, model_overrides=model_overrides, resume=resume,
                                    resume_from=resume_from, overwrite=overwrite, progress=progress)
        typer.echo(describe_translation(summary))
        exit_if_signalled(summary)
        return
    given = [f.name for f in dataclasses.fields(TranslationConfig) if given_on_command_line(ctx, f"translation__{f.name}")]
    if given:
        raise LmforgeError(f"--{given[0].replace('_', '-')} is for training on translation pairs; --data {data} is not a "
                           "pairs file (.jsonl or .tsv)")
    summary = run_pretrain(data, model, out, cfg, model_overrides=model_overrides, resume=resume,
                           resume_from=resume_from, overwrite=overwrite, progress=progress)
    if summary.get("rank"):  # under torchrun, rank 0 reports
        exit_if_signalled(summary)
        return
    typer.echo(describe(summary))
    exit_if_signalled(summary)


from lmforge.cli_finetune import finetune as _finetune, merge as _merge  # noqa: E402

app.command("finetune")(_finetune)
app.command("merge")(_merge)


@app.command()
def models(
    presets: Annotated[bool, typer.Option("--presets", help="List the architecture presets instead of the named models.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
):
    """List named pretrained models (where they come from, whether present) or, with --presets, architectures."""
    from lmforge.model.config import PRESETS
    from lmforge.model.estimate import estimate_memory

    if not presets:
        from lmforge.interop.registry import cache_dir, list_models

        entries = list_models()
        if as_json:
            _echo_json([e.to_dict() for e in entries])
            return
        typer.echo(f"{'model':<24} {'family':<7} {'params':>8} {'context':>8} {'on disk':>9}  {'present':<7}  source")
        for e in entries:
            size = f"{e.disk_bytes / 1e6:.0f} MB" if e.present else "-"
            typer.echo(f"{e.name:<24} {e.family:<7} {e.params / 1e6:>7.1f}M {e.context:>8} {size:>9}  "
                       f"{'yes' if e.present else 'no':<7}  {e.source}")
        typer.echo(f"cache: {cache_dir()}  (also accepted: a model/run dir, an HF folder, a .gguf file, a Hub id as hf:org/name)")
        return
    rows = []
    for name, c in PRESETS.items():
        est = estimate_memory(c, 1, min(c.block_size, 1024))
        family = "enc-dec" if c.is_encoder_decoder else "llama" if c.position == "rope" else "gpt2"
        # An encoder-decoder's layers as encoder+decoder, e.g. 6+6.
        layers = f"{c.n_encoder_layer}+{c.n_layer}" if c.is_encoder_decoder else c.n_layer
        rows.append({"name": name, "family": family, "params": est["params"], "layers": layers,
                     "heads": f"{c.n_head}/{c.n_kv_head}", "width": c.n_embd, "context": c.block_size,
                     "vocab": c.vocab_size})
    if as_json:
        _echo_json(rows)
        return
    typer.echo(f"{'preset':<16} {'family':<7} {'params':>10} {'layers':>6} {'heads q/kv':>10} {'width':>6} {'context':>8} {'vocab':>7}")
    for r in rows:
        typer.echo(f"{r['name']:<16} {r['family']:<7} {r['params'] / 1e6:>9.1f}M {r['layers']:>6} {r['heads']:>10} "
                   f"{r['width']:>6} {r['context']:>8} {r['vocab']:>7}")


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="A model dir, run dir, known model name, HF folder, .gguf file or hf:org/name (a Hugging Face Hub id).", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="Output: a folder (--to lmforge, hf) or a .gguf file.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Output format: lmforge (model dir), hf (transformers folder) or gguf (llama.cpp).", show_default=False)],
    dtype: Annotated[Optional[str], typer.Option(help="Weights: fp32 (or f32), f16, bf16 for lmforge/hf; fp32, f16, q8_0, q4_0, q4_1 for gguf. Default: a GGUF's Q8_0/Q4_0/Q4_1 matrices (or a quantized model dir's blocks) copied unchanged into lmforge and gguf outputs, the rest fp32; fp32 for hf. --dtype fp32 dequantizes everything.", show_default=False)] = None,
    overwrite: Overwrite = False,
):
    """Convert a model between lmforge, Hugging Face and GGUF formats."""
    from lmforge.interop.convert import convert as run_convert

    s = run_convert(src, dst, to, dtype=dtype, overwrite=overwrite)
    types = ", ".join(f"{n} {t}" for t, n in sorted(s.get("tensor_types", {}).items()))
    typer.echo(f"converted {s['source']} ({s['model']}, {s['params'] / 1e6:.1f}M parameters) to {to} {s['dtype']} "
               f"in {s['seconds']:.1f} s: {s['output']} ({s['bytes'] / 1e6:.1f} MB{'; tensors: ' + types if types else ''})")


@app.command()
def quantize(
    src: Annotated[str, typer.Argument(help="Any model lmforge loads: a model dir, run dir, known name, HF folder, .gguf file.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Block format: q8_0, q4_0 or q4_1 (GGUF's own).", show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="The quantized model dir to write.", show_default=False)],
    embedding_format: Annotated[Optional[str], typer.Option("--embedding-format", help="Block format of the token embedding (which a tied head shares) and of an untied lm_head. Default: q8_0 for --to q4_0/q4_1 (the head is the most error-sensitive matrix; llama.cpp keeps it above 4 bits too), --to's format for q8_0.", show_default=False)] = None,
    overwrite: Overwrite = False,
):
    """Store a model's linear weights and embedding as GGUF blocks (a model dir ~4x or ~6x smaller)."""
    from lmforge.interop.convert import quantize_model

    s = quantize_model(src, out, to, embedding_format=embedding_format, overwrite=overwrite)
    head = "the tied head shares it" if s["tied"] else "and lm_head"
    types = ", ".join(f"{n} {t}" for t, n in sorted(s["tensor_types"].items()))
    typer.echo(f"quantized {s['source']} ({s['model']}, {s['params'] / 1e6:.1f}M parameters) to {s['format']}, "
               f"token embedding ({head}) {s['embedding_format']}, in {s['seconds']:.1f} s: {s['output']} "
               f"({s['bytes'] / 1e6:.1f} MB; tensors: {types})")


@app.command()
@with_config(model_overrides=Spec(ModelConfig, "model.", overrides=True))
def estimate(
    model: Annotated[str, typer.Option(help="A preset, a YAML/JSON file of model settings, or a known pretrained model's name (its architecture).")] = "tiny",
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence (0 = the model's context).")] = 0,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="Predict for a named GPU (datasheet memory, FLOP/s, bandwidth) instead of this machine: " + ", ".join(GPUS) + ".", show_default=False)] = None,
    inference: Annotated[bool, typer.Option("--inference", help="Also estimate inference: KV cache, memory, decode and prefill tokens/s.")] = False,
    context: Annotated[int, typer.Option(help="Inference: tokens of context (0 = the model's).")] = 0,
    inference_batch: Annotated[int, typer.Option("--inference-batch", help="Inference: sequences decoded together.")] = 1,
    weights: Annotated[str, typer.Option(help="Inference: weight storage, fp32, bf16, q8_0, q4_1 or q4_0.")] = "fp32",
    measure: Annotated[bool, typer.Option("--measure", help="Also measure on this machine (a few training steps on random tokens; with --inference, instead, decoding with a pretrained model) and record the figures for `lmforge choose`.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    model_overrides: dict = None,
):
    """Estimate parameters, FLOPs, memory and speed of training (and inference) for a model, here or on a named GPU."""
    from lmforge.model.hardware import target
    from lmforge.model.speed import inference_estimate, training_estimate, training_speed

    config, pretrained = _estimate_config(model, model_overrides)
    seq = seq_len or config.block_size
    hw = target(gpu)
    if measure and gpu:
        raise LmforgeError("--measure measures this machine; drop --gpu")
    est = training_estimate(config, batch_size, seq, hw, optimizer=optimizer)
    speed = training_speed(config, batch_size, seq, hw, optimizer=optimizer)
    out: dict = {"model": config.name, "hardware": hw.describe(), "train": {**est, **speed.to_dict()}}
    if inference:
        out["inference"] = inference_estimate(config, hw, batch_size=inference_batch, context=context,
                                              weight_format=weights).to_dict()
    if measure:
        out["measured"] = _measure_and_record(model, config, pretrained, batch_size, seq, optimizer, inference,
                                              inference_batch, weights, out)
    if as_json:
        _echo_json(out)
        return
    gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
    typer.echo(f"{config.name}: {est['params']:,} parameters, {est['flops_per_token'] / 1e9:.3f} GFLOP per token (train)")
    if config.is_encoder_decoder:
        typer.echo(f"  encoder-decoder ({config.n_encoder_layer}+{config.n_layer} layers): sources and targets of "
                   f"{seq} tokens each; FLOPs per target token")
    typer.echo(f"training memory ({hw.precision}, batch {batch_size} x {seq}):")
    for key in ("weights", "grads", "optimizer", "activations", "logits", "total"):
        typer.echo(f"  {key:<12} {gib(est[key])}")
    typer.echo(f"  {'peak':<12} {gib(est['peak'])} (the total + the backward's transients, as measured: lmforge.model.speed)")
    typer.echo(f"on {hw.describe()}:")
    typer.echo(f"  training     {speed.tokens_per_s:,.0f} tokens/s predicted (step {speed.step_seconds:.3f} s = matmuls "
               f"{speed.matmul_seconds:.3f} s at {speed.matmul_efficiency:.0%} of peak + memory traffic "
               f"{speed.memory_seconds:.3f} s; MFU {speed.mfu:.0%}); memory {'fits' if est['peak'] <= hw.memory_bytes else 'does NOT fit'}")
    if inference:
        inf = out["inference"]
        typer.echo(f"  inference    {weights} weights {inf['weight_bytes'] / 1e6:,.0f} MB + KV cache {inf['kv_cache_bytes'] / 1e6:,.1f} MB "
                   f"(batch {inf['batch_size']} x context {inf['context']}) = {inf['memory_bytes'] / 1e6:,.0f} MB; decode "
                   f"{inf['decode_tokens_per_s']:,.1f} tokens/s ({inf['ms_per_token']:.1f} ms a token, {inf['bound']}-bound); "
                   f"prefill {inf['prefill_tokens_per_s']:,.0f} tokens/s")
    if measure:
        for mode, m in out["measured"].items():
            predicted = out["train"]["tokens_per_s"] if mode == "train" else out["inference"]["decode_tokens_per_s"]
            typer.echo(f"  measured {mode:<7} {m['tokens_per_s']:,.1f} tokens/s (predicted {predicted:,.1f}: "
                       f"{predicted / m['tokens_per_s']:.2f}x); peak RSS {m['peak_rss_bytes'] / 1e6:,.0f} MB "
                       f"(process before the model {m['baseline_rss_bytes'] / 1e6:,.0f} MB)")


def _estimate_config(spec: str, overrides: dict | None) -> tuple[ModelConfig, str | None]:
    """A preset/YAML as pretrain reads it, or a known pretrained model by its architecture."""
    from lmforge.interop.registry import KNOWN_MODELS
    from lmforge.train.pretrain import resolve_model_config

    if spec in KNOWN_MODELS:
        return resolve_model_config(KNOWN_MODELS[spec].architecture, overrides or {}), spec
    return resolve_model_config(spec, overrides or {}), None


def _measure_and_record(spec: str, config: ModelConfig, pretrained: str | None, batch_size: int, seq: int,
                        optimizer: str, inference: bool, inference_batch: int, weights: str, out: dict) -> dict:
    from lmforge.model import measure

    figures: dict = {}
    if not inference:
        figures["train"] = {"model": spec, **measure.measure_training(config, batch_size, seq, optimizer=optimizer)}
        measure.record_measured(measure.measurement_key(spec, "train", batch_size, seq), figures["train"])
    else:  # alone in its process: the peak RSS is decoding's, not a training step's
        if pretrained is None:
            raise LmforgeError("--measure --inference: give a pretrained model's name (--model "
                               "smollm2-135m-instruct): decoding is measured on the model lmforge loads")
        from lmforge.interop.registry import KNOWN_MODELS

        km = KNOWN_MODELS[pretrained]
        if weights not in (km.quant_format, "fp32"):
            raise LmforgeError(f"--weights {weights}: {pretrained} is stored as {km.quant_format} "
                               "(or fp32 when imported so); measure one of those")
        figures["decode"] = {"model": pretrained, "weights": weights,
                             **measure.measure_decode(pretrained, batch_size=inference_batch,
                                                      import_dtype="fp32" if weights == "fp32" else None)}
        measure.record_measured(measure.measurement_key(pretrained, "decode", inference_batch,
                                                        figures["decode"]["context"], weights), figures["decode"])
    return figures


@app.command()
def choose(
    ram: Annotated[Optional[str], typer.Option("--ram", help="Memory the model may use, e.g. 8G, 512M (default: what is available now; with --gpu, the GPU's).", show_default=False)] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="Choose for a named GPU: " + ", ".join(GPUS) + ".", show_default=False)] = None,
    latency_ms: Annotated[Optional[float], typer.Option("--latency-ms", help="Reject models whose decoded token takes longer.", show_default=False)] = None,
    task: Annotated[str, typer.Option("--task", help="chat, code or translation.")] = "chat",
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
):
    """Rank the models lmforge knows for a task on this machine (or a named GPU), and say why the others don't fit."""
    from lmforge.choose import choose as run_choose
    from lmforge.choose import parse_size, render
    from lmforge.model.hardware import target
    from lmforge.model.measure import load_measured

    hw = target(gpu)
    limit = parse_size(ram) if ram else hw.memory_bytes
    verdicts = run_choose(task, hw, ram_bytes=limit, latency_ms=latency_ms, measured=load_measured())
    if as_json:
        _echo_json({"task": task, "hardware": hw.describe(), "memory_limit_bytes": limit,
                    "models": [v.to_dict() for v in verdicts]})
        return
    typer.echo(render(verdicts, task, hw, limit))


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option("-o", "--out", help="Working folder for every stage's output.")] = Path("runs/quickstart"),
    inputs: Annotated[Optional[list[str]], typer.Option("--input", help="Your own files/folders instead of the Python standard library (repeat the flag).")] = None,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = 4096,
    model: Annotated[str, typer.Option(help="Model preset to pretrain.")] = "tiny",
    minutes: Annotated[float, typer.Option(help="Time budget for pretraining, in minutes.")] = 5.0,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 16,
    block_size: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    overwrite: Overwrite = False,
    progress: Progress = True,
):
    """Run the whole pipeline on the embedded corpus (the Python standard library source)."""
    from lmforge.quickstart import run_quickstart

    run_quickstart(out, inputs=inputs, vocab_size=vocab_size, model=model, minutes=minutes, batch_size=batch_size,
                   block_size=block_size, overwrite=overwrite, progress=progress)


ModelArg = Annotated[str, typer.Argument(help="A model dir, a run dir (its best model) or a known model name.", show_default=False)]


@dataclasses.dataclass
class SamplingOptions(SamplingParams):
    """SamplingParams as the command line gives them, checked only once `_sampling_from` has
    applied generation.json and the beam-search rule: `--num-beams 4` alone must not be refused
    for the default temperature."""

    def __post_init__(self) -> None:
        pass


def _sampling_from(ctx: typer.Context, params: SamplingParams, generation: dict) -> SamplingParams:
    """A model dir's generation.json fills the sampling options the user did not give. Its
    stop_token_ids go to the Engine, not here: they are the model's end tokens, which
    --ignore-eos passes, not stop tokens the user asked for. --num-beams N (N > 1) is a
    deterministic search: the default temperature (0.8, or generation.json's) is not applied;
    a temperature given on the command line is, and SamplingParams refuses it."""
    from lmforge.generate.params import SamplingParams

    values = dataclasses.asdict(params)
    for key, value in generation.items():
        if key in values and key != "stop_token_ids" and not given_on_command_line(ctx, key):
            values[key] = value
    if values["num_beams"] > 1 and not given_on_command_line(ctx, "temperature"):
        values["temperature"] = 0.0
    return SamplingParams(**values)


@app.command()
@with_config(params=SamplingOptions)
def generate(
    ctx: typer.Context,
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="The text to continue.", show_default=False)],
    params: SamplingParams = None,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Print tokens as they come (default: when stdout is a terminal).", show_default=False)] = None,
    truncate: Annotated[Optional[str], typer.Option(help="'left': cut a too-long prompt from the left (with a warning) instead of failing.")] = None,
    int8_activations: Annotated[bool, typer.Option("--int8-activations", help="Quantized models: round the products' inputs to int8 per block, as llama.cpp does (faster batched decoding; the text leaves the exact model's after some tokens).")] = False,
):
    """Continue a prompt with a model (sampling options as in transformers)."""
    from lmforge.generate.engine import Engine
    from lmforge.interop.registry import load_model

    if truncate not in (None, "left"):
        raise LmforgeError(f"--truncate must be 'left', got {truncate!r}")
    loaded = load_model(model)
    params = _sampling_from(ctx, params, loaded.generation)
    engine = Engine.for_loaded(loaded, int8_activations=int8_activations)
    ids = engine.encode(prompt)
    kept = engine.check_length(ids, params, truncate)
    if len(kept) < len(ids):
        print(f"lmforge: warning: prompt cut from {len(ids)} to its last {len(kept)} tokens to fit the context", file=sys.stderr)
    several = params.num_beams > 1 or params.num_return_sequences > 1
    if stream is None:
        stream = sys.stdout.isatty() and not several  # beam search cannot stream: it prints at the end
    if stream:
        for piece in engine.stream_ids(kept, params):  # refuses beams and several sequences, one line
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    completions = engine.generate_ids([kept], params)
    if len(completions) == 1:
        typer.echo(completions[0].text)
        return
    for i, c in enumerate(completions, 1):  # a header line before each sequence
        score = "" if c.score is None else f", score {c.score:.4f}"
        typer.echo(f"=== sequence {i} of {len(completions)}{score} ===")
        typer.echo(c.text)


@dataclasses.dataclass
class TranslateOptions(SamplingOptions):
    temperature: float = 0.0  # 0 = greedy (translation's default, as transformers' do_sample=False); higher = sample


@app.command()
@with_config(params=TranslateOptions)
def translate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="An encoder-decoder model dir, run dir or known model name.", show_default=False)],
    text: Annotated[Optional[str], typer.Argument(help="The text to translate (or --input FILE).", show_default=False)] = None,
    params: SamplingParams = None,
    input: Annotated[Optional[Path], typer.Option("-i", "--input", help="Translate this file: one source per line (blank lines stay blank).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="With --input: write the translations here, one per line (atomically); default stdout.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Sources translated together (sorted by length).")] = 16,
    progress: Progress = True,
):
    """Translate with an encoder-decoder model (or a decoder-only one trained on pairs): greedy unless --temperature or --num-beams says otherwise."""
    from lmforge.fsutil import write_text_atomic
    from lmforge.generate.engine import Engine
    from lmforge.generate.translate import translate_lines, translate_texts
    from lmforge.interop.registry import load_model

    if (text is None) == (input is None):
        raise LmforgeError("give the TEXT to translate or --input FILE (one source per line), not both")
    if output is not None and input is None:
        raise LmforgeError("--output goes with --input FILE; a TEXT's translation is printed")
    loaded = load_model(model)
    engine = Engine.for_loaded(loaded)
    try:
        engine.require_translator()
    except LmforgeError as e:
        raise LmforgeError(f"{loaded.path}: {e}") from None
    # Translation is greedy unless a temperature is given here: generation.json's (a sampling
    # default for chat-style models) does not turn it into sampling.
    params = _sampling_from(ctx, params, {k: v for k, v in loaded.generation.items() if k != "temperature"})
    # A default max_new_tokens yields to a decoder-only translator's context; one given does not.
    cap = not given_on_command_line(ctx, "max_new_tokens") and "max_new_tokens" not in loaded.generation
    if input is None:
        done = translate_texts(engine, [text], params, batch_size=batch_size, cap_to_context=cap)[0]
        if len(done) == 1:
            typer.echo(done[0])
            return
        for i, t in enumerate(done, 1):
            typer.echo(f"=== translation {i} of {len(done)} ===")
            typer.echo(t)
        return
    from lmforge.eval.io import read_lines

    lines = translate_lines(engine, read_lines(input), params, batch_size=batch_size, progress=progress,
                            cap_to_context=cap)
    result = "".join(line + "\n" for line in lines)
    if output is None:
        typer.echo(result, nl=False)
        return
    write_text_atomic(output, result)
    print(f"wrote {len(lines):,} translations to {output}", file=sys.stderr)


@app.command()
@with_config(params=SamplingOptions)
def chat(
    ctx: typer.Context,
    model: ModelArg,
    params: SamplingParams = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    int8_activations: Annotated[bool, typer.Option("--int8-activations", help="Quantized models: round the products' inputs to int8 per block, as llama.cpp does (faster batched decoding; the text leaves the exact model's after some tokens).")] = False,
):
    """Chat with a model in the terminal (/system TEXT, /reset, /save FILE, /exit); reads a pipe too."""
    from lmforge.generate.chat_session import ChatSession
    from lmforge.generate.engine import Engine
    from lmforge.interop.registry import load_model

    loaded = load_model(model)
    params = _sampling_from(ctx, params, loaded.generation)
    engine = Engine(loaded.model, loaded.tokenizer, stop_token_ids=loaded.generation.get("stop_token_ids", ()),
                    int8_activations=int8_activations)
    if not loaded.tokenizer.chat_template:
        raise LmforgeError(f"{loaded.path}: this model has no chat template; use `lmforge generate` for plain text")
    interactive = sys.stdin.isatty()
    note = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    session = ChatSession(engine, params, system=system, notify=note)
    if interactive:
        note(f"chatting with {loaded.path} — /system TEXT, /reset, /save FILE, /exit")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/exit":
                break
            elif cmd == "/reset":
                session.reset()
                note("[history cleared]")
            elif cmd == "/system":
                session.system = arg.strip() or None
                note(f"[system prompt {'set' if session.system else 'cleared'}]")
            elif cmd == "/save":
                if not arg.strip():
                    note("usage: /save FILE")
                else:
                    note(f"[saved to {session.save(arg.strip())}]")
            else:
                note(f"unknown command {cmd}; commands: /system TEXT, /reset, /save FILE, /exit")
            continue
        try:
            for piece in session.send(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
        except LmforgeError as e:
            note(f"lmforge: error: {e}")
            if not interactive:
                raise


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="A model dir, run dir, adapter dir or known model name.")] = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default; 0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1 and /metrics.", show_default=False)] = None,
    api_key_file: Annotated[Optional[Path], typer.Option("--api-key-file", help="Read the API key from this file (keeps it out of the process list).", show_default=False)] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together (the KV cache's slots).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Sequences waiting for a slot; more are answered 429 with Retry-After.")] = 64,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context served, prompt + completion (default: the model's, at most 2048).", show_default=False)] = None,
    max_tokens_limit: Annotated[Optional[int], typer.Option(help="The most tokens one completion may ask for (default: the context).", show_default=False)] = None,
    max_n: Annotated[int, typer.Option(help="The most choices (n) one request may ask for.")] = 8,
    max_messages: Annotated[int, typer.Option(help="Messages in one chat request.")] = 256,
    max_prompt_chars: Annotated[int, typer.Option(help="Characters of prompt text in one request.")] = 200_000,
    max_body_bytes: Annotated[int, typer.Option(help="Request body size; larger is answered 413.")] = 2 << 20,
    prefill_chunk: Annotated[int, typer.Option(help="Prompt tokens prefilled per step beside the running batch (longer prompts go in pieces).")] = 512,
    prefix_reuse: Annotated[bool, typer.Option("--prefix-reuse/--no-prefix-reuse", help="Let a prompt continue a finished request's cached prefix (a shared system prompt, the earlier turns of a chat) instead of prefilling it again. The replies are the same bits either way.")] = True,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="A browser origin allowed to call the API (repeat the flag).", show_default=False)] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="The model id clients send and /v1/models lists (default: MODEL).", show_default=False)] = None,
    drain_seconds: Annotated[float, typer.Option(help="On Ctrl-C: how long in-flight requests may take to finish.")] = 30.0,
    int8_activations: Annotated[bool, typer.Option("--int8-activations", help="Quantized models: round the products' inputs to int8 per block, as llama.cpp does (faster batched decoding; the text leaves the exact model's after some tokens).")] = False,
    stream_interval: Annotated[float, typer.Option(help="Milliseconds between a stream's chunks: text decoded meanwhile goes in one chunk (the first token and the end go at once; 0: a chunk per token). Each chunk costs the decode loop CPU time on small machines.")] = 40.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
):
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions) with a chat page at /."""
    from lmforge.serve import ServeConfig, run_server

    if api_key and api_key_file:
        raise LmforgeError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise LmforgeError(f"{api_key_file}: cannot read the API key file: {e.strerror}") from None
        if not api_key:
            raise LmforgeError(f"{api_key_file}: the API key file is empty")
    if log_level not in ("debug", "info", "warning", "error"):
        raise LmforgeError(f"--log-level must be debug, info, warning or error, got {log_level!r}")
    run_server(ServeConfig(model=model, served_model_name=served_model_name, host=host, port=port, api_key=api_key,
                           max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len,
                           max_tokens_limit=max_tokens_limit, max_n=max_n, max_messages=max_messages,
                           max_prompt_chars=max_prompt_chars, max_body_bytes=max_body_bytes, prefill_chunk=prefill_chunk,
                           prefix_reuse=prefix_reuse, cors_origins=list(cors_origin or []), drain_seconds=drain_seconds,
                           int8_activations=int8_activations, stream_interval_ms=stream_interval,
                           log_level=log_level))


class _Interrupted(Exception):
    """Ctrl-C, carried past click (which would print "Aborted!" and exit 1) to `main`."""


def _rank_prefix() -> str:
    """"rank R of N: " in a process torchrun started with several ranks, so every line says whose it is."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"rank {os.environ.get('RANK', '0')} of {world}: " if world.isdigit() and int(world) > 1 else ""


def _lost_other_ranks(e: BaseException) -> bool:
    """A collective failed because a peer is gone or too slow (gloo/nccl errors, the timeout)."""
    text = f"{type(e).__name__} {e}".lower()
    return type(e).__name__.startswith("Dist") or any(
        s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe"))


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors and help are typer's; lmforge errors print one line and exit 1;
    Ctrl-C prints one line and exits 130 (128 + SIGINT, as a shell reports it)."""
    command = typer.main.get_command(app)
    invoke = command.invoke

    def invoke_catching_interrupt(ctx):
        try:
            return invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted from None

    command.invoke = invoke_catching_interrupt
    try:
        command.main(args=argv, prog_name="lmforge", standalone_mode=True)
    except LmforgeError as e:
        # One line whatever a message quotes (a JSON key, a file name may hold a newline).
        print(f"lmforge: error: {_rank_prefix()}{' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk under a writer outside the atomic helpers (metrics.csv, ...)
        from lmforge.fsutil import disk_full_error, is_disk_full

        if not is_disk_full(e):
            raise
        print(f"lmforge: error: {disk_full_error(e.filename or Path.cwd())}", file=sys.stderr)
        return 1
    except (_Interrupted, KeyboardInterrupt):  # the second: Ctrl-C while the options were parsed
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception as e:  # last: the clauses above take theirs first
        if not (_rank_prefix() and _lost_other_ranks(e)):
            raise
        # A rank died or stalled: torchrun names it; this one says why it stops, in one line.
        cause = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        cause = re.sub(r"^\[[^\]]*\]\s*", "", cause)  # gloo's "[.../pair.cc:537] " source location
        print(f"lmforge: error: {_rank_prefix()}lost contact with the other ranks, stopping ({cause[:300]})", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    """The `lmforge` command. Huge pages for torch's allocator (fine-tuning SmolLM2-135M: peak RSS
    3.5 GB -> 2.1 GB at the same speed) are set for this process only, before torch is imported:
    this module's imports are torch-free (tests/test_no_side_effects.py checks it)."""
    from lmforge.allocator import use_huge_pages

    use_huge_pages()
    sys.exit(main())
