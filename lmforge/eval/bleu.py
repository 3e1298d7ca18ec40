"""BLEU, chrF and TER through sacrebleu with its defaults, so the scores (and the signature that
states how they were computed) are the ones papers report and the `sacrebleu` command prints.

References are kept per example — `refs[i]` lists every reference of hypothesis i, of any
number — and turned into sacrebleu's *transposed* layout (one stream per reference position,
`streams[j][i]`) in one place, `transpose`; handing sacrebleu the per-example lists directly
is a classic silent bug (it scores garbage without complaint). Examples with fewer references
get `None` in the missing streams, which sacrebleu skips.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lmforge.errors import LmforgeError, check_counts

EXAMPLES_IN_REPORT = 5


def transpose(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's reference streams."""
    width = max((len(r) for r in refs), default=0)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


def read_hypotheses(path: str | os.PathLike) -> list[str]:
    """One hypothesis per line, read exactly as the `sacrebleu` command reads them."""
    from lmforge.eval.io import read_lines

    return read_lines(path)


def read_references(paths: Sequence[str | os.PathLike]) -> list[list[str]]:
    """Per-example reference lists from one or more files: a text file gives one reference per
    line (one file per reference stream); a JSONL file gives, per line, a list of references
    (or an object with `references`, a list, or `reference`, a string). Several files are
    joined example by example, so they must have the same number of lines."""
    from lmforge.eval.io import is_jsonl, read_lines
    from lmforge.jsonio import read_jsonl

    if not paths:
        raise LmforgeError("give at least one --ref file")
    combined: list[list[str]] | None = None
    first = None
    for path in paths:
        path = Path(path)
        if is_jsonl(path):
            per_item = []
            for lineno, obj in read_jsonl(path, objects=False):  # a line may be a bare list
                per_item.append(_refs_of(obj, f"{path}:{lineno}"))
        else:
            per_item = [[line] for line in read_lines(path)]
        if combined is None:
            combined, first = per_item, path
        elif len(per_item) != len(combined):
            raise LmforgeError(f"{path}: {len(per_item)} references, but {first} has {len(combined)}; "
                               "reference files must have one line per example")
        else:
            combined = [a + b for a, b in zip(combined, per_item)]
    return combined  # type: ignore[return-value]


def _refs_of(obj, where: str) -> list[str]:
    if isinstance(obj, dict):
        if "references" in obj:
            obj = obj["references"]
        elif isinstance(obj.get("reference"), str):
            return [obj["reference"]]
        else:
            raise LmforgeError(f"{where}: expected a list of references, or an object with 'references' (a list) "
                               "or 'reference' (a string)")
    if isinstance(obj, str):
        return [obj]
    if not isinstance(obj, list) or not obj or not all(isinstance(r, str) for r in obj):
        raise LmforgeError(f"{where}: expected a non-empty list of reference strings, got {str(obj)[:60]!r}")
    return list(obj)


@dataclass
class BleuScores:
    bleu: float
    chrf: float
    ter: float
    signatures: dict[str, str]  # metric -> sacrebleu signature string
    bleu_details: dict = field(default_factory=dict)  # precisions, brevity penalty, lengths
    n: int = 0
    references_per_example: list[int] = field(default_factory=list)  # distinct counts (min, max)


