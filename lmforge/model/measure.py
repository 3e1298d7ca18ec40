"""Measure on this machine what `lmforge.model.speed` predicts, and remember it.

`lmforge estimate --measure` runs a few real training steps (the model, fused AdamW as
`lmforge.train.optim` builds it, random tokens) or decodes with the Engine, takes the median step
time and the process's peak RSS (the kernel's VmHWM), and records the figures in
`<cache>/measured.json` under this machine's signature; `lmforge choose` prefers a measured figure
to an estimate where one is recorded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.fsutil import write_text_atomic
from lmforge.model.config import ModelConfig
from lmforge.model.hardware import cpu_fields

MEASURED_FILE = "measured.json"


def machine_signature() -> str:
    """CPU model and thread count: figures from another machine, or other threads, don't apply."""
    cpu = cpu_fields().get("model name") or platform.processor() or platform.machine()
    return f"{cpu} x {torch.get_num_threads()} threads"


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux VmHWM), 0 where the kernel doesn't say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def measure_training(config: ModelConfig, batch_size: int, seq_len: int, *, steps: int = 6,
                     optimizer: str = "adamw", seed: int = 0) -> dict:
    """Median seconds of a training step (the first, which allocates, left out) and the peak RSS
    over the process's baseline before the model existed."""
    from lmforge.model.io import model_class

    if steps < 2:
        raise LmforgeError("estimate --measure: at least 2 steps (the first is not timed)")
    if config.is_encoder_decoder:
        raise LmforgeError(f"estimate --measure: {config.name} is an encoder-decoder; measuring its training is "
                           "not built (bench/bench_seq2seq_train.py measures the translation trainer)")
    baseline = rss_bytes()
    torch.manual_seed(seed)
    model = model_class(config)(config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-4, fused=True) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=True))
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(steps):
        x = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
        y = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
        t = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    step = statistics.median(times[1:])
    return {"mode": "train", "batch_size": batch_size, "seq_len": seq_len, "optimizer": optimizer,
            "step_seconds": step, "tokens_per_s": batch_size * seq_len / step, "steps": steps,
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes()}


def measure_decode(spec: str, *, batch_size: int = 1, prompt_tokens: int = 64, new_tokens: int = 64,
                   import_dtype: str | None = None) -> dict:
    """Decode tokens/s of a loadable model (its own storage format) through the Engine: the time
    of prompt + new_tokens minus that of prompt + 1, so prefill is not counted."""
    from lmforge.generate.engine import Engine
    from lmforge.interop.registry import load_model

    baseline = rss_bytes()
    loaded = load_model(spec, import_dtype=import_dtype)
    timed = time_decode(Engine(loaded.model, loaded.tokenizer), batch_size, prompt_tokens, new_tokens)
    return {"mode": "decode", "batch_size": batch_size, "context": prompt_tokens + new_tokens,
            "step_seconds": timed["step_seconds"], "tokens_per_s": batch_size / timed["step_seconds"],
            "prefill_seconds": timed["prefill_seconds"], "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes()}


def time_decode(engine, batch_size: int, prompt_tokens: int, new_tokens: int, repeats: int = 3) -> dict:
    """Seconds a decode step (and a prefill) takes at this batch and context through `engine`:
    the median time of prompt + new_tokens minus that of prompt + 1, over `repeats` runs after a
    warm-up. Every step runs (EOS ignored, no stop strings), so an untrained model times the same
    as a trained one."""
    from lmforge.generate.params import SamplingParams

    gen = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size
    prompts = [torch.randint(min(100, vocab - 1), vocab, (prompt_tokens,), generator=gen).tolist() for _ in range(batch_size)]

    def timed(n: int) -> float:
        t = time.perf_counter()
        engine.generate_ids(prompts, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
        return time.perf_counter() - t

    timed(2)  # warm-up: first calls compile kernels and fault pages in
    short = statistics.median(timed(1) for _ in range(repeats))
    full = statistics.median(timed(new_tokens + 1) for _ in range(repeats))
    return {"step_seconds": max(full - short, 1e-9) / new_tokens, "prefill_seconds": short}


def _file() -> Path:
    from lmforge.interop.registry import cache_dir

    return cache_dir() / MEASURED_FILE


def _read_all(path: Path) -> dict:
    """Every machine's entries, or a one-line error naming the file: a file lmforge cannot read is
    refused, never silently replaced."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: not a measurements file lmforge wrote ({e}); delete it to start over") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: not a measurements file lmforge wrote (a JSON object expected); delete it to start over")
    return data


def load_measured() -> dict:
    """{key: figures} recorded on this machine (other machines' entries are kept but not returned)."""
    return _read_all(_file()).get(machine_signature(), {})


def record_measured(key: str, figures: dict) -> Path:
    path = _file()
    data = _read_all(path)
    data.setdefault(machine_signature(), {})[key] = figures
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    return path


def measurement_key(model: str, mode: str, batch_size: int, length: int, weight_format: str = "") -> str:
    return f"{model}|{mode}|b{batch_size}|{length}" + (f"|{weight_format}" if weight_format else "")
