"""A model in memory with everything that travels with it, and its model dir on disk.

Every importer (GGUF, Hugging Face folders, the registry) produces a `ModelBundle` and every
exporter consumes one, so a conversion is always "read into a bundle, write the bundle":

    model dir    config.json (+ "source": where it was imported from), model.safetensors,
                 tokenizer.json + tokenizer_config.json, generation.json (stop tokens etc.), manifest.json

A bundle read from GGUF blocks (a GGUF file, a quantized model dir) carries them beside the fp32
model: writers that can hold blocks (a model dir, a GGUF) store those bytes unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from lmforge.fsutil import atomic_dir, write_text_atomic
from lmforge.manifest import write_manifest
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.model.io import load_model_dir, model_from_state_dict, read_model_config, write_model_files
from lmforge.tokenizer import Tokenizer

GENERATION_FILE = "generation.json"
SOURCE_KEY = "source"  # config.json entry recording where an imported model came from
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass
class ModelBundle:
    model: GPT
    tokenizer: Tokenizer
    generation: dict[str, Any] = field(default_factory=dict)  # generation.json: sampling defaults, stop ids
    source: dict[str, Any] = field(default_factory=dict)  # provenance, e.g. {"format": "gguf", "path": ...}
    # GGUF blocks by weight name (lmforge.quant.store), from a quantized model dir or a GGUF: the
    # model holds their fp32 values, a writer that keeps them writes these bytes unchanged.
    blocks: dict[str, Any] = field(default_factory=dict)
    # The main block format of `blocks` (config.json "quantization".format); None when there are none.
    quant_format: str | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def stop_token_ids(tokenizer: Tokenizer, extra: Iterable[int] = ()) -> list[int]:
    """The ids that end a generation: eos, the chat template's end-of-turn marker, and `extra`."""
    ids = set(int(i) for i in extra)
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    for token in END_OF_TURN_TOKENS:
        i = tokenizer.hf.token_to_id(token)
        if i is not None and tokenizer.chat_template and token in tokenizer.chat_template:
            ids.add(i)
    return sorted(ids)


def assemble_model(config: ModelConfig, sd: dict[str, torch.Tensor], source: str) -> GPT:
    """A fp32 GPT (eval mode) that takes over `sd`'s tensors instead of copying them: imports
    hold the whole model in memory once already (SmolLM2: 540 MB of fp32), a copy would double
    the peak."""
    return model_from_state_dict(config, sd, source=source)


def save_bundle(bundle: ModelBundle, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a complete model dir, atomically (temp folder renamed into place); a bundle with
    blocks becomes a quantized model dir holding those bytes (lmforge.quant.store)."""
    extra = {SOURCE_KEY: bundle.source} if bundle.source else {}
    weights = None
    if bundle.blocks:
        from lmforge.model.io import model_state_dict
        from lmforge.quant.store import QUANT_KEY, blocks_state_dict, main_format

        weights, entry = blocks_state_dict(model_state_dict(bundle.model), bundle.blocks,
                                           bundle.quant_format or main_format(bundle.blocks))
        extra[QUANT_KEY] = entry
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model_files(bundle.model, tmp, tokenizer=bundle.tokenizer, extra_config=extra or None, weights=weights)
        if bundle.generation:
            write_text_atomic(tmp / GENERATION_FILE, json.dumps(bundle.generation, indent=2) + "\n")
        write_manifest(tmp)
    return Path(out)


def read_generation(path: str | os.PathLike) -> dict[str, Any]:
    """A model dir's generation.json ({} when it has none)."""
    file = Path(path) / GENERATION_FILE
    if not file.is_file():
        return {}
    from lmforge.jsonio import read_json_object

    return read_json_object(file, GENERATION_FILE)


def load_bundle(path: str | os.PathLike) -> ModelBundle:
    """A model dir read back into a bundle (fp32, CPU; a quantized dir's blocks kept beside)."""
    path = Path(path)
    model, _ = load_model_dir(path, dequantize=True)
    _, raw = read_model_config(path)
    blocks, fmt = {}, None
    if "quantization" in raw:
        from lmforge.model.io import WEIGHTS_FILE, read_safetensors
        from lmforge.quant.store import quant_tensors, tensor_layout

        file = path / WEIGHTS_FILE
        blocks = quant_tensors(read_safetensors(file), raw["quantization"], str(file))
        fmt = tensor_layout(raw["quantization"], str(file))[0].name
    return ModelBundle(model, Tokenizer.load(path), read_generation(path), raw.get(SOURCE_KEY) or {}, blocks, fmt)
