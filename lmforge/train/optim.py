"""Optimizers (AdamW, SGD with momentum) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from lmforge.train.config import TrainConfig


def build_optimizer(param_groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """`param_groups` come from the model: decayed 2-D weights apart from norms/biases/embeddings."""
    groups = [{**g, "weight_decay": cfg.weight_decay if g.get("weight_decay", 0.0) else 0.0} for g in param_groups]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        # The fused kernel exists for CPU and CUDA and takes one pass over all parameters instead
        # of a Python loop per tensor: the main per-step cost of small models on a CPU.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "exponential":
        # The LR range test: min_lr at the first step after warmup, lr at the last, a constant
        # factor between steps (evenly spaced on a log axis).
        span = cfg.max_steps - 1 - cfg.warmup_steps
        return cfg.min_lr * (cfg.lr / cfg.min_lr) ** ((step - cfg.warmup_steps) / span if span > 0 else 0.0)
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
