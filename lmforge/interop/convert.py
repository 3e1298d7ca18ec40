"""`lmforge convert SRC DST --to lmforge|hf|gguf`: read any model source into a bundle, write it
in the format asked for; `lmforge quantize SRC --to q8_0|q4_0|q4_1 -o OUT`: the same, as a model
dir of GGUF blocks.

SRC is whatever `resolve_model_dir` accepts (model dir, run dir, HF folder, .gguf file, known
name, hf:org/name Hub id); GGUF files and HF folders are read directly, without a stop in the cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.fsutil import check_output_free
from lmforge.interop.bundle import ModelBundle, load_bundle, save_bundle
from lmforge.interop.registry import _is_adapter_dir, _is_gguf, _is_hf_dir, _is_model_dir, load_model, resolve_model_dir

FORMATS = ("lmforge", "hf", "gguf")
DTYPES = {"lmforge": ("f32", "f16", "bf16"), "hf": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "q8_0", "q4_0", "q4_1")}
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def read_any(spec: str | os.PathLike) -> ModelBundle:
    """A bundle from any model source lmforge accepts."""
    p = Path(spec)
    if p.is_file() and _is_gguf(p):
        from lmforge.interop.gguf import read_gguf

        return read_gguf(p)
    if p.is_dir() and not _is_model_dir(p) and _is_hf_dir(p):
        from lmforge.interop.hf import read_hf_dir

        return read_hf_dir(p)
    path = resolve_model_dir(spec)
    if _is_adapter_dir(path):  # a LoRA run: its base with the adapters merged in
        loaded = load_model(path)
        return ModelBundle(loaded.model, loaded.tokenizer, loaded.generation,
                           {"format": "lmforge-lora", "path": str(path)})
    return load_bundle(path)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, dtype: str | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Convert `src` into `dst` in format `to`; returns a summary (for the CLI and benchmarks).

    dtype None: f32, except a quantized model dir to GGUF, which keeps its block format (the
    blocks are written unchanged)."""
    if to not in FORMATS:
        raise LmforgeError(f"--to must be one of {', '.join(FORMATS)}; got {to!r}")
    if dtype is not None and dtype not in DTYPES[to]:
        raise LmforgeError(f"--dtype for --to {to} must be one of {', '.join(DTYPES[to])}; got {dtype!r}")
    dst = Path(dst)
    check_output_free(dst, overwrite)  # before reading a large source
    t0 = time.perf_counter()
    bundle = read_any(src)
    if dtype is None:
        formats = {q.format.name for q in bundle.blocks.values()}
        dtype = formats.pop() if to == "gguf" and len(formats) == 1 else "f32"
    bundle.source = {**bundle.source, "converted_from": str(src)} if to == "lmforge" else bundle.source
    summary: dict[str, Any] = {"source": str(src), "output": str(dst), "format": to, "dtype": dtype,
                               "model": bundle.config.name, "params": bundle.model.param_count()}
    if to == "gguf":
        summary.update(_write_gguf(bundle, dst, dtype, overwrite))
    else:
        if dtype != "f32":
            bundle.model.to(_TORCH_DTYPES[dtype])
        if to == "hf":
            from lmforge.interop.hf import write_hf_dir

            write_hf_dir(bundle, dst, overwrite=overwrite)
        else:
            save_bundle(bundle, dst, overwrite=overwrite)
    summary["bytes"] = dst.stat().st_size if dst.is_file() else sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _write_gguf(bundle: ModelBundle, dst: Path, dtype: str, overwrite: bool) -> dict[str, Any]:
    from lmforge.interop.gguf import write_gguf

    written = write_gguf(bundle, dst, dtype=dtype, overwrite=overwrite)
    return {"tensor_types": written["tensor_types"], "architecture": written["architecture"]}


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Write `src` (anything lmforge loads) as a model dir whose linear weights and embedding are
    `fmt` blocks (lmforge.quant.store); returns a summary."""
    from lmforge.fsutil import atomic_dir, write_text_atomic
    from lmforge.interop.bundle import GENERATION_FILE, SOURCE_KEY
    from lmforge.manifest import write_manifest
    from lmforge.model.io import model_state_dict, write_model_files
    from lmforge.quant.formats import block_format
    from lmforge.quant.store import QUANT_KEY, quantize_state_dict

    f = block_format(fmt)  # a bad name fails before a large source is read
    dst = Path(dst)
    check_output_free(dst, overwrite)
    t0 = time.perf_counter()
    bundle = read_any(src)
    weights, entry = quantize_state_dict(model_state_dict(bundle.model), f.name)
    source = {**bundle.source, "quantized_from": str(src)}
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        write_model_files(bundle.model, tmp, tokenizer=bundle.tokenizer,
                          extra_config={SOURCE_KEY: source, QUANT_KEY: entry}, weights=weights)
        if bundle.generation:
            write_text_atomic(tmp / GENERATION_FILE, json.dumps(bundle.generation, indent=2) + "\n")
        write_manifest(tmp)
    return {"source": str(src), "output": str(dst), "format": f.name, "model": bundle.config.name,
            "params": bundle.model.param_count(), "quantized_tensors": len(entry["tensors"]),
            "bytes": sum(p.stat().st_size for p in dst.rglob("*") if p.is_file()),
            "seconds": round(time.perf_counter() - t0, 3)}
