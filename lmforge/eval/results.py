"""Evaluation results: one JSON layout for every eval, a markdown report beside it, and the
side-by-side comparison of several results (`lmforge eval compare`).

A result file (`-o OUT.json`) holds, at the top level, the headline metrics of its kind
(ppl: `perplexity`, `nll`, `tokens`, `bits_per_byte`; bleu: `bleu`, `chrf`, `ter`, `signature`;
tasks: `tasks` {name: {...}} and `average`; code: `pass_at_k` {"pass@1": ..., "pass@10": ...},
`failures` {class: count}; bias (`lmforge probe bias`): `categories`, `overall`, `models`, see
lmforge.eval.bias) next to what makes it reproducible: `model` (spec,
resolved path, name, parameters, tokenizer hash), `data` (path, bytes, SHA-256), `settings`,
`lmforge_version` and `created`. `OUT.md` (and `OUT.png` where there is a figure) is the report
for people.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_file, write_text_atomic

FORMAT = "lmforge-eval"
FORMAT_VERSION = 1
KINDS = ("ppl", "bleu", "tasks", "code", "bias", "compare")


def make_result(kind: str, *, model: dict | None, data: dict | None, settings: dict, metrics: dict,
                details: dict | None = None, notes: Sequence[str] = ()) -> dict:
    import lmforge

    return {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": kind,
        **metrics,
        "model": model, "data": data, "settings": settings, "notes": list(notes),
        "lmforge_version": lmforge.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **({"details": details} if details else {}),
    }


def model_info(spec: str, loaded) -> dict:
    model = loaded.model
    return {
        "spec": str(spec), "path": str(loaded.path), "name": model.config.name,
        "params": model.param_count(), "context": model.config.block_size,
        "tokenizer_sha256": loaded.tokenizer.sha256,
    }


def _clean(value: Any) -> Any:
    """JSON has no inf/NaN: write them as null rather than as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def report_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """OUT.json -> (OUT.json, OUT.md, OUT.png)."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix == ".json" else out
    return base.with_suffix(".json"), base.with_suffix(".md"), base.with_suffix(".png")


def write_result(result: dict, out: str | os.PathLike) -> list[Path]:
    """Write OUT.json, OUT.md and (where the kind has a figure) OUT.png; each atomically."""
    json_path, md_path, png_path = report_paths(out)
    with atomic_file(json_path, "w", encoding="utf-8") as f:
        json.dump(_clean(result), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    written = [json_path]
    figure = _figure(result, png_path)
    if figure is not None:
        written.append(figure)
    write_text_atomic(md_path, render_markdown(result, figure.name if figure is not None else None))
    written.append(md_path)
    return written


def load_result(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file")
    from lmforge.jsonio import read_json

    result = read_json(path, "result file")
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        raise LmforgeError(f"{path}: not an lmforge eval result (no \"format\": \"{FORMAT}\"); "
                           "make one with `lmforge eval ppl|bleu|tasks|code -o FILE.json`")
    if result.get("kind") not in KINDS:
        raise LmforgeError(f"{path}: unknown result kind {result.get('kind')!r}")
    return result


# -- the metrics a result puts forward ------------------------------------------------------------
def headline(result: dict) -> list[dict]:
    """[{metric, value, stderr, higher_is_better, key}] where `key` identifies what the number is
    comparable with: the same metric on the same data with the same settings."""
    kind, data = result["kind"], result.get("data") or {}
    sha = (data.get("sha256") or "")[:12]
    name = Path(data.get("path", "")).name
    rows = []
    if kind == "ppl":
        s = result["settings"]
        where = f"{name} ({sha}), context {s['context']}/stride {s['stride']}"
        rows.append(dict(metric="perplexity", value=result["perplexity"], stderr=None, higher_is_better=False, data=where))
        if result.get("bits_per_byte") is not None:
            rows.append(dict(metric="bits per byte", value=result["bits_per_byte"], stderr=None, higher_is_better=False,
                             data=f"{name} ({sha})"))
    elif kind == "bleu":
        where = f"{name} ({sha})"
        for metric, better in (("bleu", True), ("chrf", True), ("ter", False)):
            if result.get(metric) is not None:
                rows.append(dict(metric=metric.upper() if metric != "chrf" else "chrF", value=result[metric],
                                 stderr=None, higher_is_better=better, data=where))
    elif kind == "tasks":
        for task, t in result["tasks"].items():
            where = f"{task} ({(t.get('sha256') or '')[:12]}, n={t['n']})"
            for metric in t["metrics"]:
                rows.append(dict(metric=f"{task}: {metric}", value=t[metric], stderr=t.get(f"{metric}_stderr"),
                                 higher_is_better=True, data=where))
    elif kind == "bias":
        from lmforge.eval.bias import headline as bias_headline

        rows += bias_headline(result)
    elif kind == "code":
        where = f"{name} ({sha}), n={result['problems']}"
        for metric, value in result["pass_at_k"].items():
            rows.append(dict(metric=metric, value=value, stderr=None, higher_is_better=True, data=where))
    for r in rows:
        r["key"] = f"{r['metric']} | {r['data']}"
    return rows


def model_label(result: dict) -> str:
    m = result.get("model") or {}
    return str(m.get("spec") or m.get("name") or "—")


# -- markdown -------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.{digits}g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _common_facts(result: dict) -> list[tuple[str, Any]]:
    m, d = result.get("model") or {}, result.get("data") or {}
    facts = []
    if m:
        params = f", {m['params'] / 1e6:.1f}M parameters" if m.get("params") else ""
        facts.append(("model", f"`{m.get('spec')}` ({m.get('name')}{params}, context {m.get('context')})"))
        if m.get("path") and m.get("path") != m.get("spec"):
            facts.append(("model path", f"`{m['path']}`"))
    if d:
        facts.append(("data", f"`{d.get('path')}` ({_fmt(d.get('bytes'))} bytes, SHA-256 `{(d.get('sha256') or '')[:16]}…`)"))
    for k, v in (result.get("settings") or {}).items():
        if isinstance(v, (list, dict)) or (isinstance(v, str) and v != v.strip()):
            v = json.dumps(v, ensure_ascii=False)  # a delimiter " " must show
        facts.append((k.replace("_", " "), v))
    facts.append(("lmforge", f"{result.get('lmforge_version')} ({result.get('created')})"))
    return facts


def render_markdown(result: dict, figure: str | None = None) -> str:
    kind = result["kind"]
    title = {"ppl": "Perplexity", "bleu": "BLEU / chrF / TER", "tasks": "Task accuracy", "code": "Code generation (pass@k)",
             "bias": "Bias", "compare": "Comparison"}[kind]
    if kind == "compare":
        return _compare_markdown(result, figure)
    if kind == "bias":
        from lmforge.eval.bias import render_markdown as bias_markdown

        return bias_markdown(result, figure, _table, _common_facts)
    subject = model_label(result) if result.get("model") else _source_name(result)
    parts = [f"# {title}: {subject}", ""]
    if kind == "ppl":
        rows = [("perplexity", result["perplexity"]), ("mean NLL (nats/token)", result["nll"]),
                ("bits per byte", result["bits_per_byte"]), ("tokens scored", result["tokens"]),
                ("windows", result["windows"]), ("throughput", f"{result['tokens_per_s']:,.0f} tokens/s")]
        parts += [_table(["metric", "value"], rows), ""]
        parts += ["Perplexity = exp(mean NLL per scored token); bits per byte = total NLL / ln 2 / UTF-8 bytes "
                  "(comparable across tokenizers). Sliding window as in transformers' \"Perplexity of "
                  "fixed-length models\".", ""]
    elif kind == "bleu":
        rows = [(name, f"{result[key]:.2f}", result["signatures"].get(key))
                for name, key in (("BLEU", "bleu"), ("chrF", "chrf"), ("TER", "ter"))]
        parts += [_table(["metric", "score", "sacrebleu signature"], rows), ""]
        if result.get("bleu_details"):
            b = result["bleu_details"]
            parts += [f"BLEU details: n-gram precisions {' / '.join(f'{p:.1f}' for p in b['precisions'])}, "
                      f"brevity penalty {b['bp']:.3f}, ratio {b['sys_len'] / max(b['ref_len'], 1):.3f} "
                      f"(hyp {b['sys_len']:,} / ref {b['ref_len']:,} tokens)", ""]
        examples = (result.get("details") or {}).get("examples") or []
        if examples:
            parts += ["## Examples", "", _table(["#", "hypothesis", "reference(s)"],
                                                [(e["index"], e["hypothesis"], " ‖ ".join(e["references"])) for e in examples]), ""]
    elif kind == "tasks":
        rows = []
        for name, t in result["tasks"].items():
            cells = []
            for metric in t["metrics"]:
                se = t.get(f"{metric}_stderr")
                cells.append(f"{metric} {t[metric]:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
            rows.append((name, t["type"], t["n"], "; ".join(cells), t.get("chance")))
        parts += [_table(["task", "type", "items", "accuracy ± standard error", "chance"], rows), ""]
        parts += ["Multiple choice as lm-evaluation-harness scores it: `acc` picks the choice with the highest "
                  "total log-likelihood, `acc_norm` divides it by the choice's length in characters; "
                  "standard error = sample standard deviation / √n.", ""]
    elif kind == "code":
        parts += _code_markdown(result)
    if figure:
        parts += [f"![figure]({figure})", ""]
    if result.get("notes"):
        parts += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    parts += ["## Settings", "", _table(["", "value"], _common_facts(result)), ""]
    return "\n".join(parts)


def _source_name(result: dict) -> str:
    """What a result without a model scored: the hypotheses (bleu) or the completions (code) file."""
    settings = result.get("settings") or {}
    source = settings.get("hyp") or (settings.get("completions") or {}).get("path") or "?"
    return Path(source).name


def _code_markdown(result: dict) -> list[str]:
    problems = (result.get("details") or {}).get("problems") or []
    low, high = result["samples_per_problem"]
    per = f"{low}" if low == high else f"{low}-{high}"
    parts = [_table(["metric", "value"], [*result["pass_at_k"].items(), ("problems", result["problems"]),
                                          ("samples per problem", per), ("samples passed", f"{result['passed']:,} / "
                                                                                        f"{result['samples']:,}")]), ""]
    parts += ["pass@k = 1 - C(n-c, k) / C(n, k) per problem (n samples, c correct; the HumanEval paper's unbiased "
              "estimator), averaged over problems. Each sample runs `prompt + completion + test + check(entry_point)` "
              "alone in the sandbox (namespaces, rlimits, timeout).", ""]
    if result.get("failures"):
        parts += ["## Failures", "", _table(["cause", "samples"], list(result["failures"].items())), ""]
    if problems:
        rows = [(p["task_id"], p["n"], p["correct"], p.get("pass@1"),
                 ", ".join(f"{k} {v}" for k, v in p["failures"].items()) or "—") for p in problems]
        parts += ["## Problems", "", _table(["task", "samples", "passed", "pass@1", "failures"], rows), ""]
    return parts


def _compare_markdown(result: dict, figure: str | None) -> str:
    models = result["models"]
    parts = ["# Comparison", "", f"{len(result['results'])} results, {len(models)} models side by side; best per row "
             "in bold (only results on the same data with the same settings share a row).", ""]
    rows = []
    for r in result["rows"]:
        cells = []
        for m in models:
            v = r["values"].get(m)
            text = _fmt(v) if v is not None else "—"
            se = (r.get("stderr") or {}).get(m)
            if v is not None and se is not None:
                text += f" ± {_fmt(se, 2)}"
            if v is not None and m == r.get("best") and len(r["values"]) > 1:
                text = f"**{text}**"
            cells.append(text)
        arrow = {True: "↑", False: "↓"}.get(r["higher_is_better"], "")
        rows.append([f"{r['metric']} {arrow}", r["data"], *cells])
    parts += [_table(["metric", "data", *models], rows), ""]
    if figure:
        parts += [f"![comparison]({figure})", ""]
    parts += ["Results:", ""] + [f"- `{p}`" for p in result["results"]] + [""]
    return "\n".join(parts)


# -- figures --------------------------------------------------------------------------------------
def _figure(result: dict, path: Path) -> Path | None:
    kind = result["kind"]
    if kind == "ppl" and len((result.get("details") or {}).get("window_nll") or []) > 1:
        return _plot_windows(result, path)
    if kind == "tasks" and result.get("tasks"):
        return _plot_tasks(result, path)
    if kind == "compare" and result.get("rows"):
        return plot_compare(result, path)
    if kind == "bias" and result.get("models"):
        from lmforge.eval.bias import plot_bias

        return plot_bias(result, path)
    return None


def _save(fig, path: Path) -> Path:
    from lmforge.report import save_png

    return save_png(fig, path)


def _plot_windows(result: dict, path: Path) -> Path:
    from lmforge.report import subplots

    nll = result["details"]["window_nll"]
    fig, ax = subplots(figsize=(8, 3.2))
    ax.plot(range(len(nll)), nll, marker="o" if len(nll) < 40 else None, markersize=3)
    ax.axhline(result["nll"], linestyle="--", color="gray", linewidth=1)
    ax.annotate(f"mean {result['nll']:.3f} (ppl {result['perplexity']:.2f})", (0, result["nll"]),
                textcoords="offset points", xytext=(4, 4), fontsize=8, color="gray")
    ax.set_xlabel(f"window (stride {result['settings']['stride']} tokens)")
    ax.set_ylabel("mean NLL (nats/token)")
    ax.set_title("where the text is hard: NLL along the data")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _plot_tasks(result: dict, path: Path) -> Path:
    from lmforge.report import subplots

    names = list(result["tasks"])
    fig, ax = subplots(figsize=(max(5, 1.3 * len(names) + 2), 3.6))
    width = 0.38
    for k, label in enumerate(("acc / exact_match", "acc_norm / contains")):
        xs, ys, es = [], [], []
        for i, n in enumerate(names):
            t = result["tasks"][n]
            if k < len(t["metrics"]):
                m = t["metrics"][k]
                xs.append(i + (k - 0.5) * width)
                ys.append(t[m])
                es.append(t.get(f"{m}_stderr") or 0.0)
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=label)
    labelled = False
    for i, n in enumerate(names):
        chance = result["tasks"][n].get("chance")
        if chance is not None:
            ax.hlines(chance, i - width, i + width, colors="gray", linestyles="--", linewidth=1,
                      label=None if labelled else "chance")
            labelled = True
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy ± standard error", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_compare(result: dict, path: Path) -> Path:
    import matplotlib

    from lmforge.report import subplots

    rows, models = result["rows"], result["models"]
    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, r in zip(axes.flat, rows):
        present = [m for m in models if r["values"].get(m) is not None]
        ys = [r["values"][m] for m in present]
        es = [(r.get("stderr") or {}).get(m) or 0.0 for m in present]
        ax.bar(range(len(present)), ys, yerr=es if any(es) else None, capsize=3,
               color=[colors[models.index(m) % len(colors)] for m in present])
        ax.set_xticks(range(len(present)), [_short(m) for m in present], rotation=20, ha="right", fontsize=8)
        if ys and min(ys) >= 0:  # all-zero bars still get a readable axis
            ax.set_ylim(0, max(max(y + e for y, e in zip(ys, es)) * 1.1, 1e-9) if max(ys) > 0 else 1)
        better = {True: "higher is better", False: "lower is better"}.get(r["higher_is_better"], "0 is neutral")
        ax.set_title(f"{r['metric']} ({better})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _short(label: str, n: int = 22) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1):]


# -- compare ---------------------------------------------------------------------------------------
def compare(paths: Sequence[str | os.PathLike]) -> dict:
    """Several results side by side: one row per comparable metric, one column per result."""
    if not paths:
        raise LmforgeError("give at least one result file (made by lmforge eval ppl|bleu|tasks|code -o FILE.json)")
    results = [(Path(p), load_result(p)) for p in paths]
    labels: list[str] = []
    rows: dict[str, dict] = {}
    for p, r in results:
        if r["kind"] == "compare":
            raise LmforgeError(f"{p}: a comparison, not a result; compare the result files themselves")
        label = model_label(r) if r.get("model") else (_source_name(r) if _source_name(r) != "?" else p.stem)
        marks = headline(r)
        # The same model in two results (other tasks, other data) stays one column; the same model
        # measured twice on the same thing (two checkpoints' copies, two settings) gets two.
        if any(label in rows.get(h["key"], {}).get("values", {}) for h in marks):
            label = f"{label} [{p.stem}]"
        if label not in labels:
            labels.append(label)
        for h in marks:
            row = rows.setdefault(h["key"], {"metric": h["metric"], "data": h["data"], "values": {}, "stderr": {},
                                             "higher_is_better": h["higher_is_better"]})
            row["values"][label] = h["value"]
            row["stderr"][label] = h["stderr"]
    for row in rows.values():
        present = {m: v for m, v in row["values"].items() if v is not None}
        if present and row["higher_is_better"] is not None:
            pick = max if row["higher_is_better"] else min
            row["best"] = pick(present, key=present.get)
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": "compare", "models": labels,
        "results": [str(p) for p, _ in results], "rows": list(rows.values()),
        "lmforge_version": __import__("lmforge").__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
