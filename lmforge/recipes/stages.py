"""The folder of one recipe run, and what makes a recipe resumable.

    OUT/recipe.json        the recipe's name and settings (a rerun with other settings is refused)
    OUT/stages/NAME.json   one per finished stage: its result; a rerun skips the stage and reuses it
    OUT/run-*/             training runs: a rerun continues them from their last checkpoint
    OUT/report.md, OUT/results.json, OUT/*.png   written last

A recipe's budget is the whole recipe's, evaluations included: the stages whose cost does not
depend on training run first and are timed, the cost of those after training is predicted, and
training gets what is left (`RecipeDir.training_minutes`); a budget too small for the evaluations
alone is refused rather than overrun.

`lmforge recipe run NAME -o OUT` both starts and continues: after an interruption the same
command picks up at the first unfinished stage (and inside a training stage, at its last
checkpoint). Every file is written to a temp name and renamed, so a stage's JSON is there only
when the stage finished.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmforge.errors import LmforgeError
from lmforge.fsutil import write_text_atomic

RECIPE_FILE = "recipe.json"
STAGES_DIR = "stages"
CALIBRATION_STEPS = 40  # a throwaway run of this many steps turns minutes into a step count


@dataclass
class RecipeDir:
    out: Path
    recipe: str
    settings: dict  # what decides the results (budget, model, data...): a rerun must match them
    overwrite: bool = False
    echo: Callable[[str], None] = print
    budget_minutes: float = 0.0  # the whole recipe's budget (0 = none: stages that plan by it refuse)
    started: float = field(default_factory=time.time)
    _stage_started: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        marker = self.out / RECIPE_FILE
        if self.out.exists() and self.overwrite:
            shutil.rmtree(self.out)
        if marker.exists():
            saved = json.loads(marker.read_text(encoding="utf-8"))
            if saved.get("recipe") != self.recipe or saved.get("settings") != _jsonable(self.settings):
                raise LmforgeError(f"{marker}: this folder holds recipe {saved.get('recipe')!r} with settings "
                                   f"{saved.get('settings')}; continuing it needs the same ones "
                                   "(pass --overwrite to start over, or another -o)")
            done = sorted(p.stem for p in (self.out / STAGES_DIR).glob("*.json"))
            self.echo(f"[recipe] continuing {self.out} (stages done: {', '.join(done) or 'none'})")
        elif self.out.exists() and any(self.out.iterdir()):
            raise LmforgeError(f"{self.out} exists, is not empty and is not a {self.recipe} recipe folder; "
                               "pass --overwrite or another -o")
        else:
            (self.out / STAGES_DIR).mkdir(parents=True, exist_ok=True)
            write_text_atomic(marker, json.dumps({"recipe": self.recipe, "settings": _jsonable(self.settings)}, indent=1))

    def stage(self, name: str, run: Callable[[], dict]) -> dict:
        """The result of stage `name`: from its file when an earlier run finished it, else run now."""
        file = self.out / STAGES_DIR / f"{name}.json"
        if file.exists():
            self.echo(f"[recipe] {name}: done before, reusing {file}")
            return json.loads(file.read_text(encoding="utf-8"))
        self.echo(f"[recipe] {name} ...")
        t0 = self._stage_started = time.time()
        try:
            result = run()
        finally:
            self._stage_started = None
        result = {**result, "stage_seconds": round(time.time() - t0, 1)}
        write_text_atomic(file, json.dumps(_jsonable(result), indent=1, ensure_ascii=False) + "\n")
        return result

    def seconds_spent(self) -> float:
        """The recipe's time so far: its finished stages (from their files, so the time an
        interrupted session spent counts) and the stage running now."""
        done = 0.0
        for file in (self.out / STAGES_DIR).glob("*.json"):
            done += float(json.loads(file.read_text(encoding="utf-8")).get("stage_seconds", 0.0))
        return done + (time.time() - self._stage_started if self._stage_started is not None else 0.0)

    def training_minutes(self, after_seconds: float, after: str, least_minutes: float = 0.1) -> float:
        """The minutes training may take from now: the budget less what the recipe has spent and
        what the stages after training are expected to take (`after` names them for the message).
        A budget that leaves less than `least_minutes` is refused, naming what it must cover."""
        if self.budget_minutes <= 0:
            raise LmforgeError(f"recipe {self.recipe}: no budget to plan training by (give --budget minutes or --max-steps)")
        spent = self.seconds_spent()
        left = self.budget_minutes * 60 - spent - after_seconds
        if left < least_minutes * 60:
            need = math.ceil((spent + after_seconds) / 60 + least_minutes)
            raise LmforgeError(f"--budget {self.budget_minutes:g}: the recipe has spent {spent / 60:.1f} min and "
                               f"~{after_seconds / 60:.1f} min are planned for {after}, which leaves {max(left, 0) / 60:.1f} min to train "
                               f"(at least {least_minutes:g}); give --budget {need} or more, or --max-steps N")
        self.echo(f"[recipe] budget {self.budget_minutes:g} min: {spent / 60:.1f} spent, ~{after_seconds / 60:.1f} "
                  f"planned for {after} -> {left / 60:.1f} min to train")
        return left / 60

    def finish(self, results: dict, report: str) -> dict:
        """results.json and report.md, written last; returns the results as written."""
        results = _jsonable({"recipe": self.recipe, "settings": self.settings, **results,
                             "wall_seconds_this_session": round(time.time() - self.started, 1)})
        write_text_atomic(self.out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(self.out / "report.md", report)
        self.echo(f"[recipe] wrote {self.out / 'report.md'} and {self.out / 'results.json'}")
        return results


def resuming(run_dir: Path) -> bool:
    """A training run an interrupted recipe left behind, with a checkpoint to continue from."""
    return (Path(run_dir) / "latest").exists()


def saved_max_steps(run_dir: Path) -> int:
    """The step count an interrupted run was started with (its config.yaml), so that it resumes as planned."""
    import yaml

    from lmforge.train.pretrain import RUN_CONFIG

    return int(yaml.safe_load((Path(run_dir) / RUN_CONFIG).read_text(encoding="utf-8"))["train"]["max_steps"])


@dataclass(frozen=True)
class BudgetPlan:
    steps: int  # the run's max_steps: its cosine schedule ends there
    seconds: float  # what is left of the minutes after the timing run: the run's clock, a backstop (time_budget)


def steps_for_budget(train: Callable[[Path, int], Any], scratch: Path, minutes: float, fraction: float = 0.85, *,
                     steps: int = CALIBRATION_STEPS, window: tuple[int, int] = (10, 30),
                     echo: Callable[[str], None] = print) -> BudgetPlan:
    """The step count that fills `minutes` from now: `train(scratch, steps)` timed here (a
    throwaway run, from step window[0] to window[1]); what is left of the minutes after it goes
    `fraction` to steps and the rest to the run's evaluations and checkpoints, and is the run's
    clock should its steps run slower than timed. A cosine schedule needs its end up front, and a
    step count, unlike a clock, makes the run itself repeatable (`--resume` is exact)."""
    from lmforge.train.metrics import METRICS_FILE, read_metrics

    first, last = window
    shutil.rmtree(scratch, ignore_errors=True)
    t0 = time.time()
    train(scratch, steps)
    calibration = time.time() - t0
    elapsed = {int(r["step"]): float(r["elapsed_s"]) for r in read_metrics(scratch / METRICS_FILE) if r.get("elapsed_s")}
    shutil.rmtree(scratch, ignore_errors=True)
    if first not in elapsed or last not in elapsed:
        raise LmforgeError(f"{scratch}: the calibration run logged no step times for steps {first} and {last}")
    # The first steps pay for allocations and warm-up that a run pays once, the last row's time
    # includes the closing val-loss evaluation: neither is in the window.
    rate = (last - first) / max(elapsed[last] - elapsed[first], 1e-6)
    left = max(minutes * 60 - calibration, 0.0)
    planned = max(steps, int(rate * left * fraction))
    echo(f"[recipe] calibration: {rate:.3f} steps/s here (timed in {calibration:.0f} s) -> {planned} steps in the "
         f"{left / 60:.1f} minutes left")
    return BudgetPlan(planned, max(left, 1.0))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
