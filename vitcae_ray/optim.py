"""AdamW with decay on weight matrices only, and a per-step warm-up + cosine LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig

# 1-D and bias parameters never decay; these multi-dimensional ones don't either.
NO_DECAY = ("cls_token", "pos_embed", "dec_pos_embed", "tau")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
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


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's per-parameter state keyed by parameter name, and each group's
    learning rate: it loads into an optimizer over a different set of trainable parameters
    (a changed frozen set) by :func:`load_optimizer_state`."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        "state": {names[id(p)]: dict(st) for p, st in optimizer.state.items()},
        "lr": [g["lr"] for g in optimizer.param_groups],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Give each parameter ``optimizer`` trains its state from ``saved`` (by name; a parameter
    the saved optimizer did not train starts fresh, a saved one that no longer trains is
    dropped) and each group its learning rate."""
    training = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        st = saved["state"].get(name)
        if id(p) in training and st is not None:
            optimizer.state[p] = {
                k: v.to(p.device) if torch.is_tensor(v) and v.dim() else v for k, v in st.items()
            }
    for g, lr in zip(optimizer.param_groups, saved["lr"]):
        g["lr"] = lr
