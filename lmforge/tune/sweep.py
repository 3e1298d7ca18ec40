"""`lmforge tune sweep CONFIG.yaml --trials N`: an Optuna search over the pretraining config.

CONFIG.yaml holds what a `lmforge pretrain --config` file holds (data, model, train: {...}) plus a
`search:` section, one entry per TrainConfig field searched:

    data: shards/
    model: tiny
    train: {max_steps: 300, eval_every: 50, batch_size: 16}
    search:
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range (float, or int when low and high are)
      weight_decay: {low: 0.0, high: 0.2}
      batch_size: [8, 16]                          # a list: one of these values
    sweep: {seed: 0, startup_trials: 2, warmup_evals: 1}   # optional: sampler seed, pruner settings

Each trial is a real short pretraining run (lmforge.train.pretrain, the one Trainer) in
OUT/trials/trial-NNN; its val loss at every evaluation is reported to the trial through the
Trainer's on_step hook, and the median pruner (a trial worse than the median of earlier trials
at the same step) stops it there: its run dir is removed and the trial recorded as pruned. A trial
whose loss goes non-finite is recorded as failed. The objective is the trial's best val loss.

The study lives in OUT/study.db (SQLite): the same command again continues it, up to --trials
finished trials in all (a trial an interruption left running is re-run with the same settings).
At the end: OUT/results.md (a table of every trial), OUT/slice.png (val loss against each
searched setting), OUT/best.yaml (the best trial's settings, a `lmforge pretrain --config` file).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.fsutil import write_text_atomic
from lmforge.train.config import TrainConfig

STUDY_FILE = "study.db"
STUDY_NAME = "lmforge-sweep"
TOP_KEYS = ("data", "model", "train", "search", "sweep")
SWEEP_KEYS = {"seed": int, "startup_trials": int, "warmup_evals": int}


@dataclass
class Param:
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list | None = None
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass
class SweepConfig:
    path: Path
    data: str
    model: str
    train: dict
    search: list[Param]
    seed: int = 0
    startup_trials: int = 2
    warmup_evals: int = 1  # evaluations a trial runs before it may be pruned (the first is noisy)
    raw: dict = field(default_factory=dict)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_sweep_config(path: str | Path) -> SweepConfig:
    """CONFIG.yaml, validated: every error one line naming the file and the field."""
    from lmforge.yamlio import read_yaml

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file")
    tree = read_yaml(path) or {}
    if not isinstance(tree, dict):
        raise LmforgeError(f"{path}: expected a mapping at the top level ({', '.join(TOP_KEYS)})")
    unknown = [k for k in tree if k not in TOP_KEYS]
    if unknown:
        raise LmforgeError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(TOP_KEYS)})")
    if not isinstance(tree.get("data"), str):
        raise LmforgeError(f"{path}: data: the shards dir to train on (a string) is required")
    model = tree.get("model", "tiny")
    if not isinstance(model, str):
        raise LmforgeError(f"{path}: model: a preset name or a model YAML file (a string), got {model!r}")
    train = tree.get("train") or {}
    if not isinstance(train, dict):
        raise LmforgeError(f"{path}: train: expected a mapping of train settings")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in train:
        if key not in names:
            raise LmforgeError(f"{path}: train.{key}: not a train setting (see `lmforge pretrain --help`)")
    _check_train(path, "train", train)
    search = tree.get("search")
    if not isinstance(search, dict) or not search:
        raise LmforgeError(f"{path}: search: expected a mapping of train settings to ranges or lists, e.g. "
                           "lr: {low: 1.0e-4, high: 1.0e-2, log: true}")
    types = typing.get_type_hints(TrainConfig)
    params = []
    for name, spec in search.items():
        where = f"{path}: search.{name}"
        if name not in names:
            raise LmforgeError(f"{where}: not a train setting (see `lmforge pretrain --help`)")
        if isinstance(spec, list):
            if not spec or len(set(map(repr, spec))) != len(spec):
                raise LmforgeError(f"{where}: a list of choices must hold at least one value, each once")
            if not all(isinstance(v, (str, int, float, bool)) for v in spec):
                raise LmforgeError(f"{where}: choices must be numbers, strings or booleans, got {spec!r}")
            param = Param(name, choices=list(spec))
            values = spec
        elif isinstance(spec, dict):
            extra = set(spec) - {"low", "high", "log"}
            if extra:
                raise LmforgeError(f"{where}: unknown key {sorted(extra)[0]!r} (a range has low, high and optionally log)")
            low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
            if not (_number(low) and _number(high)) or not low < high:
                raise LmforgeError(f"{where}: a range needs numbers low < high, got low={low!r} high={high!r}")
            if not isinstance(log, bool) or (log and low <= 0):
                raise LmforgeError(f"{where}: log must be true or false, and a log range needs low > 0")
            integer = types[name] in (int, int | None)
            if integer and not (isinstance(low, int) and isinstance(high, int)):
                raise LmforgeError(f"{where}: an integer setting; low and high must be integers")
            if not integer and types[name] is not float:
                raise LmforgeError(f"{where}: not a numeric setting; give a list of choices")
            param = Param(name, low=low, high=high, log=log, integer=integer)
            values = [low, high]
        else:
            raise LmforgeError(f"{where}: expected a range {{low: .., high: .., log: ..}} or a list of choices, got {spec!r}")
        for v in values:
            _check_train(path, f"search.{name}", {**train, name: v})
        params.append(param)
    sweep = tree.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise LmforgeError(f"{path}: sweep: expected a mapping ({', '.join(SWEEP_KEYS)})")
    for key, value in sweep.items():
        if key not in SWEEP_KEYS:
            raise LmforgeError(f"{path}: sweep.{key}: unknown setting (known: {', '.join(SWEEP_KEYS)})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise LmforgeError(f"{path}: sweep.{key}: expected an integer >= 0, got {value!r}")
    return SweepConfig(path=path, data=tree["data"], model=model, train=train, search=params, raw=tree,
                       **{k: sweep[k] for k in SWEEP_KEYS if k in sweep})


def _check_train(path: Path, where: str, values: dict) -> TrainConfig:
    try:
        cfg = TrainConfig(**values)
        cfg.check_schedule()
        return cfg
    except LmforgeError as e:
        raise LmforgeError(f"{path}: {where}: {e}") from None
    except TypeError as e:
        raise LmforgeError(f"{path}: {where}: {e}") from None


def _optuna():
    try:
        import optuna
    except ImportError:
        raise LmforgeError("tune sweep needs Optuna: pip install lmforge[tune]") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _data_path(config: SweepConfig) -> Path:
    """data and a model file are read relative to CONFIG.yaml's folder when not found as given."""
    data = Path(config.data)
    return data if data.is_absolute() or data.exists() else config.path.parent / data


