"""`lmforge tune lr-range|sweep`: the exponential schedule, the divergence stop, both LR rules, a
real range test and real sweeps (pruning, resume, best.yaml), one-line errors for bad configs."""

import json
import math
import os
import re

import numpy as np
import pytest
import yaml

from conftest import one_line_error
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import lr_at
from lmforge.tune.lr_range import RangeRecorder, range_config, smooth, suggest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_exponential_schedule_is_geometric_from_min_to_max():
    cfg = range_config(TrainConfig(), 1e-7, 1.0, 50)
    lrs = [lr_at(s, cfg) for s in range(cfg.max_steps)]
    np.testing.assert_allclose(lrs, np.geomspace(1e-7, 1.0, 50), rtol=1e-12)
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)  # one constant factor per step
    with pytest.raises(Exception, match="min-lr"):
        TrainConfig(schedule="exponential", min_lr=0.0)


def test_suggestions_on_a_known_curve():
    """loss = 3 - tanh(2 (x + 4)) + 10 max(0, x + 1), x = log10(lr): steepest at x = -4, minimum
    at x = -1 (so min/10 is 1e-2)."""
    x = np.linspace(-7, 0, 141)
    loss = 3 - np.tanh(2 * (x + 4)) + 10 * np.maximum(0, x + 1)
    picks = suggest(list(10 ** x), list(loss))
    assert picks["min_index"] == 120 and picks["min_div10"] == pytest.approx(1e-2)
    # The slope between neighbours is steepest on the segment straddling -4: its left point or -4 itself.
    assert math.log10(picks["steepest"]) == pytest.approx(-4, abs=0.051)
    # A curve whose steepest fall is elsewhere moves the pick (the rule can fail).
    shifted = 3 - np.tanh(2 * (x + 5.5)) + 10 * np.maximum(0, x + 1)
    assert math.log10(suggest(list(10 ** x), list(shifted))["steepest"]) == pytest.approx(-5.5, abs=0.051)


def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    s = smooth([1.0, 3.0], beta=0.5)
    assert s == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_recorder_stops_past_four_times_the_minimum():
    rec = RangeRecorder(factor=4.0, beta=0.0)  # beta 0: the smoothed loss is the loss
    answers = [rec(i + 1, {"train_loss": v, "lr": 10.0 ** i}) for i, v in enumerate([5.0, 2.0, 1.0, 3.9, 4.1])]
    assert answers == [None, None, None, None, "diverged"]
    assert rec.lrs == [1.0, 10.0, 100.0, 1000.0, 10000.0]


def test_lr_range_on_shards(shards, tmp_path, cli):
    data, model_file = shards
    out = tmp_path / "range"
    r = cli("tune", "lr-range", "--data", data, "--model", model_file, "--min-lr", 1e-4, "--max-lr", 100, "--steps", 60,
            "--train.batch-size", 4, "--train.block-size", 32, "--train.seed", 3, "--no-progress", "-o", out)
    assert r.code == 0, r.err
    assert "suggested LR (steepest descent)" in r.out and "suggested LR (min-loss LR / 10)" in r.out
    assert "largest batch that fits" in r.out
    result = json.loads((out / "lr-range.json").read_text())
    rows = read_metrics(out / "run" / "metrics.csv")
    lrs = [float(row["lr"]) for row in rows]
    # The run's logged LRs are the geometric sequence, up to where it stopped.
    np.testing.assert_allclose(lrs, np.geomspace(1e-4, 100, 60)[:len(lrs)], rtol=1e-9)
    assert [c["lr"] for c in result["curve"]] == pytest.approx(lrs)
    # At LR 100 a model diverges: the test stopped early, once past 4x the minimum (or non-finite).
    assert result["stopped_because"] in ("diverged", "not_finite") and result["steps_run"] < 60
    if result["stopped_because"] == "diverged":
        assert result["curve"][-1]["smoothed"] > 4 * result["min_smoothed_loss"]
    s = result["suggested_lr"]
    assert 1e-4 <= s["steepest"] <= result["min_loss_lr"] and s["min_div10"] == pytest.approx(result["min_loss_lr"] / 10)
    assert result["largest_batch_size"]["batch_size"] >= 4
    assert (out / "lr-range.png").stat().st_size > 10_000
    assert not (out / "run" / "checkpoints").exists()  # weights trained past divergence are not kept


