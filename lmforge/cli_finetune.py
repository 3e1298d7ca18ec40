"""`lmforge finetune` and `lmforge merge` (registered on the main app in cli.py). Imports no torch
at module level, so `lmforge --help` stays fast."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli_options import Spec, given_on_command_line, load_yaml_defaults, with_config
from lmforge.errors import LmforgeError
from lmforge.model.lora_config import LoRAConfig
from lmforge.train.config import FinetuneConfig, FinetuneTrainConfig

ModelSpec = Annotated[str, typer.Argument(
    help="The model to start from: a known name (lmforge models), a model dir, a run dir, an HF folder or a .gguf file.",
    show_default=False)]


@with_config(ft=Spec(FinetuneConfig, alias=False), cfg=Spec(FinetuneTrainConfig, "train.", alias=True),
             lora=Spec(LoRAConfig, "lora."))
def finetune(
    ctx: typer.Context,
    model: ModelSpec,
    data: Annotated[Optional[Path], typer.Option(help="Training data: JSONL of chats (messages), instructions (instruction/input/output) or text, or a .txt file.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Run dir: checkpoints, best/ (adapters or model), metrics.csv, report.", show_default=False)] = None,
    val_data: Annotated[Optional[Path], typer.Option(help="Held-out examples for eval and early stopping (default: --val-fraction of --data).", show_default=False)] = None,
    ft: FinetuneConfig = None,
    cfg: FinetuneTrainConfig = None,
    lora: LoRAConfig = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="YAML run config ({data, out, method, train: {...}, lora: {...}}); flags override it.", is_eager=True, callback=load_yaml_defaults)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint (its saved settings are the defaults).")] = False,
    resume_from: Annotated[Optional[str], typer.Option(help="Continue from this checkpoint folder instead.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Fine-tune a pretrained model (LoRA or full) on chats, instructions or text."""
    from lmforge.train.finetune import describe, finetune as run_finetune
    from lmforge.train.pretrain import RUN_CONFIG

    if out is None:
        raise LmforgeError("--out is required: the run dir to write (or resume)")
    if resume or resume_from:
        saved_file = out / RUN_CONFIG
        if saved_file.exists():
            import yaml

            saved = yaml.safe_load(saved_file.read_text())
            cfg = _keep_given(ctx, FinetuneTrainConfig, saved.get("train") or {}, cfg, "train__")
            ft = _keep_given(ctx, FinetuneConfig, saved.get("finetune") or {}, ft, "")
            if saved.get("lora"):
                lora = _keep_given(ctx, LoRAConfig, saved["lora"], lora, "lora__")
            data = data or (Path(saved["data"]) if saved.get("data") else None)
            val_data = val_data or (Path(saved["val_data"]) if saved.get("val_data") else None)
    if data is None:
        raise LmforgeError("--data is required: a JSONL of chats/instructions/text or a .txt file")
    summary = run_finetune(model, data, out, ft, cfg, lora, val_data=val_data, resume=resume,
                           resume_from=resume_from, overwrite=overwrite, progress=progress)
    typer.echo(describe(summary))


def _keep_given(ctx: typer.Context, cls: type, saved: dict, current, prefix: str):
    """The saved run's settings, except those given on this command line."""
    values = dict(saved)
    now = dataclasses.asdict(current)
    for name in now:
        if given_on_command_line(ctx, f"{prefix}{name}") or name not in values:
            values[name] = now[name]
    return cls(**{k: v for k, v in values.items() if k in now})


def merge(
    adapter: Annotated[str, typer.Argument(help="A LoRA run dir (its best adapters) or adapter dir.", show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="The merged model dir to write (atomically).", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")] = False,
):
    """Fold LoRA adapters into their base model's weights: a plain model dir to share or convert."""
    from lmforge.train.finetune import merge_adapter

    s = merge_adapter(adapter, out, overwrite=overwrite)
    typer.echo(f"merged {s['adapters']} adapted layers of {s['adapter']} into {s['base_model']}: {s['output']} "
               f"({s['params'] / 1e6:.1f}M parameters)")