def _model_spec(config: SweepConfig) -> str:
    model = Path(config.model)
    if model.suffix in (".yaml", ".yml", ".json") and not model.is_absolute() and not model.exists():
        return str(config.path.parent / model)
    return config.model


def open_study(out: Path, config: SweepConfig, done: int = 0):
    optuna = _optuna()
    return optuna.create_study(
        study_name=STUDY_NAME, storage=f"sqlite:///{(out / STUDY_FILE).resolve()}", direction="minimize",
        load_if_exists=True,
        # Seeded by the trials already run: a resumed sweep does not draw the first trials' settings again.
        sampler=optuna.samplers.TPESampler(seed=config.seed + done, n_startup_trials=max(config.startup_trials, 1)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=config.startup_trials, n_warmup_steps=0,
                                           n_min_trials=1),
    )


class _Reporter:
    """The Trainer's on_step hook for one trial: reports each val loss, asks to stop when pruned."""

    def __init__(self, trial, warmup_evals: int):
        self.trial, self.warmup_evals = trial, warmup_evals
        self.evals = 0
        self.pruned_at: int | None = None

    def __call__(self, step: int, seen: dict) -> str | None:
        if "val_loss" not in seen:
            return None
        self.evals += 1
        self.trial.report(seen["val_loss"], step)
        if self.evals > self.warmup_evals and self.trial.should_prune():
            self.pruned_at = step
            return "pruned"
        return None


