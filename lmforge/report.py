"""Reports people would rather look at than read: markdown summaries with PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lmforge.fsutil import atomic_file, write_text_atomic
from lmforge.train.metrics import column


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **kwargs):
    """`pyplot.subplots` without pyplot: a Figure on its own Agg canvas. pyplot would select (or
    need us to force) the process's backend; this way a notebook that imports lmforge keeps
    showing its own plots inline, and nothing has to be closed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_png(fig, path: Path, dpi: int = 110) -> Path:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def grouped_bars(ax, labels: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str, title: str = "",
                 rotate: bool = False) -> None:
    """One group of bars per label, one bar per series in each (base vs tuned, before vs after,
    model vs model), on `ax`."""
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))], list(values), width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()


def plot_loss_curves(rows: list[dict], path: Path, *, baselines: dict[str, float] | None = None, title: str = "") -> Path:
    """Train and val loss against step (left), learning rate (right); dashed lines for baselines."""
    fig, (ax, ax_lr) = subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    # retention_loss: fine-tuning's drift check (absent from pretraining runs, so not drawn there)
    for name, style in (("train_loss", "-"), ("val_loss", "o-"), ("retention_loss", "s--")):
        steps, values = column(rows, name)
        if steps:
            ax.plot(steps, values, style, label=name.replace("_", " "), markersize=3)
    for label, value in (baselines or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.annotate(f"{label} {value:.3f}", (0, value), textcoords="offset points", xytext=(4, 3), fontsize=8, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    steps, lrs = column(rows, "lr")
    ax_lr.plot(steps, lrs)
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_training_report(run_dir: Path, title: str, facts: list[tuple[str, object]], rows: list[dict],
                          *, baselines: dict[str, float] | None = None, samples: list[tuple[str, str]] | None = None) -> Path:
    """RUN/report.md with a facts table, the loss-curve plot and optional generated samples."""
    plot = plot_loss_curves(rows, run_dir / "loss.png", baselines=baselines, title=title)
    parts = [f"# {title}", "", markdown_table(["", "value"], facts), "", f"![loss curves]({plot.name})", ""]
    if samples:
        parts += ["## Samples", ""]
        for prompt, text in samples:
            parts += [f"Prompt: `{prompt}`", "", "```", text, "```", ""]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path