def score(hypotheses: Sequence[str], refs: Sequence[Sequence[str]], *, hyp_source: str = "hypotheses",
          ref_source: str = "references") -> BleuScores:
    """Corpus BLEU, chrF and TER (sacrebleu defaults) of hypotheses against per-example references."""
    from sacrebleu.metrics import BLEU, CHRF, TER

    if not hypotheses:
        raise LmforgeError(f"{hyp_source}: no hypotheses")
    if len(hypotheses) != len(refs):
        raise LmforgeError(f"{hyp_source}: {len(hypotheses)} hypotheses but {ref_source}: {len(refs)} references; "
                           "they must have one line per example, in the same order")
    for i, r in enumerate(refs):
        if not r:
            raise LmforgeError(f"{ref_source}: example {i + 1} has no reference")
    streams = transpose(refs)
    results, signatures = {}, {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
        s = metric.corpus_score(list(hypotheses), streams)
        results[name] = s
        signatures[name] = str(metric.get_signature())
    b = results["bleu"]
    counts = sorted({len(r) for r in refs})
    return BleuScores(
        bleu=b.score, chrf=results["chrf"].score, ter=results["ter"].score, signatures=signatures,
        bleu_details={"precisions": list(b.precisions), "bp": b.bp, "sys_len": b.sys_len, "ref_len": b.ref_len},
        n=len(hypotheses), references_per_example=[counts[0], counts[-1]],
    )


def _result(scores: BleuScores, hyps: Sequence[str], refs: Sequence[Sequence[str]], *, model: dict | None,
            data: dict, settings: dict, notes: list[str], extra_details: dict | None = None) -> dict:
    from lmforge.eval.results import make_result

    examples = [{"index": i + 1, "hypothesis": hyps[i], "references": list(refs[i])}
                for i in range(min(EXAMPLES_IN_REPORT, len(hyps)))]
    metrics = {"bleu": scores.bleu, "chrf": scores.chrf, "ter": scores.ter, "signature": scores.signatures["bleu"],
               "signatures": scores.signatures, "bleu_details": scores.bleu_details, "segments": scores.n,
               "references_per_example": scores.references_per_example}
    return make_result("bleu", model=model, data=data, settings=settings, metrics=metrics,
                       details={"examples": examples, **(extra_details or {})}, notes=notes)


def evaluate_files(hyp: str | os.PathLike, refs: Sequence[str | os.PathLike]) -> dict:
    """`lmforge eval bleu --hyp FILE --ref FILE...`."""
    from lmforge.eval.io import fingerprint

    hyps = read_hypotheses(hyp)
    references = read_references(refs)
    scores = score(hyps, references, hyp_source=str(hyp), ref_source=str(refs[0]) if len(refs) == 1 else "--ref files")
    # What two systems' scores are comparable on: the references (the hypotheses differ by nature).
    ref_prints = [fingerprint(r) for r in refs]
    data = {"path": str(refs[0]), "bytes": sum(r["bytes"] for r in ref_prints),
            "sha256": ref_prints[0]["sha256"] if len(refs) == 1 else _combined_sha([r["sha256"] for r in ref_prints]),
            "references": ref_prints, "hypotheses": fingerprint(hyp)}
    return _result(scores, hyps, references, model=None, data=data, settings={"hyp": str(hyp), "refs": [str(r) for r in refs]},
                   notes=[])


def _combined_sha(parts: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# -- generate, then score ------------------------------------------------------------------------
DEFAULT_TEMPLATE = "{source}"


@dataclass
class BleuGenerateConfig:
    template: str = DEFAULT_TEMPLATE  # prompt built from each pair ({source}); e.g. "English: {source}\nFrench:"
    max_new_tokens: int = 128  # tokens generated per example at most
    batch_size: int = 8  # prompts generated together
    stop: list[str] = field(default_factory=lambda: ["\n"])  # generation ends at any of these (default: newline); with beams each hypothesis is cut at the first one after the search
    limit: int = 0  # score only the first N pairs (0 = all)
    num_beams: int = 1  # beam search with this many beams (1 = greedy)
    source_field: str = "source"  # the pairs' source field (a dotted path reaches into objects: translation.en)
    target_field: str = "reference"  # the pairs' reference field: a string or a list of strings ("references" is read too by default)

    def __post_init__(self) -> None:
        check_counts(self, at_least_0=("limit",), at_least_1=("max_new_tokens", "batch_size", "num_beams"))
        for name in ("source_field", "target_field"):
            if not getattr(self, name) or any(not part for part in getattr(self, name).split(".")):
                raise LmforgeError(f"--{name.replace('_', '-')} must name a field, got {getattr(self, name)!r}")


def _field(obj, path: str):
    """obj's value at a dotted path ("translation.en"), or a KeyError naming the missing part."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(part)
        obj = obj[part]
    return obj


def read_pairs(path: str | os.PathLike, limit: int = 0, source_field: str = "source",
               target_field: str = "reference") -> tuple[list[str], list[list[str]]]:
    """pairs.jsonl: {"source": str, "reference": str | [str, ...]} (or "references") per line;
    other field names (dotted paths into nested objects) with source_field / target_field."""
    from lmforge.jsonio import read_jsonl

    sources, refs = [], []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            source = _field(obj, source_field)
        except KeyError:
            source = None
        if not isinstance(source, str):
            raise LmforgeError(f"{where}: expected an object with a string {source_field!r} and a {target_field!r}")
        try:
            ref = _field(obj, target_field)
        except KeyError:
            ref = obj.get("references") if target_field == "reference" and isinstance(obj, dict) else None
            if ref is None:
                raise LmforgeError(f"{where}: no {target_field!r} (a string or a list of strings)") from None
        sources.append(source)
        refs.append(_refs_of(ref, where))
        if limit and len(sources) >= limit:
            break
    return sources, refs


def render_prompt(template: str, source: str, where: str) -> str:
    try:
        return template.format(source=source)
    except (KeyError, IndexError, ValueError) as e:
        raise LmforgeError(f"{where}: --template {template!r} fails ({type(e).__name__} {e}); the only field is {{source}} "
                           "(write {{ and }} for literal braces)") from None


def generate_and_score(model_spec: str, pairs: str | os.PathLike, config: BleuGenerateConfig | None = None, *,
                       device: str = "cpu", progress: bool = False) -> dict:
    """`lmforge eval bleu --model MODEL --data pairs.jsonl`: greedy, batched generation with the
    Engine, then the same scoring as for files."""
    from lmforge.eval.io import fingerprint
    from lmforge.eval.perplexity import load_engine
    from lmforge.eval.results import model_info
    from lmforge.generate.sampling import SamplingParams

    config = config or BleuGenerateConfig()
    if config.batch_size < 1:
        raise LmforgeError(f"--batch-size must be positive, got {config.batch_size}")
    sources, refs = read_pairs(pairs, config.limit, config.source_field, config.target_field)
    engine, loaded = load_engine(model_spec, device)
    beams = config.num_beams > 1
    # Beam search ends hypotheses on tokens only: the stop strings cut its outputs afterwards.
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0, num_beams=config.num_beams,
                            stop=[] if beams else list(config.stop))
    from lmforge.generate.translate import fits_context, translate_ids

    prompts, cut, capped = [], 0, 0
    for i, s in enumerate(sources):
        where = f"{pairs}:{i + 1}"
        ids = engine.encode(render_prompt(config.template, s, where))
        if engine.translates:
            ids = engine.translation_prompt(ids)
        if engine.translates:  # a source is never cut: a translation of part of it scores nothing true
            # A decoder-only translator's translation shares the context with its source: at most the room left.
            fitted = fits_context(engine, params, len(ids), True) if not engine.is_encoder_decoder else params
            capped += fitted.max_new_tokens < params.max_new_tokens
            try:
                kept = engine.check_length(ids, fitted)
            except LmforgeError as e:
                raise LmforgeError(f"{where}: {e}") from None
        else:
            kept = engine.check_length(ids, params, "left")  # keep the end: it holds the source's last words
        cut += len(kept) < len(ids)
        prompts.append(kept)
    if engine.translates:
        done = translate_ids(engine, prompts, params, batch_size=config.batch_size, progress=progress, cap_to_context=True)
        hyps = [_cut_at_stop(group[0].text, config.stop if beams else []) for group in done]
    else:
        hyps = generate_batched(engine, prompts, params, config.batch_size, progress=progress,
                                cut_at=config.stop if beams else ())
    scores = score(hyps, refs, hyp_source=f"{model_spec} outputs", ref_source=str(pairs))
    settings = {"template": config.template, "max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
                "stop": list(config.stop), "decoding": f"beam search ({config.num_beams} beams)" if beams else "greedy",
                "num_beams": config.num_beams, "limit": config.limit, "source_field": config.source_field,
                "target_field": config.target_field, "device": str(engine.device),
                "architecture": "encoder-decoder" if engine.is_encoder_decoder else
                "decoder (source <sep> target)" if engine.translates else "decoder",
                "decode_backend": engine.decode_backend_used}  # measured fastest here: recorded
    return _result(scores, hyps, refs, model=model_info(model_spec, loaded), data=fingerprint(pairs), settings=settings,
                   notes=([f"{cut} prompts longer than the context minus max_new_tokens were cut from the left"] if cut else [])
                   + ([f"{capped} translations were allowed only the room their source left in the context, under "
                       f"max_new_tokens"] if capped else []),
                   extra_details={"hypotheses": hyps})


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before its first stop string, stripped of surrounding whitespace."""
    hits = [i for i in (text.find(s) for s in stops if s) if i != -1]
    return (text[: min(hits)] if hits else text).strip()


def generate_batched(engine, prompts: list[list[int]], params, batch_size: int, progress: bool = False,
                     cut_at: Sequence[str] = ()) -> list[str]:
    """Completions (greedy, or each prompt's best beam), in batches of prompts of similar length
    (less padding), in input order; each cut at the first stop string (the Engine's, or `cut_at`
    after a beam search) and stripped of surrounding whitespace."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    bar = None
    if progress:
        from lmforge.progress import progress_bar

        bar = progress_bar(total=len(prompts), unit="example", desc="generating", leave=False)
    for k in range(0, len(order), batch_size):
        group = order[k : k + batch_size]
        for i, c in zip(group, engine.generate_ids([prompts[i] for i in group], params)):
            out[i] = _cut_at_stop(c.text, cut_at)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return out
