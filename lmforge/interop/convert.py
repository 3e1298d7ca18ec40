"""`lmforge convert SRC DST --to lmforge|hf|gguf`: read any model source into a bundle, write it
in the format asked for (an encoder-decoder: lmforge, or hf as mBART); `lmforge quantize SRC
--to q8_0|q4_0|q4_1 -o OUT`: the same, as a model dir of GGUF blocks.

SRC is whatever `resolve_model_dir` accepts (model dir, run dir, HF folder, .gguf file, known
name, hf:org/name Hub id); GGUF files and HF folders are read directly, without a stop in the cache.
Blocks travel: a GGUF's Q8_0/Q4_0/Q4_1 matrices (or a quantized dir's) stay those bytes in a
model dir or GGUF written without --dtype; --dtype fp32 (or any other) dequantizes them.
"""

from __future__ import annotations

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
_ALIASES = {"fp32": "f32", "fp16": "f16"}  # torch's spelling, accepted beside ggml's


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

    dtype None: a source's GGUF blocks (a .gguf file's Q8_0/Q4_0/Q4_1 matrices, a quantized model
    dir's) are written unchanged to lmforge (a quantized model dir) and gguf (in the source's
    main format), the rest f32; hf is f32. Given (fp32 = f32, fp16 = f16), every weight is
    turned into it."""
    if to not in FORMATS:
        raise LmforgeError(f"--to must be one of {', '.join(FORMATS)}; got {to!r}")
    dtype = _ALIASES.get(dtype, dtype)
    if dtype is not None and dtype not in DTYPES[to]:
        raise LmforgeError(f"--dtype for --to {to} must be one of {', '.join(DTYPES[to])}; got {dtype!r}")
    dst = Path(dst)
    check_output_free(dst, overwrite)  # before reading a large source
    t0 = time.perf_counter()
    bundle = read_any(src)
    if bundle.config.is_encoder_decoder and to == "gguf":
        raise LmforgeError(f"{src}: an encoder-decoder ({bundle.config.name}) cannot be written as GGUF; "
                           "--to lmforge or hf (mBART)")
    if dtype is None and to != "hf" and bundle.blocks:
        dtype = bundle.quant_format
    elif to == "lmforge" or dtype is None:
        bundle.blocks, bundle.quant_format = {}, None  # dequantized: the model's fp32 values are written
        dtype = dtype or "f32"
    bundle.source = {**bundle.source, "converted_from": str(src)} if to == "lmforge" else bundle.source
    summary: dict[str, Any] = {"source": str(src), "output": str(dst), "format": to, "dtype": dtype,
                               "model": bundle.config.name, "params": bundle.model.param_count()}
    if to == "gguf":
        summary.update(_write_gguf(bundle, dst, dtype, overwrite))
    elif to == "lmforge" and bundle.blocks:
        summary["tensor_types"] = _tensor_types(bundle)
        save_bundle(bundle, dst, overwrite=overwrite)
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


def _tensor_types(bundle: ModelBundle) -> dict[str, int]:
    """How many stored tensors are in each format: the blocks' own, f32 for the rest."""
    from lmforge.model.io import model_state_dict

    counts: dict[str, int] = {}
    for name in model_state_dict(bundle.model):
        kind = bundle.blocks[name].format.name if name in bundle.blocks else "f32"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _write_gguf(bundle: ModelBundle, dst: Path, dtype: str, overwrite: bool) -> dict[str, Any]:
    from lmforge.interop.gguf import write_gguf

    written = write_gguf(bundle, dst, dtype=dtype, overwrite=overwrite)
    return {"tensor_types": written["tensor_types"], "architecture": written["architecture"]}


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, *, embedding_format: str | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write `src` (anything lmforge loads) as a model dir whose linear weights are `fmt` blocks and
    whose token embedding (so a tied head) and untied lm_head are `embedding_format` blocks
    (default: q8_0 under q4_0/q4_1, else `fmt`; lmforge.quant.store); returns a summary.
    Blocks the source already holds in the format a weight gets are kept as they are."""
    from lmforge.model.io import model_state_dict
    from lmforge.quant.store import EMBEDDING_FORMAT, quantize_blocks

    f = _named_format("--to", fmt)  # a bad name fails before a large source is read
    emb = _named_format("--embedding-format", embedding_format if embedding_format is not None else EMBEDDING_FORMAT[f.name])
    dst = Path(dst)
    check_output_free(dst, overwrite)
    t0 = time.perf_counter()
    bundle = read_any(src)
    if bundle.config.is_encoder_decoder:
        raise LmforgeError(f"{src}: quantizing an encoder-decoder ({bundle.config.name}) is not supported")
    blocks = quantize_blocks(model_state_dict(bundle.model), f.name, embedding_format=emb.name, keep=bundle.blocks)
    reused = sum(1 for name, q in blocks.items() if bundle.blocks.get(name) is q)
    bundle.blocks, bundle.quant_format = blocks, f.name
    bundle.source = {**bundle.source, "quantized_from": str(src)}
    save_bundle(bundle, dst, overwrite=overwrite)
    return {"source": str(src), "output": str(dst), "format": f.name, "embedding_format": emb.name,
            "tied": bundle.config.tie_embeddings, "model": bundle.config.name,
            "params": bundle.model.param_count(), "quantized_tensors": len(blocks), "reused_blocks": reused,
            "tensor_types": _tensor_types(bundle),
            "bytes": sum(p.stat().st_size for p in dst.rglob("*") if p.is_file()),
            "seconds": round(time.perf_counter() - t0, 3)}


def _named_format(flag: str, name: str):
    from lmforge.quant.formats import block_format

    try:
        return block_format(name)
    except LmforgeError as e:
        raise LmforgeError(f"{flag}: {e}") from None
