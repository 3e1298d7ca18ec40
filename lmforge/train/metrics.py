"""Run logs: `metrics.csv` (one row per logged step) and TensorBoard scalars, written as they come."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from lmforge.fsutil import atomic_file
from lmforge.train.tbevents import ScalarWriter

COLUMNS = ["step", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "mfu", "grad_norm", "tokens_seen", "elapsed_s",
           "retention_loss"]  # retention_loss: fine-tuning's drift check (see trainer.RetentionCheck)
METRICS_FILE = "metrics.csv"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, extra_columns: tuple[str, ...] = ()):
        # extra_columns: a caller's own metrics (trainer.ExtraEval), after the standard ones.
        self.columns = COLUMNS + [c for c in extra_columns if c not in COLUMNS]
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            # Rows past the checkpoint we resume from describe steps that will be re-run.
            kept = [r for r in read_metrics(self.path, complete_only=True) if int(r["step"]) <= resume_step]
            self._rewrite(kept)
        else:
            self._rewrite([])
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.columns)
        self._tb = ScalarWriter(run_dir / "tensorboard")

    def _rewrite(self, rows: list[dict]) -> None:
        # Atomic: a kill here must not lose the rows of the steps before the checkpoint.
        with atomic_file(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in self.columns})

    def log(self, step: int, **values) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ValueError(f"unknown metric columns {sorted(unknown)}")
        self._csv.writerow({"step": step, **{k: _fmt(v) for k, v in values.items()}})
        self._file.flush()
        self._tb.add_scalars(step, {k.replace("_", "/", 1) if k.endswith("loss") else k: v
                                    for k, v in values.items() if v is not None and k not in ("tokens_seen",)})

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def read_metrics(path: Path, complete_only: bool = False) -> list[dict]:
    """The rows of a metrics.csv; with `complete_only`, without a last line a kill cut short
    (rows are appended as they come, so `13,2.1` may have been written as `1`)."""
    with open(path, newline="") as f:
        text = f.read()
    if complete_only and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text, newline="")))


def column(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where `name` was logged."""
    pairs = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
    return [p[0] for p in pairs], [p[1] for p in pairs]