def test_lr_range_refuses_other_data(tmp_path, tiny_model_dir, cli):
    (tmp_path / "chats.jsonl").write_text('{"text": "hi"}\n')
    one_line_error(cli("tune", "lr-range", "--data", tmp_path / "chats.jsonl", "-o", tmp_path / "o"), "needs token shards")
    one_line_error(cli("tune", "lr-range", "--data", tmp_path, "--model", tiny_model_dir, "-o", tmp_path / "o"), "a model dir")


# -- sweep -------------------------------------------------------------------------------------

optuna = pytest.importorskip("optuna")


def sweep_config(tmp_path, shards, **search) -> "Path":  # noqa: F821
    data, model_file = shards
    tree = {"data": str(data), "model": str(model_file),
            "train": {"max_steps": 6, "batch_size": 4, "block_size": 32, "eval_every": 2, "eval_batches": 2,
                      "warmup_steps": 1, "checkpoint_every": 0, "log_every": 2, "seed": 5},
            "search": search or {"lr": {"low": 1e-3, "high": 3e-2, "log": True}, "weight_decay": [0.0, 0.1]},
            "sweep": {"seed": 1, "startup_trials": 2}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def states(out) -> list[str]:
    study = optuna.load_study(study_name="lmforge-sweep", storage=f"sqlite:///{out / 'study.db'}")
    return [t.state.name for t in study.get_trials()]


def test_sweep_prunes_resumes_and_writes_best(shards, tmp_path, cli):
    config = sweep_config(tmp_path, shards)
    out = tmp_path / "sw"
    out.mkdir()
    # Two good trials, then one made bad (a learning rate at which nothing is learned): the median
    # pruner stops it at an evaluation before its last step.
    study = optuna.create_study(study_name="lmforge-sweep", storage=f"sqlite:///{out / 'study.db'}", direction="minimize")
    for lr in (2e-2, 1e-2, 1e-3):
        study.enqueue_trial({"lr": lr, "weight_decay": 0.0})
    r = cli("tune", "sweep", config, "--trials", 2, "-o", out)
    assert r.code == 0, r.err
    assert states(out) == ["COMPLETE", "COMPLETE", "WAITING"]
    r = cli("tune", "sweep", config, "--trials", 3, "-o", out)  # resumes: one more trial
    assert r.code == 0, r.err
    assert states(out) == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = re.search(r"trial 2: .*pruned at step (\d+)", r.out)
    assert pruned and int(pruned.group(1)) < 6, r.out  # stopped before its last step
    assert not (out / "trials" / "trial-002").exists() and (out / "trials" / "trial-000" / "metrics.csv").exists()
    r = cli("tune", "sweep", config, "--trials", 3, "-o", out)
    assert r.code == 0 and "nothing to run" in r.out and len(states(out)) == 3
    results = (out / "results.md").read_text()
    assert "| trial | state | lr | weight_decay | val loss (best; pruned: last) | steps |" in results and "pruned" in results
    assert (out / "slice.png").stat().st_size > 5_000
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] in (2e-2, 1e-2) and best["train"]["max_steps"] == 6
    # best.yaml is a `pretrain --config` file: it trains, with the best trial's settings.
    run = tmp_path / "from-best"
    r = cli("pretrain", "--config", out / "best.yaml", "-o", run, "--no-progress", "--max-steps", 2)
    assert r.code == 0, r.err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == best["train"]["lr"] and saved["train"]["weight_decay"] == best["train"]["weight_decay"]


