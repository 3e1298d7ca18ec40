"""Quantized weights in a model dir: the GGUF block bytes, stored as they are.

A quantized model dir is a model dir (lmforge.model.io) whose config.json has one more entry,

    "quantization": {
      "format": "q4_1",
      "tensors": {
        "tok_emb.weight":           {"format": "q8_0", "shape": [49152, 576]},
        "blocks.0.attn.qkv.weight": {"format": "q4_1", "shape": [960, 576]},
        ...
      }
    }

and whose model.safetensors holds each listed tensor as uint8 [rows, cols / 32 * block bytes] of
its own format: row r is row r's blocks in order, byte for byte what a GGUF file stores for it
(see lmforge.quant.formats). "format" at the top is the main format, the one `lmforge quantize
--to` asked for or the one most of a GGUF's matrices use; each tensor names its own, because
they differ: the token embedding (and so a tied head) and an untied head are kept at q8_0 when
the rest is 4-bit, as llama.cpp keeps its output matrix at higher precision. An older entry
wrote a tensor as a bare `[rows, cols]`, meaning the main format; it is still read.

Everything not listed (norms, biases, rows whose length is not a multiple of 32, tensors a GGUF
stored in another type) stays floating point. A load computes on the blocks
(lmforge.quant.modules) or, asked to, turns them back into fp32 exactly as ggml does; the file
keeps the bytes, so an export writes them unchanged.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.quant.formats import BLOCK, BlockFormat, QuantTensor, block_format, quantize

QUANT_KEY = "quantization"
# The embedding's format when none is given: q8_0 under a 4-bit main format. The embedding is
# also the (tied) output head, the matrix whose errors reach the logits undiluted; llama.cpp's
# quantizer likewise keeps output.weight above the 4-bit types. At q8_0 it costs SmolLM2-135M
# 30 MB against 18 MB at q4_1.
EMBEDDING_FORMAT = {"q8_0": "q8_0", "q4_0": "q8_0", "q4_1": "q8_0"}
EMBEDDING_NAMES = ("tok_emb.weight", "lm_head.weight")


def quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Weights stored quantized: 2-D matrices of the linear layers and the token embedding, with
    rows a whole number of blocks."""
    if tensor.ndim != 2 or tensor.shape[1] % BLOCK or not tensor.is_floating_point():
        return False
    return name == "tok_emb.weight" or name == "lm_head.weight" or (name.startswith("blocks.") and name.endswith(".weight")
                                                                    and ".norm_" not in name)


def quantize_blocks(sd: dict[str, torch.Tensor], fmt: str, *, embedding_format: str | None = None,
                    keep: dict[str, QuantTensor] | None = None) -> dict[str, QuantTensor]:
    """The quantizable weights of `sd` as QuantTensors: `fmt`, except the token embedding and an
    untied lm_head in `embedding_format` (default: EMBEDDING_FORMAT[fmt]).

    keep: blocks the source already holds (a quantized model dir, a GGUF). One already in the
    format a weight gets is reused as it is: its fp32 values are its dequantized blocks, and
    quantizing those again need not give the same bytes back (the fp16 scale is rounded anew).
    """
    f = block_format(fmt)
    emb = block_format(embedding_format if embedding_format is not None else EMBEDDING_FORMAT[f.name])
    keep = keep or {}
    out: dict[str, QuantTensor] = {}
    for name, t in sd.items():
        if not quantizable(name, t):
            continue
        want = emb if name in EMBEDDING_NAMES else f
        held = keep.get(name)
        if held is not None and held.format == want and held.shape == tuple(t.shape):
            out[name] = held
        else:
            out[name] = quantize(t.detach().float().cpu().numpy(), want, name)
    if not out:
        raise LmforgeError("nothing to quantize: no linear weight has rows that are a whole number of 32-value blocks")
    return out


def main_format(blocks: dict[str, QuantTensor]) -> str:
    """The format most of `blocks` are in (a GGUF's file type, in effect: SmolLM2's Q4_1 file holds
    210 Q4_1 matrices and a Q8_0 embedding)."""
    if not blocks:
        raise LmforgeError("no quantized tensors, so no main format")
    counts = Counter(q.format.name for q in blocks.values())
    return max(counts, key=lambda name: (counts[name], name == "q8_0"))  # a tie goes to the finer format


