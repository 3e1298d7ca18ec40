"""`lmforge choose`: which model, for this task, on this machine (or a named GPU)?

The candidates are the models lmforge knows: the pretrained ones of the registry, in each storage
format lmforge runs them in (the shipped GGUF blocks, q8_0, fp32), ready to use; and the
architecture presets, to train yourself (a recipe does it in one command). Each is judged by:

- fit: inference memory (weights in their format + the KV cache at the task's context + the
  runtime) for a pretrained model, training memory (lmforge.model.estimate, at batch 8 and the
  task's context, + the runtime) for a preset, against --ram (default: the memory available now) or
  the GPU's memory;
- speed: decode milliseconds a token (pretrained) or training tokens/s (presets), measured where
  `lmforge estimate --measure` recorded a figure on this machine, predicted (lmforge.model.speed)
  otherwise; --latency-ms rejects a model whose token takes longer;
- task: an English-only model is not a translator; an encoder-decoder does nothing but translate;
- expected quality: the figures lmforge measured for the model and task, with where they are
  recorded (bench/README.md) — never a number made up for a model nobody measured.

Ranked: usable pretrained models first (by quality, then speed), then presets to train (bigger
first: given the same budget on the same data, the larger model that still fits has the lower
loss in every scaling law; its cost is shown as training tokens an hour). Every rejection says why.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from lmforge.errors import LmforgeError
from lmforge.model.config import PRESETS, ModelConfig, get_preset
from lmforge.model.hardware import Hardware
from lmforge.model.speed import inference_estimate, training_estimate, training_speed

TASKS = ("chat", "code", "translation")
TASK_CONTEXT = {"chat": 2048, "code": 1024, "translation": 256}
TRAIN_BATCH = 8
# A Python process with torch and lmforge imported, before any model: 0.42-0.44 GB of RSS here
# (bench/bench_estimate.py measures it beside each run); CUDA's context costs about as much on a GPU.
RUNTIME_BYTES = 450 * 10**6
ENGLISH_ONLY = {"smollm2-135m-instruct"}


@dataclass(frozen=True)
class Quality:
    metric: str
    value: float
    source: str

    def __str__(self) -> str:
        return f"{self.metric} {self.value:g}"


# What lmforge measured; each figure says where it is recorded and how it was taken.
QUALITY: dict[tuple[str, str], tuple[Quality, ...]] = {
    ("smollm2-135m-instruct", "chat"): (
        Quality("chatbot recipe scripted checks passed (of 25)", 4,
                "bench/README.md, Recipes: `lmforge recipe run chatbot`, the model before fine-tuning"),
        Quality("lmforge eval tasks facts accuracy", 0.800, "bench/README.md, Evaluation: `lmforge eval tasks`"),
    ),
    ("smollm2-135m-instruct", "code"): (
        Quality("lmforge eval tasks code accuracy", 0.667, "bench/README.md, Evaluation: `lmforge eval tasks`"),
        Quality("HumanEval pass@1 (first 40 problems, raw prompt without the chat template)", 0.0,
                "bench/README.md, Recipes: `lmforge recipe run code`"),
    ),
}


@dataclass
class Verdict:
    name: str
    kind: str  # "pretrained" (use now) or "preset" (train it)
    weight_format: str
    params: int
    memory_bytes: int
    speed: str  # what the speed figure is, with its unit
    speed_value: float
    measured: str  # "" (predicted) or the settings it was measured at, e.g. "batch 1, context 128"
    quality: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GiB', '2000000000' -> bytes (G and GB are 10^9, GiB 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise LmforgeError(f"--ram {text!r}: not a size (e.g. 8G, 512M, 1.5GiB)")
    number, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    power = " kmgt".index(unit) if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def _pretrained() -> list[tuple[str, str, ModelConfig]]:
    from lmforge.interop.registry import KNOWN_MODELS

    out = []
    for km in KNOWN_MODELS.values():
        if not km.architecture:
            raise LmforgeError(f"registry entry {km.name}: no architecture preset on record to estimate it by")
        config = get_preset(km.architecture)
        for fmt in dict.fromkeys((km.quant_format, "q8_0", "fp32")):
            out.append((km.name, fmt, config))
    return out


def _measured(measured: dict, name: str, mode: str, fmt: str = "") -> tuple[dict | None, str]:
    """A figure `lmforge estimate --measure` recorded for the model (any batch and length: the
    settings are shown beside it), and those settings in words."""
    for figures in measured.values():
        if figures.get("model") == name and figures.get("mode") == mode and (not fmt or figures.get("weights") == fmt):
            if mode == "decode":
                return figures, f"batch {figures['batch_size']}, context {figures['context']}"
            return figures, f"batch {figures['batch_size']} x {figures['seq_len']}"
    return None, ""


def choose(task: str, hw: Hardware, *, ram_bytes: int | None = None, latency_ms: float | None = None,
           measured: dict | None = None) -> list[Verdict]:
    if task not in TASKS:
        raise LmforgeError(f"--task {task!r}: one of {', '.join(TASKS)}")
    limit = ram_bytes if ram_bytes is not None else hw.memory_bytes
    measured = measured or {}
    context = TASK_CONTEXT[task]
    verdicts: list[Verdict] = []
    for name, fmt, config in _pretrained():
        est = inference_estimate(config, hw, context=min(context, config.block_size), weight_format=fmt)
        seen, at = _measured(measured, name, "decode", fmt) if hw.kind == "cpu" else (None, "")
        ms = seen["step_seconds"] * 1000 if seen else est.ms_per_token
        v = Verdict(name, "pretrained", fmt, _params(config), est.memory_bytes + RUNTIME_BYTES, "ms/token", ms,
                    at, [str(q) for q in QUALITY.get((name, task), ())])
        if task == "translation" and name in ENGLISH_ONLY:
            v.rejected.append("English-only (its model card), never trained to translate")
        _check_fit(v, limit, hw)
        if latency_ms is not None and ms > latency_ms:
            v.rejected.append(f"{ms:.1f} ms a token > --latency-ms {latency_ms:g}")
        verdicts.append(v)
    for name, config in PRESETS.items():
        seq = min(context, config.block_size)
        seen, at = _measured(measured, name, "train") if hw.kind == "cpu" else (None, "")
        speed = seen["tokens_per_s"] if seen else training_speed(config, TRAIN_BATCH, seq, hw).tokens_per_s
        need = training_estimate(config, TRAIN_BATCH, seq, hw)["peak"] + RUNTIME_BYTES
        v = Verdict(name, "preset", "fp32" if hw.precision == "fp32" else "bf16 autocast", _params(config), need,
                    "training tokens/s", speed, at,
                    note=f"untrained: {speed * 3600 / 1e6:.1f}M training tokens an hour at batch {TRAIN_BATCH} x {seq}")
        if task == "translation" and not config.is_encoder_decoder:
            v.note += "; as a translator, a decoder-only twin (recipe translation trains both)"
        if task != "translation" and config.is_encoder_decoder:
            v.rejected.append("an encoder-decoder: it maps a source to a target (translation), not a chat or code")
        _check_fit(v, limit, hw)
        if latency_ms is not None and v.kind == "preset" and not v.rejected:
            ms = inference_estimate(config, hw, context=seq).ms_per_token if not config.is_encoder_decoder else None
            if ms is not None and ms > latency_ms:
                v.rejected.append(f"once trained, {ms:.1f} ms a token (fp32, predicted) > --latency-ms {latency_ms:g}")
        verdicts.append(v)
    usable = [v for v in verdicts if not v.rejected]
    ranked = sorted((v for v in usable if v.kind == "pretrained"),
                    key=lambda v: (-len(v.quality), v.speed_value))
    ranked += sorted((v for v in usable if v.kind == "preset"), key=lambda v: -v.params)
    return ranked + [v for v in verdicts if v.rejected]


def _params(config: ModelConfig) -> int:
    from lmforge.model.estimate import estimate_memory

    return estimate_memory(config, 1, 1)["params"]


def _check_fit(v: Verdict, limit: int, hw: Hardware) -> None:
    if v.memory_bytes > limit:
        where = "--ram" if hw.kind == "cpu" else f"the {hw.name}'s memory"
        v.rejected.append(f"needs {v.memory_bytes / 1e9:.2f} GB > {where} {limit / 1e9:.2f} GB")


def render(verdicts: list[Verdict], task: str, hw: Hardware, limit: int) -> str:
    lines = [f"task {task} (context {TASK_CONTEXT[task]}), on {hw.describe()}; memory limit {limit / 1e9:.2f} GB",
             "", f"{'#':>2}  {'model':<24} {'kind':<10} {'format':<13} {'params':>8} {'memory':>9}  speed"]
    rank = 0
    for v in verdicts:
        if v.rejected:
            continue
        rank += 1
        how = f"measured, {v.measured}" if v.measured else "predicted"
        fig = f"{v.speed_value:,.1f} {v.speed} ({how})"
        lines.append(f"{rank:>2}  {v.name:<24} {v.kind:<10} {v.weight_format:<13} {v.params / 1e6:>7.1f}M "
                     f"{v.memory_bytes / 1e9:>7.2f} GB  {fig}")
        for q in v.quality:
            lines.append(f"{'':>4}quality: {q}")
        if v.note:
            lines.append(f"{'':>4}{v.note}")
    if rank == 0:
        lines.append("    (none fits: see the rejections)")
    rejected = [v for v in verdicts if v.rejected]
    if rejected:
        lines += ["", "rejected:"]
        for v in rejected:
            lines.append(f"  {v.name} ({v.kind}, {v.weight_format}): {'; '.join(v.rejected)}")
    sources = sorted({q.source for (name, t), qs in QUALITY.items() if t == task for q in qs})
    if sources:
        lines += ["", "quality figures: " + "; ".join(sources)]
    return "\n".join(lines)
