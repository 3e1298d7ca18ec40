"""LoRA: low-rank adapters on a frozen model (Hu et al., 2021).

A target linear layer W (out x in) becomes W x + (alpha / r) * B A x, with A (r x in) random,
B (out x r) zero (so training starts from the base model exactly) and only A and B trained.
lmforge fuses q/k/v into one `qkv` matrix and gate/up into one `fc`; their adapters are split the
same way (one A/B pair per q, k, v / gate, up), so a rank-r adapter here has the capacity of
PEFT's rank-r adapters on separate q_proj/k_proj/v_proj (gate_proj/up_proj) layers.

Adapters are saved alone (`adapter.safetensors` + `adapter_config.json`, a few MB), loaded on
top of the base model, or merged into its weights (`lmforge merge`) for export.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT, Linear
from lmforge.jsonio import read_json
from lmforge.model.io import check_finite, verify_model_files
from lmforge.model.lora_config import LoRAConfig, check_adapter_config  # LoRAConfig re-exported: LoRA's settings live apart, torch-free

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    """A frozen `Linear` plus one low-rank update per output group (q|k|v, gate|up, or whole)."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float, splits: list[int]):
        super().__init__()
        if sum(splits) != base.out_features:
            raise ValueError(f"splits {splits} do not add up to {base.out_features}")
        self.base = base
        self.splits = splits
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = dropout
        g = len(splits)
        self.lora_A = nn.Parameter(torch.empty(g * rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(n, rank, dtype=base.weight.dtype, device=base.weight.device)) for n in splits
        )
        # As PEFT: A from Kaiming-uniform (a=sqrt(5), nn.Linear's own init), B zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta(self) -> torch.Tensor:
        """The dense update B A * scale, (out x in)."""
        parts = [b @ a for b, a in zip(self.lora_B, self.lora_A.split(self.rank))]
        return torch.cat(parts) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        low = F.linear(h, self.lora_A)  # [..., g * r]
        # One fused out + scale * low @ B^T with B block-diagonal over the parts (q|k|v, gate|up):
        # the per-part products, their concatenation, the scaling and the addition were four
        # passes over [tokens, out] (cat and mul ~15% of a LoRA step on CPU); the zeros cost
        # g x a rank-r matmul, small beside the base's.
        up = self.lora_B[0] if len(self.lora_B) == 1 else torch.block_diag(*self.lora_B)
        # In place on the base's fresh output (its matmul keeps no output for backward): no second
        # [tokens, out] buffer per adapter.
        out.view(-1, out.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), up.t(), alpha=self.scale)
        return out


def apply_lora(model: GPT, cfg: LoRAConfig) -> list[str]:
    """Freeze `model` and wrap the matching linear layers; returns their names."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name != "lm_head" and any(fnmatch.fnmatch(name, pat) for pat in cfg.targets):
            targets.append(name)
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, Linear)]
        raise LmforgeError(
            f"--lora.targets {cfg.targets} match no module; linear layers are named like {', '.join(linears[:4])}"
        )
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        parts = model.config.fused_parts(name) or [base.out_features]
        setattr(parent, attr, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, parts))
    if cfg.train_embeddings:
        model.tok_emb.weight.requires_grad_(True)
    if cfg.train_norms:
        for name, p in model.named_parameters():
            if "norm" in name:
                p.requires_grad_(True)
    return targets


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every trainable tensor, by its name in the wrapped model."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: GPT, folder: str | os.PathLike, cfg: LoRAConfig, base: str) -> None:
    folder = Path(folder)
    save_file(trainable_state_dict(model), str(folder / ADAPTER_FILE))
    meta = {"lora": asdict(cfg), "base_model": base, "targets": [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))


def read_adapter_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise LmforgeError(f"{folder}: not an adapter dir (no {ADAPTER_CONFIG})")
    return check_adapter_config(read_json(path, ADAPTER_CONFIG), str(path))


def load_adapter(model: GPT, folder: str | os.PathLike) -> LoRAConfig:
    """Wrap `model` as the adapter was trained and load its weights."""
    verify_model_files(Path(folder))
    meta = read_adapter_config(folder)
    cfg = LoRAConfig(**meta["lora"])
    apply_lora(model, cfg)
    file = Path(folder) / ADAPTER_FILE
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise LmforgeError(f"{file}: unreadable adapter weights ({e})") from None
    check_finite(tensors, str(file))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise LmforgeError(f"{file}: tensors {unknown[:3]} do not fit this base model")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise LmforgeError(f"{file}: {name} has shape {tuple(t.shape)}, the base model needs {tuple(params[name].shape)}")
            params[name].copy_(t)
    return cfg


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight and unwrap it: a plain GPT again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.base.weight += module.delta().to(module.base.weight.dtype)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each tensor counted once (tied weights are one tensor)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
