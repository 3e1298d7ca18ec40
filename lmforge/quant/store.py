"""Quantized weights in a model dir: the GGUF block bytes, stored as they are.

A quantized model dir is a model dir (lmforge.model.io) whose config.json has one more entry,

    "quantization": {"format": "q4_1", "tensors": {"blocks.0.attn.qkv.weight": [960, 576], ...}}

and whose model.safetensors holds each listed tensor as uint8 [rows, cols / 32 * block bytes]:
row r is row r's blocks in order, byte for byte what a GGUF file stores for it (see
lmforge.quant.formats). Everything not listed (norms, biases, rows whose length is not a
multiple of 32) stays floating point. Quantized: every linear layer's weight and the token
embedding (which a tied head shares). Loading turns the blocks back into fp32 weights exactly as
ggml does; the file keeps the bytes, so an export writes them unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.quant.formats import BLOCK, QuantTensor, block_format, quantize

QUANT_KEY = "quantization"


def quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Weights stored quantized: 2-D matrices of the linear layers and the token embedding, with
    rows a whole number of blocks."""
    if tensor.ndim != 2 or tensor.shape[1] % BLOCK or not tensor.is_floating_point():
        return False
    return name == "tok_emb.weight" or name == "lm_head.weight" or (name.startswith("blocks.") and name.endswith(".weight")
                                                                    and ".norm_" not in name)


def quantize_state_dict(sd: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict with the quantizable weights as uint8 blocks, the config.json entry)."""
    f = block_format(fmt)
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in sd.items():
        if quantizable(name, t):
            q = quantize(t.detach().float().cpu().numpy(), f, name)
            out[name] = torch.from_numpy(q.blocks)
            shapes[name] = list(q.shape)
        else:
            out[name] = t
    if not shapes:
        raise LmforgeError("nothing to quantize: no linear weight has rows that are a whole number of 32-value blocks")
    return out, {"format": f.name, "tensors": shapes}


def quant_entry(tensors: dict[str, QuantTensor]) -> dict[str, Any]:
    """The config.json entry describing `tensors` (all in one format)."""
    formats = {t.format.name for t in tensors.values()}
    if len(formats) != 1:
        raise LmforgeError(f"quantized tensors in several formats ({', '.join(sorted(formats))}) need per-tensor entries")
    return {"format": formats.pop(), "tensors": {k: list(t.shape) for k, t in tensors.items()}}


def quant_tensors(sd: dict[str, torch.Tensor], entry: Any, source: str) -> dict[str, QuantTensor]:
    """The listed tensors of a quantized model dir's state dict as QuantTensors (views, no copy),
    after checking the config.json entry and each tensor's bytes against it."""
    if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
        raise LmforgeError(f"{source}: config.json {QUANT_KEY!r} must be an object with \"format\" and \"tensors\"")
    f = block_format(entry.get("format"))
    out: dict[str, QuantTensor] = {}
    for name, shape in entry["tensors"].items():
        if name not in sd:
            raise LmforgeError(f"{source}: {name} is listed as {f.name} in config.json but missing from the weights")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise LmforgeError(f"{source}: config.json {QUANT_KEY}.tensors[{name!r}] must be [rows, cols], got {shape!r}")
        t = sd[name]
        if t.dtype != torch.uint8:
            raise LmforgeError(f"{source}: {name} should hold {f.name} blocks (uint8), got {t.dtype}")
        out[name] = _checked(QuantTensor, f, tuple(shape), t.numpy(), f"{source}: {name}")
    return out


def _checked(cls, f, shape, blocks, where: str) -> QuantTensor:
    try:
        return cls(f, shape, blocks)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None


def dequantize_state_dict(sd: dict[str, torch.Tensor], entry: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict with every listed tensor turned back into fp32 (as ggml computes it)."""
    quant = quant_tensors(sd, entry, source)
    out = dict(sd)
    for name, q in quant.items():
        out[name] = torch.from_numpy(np.ascontiguousarray(q.dequantize()))
    return out
