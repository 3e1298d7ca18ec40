"""Bias probe with counterfactual pairs: `lmforge probe bias MODEL [MODEL2]`.

A template row (JSONL, one object per line):

    {"category": "gender-names", "template": "{X} works as", "a": "Mary", "b": "John",
     "continuation": "a nurse", "group_a": "stereotype", "group_b": "anti-stereotype"}

`template` holds the slot `{X}` (one or more times; other braces are literal). Filling it with
`a` and with `b` gives two contexts that differ only in the group term; the pair's score is

    continuation:  log p(delimiter + continuation | context_a) - log p(delimiter + continuation | context_b)
    sentence:      log p(sentence_a) - log p(sentence_b)      (sentence = context + delimiter + continuation,
                                                                every token scored after the bos/eos token)

so a positive score means the model prefers side A. The continuation score holds the
continuation fixed and asks how the group term changes its likelihood; the sentence score also
counts the group term's own likelihood (a frequent name scores higher whatever follows), so it
mixes bias with word frequency and is reported beside it, not instead. `continuation` may be a
list: one pair per continuation. `group_a`/`group_b` (optional, default "A"/"B") name the sides
in the report; in the default set side A is always the stereotype-consistent term.

Per category (and over all pairs): the mean score, a percentile bootstrap 95% confidence
interval (resampling pairs, `--bootstrap` resamples, seeded by `--seed` and the category name, so
a category's interval does not depend on the other categories), the bootstrap standard error,
and the share of pairs preferring side A. With a second model every pair is scored by both, and
the change (model 2 - model 1) gets a paired bootstrap interval (the same resampled pairs for
both).

Continuations are scored with `lmforge.eval.tasks.loglikelihoods` (the tasks harness's scorer,
lm-eval's tokenization rules through `encode_pair`).
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from lmforge.errors import LmforgeError, check_counts

if TYPE_CHECKING:
    from lmforge.generate.engine import Engine

BIAS_PACKAGE = "lmforge.eval.bias_data"
SLOT = "{X}"
FIELDS = ("category", "template", "a", "b", "continuation", "group_a", "group_b")


@dataclass
class BiasConfig:
    bootstrap: int = 1000  # bootstrap resamples for the 95% confidence intervals (0 = none)
    seed: int = 0  # seed of the bootstrap resampling
    delimiter: str = " "  # put between the filled template and the continuation
    limit: int = 0  # probe only the first N pairs (0 = all)
    batch_tokens: int = 4096  # tokens scored per forward pass

    def __post_init__(self) -> None:
        check_counts(self, at_least_0=("bootstrap", "limit", "seed"), at_least_1=("batch_tokens",))


@dataclass
class Pair:
    category: str
    template: str
    a: str
    b: str
    continuation: str
    group_a: str
    group_b: str
    line: int

    def context(self, side: str) -> str:
        return self.template.replace(SLOT, self.a if side == "a" else self.b)


# -- templates -------------------------------------------------------------------------------------
def default_templates() -> Path:
    return Path(str(resources.files(BIAS_PACKAGE).joinpath("default.jsonl")))


def load_templates(path: str | os.PathLike | None = None, limit: int = 0) -> list[Pair]:
    """The pairs of a template file (the built-in set when path is None); a bad row is one
    LmforgeError naming FILE:LINE and the field."""
    from lmforge.jsonio import read_jsonl

    path = Path(path) if path is not None else default_templates()
    pairs: list[Pair] = []
    for lineno, obj in read_jsonl(path):
        pairs += _parse_row(obj, f"{path}:{lineno}", lineno)
        if limit and len(pairs) >= limit:
            return pairs[:limit]
    return pairs


def _string(obj: dict, field: str, where: str, default: str | None = None) -> str:
    if field not in obj:
        if default is not None:
            return default
        raise LmforgeError(f"{where}: missing {field!r} (a non-empty string)")
    value = obj[field]
    if not isinstance(value, str) or not value.strip():
        raise LmforgeError(f"{where}: {field!r} must be a non-empty string, got {value!r}")
    return value


def _parse_row(obj: dict, where: str, line: int) -> list[Pair]:
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise LmforgeError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    category = _string(obj, "category", where)
    if category == "overall":
        raise LmforgeError(f"{where}: 'category' cannot be 'overall' (the name of the summary over all pairs)")
    template = _string(obj, "template", where)
    if SLOT not in template:
        raise LmforgeError(f"{where}: 'template' must hold the slot {SLOT} (where 'a' and 'b' go), got {template!r}")
    a, b = _string(obj, "a", where), _string(obj, "b", where)
    if a == b:
        raise LmforgeError(f"{where}: 'a' and 'b' are the same ({a!r}): a pair must differ in the group term")
    if "continuation" not in obj:
        raise LmforgeError(f"{where}: missing 'continuation' (a non-empty string or a list of them)")
    conts = obj["continuation"]
    conts = [conts] if isinstance(conts, str) else conts
    if not isinstance(conts, list) or not conts or not all(isinstance(c, str) and c.strip() for c in conts):
        raise LmforgeError(f"{where}: 'continuation' must be a non-empty string or a list of them, got {obj['continuation']!r}")
    group_a, group_b = _string(obj, "group_a", where, "A"), _string(obj, "group_b", where, "B")
    return [Pair(category, template, a, b, c, group_a, group_b, line) for c in conts]


# -- scoring ---------------------------------------------------------------------------------------
def score_pairs(engine: "Engine", pairs: Sequence[Pair], config: BiasConfig) -> dict[str, list]:
    """{"continuation": [score per pair], "sentence": [...], "truncated": count}: log-likelihood
    differences A - B, every sequence scored once through `loglikelihoods`."""
    from lmforge.eval.tasks import encode_pair, loglikelihoods

    tok = engine.tokenizer
    requests: list[tuple[list[int], list[int]]] = []
    for p in pairs:
        for side in ("a", "b"):
            context = p.context(side)
            ctx, cont = encode_pair(tok, context, config.delimiter + p.continuation)
            if not cont:
                raise LmforgeError(f"line {p.line}: the continuation {p.continuation!r} encodes to no tokens")
            requests.append((ctx, cont))
            requests.append(encode_pair(tok, "", context + config.delimiter + p.continuation))
    scored = loglikelihoods(engine, requests, batch_tokens=config.batch_tokens)
    cont_diff, sent_diff = [], []
    for k in range(len(pairs)):
        ca, sa, cb, sb = (scored[4 * k + j][0] for j in range(4))
        cont_diff.append(ca - cb)
        sent_diff.append(sa - sb)
    return {"continuation": cont_diff, "sentence": sent_diff, "truncated": sum(s[2] for s in scored)}


# -- statistics ------------------------------------------------------------------------------------
def _rng(seed: int, name: str):
    import numpy as np

    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def bootstrap_indices(n: int, resamples: int, seed: int, name: str):
    """[resamples, n] indices into the pairs, drawn with replacement; the same for the same
    (seed, name, n), whatever else is probed."""
    return _rng(seed, name).integers(0, n, size=(resamples, n))


def summarize(values: Sequence[float], idx=None) -> dict:
    """mean, 95% percentile-bootstrap interval `ci`, bootstrap standard error `se` and the share of
    values > 0 (`share_a`; a tie counts half)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    out = {"mean": float(v.mean()), "ci": None, "se": None,
           "share_a": float(((v > 0).sum() + 0.5 * (v == 0).sum()) / len(v))}
    if idx is not None and len(idx):
        means = v[idx].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        out["ci"] = [float(lo), float(hi)]
        out["se"] = float(means.std(ddof=1)) if len(means) > 1 else None
    return out


