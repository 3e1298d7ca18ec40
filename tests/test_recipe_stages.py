"""The recipe folder's budget: what a recipe spent (across interruptions), what training may take
after the evaluations it must leave time for, and a budget too small refused in one line."""

import json
import time

import pytest

from lmforge.errors import LmforgeError
from lmforge.recipes.stages import RecipeDir, steps_for_budget


def recipe_dir(tmp_path, budget: float) -> RecipeDir:
    return RecipeDir(tmp_path / "out", "demo", {"budget": budget}, echo=lambda s: None, budget_minutes=budget)


def test_training_gets_the_budget_less_what_was_spent_and_what_comes_after(tmp_path):
    recipe = recipe_dir(tmp_path, 10)
    # a stage an earlier, interrupted session finished: its seconds count
    (recipe.out / "stages" / "data.json").write_text(json.dumps({"stage_seconds": 120.0}))
    assert recipe.seconds_spent() == pytest.approx(120.0)
    minutes = recipe.stage("train", lambda: {"minutes": (time.sleep(0.3), recipe.training_minutes(180, "the evals"))[1]})
    # 600 s - 120 spent - 0.3 s of the running stage - 180 after
    assert minutes["minutes"] == pytest.approx((600 - 120 - 0.3 - 180) / 60, abs=0.01)
    assert recipe.seconds_spent() == pytest.approx(120.3, abs=0.1)  # the finished stage now counts from its file


def test_a_budget_the_evaluations_alone_exceed_is_refused_naming_what_it_needs(tmp_path):
    recipe = recipe_dir(tmp_path, 3)
    (recipe.out / "stages" / "data.json").write_text(json.dumps({"stage_seconds": 120.0}))
    with pytest.raises(LmforgeError, match=r"--budget 3: .*~3.0 min are planned for the evals.*give --budget 6 or more"):
        recipe.training_minutes(180, "the evals")
    with pytest.raises(LmforgeError, match="no budget to plan training by"):
        recipe_dir(tmp_path / "none", 0).training_minutes(0, "nothing")


def test_steps_for_budget_counts_the_calibration_run_against_the_minutes(tmp_path):
    def train(folder, steps):  # 10 steps a second between steps 10 and 30, and a second to run
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text("step,elapsed_s\n10,1.0\n30,3.0\n")
        time.sleep(1.0)

    plan = steps_for_budget(train, tmp_path / "scratch", minutes=0.1, steps=5, echo=lambda s: None)
    # 6 s less the ~1 s calibration, 85% of it at 10 steps/s: ~42 (51 had the calibration been free);
    # the ~5 s left are the run's clock
    assert 38 <= plan.steps <= 43 and 4.0 <= plan.seconds <= 5.0 and not (tmp_path / "scratch").exists()
