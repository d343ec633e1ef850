"""Optimizer and learning-rate schedule (paper appendix A): AdamW with weight decay on weight matrices
and embeddings only, linear warmup then cosine decay to ``min_lr_ratio * lr``."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn

from transfusion.train_config import TrainConfig


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR factor for the step with 0-based index ``step``: linear warmup to 1 over ``warmup_steps``
    steps, then cosine decay reaching ``min_ratio`` after ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda" or None
    )


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    fn = partial(
        lr_multiplier, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_ratio=cfg.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)
