"""`lmforge recipe ...`: end-to-end recipes (parse, call lmforge.recipes, print)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.errors import LmforgeError

recipe_app = typer.Typer(help="End-to-end recipes: data, training, evaluation and a report in one command.",
                         no_args_is_help=True)


@recipe_app.command("list")
def list_recipes():
    """The recipes, their default budgets and what each does."""
    from lmforge.recipes import RECIPES

    for r in RECIPES.values():
        typer.echo(f"{r.name:<12} {r.budget:>5g} min  {r.summary}")


@recipe_app.command("run")
def run(
    name: Annotated[str, typer.Argument(help="The recipe (lmforge recipe list).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder (default runs/recipe-NAME); "
                                                "running again on it continues an interrupted run.")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Minutes for the whole recipe (default: the recipe's), evaluations "
                                                    "included: training gets what they leave.")] = None,
    model: Annotated[Optional[str], typer.Option(help="The base model (style, chatbot); the model scored beside ours "
                                                 "(code; '' = none).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="The recipe's data (style: a text file in the style; chatbot: "
                                                 "chat JSONL as fine-tuning reads it).")] = None,
    checks: Annotated[Optional[Path], typer.Option(help="chatbot with --data: scripted checks, JSONL of "
                                                   "{messages, expect: regex of the last reply}.")] = None,
    max_steps: Annotated[int, typer.Option(help="A fixed number of training steps instead of the budget (0 = budget).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Start over in an existing --out.")] = False,
):
    """Run a recipe end to end (data, training, evaluation, report.md + plots in --out); the same
    command continues it after an interruption."""
    from lmforge.recipes import RECIPES

    if name not in RECIPES:
        typer.echo(f"lmforge: error: no recipe {name!r}; there are: {', '.join(RECIPES)}", err=True)
        raise typer.Exit(2)
    info = RECIPES[name]
    out = out or Path(f"runs/recipe-{name}")
    minutes = budget if budget is not None else info.budget
    try:
        if checks is not None and name != "chatbot":
            raise LmforgeError(f"--checks is for the chatbot recipe, not {name}")
        if name == "style":
            from lmforge.recipes.style import StyleConfig, run_style

            cfg = StyleConfig(out=out, budget=minutes, text=data, max_steps=max_steps, overwrite=overwrite)
            if model:
                cfg.model = model
            run_style(cfg, echo=typer.echo)
        elif name == "code":
            from lmforge.recipes.code import CodeRecipeConfig, run_code

            if data:
                raise LmforgeError("the code recipe trains on the standard library's source; it takes no --data")
            cfg = CodeRecipeConfig(out=out, budget=minutes, max_steps=max_steps, overwrite=overwrite)
            if model is not None:
                cfg.compare = model
            run_code(cfg, echo=typer.echo)
        elif name == "chatbot":
            from lmforge.recipes.chatbot import ChatbotConfig, run_chatbot

            cfg = ChatbotConfig(out=out, budget=minutes, data=data, checks=checks, max_steps=max_steps, overwrite=overwrite)
            if model:
                cfg.model = model
            run_chatbot(cfg, echo=typer.echo)
        elif name == "translation":
            if model or data:
                raise LmforgeError("the translation recipe takes no --model/--data (see `lmforge recipe translation --help`)")
            from lmforge.recipes.translation import RecipeConfig, run_recipe

            run_recipe(RecipeConfig(out=out, budget=minutes, overwrite=overwrite, max_steps=max_steps), echo=typer.echo)
    except LmforgeError as e:
        typer.echo(f"lmforge: error: {e}", err=True)
        raise typer.Exit(1) from None


@recipe_app.command("translation")
def translation(
    out: Annotated[Path, typer.Option(help="Output folder (data/, run/, results.json, bleu.png).")] = Path("runs/recipe-translation"),
    minutes: Annotated[float, typer.Option(help="Training time budget per model, in minutes.")] = 15.0,
    preset: Annotated[str, typer.Option(help="Encoder-decoder preset (the recipe's size overrides apply to seq2seq-tiny only).")] = "seq2seq-tiny",
    decoder_only: Annotated[bool, typer.Option("--decoder-only/--no-decoder-only", help="Also train and score a decoder-only model of the same size on source <|sep|> target.")] = True,
    reverse: Annotated[bool, typer.Option(help="English -> German instead of German -> English.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    install: Annotated[bool, typer.Option("--install/--no-install", help="apt-get install trans-de-en when missing.")] = True,
    ding: Annotated[Optional[Path], typer.Option(help="Ding-format dictionary file (default /usr/share/trans/de-en).")] = None,
    test_limit: Annotated[int, typer.Option(help="Test pairs scored (0 = all).")] = 500,
    max_steps: Annotated[int, typer.Option(help="Stop after N steps instead of the time budget (0 = time budget).")] = 0,
):
    """German-English translation from the Ding dictionary: extract pairs, train a small
    encoder-decoder and a decoder-only model of its size for a time budget each, score BLEU/chrF
    on the test split (greedy, beam-4), plot val BLEU over training."""
    from lmforge.recipes.translation import DEFAULT_OVERRIDES, RecipeConfig, run_recipe

    cfg = RecipeConfig(out=out, minutes=minutes, preset=preset, reverse=reverse, overwrite=overwrite, install=install,
                       test_limit=test_limit, max_steps=max_steps, decoder_only=decoder_only,
                       model_overrides=dict(DEFAULT_OVERRIDES) if preset == "seq2seq-tiny" else {})
    if ding is not None:
        cfg.ding_path = ding
    try:
        run_recipe(cfg, echo=typer.echo)
    except LmforgeError as e:
        typer.echo(f"lmforge: error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {out}/results.json and {out}/bleu.png")
