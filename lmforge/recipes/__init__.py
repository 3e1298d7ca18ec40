"""End-to-end recipes: data, training, evaluation and a report in one command.

Each recipe is a small module that chains lmforge's own stages (no second implementation of
anything) through `lmforge.recipes.stages.RecipeDir`, so that it resumes where it was interrupted
and ends with OUT/report.md, OUT/results.json and its plots. `RECIPES` lists them for `lmforge
recipe list`; `lmforge recipe run NAME` runs one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    budget: float  # default minutes (the whole recipe, on 2 CPU cores)
    summary: str


RECIPES = {r.name: r for r in (
    RecipeInfo("style", 15.0, "content creation: LoRA-tune SmolLM2 on a text in one style (tinyshakespeare); base vs tuned "
               "samples at several temperatures/top-p/min-p, with perplexity and distinct-n"),
    RecipeInfo("code", 20.0, "code generation: pretrain a small model on the standard library's source, then "
               "HumanEval pass@1/pass@10 (sandboxed execution) beside SmolLM2-135M-Instruct's (through its chat template)"),
    RecipeInfo("chatbot", 15.0, "a support chatbot: LoRA-tune SmolLM2 on chats about an invented product (system prompts, "
               "multi-turn); held-out loss on assistant tokens, scripted multi-turn checks and controls before/after"),
    RecipeInfo("translation", 30.0, "German-English from the Ding dictionary: an encoder-decoder and a decoder-only model "
               "of its size, BLEU/chrF greedy and beam-4 (also `lmforge recipe translation` with all its options)"),
)}