def blocks_state_dict(sd: dict[str, torch.Tensor], blocks: dict[str, QuantTensor],
                      fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(sd with each tensor in `blocks` replaced by its uint8 blocks, the config.json entry with
    main format `fmt`). Blocks for names `sd` does not hold (a tied lm_head) are left out."""
    out = dict(sd)
    kept: dict[str, QuantTensor] = {}
    for name, q in blocks.items():
        if name not in sd:
            continue
        if tuple(sd[name].shape) != q.shape:
            raise LmforgeError(f"{name}: blocks of shape {list(q.shape)} for a weight of shape {list(sd[name].shape)}")
        out[name] = torch.from_numpy(np.ascontiguousarray(q.blocks))
        kept[name] = q
    if not kept:
        raise LmforgeError("no quantized tensor among the weights")
    return out, quant_entry(kept, fmt)


def quantize_state_dict(sd: dict[str, torch.Tensor], fmt: str, *, embedding_format: str | None = None,
                        keep: dict[str, QuantTensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict with the quantizable weights as uint8 blocks, the config.json entry); see
    quantize_blocks for the formats chosen."""
    blocks = quantize_blocks(sd, fmt, embedding_format=embedding_format, keep=keep)
    return blocks_state_dict(sd, blocks, fmt)


def _is_dims(shape: Any) -> bool:
    return (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape))


def tensor_layout(entry: Any, source: str) -> tuple[BlockFormat, dict[str, tuple[BlockFormat, tuple[int, int]]]]:
    """(main format, {name: (format, (rows, cols))}) from a config.json "quantization" entry, in
    either layout (module docstring); anything else is an error naming `source` and the field."""
    if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
        raise LmforgeError(f"{source}: config.json {QUANT_KEY!r} must be an object with \"format\" and \"tensors\"")
    try:
        main = block_format(entry.get("format"))
    except LmforgeError as e:
        raise LmforgeError(f"{source}: config.json {QUANT_KEY}.format: {e}") from None
    layout: dict[str, tuple[BlockFormat, tuple[int, int]]] = {}
    for name, spec in entry["tensors"].items():
        field = f"config.json {QUANT_KEY}.tensors[{name!r}]"
        if isinstance(spec, list):  # the first layout: [rows, cols] in the main format
            f, shape = main, spec
        elif isinstance(spec, dict):
            extra = sorted(set(spec) - {"format", "shape"})
            if extra or "format" not in spec or "shape" not in spec:
                raise LmforgeError(f"{source}: {field} must have exactly \"format\" and \"shape\", got keys {sorted(spec)}")
            try:
                f = block_format(spec["format"])
            except LmforgeError as e:
                raise LmforgeError(f"{source}: {field}.format: {e}") from None
            shape = spec["shape"]
        else:
            shape = None
        if not _is_dims(shape):
            raise LmforgeError(f"{source}: {field} must be {{\"format\": ..., \"shape\": [rows, cols]}} "
                               f"(or [rows, cols]), got {spec!r}")
        layout[name] = (f, (shape[0], shape[1]))
    return main, layout


def quant_entry(tensors: dict[str, QuantTensor], fmt: str | None = None) -> dict[str, Any]:
    """The config.json entry describing `tensors`, under main format `fmt` (default: the one most
    of them are in)."""
    main = block_format(fmt).name if fmt is not None else main_format(tensors)
    return {"format": main, "tensors": {k: {"format": t.format.name, "shape": list(t.shape)} for k, t in tensors.items()}}


def quant_tensors(sd: dict[str, torch.Tensor], entry: Any, source: str) -> dict[str, QuantTensor]:
    """The listed tensors of a quantized model dir's state dict as QuantTensors, each in its own
    format (views, no copy), after checking the config.json entry and each tensor's bytes against it."""
    _, layout = tensor_layout(entry, source)
    out: dict[str, QuantTensor] = {}
    for name, (f, shape) in layout.items():
        if name not in sd:
            raise LmforgeError(f"{source}: {name} is listed as {f.name} in config.json but missing from the weights")
        t = sd[name]
        if t.dtype != torch.uint8:
            raise LmforgeError(f"{source}: {name} should hold {f.name} blocks (uint8), got {t.dtype}")
        out[name] = _checked(QuantTensor, f, shape, t.numpy(), f"{source}: {name}")
    return out


def logical_shapes(entry: Any, source: str) -> dict[str, tuple[int, int]]:
    """The weight shape [rows, cols] of each listed tensor (its stored shape is the blocks')."""
    return {name: shape for name, (_, shape) in tensor_layout(entry, source)[1].items()}


def _checked(cls, f, shape, blocks, where: str) -> QuantTensor:
    try:
        return cls(f, shape, blocks)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None


def dequantize_state_dict(sd: dict[str, torch.Tensor], entry: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict with every listed tensor turned back into fp32 (as ggml computes it), each
    from its own format."""
    quant = quant_tensors(sd, entry, source)
    out = dict(sd)
    for name, q in quant.items():
        out[name] = torch.from_numpy(np.ascontiguousarray(q.dequantize()))
    return out