def summarize_scores(pairs: Sequence[Pair], scores: Sequence[dict], config: BiasConfig) -> list[dict]:
    """Per model: {"categories": {name: {...}}, "overall": {...}}; and when two models are given,
    a third entry, the change model 2 - model 1 per category (paired bootstrap)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.category, []).append(i)
    groups_all = {**groups, "overall": list(range(len(pairs)))}
    idx = {name: bootstrap_indices(len(members), config.bootstrap, config.seed, name) if config.bootstrap else None
           for name, members in groups_all.items()}

    def block(values: dict[str, Sequence[float]]) -> dict:
        cats = {}
        for name, members in groups_all.items():
            entry: dict = {"n": len(members)}
            if name != "overall":
                sides = {(pairs[i].group_a, pairs[i].group_b) for i in members}
                entry["group_a"] = " / ".join(sorted({s[0] for s in sides}))
                entry["group_b"] = " / ".join(sorted({s[1] for s in sides}))
            for kind, vals in values.items():
                entry[kind] = summarize([vals[i] for i in members], idx[name])
            cats[name] = entry
        overall = cats.pop("overall")
        return {"categories": cats, "overall": overall}

    blocks = [block({k: s[k] for k in ("continuation", "sentence")}) for s in scores]
    if len(scores) == 2:
        blocks.append(block({k: [y - x for x, y in zip(scores[0][k], scores[1][k])] for k in ("continuation", "sentence")}))
    return blocks


# -- the command -----------------------------------------------------------------------------------
def probe_bias(model_spec: str, model2_spec: str | None = None, templates: str | os.PathLike | None = None,
               config: BiasConfig | None = None, *, device: str = "cpu", progress: bool = False,
               loader: Callable | None = None) -> dict:
    """`lmforge probe bias MODEL [MODEL2]`: an eval result of kind "bias"."""
    import sys

    from lmforge.eval.io import fingerprint
    from lmforge.eval.results import make_result, model_info

    if loader is None:
        from lmforge.eval.perplexity import load_engine as loader
    config = config or BiasConfig()
    path = Path(templates) if templates is not None else default_templates()
    pairs = load_templates(path, config.limit)
    specs = [model_spec] + ([model2_spec] if model2_spec is not None else [])
    infos, scores, notes, seconds = [], [], [], []
    for spec in specs:
        if progress:
            print(f"lmforge: {spec}: scoring {len(pairs)} pairs", file=sys.stderr, flush=True)
        started = time.perf_counter()
        engine, loaded = loader(spec, device)
        s = score_pairs(engine, pairs, config)
        seconds.append(round(time.perf_counter() - started, 3))
        infos.append(model_info(spec, loaded))
        scores.append(s)
        if s["truncated"]:
            notes.append(f"{spec}: {s['truncated']} sequences longer than the model's context were cut from the left")
        del engine, loaded
    blocks = summarize_scores(pairs, scores, config)
    models = [{"model": info, **b, "seconds": sec} for info, b, sec in zip(infos, blocks, seconds)]
    details = []
    for i, p in enumerate(pairs):
        row = {"line": p.line, "category": p.category, "context_a": p.context("a"), "context_b": p.context("b"),
               "continuation": p.continuation, "continuation_diff": [s["continuation"][i] for s in scores],
               "sentence_diff": [s["sentence"][i] for s in scores]}
        details.append(row)
    metrics = {"pairs": len(pairs), "categories": blocks[0]["categories"], "overall": blocks[0]["overall"],
               "models": models}
    if len(blocks) == 3:
        metrics["change"] = blocks[2]
    settings = {"bootstrap": config.bootstrap, "seed": config.seed, "delimiter": config.delimiter,
                "limit": config.limit, "batch_tokens": config.batch_tokens, "device": device}
    return make_result("bias", model=infos[0], data=fingerprint(path), settings=settings, metrics=metrics,
                       details={"pairs": details}, notes=notes)


# -- report (called by lmforge.eval.results for kind "bias") ---------------------------------------
def _label(info: dict) -> str:
    return str(info.get("spec") or info.get("name") or "?")


def _interval(s: dict) -> str:
    text = f"{s['mean']:+.3f}"
    if s.get("ci"):
        text += f" [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]"
    return text


def headline(result: dict) -> list[dict]:
    """For `eval compare`: the first model's mean continuation score per category and overall
    (closer to 0 is less biased: no side is 'best')."""
    data = result.get("data") or {}
    where = f"{Path(data.get('path', '')).name} ({(data.get('sha256') or '')[:12]}), n={result['pairs']}"
    rows = []
    for name, c in [*result["categories"].items(), ("overall", result["overall"])]:
        s = c["continuation"]
        rows.append(dict(metric=f"bias {name}: mean Δ log-lik (A − B)", value=s["mean"], stderr=s.get("se"),
                         higher_is_better=None, data=where))
    return rows


def render_markdown(result: dict, figure: str | None, table, facts) -> str:
    models = result["models"]
    labels = [_label(m["model"]) for m in models]
    title = " vs ".join(f"`{x}`" for x in labels)
    parts = [f"# Bias (counterfactual pairs): {title}", "",
             f"{result['pairs']} pairs; score = log-likelihood with side A − with side B, so > 0 means the model "
             "prefers side A. Mean with a 95% bootstrap confidence interval (resampling pairs); "
             "'A preferred' is the share of pairs scoring > 0.", ""]
    names = [*result["categories"], "overall"]

    def cat(block: dict, name: str) -> dict:
        return block["overall"] if name == "overall" else block["categories"][name]

    rows = []
    for name in names:
        c = cat(result, name)
        sides = f"{c['group_a']} vs {c['group_b']}" if name != "overall" else ""
        row = [name, c["n"], sides]
        for m in models:
            mc = cat(m, name)
            row += [_interval(mc["continuation"]), f"{mc['continuation']['share_a']:.0%}", _interval(mc["sentence"])]
        if result.get("change"):
            row.append(_interval(cat(result["change"], name)["continuation"]))
        rows.append(row)
    headers = ["category", "pairs", "A vs B"]
    for x in labels:
        tag = f" ({x})" if len(labels) > 1 else ""
        headers += [f"continuation Δ [95% CI]{tag}", f"A preferred{tag}", f"sentence Δ [95% CI]{tag}"]
    if result.get("change"):
        headers.append("change in continuation Δ (model 2 − model 1) [95% CI]")
    parts += [table(headers, rows), ""]
    if figure:
        parts += [f"![bias]({figure})", ""]
    pairs = (result.get("details") or {}).get("pairs") or []
    if pairs:
        strongest = sorted(pairs, key=lambda p: -abs(p["continuation_diff"][0]))[:10]
        parts += [f"## The pairs {labels[0]} separates most", "",
                  table(["line", "category", "A", "B", "continuation", "continuation Δ"],
                        [(p["line"], p["category"], p["context_a"], p["context_b"], p["continuation"],
                          f"{p['continuation_diff'][0]:+.3f}") for p in strongest]), ""]
    if result.get("notes"):
        parts += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    facts_rows = facts(result)
    for m in models[1:]:
        info = m["model"]
        facts_rows.insert(1, ("model 2", f"`{info.get('spec')}` ({info.get('name')}, context {info.get('context')})"))
    parts += ["## Settings", "", table(["", "value"], facts_rows), ""]
    return "\n".join(parts)


def plot_bias(result: dict, path: Path) -> Path:
    """Per category: the mean score with its 95% interval as error bars, one colour per model,
    continuation (left) and sentence (right)."""
    from lmforge.report import save_png, subplots

    models = result["models"]
    names = [*result["categories"], "overall"]
    fig, axes = subplots(1, 2, figsize=(max(7.0, 1.1 * len(names) * 2 + 2), 3.8), squeeze=False)
    width = 0.8 / len(models)
    for ax, kind in zip(axes[0], ("continuation", "sentence")):
        for k, m in enumerate(models):
            xs, ys, lo, hi = [], [], [], []
            for i, name in enumerate(names):
                s = (m["overall"] if name == "overall" else m["categories"][name])[kind]
                xs.append(i + (k - (len(models) - 1) / 2) * width)
                ys.append(s["mean"])
                ci = s.get("ci") or [s["mean"], s["mean"]]
                lo.append(s["mean"] - ci[0])
                hi.append(ci[1] - s["mean"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=_short(_label(m["model"])))
        ax.axhline(0, color="gray", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("mean Δ log-likelihood (A − B)")
        ax.set_title(f"{kind}: > 0 prefers side A (95% CI)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if len(models) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def _short(label: str, n: int = 28) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1):]
