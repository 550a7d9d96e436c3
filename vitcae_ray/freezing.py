"""Applying head-convergence decisions to a model and its optimizer, and measuring what
freezing saves.

Freezing replaces attention parameters with new, smaller ones (see ``model/attention.py``), so
the optimizer is rebuilt around the surviving parameters, carrying their AdamW state (sliced
to the heads that stay active), and DDP must be re-wrapped by the caller on every rank.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import Config
from .engine import decode_prior
from .losses import vitcae_loss
from .model import ViTCAE
from .optim import build_lr_schedule, build_optimizer

_GROUPED = ("qkv_weight_active", "qkv_bias_active", "tau_active")


def frozen_heads(model: ViTCAE) -> list[list[int]]:
    """Per encoder layer, the frozen head indices."""
    return [list(a.frozen_heads) for a in model.attention_layers]


def set_tau_factors(model: ViTCAE, factors: Sequence[Sequence[float]]) -> None:
    """Set the scheduler's non-learned factor of every encoder head, ``(L, H)``."""
    for attn, row in zip(model.attention_layers, factors):
        attn.tau_factor.copy_(torch.tensor(row, dtype=attn.tau_factor.dtype))


def apply_frozen(model: ViTCAE, frozen: Sequence[Sequence[int]], mode: str,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Freeze ``frozen[l]`` heads of each encoder layer whose frozen set changed.

    Returns ``{id(new_param): state}`` for the new active-group parameters, with the old
    optimizer state sliced to the heads that stay active (empty without an optimizer).
    """
    carried: dict[int, dict[str, torch.Tensor]] = {}
    for attn, heads in zip(model.attention_layers, frozen):
        heads = sorted(heads)
        if heads == attn.frozen_heads and mode == attn.freeze_mode:
            continue
        old_active = list(attn.active_heads)
        old_params = {name: getattr(attn, name) for name in _GROUPED}
        attn.set_frozen(heads, mode)
        if optimizer is None:
            continue
        keep = torch.tensor([old_active.index(h) for h in attn.active_heads], dtype=torch.long)
        for name, old in old_params.items():
            state = optimizer.state.get(old)
            if not state:
                continue
            dim = 0 if name == "tau_active" else 1
            new_state = {}
            for k, v in state.items():
                sliced = torch.is_tensor(v) and v.dim() > 0 and v.shape == old.shape
                new_state[k] = v.index_select(dim, keep.to(v.device)) if sliced else v
            carried[id(getattr(attn, name))] = new_state
    return carried


def rebuild_optimizer(model: ViTCAE, optimizer: torch.optim.Optimizer, lr_sched, cfg: Config,
                      steps_per_epoch: int, carried: dict[int, dict[str, torch.Tensor]]):
    """A new AdamW over the model's trainable parameters, with every surviving parameter's
    state (unchanged parameters keep theirs, re-grouped heads get ``carried``), the same
    learning rates, and an LR schedule continuing at the same step."""
    old_state = {id(p): optimizer.state[p] for g in optimizer.param_groups for p in g["params"]
                 if p in optimizer.state}
    new_opt = build_optimizer(model, cfg.optim)
    for g_new, g_old in zip(new_opt.param_groups, optimizer.param_groups):
        g_new["lr"] = g_old["lr"]
        for p in g_new["params"]:
            state = carried.get(id(p)) or old_state.get(id(p))
            if state:
                new_opt.state[p] = state
    new_sched = build_lr_schedule(new_opt, cfg.optim, cfg.train.epochs, steps_per_epoch)
    new_sched.load_state_dict(lr_sched.state_dict())
    for g_new, g_old in zip(new_opt.param_groups, optimizer.param_groups):
        g_new["lr"] = g_old["lr"]  # the constructor's initial step reset it
    return new_opt, new_sched


def grad_elements(model: torch.nn.Module) -> int:
    """Gradient elements DDP all-reduces per step: every parameter that requires grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_step_flops(model: ViTCAE, x: torch.Tensor, cfg: Config, epoch: int) -> int:
    """Forward + backward FLOPs of one training step on ``x`` (optimizer excluded), as
    executed: weight gradients autograd skips for frozen heads are not counted."""
    was_training = model.training
    model.train()
    with FlopCounterMode(display=False) as counter:
        out = model(x, decode_prior=decode_prior(cfg))
        vitcae_loss(out, x, epoch, cfg.loss)["loss"].backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return int(counter.get_total_flops())


def unfrozen_step_flops(model: ViTCAE, x: torch.Tensor, cfg: Config, epoch: int) -> int:
    """The same count for a copy of ``model`` with no head frozen (the baseline)."""
    baseline = copy.deepcopy(model)
    apply_frozen(baseline, [[] for _ in baseline.attention_layers], "weights")
    return train_step_flops(baseline, x, cfg, epoch)