def test_sweep_three_trials_with_tpe(shards, tmp_path, cli):
    config = sweep_config(tmp_path, shards, lr={"low": 1e-3, "high": 3e-2, "log": True}, batch_size=[2, 4])
    # data and model given relative to the config's folder (not to the current directory)
    tree = yaml.safe_load(config.read_text())
    tree.update(data=os.path.relpath(tree["data"], tmp_path), model=os.path.relpath(tree["model"], tmp_path))
    config.write_text(yaml.safe_dump(tree))
    r = cli("tune", "sweep", config, "--trials", 3)  # default OUT: beside the config
    assert r.code == 0, r.err
    out = tmp_path / "sweep-sweep"
    assert len(states(out)) == 3 and (out / "study.db").is_file() and (out / "best.yaml").is_file()
    study = optuna.load_study(study_name="lmforge-sweep", storage=f"sqlite:///{out / 'study.db'}")
    assert all(1e-3 <= t.params["lr"] <= 3e-2 and t.params["batch_size"] in (2, 4) for t in study.trials)
    assert all(t.intermediate_values for t in study.trials)  # val loss reported at each eval
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["data"] == str(shards[0].resolve()) and best["model"] == str(shards[1].resolve())


@pytest.mark.parametrize("change, fragments", [
    ({"lr_rate": 1}, ["unknown setting 'lr_rate'"]),
    ({"train": {"max_step": 5}}, ["train.max_step"]),
    ({"search": {"learning_rate": [1e-3]}}, ["search.learning_rate", "not a train setting"]),
    ({"search": {"lr": {"low": 1e-2, "high": 1e-3}}}, ["search.lr", "low < high"]),
    ({"search": {"lr": {"low": 0.0, "high": 1e-3, "log": True}}}, ["search.lr", "log range needs low > 0"]),
    ({"search": {"lr": {"low": -1.0, "high": 1e-3}}}, ["search.lr", "--lr"]),
    ({"search": {"batch_size": {"low": 2, "high": 8.5}}}, ["search.batch_size", "integers"]),
    ({"search": {"schedule": {"low": 1, "high": 2}}}, ["search.schedule", "list of choices"]),
    ({"search": {"lr": "fast"}}, ["search.lr", "expected a range"]),
    ({"search": {"lr": [1e-3], "optimizer": ["adam"]}}, ["search.optimizer", "adamw"]),
    ({"sweep": {"seeds": 1}}, ["sweep.seeds"]),
])
def test_bad_sweep_config_is_one_line(shards, tmp_path, cli, change, fragments):
    config = sweep_config(tmp_path, shards)
    tree = yaml.safe_load(config.read_text())
    for key, value in change.items():
        if key == "train":
            tree["train"].update(value)
        else:
            tree[key] = value
    config.write_text(yaml.safe_dump(tree))
    one_line_error(cli("tune", "sweep", config, "--trials", 1, "-o", tmp_path / "o"), str(config), *fragments)
    assert not (tmp_path / "o" / "study.db").exists()


def test_sweep_without_optuna_says_how_to_install(shards, tmp_path, cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    one_line_error(cli("tune", "sweep", sweep_config(tmp_path, shards), "--trials", 1, "-o", tmp_path / "o"),
                   "pip install lmforge[tune]")


def test_sweep_reruns_a_trial_an_interruption_left_running(shards, tmp_path, cli):
    config = sweep_config(tmp_path, shards)
    out = tmp_path / "sw"
    out.mkdir()
    study = optuna.create_study(study_name="lmforge-sweep", storage=f"sqlite:///{out / 'study.db'}", direction="minimize")
    trial = study.ask()  # as a sweep killed mid-trial leaves it: RUNNING, its settings drawn
    trial.suggest_float("lr", 1e-3, 3e-2, log=True)
    trial.suggest_categorical("weight_decay", [0.0, 0.1])
    r = cli("tune", "sweep", config, "--trials", 1, "-o", out)
    assert r.code == 0, r.err
    assert "trial 0 was interrupted" in r.out
    trials = optuna.load_study(study_name="lmforge-sweep", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == 0
