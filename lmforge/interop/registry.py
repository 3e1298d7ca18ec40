"""Resolve what a user names as a model: a model dir, a run dir, or a known model name."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT
from lmforge.model.io import load_model_dir
from lmforge.tokenizer import Tokenizer

GENERATION_FILE = "generation.json"

# Named models lmforge can fetch and import (filled by the pretrained-model registry).
KNOWN_MODELS: dict[str, object] = {}


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    path: Path
    generation: dict = field(default_factory=dict)  # sampling defaults from generation.json


def _is_model_dir(p: Path) -> bool:
    if not (p / "config.json").is_file():
        return False
    try:
        return "lmforge_model" in json.loads((p / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """A model dir to load for `spec`: itself, a run dir's best model (else its latest
    checkpoint), or a known name; anything else is an error listing what is accepted."""
    p = Path(spec)
    if p.is_dir():
        if _is_model_dir(p):
            return p
        if _is_model_dir(p / "best"):
            return p / "best"
        latest = p / "latest"
        if latest.is_file():
            ckpt = p / "checkpoints" / latest.read_text().strip()
            if _is_model_dir(ckpt):
                return ckpt
        raise LmforgeError(f"{p}: not an lmforge model dir (no config.json with lmforge_model) or run dir (no best/ or latest)")
    if str(spec) in KNOWN_MODELS:
        raise LmforgeError(f"model {spec!r} is known but not available yet")
    known = ", ".join(sorted(KNOWN_MODELS)) or "none yet"
    raise LmforgeError(f"unknown model {str(spec)!r}: not a model dir or run dir, and not a known name (known: {known})")


def load_model(spec: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    path = resolve_model_dir(spec)
    model, _ = load_model_dir(path, device=device, dtype=dtype)
    tokenizer = Tokenizer.load(path)
    generation = {}
    if (path / GENERATION_FILE).is_file():
        try:
            generation = json.loads((path / GENERATION_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path / GENERATION_FILE}: invalid JSON ({e.msg})") from None
    return LoadedModel(model, tokenizer, path, generation)
