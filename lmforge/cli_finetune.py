"""`lmforge finetune` and `lmforge merge` (registered on the main app in cli.py). Imports no torch
at module level, so `lmforge --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli_options import Spec, keep_given, load_yaml_defaults, saved_run_config, with_config
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
    from lmforge.train.trainer import exit_if_signalled

    if out is None:
        raise LmforgeError("--out is required: the run dir to write (or resume)")
    saved = saved_run_config(out, RUN_CONFIG) if resume or resume_from else None
    if saved is not None:
        cfg = keep_given(ctx, cfg, saved.get("train"), "train__")
        ft = keep_given(ctx, ft, saved.get("finetune"), "")
        lora = keep_given(ctx, lora, saved.get("lora"), "lora__")
        data = data or (Path(saved["data"]) if saved.get("data") else None)
        val_data = val_data or (Path(saved["val_data"]) if saved.get("val_data") else None)
    if data is None:
        raise LmforgeError("--data is required: a JSONL of chats/instructions/text or a .txt file")
    summary = run_finetune(model, data, out, ft, cfg, lora, val_data=val_data, resume=resume,
                           resume_from=resume_from, overwrite=overwrite, progress=progress)
    if summary.get("rank"):  # under torchrun, rank 0 reports
        exit_if_signalled(summary)
        return
    typer.echo(describe(summary))
    exit_if_signalled(summary)


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