def run_sweep(config_path: str | Path, trials: int, out: str | Path | None = None, *, progress: bool = False,
              echo=print) -> dict:
    """Run trials until the study in OUT holds `trials` finished ones; write the results."""
    from lmforge.train.pretrain import pretrain
    from lmforge.train.trainer import TrainingDiverged

    config = load_sweep_config(config_path)
    optuna = _optuna()
    if trials < 1:
        raise LmforgeError(f"--trials must be at least 1, got {trials}")
    out = Path(out) if out is not None else config.path.parent / f"{config.path.stem}-sweep"
    out.mkdir(parents=True, exist_ok=True)
    data, model = _data_path(config), _model_spec(config)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    study = open_study(out, config)
    # A trial an interrupted sweep left running: failed, and its settings run again first.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        echo(f"[sweep] trial {t.number} was interrupted: marked failed, its settings queued again")
    # An interrupted trial, re-run, does not count toward --trials: its retry does.
    retried = {t.user_attrs["retry_of"] for t in study.get_trials(deepcopy=False) if "retry_of" in t.user_attrs}
    done = len(study.get_trials(deepcopy=False, states=finished)) - len(retried)
    study = open_study(out, config, done)
    left = trials - done
    if left <= 0:
        echo(f"[sweep] {out / STUDY_FILE} already holds {done} finished trials (--trials {trials}): nothing to run")
    searched = [p.name for p in config.search]

    def objective(trial) -> float:
        params = {p.name: p.suggest(trial) for p in config.search}
        cfg = TrainConfig(**{**config.train, **params})
        run_dir = out / "trials" / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        reporter = _Reporter(trial, config.warmup_evals)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        try:
            summary = pretrain(data, model, run_dir, cfg, progress=progress, overwrite=True, on_step=reporter, report=False)
        except TrainingDiverged as e:
            shutil.rmtree(run_dir, ignore_errors=True)
            echo(f"[sweep] trial {trial.number}: {shown}: failed ({e})")
            raise
        trial.set_user_attr("steps", summary["steps"])
        trial.set_user_attr("train_seconds", summary["train_seconds"])
        if reporter.pruned_at is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
            echo(f"[sweep] trial {trial.number}: {shown}: pruned at step {reporter.pruned_at} "
                 f"(val loss {summary['val_loss']:.4f})")
            raise optuna.TrialPruned(f"pruned at step {reporter.pruned_at}")
        value = summary["best_val_loss"]
        if value is None:
            raise LmforgeError(f"trial {trial.number}: no evaluation ran; set train.eval_every or train.max_steps")
        echo(f"[sweep] trial {trial.number}: {shown}: best val loss {value:.4f} at step {summary['best_step']}")
        return value

    if left > 0:
        echo(f"[sweep] {left} trial(s) to run ({done} finished in {out / STUDY_FILE}); searching {', '.join(searched)}")
        study.optimize(objective, n_trials=left, catch=(TrainingDiverged,))
    return write_results(study, config, out)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_results(study, config: SweepConfig, out: Path) -> dict:
    """OUT/results.md, OUT/slice.png and OUT/best.yaml."""
    import yaml

    from lmforge.report import markdown_table

    optuna = _optuna()
    searched = [p.name for p in config.search]
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.RUNNING]
    rows = []
    for t in trials:
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append([t.number, t.state.name.lower(), *[t.params.get(n) for n in searched], t.value,
                     t.user_attrs.get("steps", last)])
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    result = {"study": str(out / STUDY_FILE), "trials": len(trials),
              "complete": len(complete), "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
              "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials)}
    table = markdown_table(["trial", "state", *searched, "val loss (best; pruned: last)", "steps"], rows)
    parts = ["# Sweep results", "", f"Config: `{config.path}`; study `{out / STUDY_FILE}` ({STUDY_NAME}).", "",
             f"{result['complete']} complete, {result['pruned']} pruned, {result['failed']} failed.", "", table, ""]
    if complete:
        best = study.best_trial
        model = _model_spec(config)
        model = str(Path(model).resolve()) if Path(model).is_file() else model  # best.yaml lives elsewhere
        best_config = {"data": str(_data_path(config).resolve()), "model": model,
                       "train": {**config.train, **best.params}}
        write_text_atomic(out / "best.yaml", f"# lmforge tune sweep {config.path}: trial {best.number}, best val loss "
                          f"{best.value:.4f}\n# lmforge pretrain --config best.yaml -o RUN\n"
                          + yaml.safe_dump(best_config, sort_keys=False))
        result.update(best_trial=best.number, best_value=best.value, best_params=best.params, best_yaml=str(out / "best.yaml"))
        parts[-1:-1] = [f"Best: trial {best.number}, val loss {best.value:.4f}: "
                        + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()) + " (best.yaml)", ""]
        plot_slices(trials, config, out / "slice.png")
        parts += ["![val loss against each searched setting](slice.png)", ""]
        result["plot"] = str(out / "slice.png")
    write_text_atomic(out / "results.md", "\n".join(parts))
    result["table"] = table
    result["results"] = str(out / "results.md")
    return result


def plot_slices(trials, config: SweepConfig, path: Path) -> Path:
    """Best val loss against each searched setting, one panel per setting (complete trials as dots,
    pruned ones at their last reported val loss as crosses)."""
    from lmforge.report import save_png, subplots

    params = config.search
    fig, axes = subplots(1, len(params), figsize=(4 * len(params), 3.6), squeeze=False)
    for ax, p in zip(axes[0], params):
        for state, marker, label in (("COMPLETE", "o", "complete"), ("PRUNED", "x", "pruned (last val loss)")):
            xs, ys = [], []
            for t in trials:
                if t.state.name != state or p.name not in t.params:
                    continue
                y = t.value if state == "COMPLETE" else (t.intermediate_values[max(t.intermediate_values)]
                                                          if t.intermediate_values else None)
                if y is not None:
                    xs.append(t.params[p.name] if p.choices is None else str(t.params[p.name]))
                    ys.append(y)
            if xs:
                ax.plot(xs, ys, marker, linestyle="none", label=label)
        if p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.name)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("sweep: val loss per setting")
    fig.tight_layout()
    return save_png(fig, path)


def describe(result: dict) -> str:
    lines = [f"{result['trials']} trials in {result['study']}: {result['complete']} complete, {result['pruned']} pruned, "
             f"{result['failed']} failed", result["table"]]
    if "best_trial" in result:
        lines.append(f"best: trial {result['best_trial']}, val loss {result['best_value']:.4f}: "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in result["best_params"].items()))
        lines.append(f"wrote {result['best_yaml']} (lmforge pretrain --config {result['best_yaml']} -o RUN), "
                     f"{result['results']}, {result.get('plot')}")
    else:
        lines.append(f"no trial completed; wrote {result['results']}")
    return "\n".join(lines)
