"""`lmforge tune lr-range|sweep`: parse, call lmforge.tune, print. torch and Optuna are imported
inside the commands so that `lmforge --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli_options import Spec, with_config
from lmforge.model.config import ModelConfig
from lmforge.train.config import TrainConfig

tune_app = typer.Typer(
    help="Tune hyperparameters: the LR range test, Optuna sweeps over the pretraining config.",
    no_args_is_help=True, rich_markup_mode=None,
)


@tune_app.command("lr-range")
@with_config(cfg=Spec(TrainConfig, "train."), model_overrides=Spec(ModelConfig, "model.", overrides=True))
def lr_range(
    data: Annotated[Path, typer.Option(help="A shards dir made by `lmforge pack`.", show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder: lr-range.json, lr-range.png, run/ (config.yaml, metrics.csv).", show_default=False)],
    model: Annotated[str, typer.Option(help="A preset (see `lmforge models --presets`) or a YAML/JSON file of model settings.")] = "tiny",
    min_lr: Annotated[float, typer.Option("--min-lr", help="The learning rate of the first step.")] = 1e-7,
    max_lr: Annotated[float, typer.Option("--max-lr", help="The learning rate of the last step.")] = 1.0,
    steps: Annotated[int, typer.Option("--steps", help="Steps from --min-lr to --max-lr (a constant factor between steps).")] = 200,
    stop_factor: Annotated[float, typer.Option("--stop-factor", help="Stop once the smoothed loss passes this many times its minimum.")] = 4.0,
    smoothing: Annotated[float, typer.Option("--smoothing", help="Loss smoothing: the moving average's decay per step (0 = none; 0.98 is fastai's).")] = 0.9,
    cfg: TrainConfig = None,
    model_overrides: dict = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """The LR range test: a short run whose LR rises exponentially; loss vs LR, two suggested LRs, the batch that fits.

    The run's schedule, LR, steps, warmup, evaluation and checkpoints are the test's (--train.lr,
    --train.min-lr, --train.max-steps ... are ignored); the other --train.* settings (batch size,
    block size, optimizer, weight decay, precision, device) are the run's."""
    from lmforge.tune.lr_range import describe, lr_range as run_range

    result = run_range(data, model, out, cfg, min_lr=min_lr, max_lr=max_lr, steps=steps, factor=stop_factor, smoothing=smoothing,
                       model_overrides=model_overrides, overwrite=overwrite, progress=progress)
    typer.echo(describe(result))
    typer.echo(f"wrote {out / 'lr-range.json'} and {result['plot']}")


@tune_app.command("sweep")
def sweep(
    config: Annotated[Path, typer.Argument(help="CONFIG.yaml: data, model, train: {...} (fixed settings) and search: {setting: {low, high, log} or [choices]}.", show_default=False)],
    trials: Annotated[int, typer.Option("--trials", help="Finished trials the study should hold (a resumed sweep runs only the rest).")] = 20,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Sweep folder: study.db, trials/, results.md, slice.png, best.yaml (default: CONFIG-sweep beside CONFIG).", show_default=False)] = None,
    progress: Annotated[bool, typer.Option(help="Show each trial's progress bar.")] = False,
):
    """An Optuna search (TPE sampler, median pruner on val loss) over the pretraining config; resumes with the same command."""
    from lmforge.tune.sweep import describe, run_sweep

    result = run_sweep(config, trials, out, progress=progress, echo=typer.echo)
    typer.echo(describe(result))
