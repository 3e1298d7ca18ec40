"""`lmforge data ...`: make training data from sources on the machine (registered in cli.py).
Imports no torch, so `lmforge --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli_options import with_config
from lmforge.data.ding import DEFAULT_DING, DingConfig

data_app = typer.Typer(help="Make training data from sources on this machine (parallel text for translation).",
                       no_args_is_help=True, rich_markup_mode=None)


@data_app.command("ding")
@with_config(config=DingConfig)
def ding(
    config: DingConfig,
    input: Annotated[Path, typer.Option("--input", help="The Ding dictionary file (Debian: sudo apt-get install trans-de-en).")] = DEFAULT_DING,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder: train/val/test.jsonl ({source, target}) and stats.json, written atomically. Default: data/ding-de-en (data/ding-en-de with --reverse).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")] = False,
):
    """German-English sentence pairs from the Ding dictionary, split train/val/test by a stable hash."""
    from lmforge.data.ding import describe, extract_ding

    out = out or Path("data/ding-en-de" if config.reverse else "data/ding-de-en")
    stats = extract_ding(out, input, config, overwrite=overwrite)
    typer.echo(describe(stats, out))
