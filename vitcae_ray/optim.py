"""AdamW with decay on weight matrices only, and a per-step warm-up + cosine LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig

# 1-D and bias parameters never decay; these multi-dimensional ones don't either.
NO_DECAY = ("cls_token", "pos_embed", "dec_pos_embed", "qkv_bias", "tau")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1].removesuffix("_active")  # attention's head groups
        if p.ndim < 2 or leaf == "bias" or leaf in NO_DECAY:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(step) = lr * step / warmup during warm-up, then cosine from lr to min_lr_ratio * lr."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
