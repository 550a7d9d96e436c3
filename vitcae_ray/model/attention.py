"""Multi-head self-attention with a learnable inverse temperature per head, and heads that
can be frozen for real compute savings.

Head h of a layer computes ``softmax(tau_h * factor_h * q_h k_h^T / sqrt(d_h)) v_h``, where
``tau_h`` is learned and ``factor_h`` is a non-learned buffer set by the convergence scheduler
(1 until it acts). The q/k/v weights are stored per head, ``(3, H, d_h, D)``.

Heads live in two groups: the active group (parameters that require grad) and the frozen
group (parameters that don't, computed by their own matmul, so autograd never forms their
weight gradients). In ``detach`` mode the frozen heads' whole attention path runs without
autograd on a detached input: their backward is skipped, and earlier layers receive no
gradient through them. The state dict is always the full per-head layout (``qkv_weight``
``(3, H, d_h, D)``, ``qkv_bias``, ``tau``), whatever the grouping.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

FREEZE_MODES = ("weights", "detach")


class Attention(nn.Module):
    """Self-attention over ``(B, T, D)`` tokens; token 0 is the CLS token when one is used.

    Args:
        dim: token width D.
        num_heads: H; ``dim`` must be divisible by it.
        fused: use ``F.scaled_dot_product_attention`` (tau folded into q); False uses the
            manual softmax path, which can also return the attention weights.
    """

    def __init__(self, dim: int, num_heads: int, fused: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        self.freeze_mode = "weights"
        weight = torch.empty(3, num_heads, self.head_dim, dim)
        nn.init.trunc_normal_(weight, std=0.02)
        self.register_buffer("tau_factor", torch.ones(num_heads))  # scheduler's factor
        self.proj = nn.Linear(dim, dim)
        self._set_groups(weight, torch.zeros(3, num_heads, self.head_dim), torch.ones(num_heads),
                         frozen=[])
        # CLS->token readout, accumulated while ``record_cls`` is on. Plain attributes, not
        # buffers: DDP would broadcast buffers from rank 0 and overwrite each rank's sums.
        self.record_cls = False
        self.cls_attn_sum: torch.Tensor | None = None  # (H, T), summed over the batch
        self.cls_attn_count = 0

    # --- head groups ---------------------------------------------------------------------
    def _set_groups(self, weight: torch.Tensor, bias: torch.Tensor, tau: torch.Tensor,
                    frozen: list[int]) -> None:
        """(Re)build the active and frozen parameter groups from full per-head tensors."""
        H = self.num_heads
        frozen = sorted(set(frozen))
        active = [h for h in range(H) if h not in frozen]
        self.active_heads, self.frozen_heads = active, frozen
        ia, if_ = torch.tensor(active, dtype=torch.long), torch.tensor(frozen, dtype=torch.long)
        # group order (active, frozen) -> canonical head order
        self.register_buffer("inverse", torch.argsort(torch.cat([ia, if_])), persistent=False)
        self.register_buffer("idx_active", ia, persistent=False)
        self.register_buffer("idx_frozen", if_, persistent=False)
        hd = torch.arange(self.head_dim)
        for group, idx in (("active", ia), ("frozen", if_)):  # the group's columns of proj
            cols = (idx[:, None] * self.head_dim + hd).flatten()
            self.register_buffer(f"cols_{group}", cols, persistent=False)
        # an empty active group must not require grad: DDP would wait for its gradient
        trainable = bool(active)
        for name, full in (("qkv_weight", weight), ("qkv_bias", bias)):
            setattr(self, f"{name}_active", nn.Parameter(full[:, ia].clone(), requires_grad=trainable))
            setattr(self, f"{name}_frozen", nn.Parameter(full[:, if_].clone(), requires_grad=False))
        self.tau_active = nn.Parameter(tau[ia].clone(), requires_grad=trainable)
        self.tau_frozen = nn.Parameter(tau[if_].clone(), requires_grad=False)

    def _full(self, name: str) -> torch.Tensor:
        """The full per-head tensor (canonical head order) of ``qkv_weight``/``qkv_bias``/``tau``."""
        dim = 0 if name == "tau" else 1
        a, f = getattr(self, f"{name}_active"), getattr(self, f"{name}_frozen")
        return torch.cat([a.detach(), f.detach()], dim=dim).index_select(dim, self.inverse)

    @property
    def qkv_weight(self) -> torch.Tensor:
        """``(3, H, d_h, D)``; head h's weights are ``qkv_weight[:, h]`` (a detached copy)."""
        return self._full("qkv_weight")

    @property
    def qkv_bias(self) -> torch.Tensor:
        return self._full("qkv_bias")

    @property
    def tau(self) -> torch.Tensor:
        return self._full("tau")

    def set_frozen(self, heads: list[int], mode: str = "weights") -> None:
        """Move ``heads`` to the frozen group (the rest become active). New parameter objects
        replace the old ones: rebuild or prune the optimizer and re-wrap DDP afterwards."""
        if mode not in FREEZE_MODES:
            raise ValueError(f"freeze mode must be one of {FREEZE_MODES}, got {mode!r}")
        if any(not 0 <= h < self.num_heads for h in heads):
            raise ValueError(f"head indices {heads} out of range for {self.num_heads} heads")
        self.freeze_mode = mode
        device = self.qkv_weight_active.device
        self._set_groups(self._full("qkv_weight"), self._full("qkv_bias"), self._full("tau"), heads)
        self.to(device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("qkv_weight", "qkv_bias", "tau"):
            destination.pop(prefix + name + "_active")
            destination.pop(prefix + name + "_frozen")
            destination[prefix + name] = self._full(name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("qkv_weight", "qkv_bias", "tau"):
            full = state_dict.pop(prefix + name, None)
            if full is None:
                continue  # reported as missing by the group keys below
            dim = 0 if name == "tau" else 1
            for group in ("active", "frozen"):
                idx = getattr(self, f"idx_{group}").to(full.device)
                state_dict[f"{prefix}{name}_{group}"] = full.index_select(dim, idx)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # --- forward -------------------------------------------------------------------------
    def effective_tau(self) -> torch.Tensor:
        """``(H,)`` inverse temperatures applied to the logits (canonical head order)."""
        return self._full("tau") * self.tau_factor

    def _group_qkv(self, x: torch.Tensor, group: str) -> tuple[torch.Tensor, ...]:
        """q (tau-scaled), k, v of one head group, each (B, Hg, T, hd)."""
        B, T, D = x.shape
        w = getattr(self, f"qkv_weight_{group}")
        Hg = w.shape[1]
        qkv = F.linear(x, w.reshape(-1, D), getattr(self, f"qkv_bias_{group}").reshape(-1))
        q, k, v = qkv.view(B, T, 3, Hg, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, Hg, T, hd)
        factor = self.tau_factor if Hg == self.num_heads else self.tau_factor[getattr(self, f"idx_{group}")]
        tau = getattr(self, f"tau_{group}") * factor
        return q * tau.view(1, -1, 1, 1).to(q.dtype), k, v

    def _attend(self, q, k, v, return_attn: bool):
        if self.fused and not return_attn:
            return F.scaled_dot_product_attention(q, k, v), None
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)).softmax(dim=-1)  # (B, Hg, T, T)
        return attn @ v, attn

    @torch.no_grad()
    def _record(self, groups: list[tuple[torch.Tensor, ...]]) -> None:
        """Accumulate softmax(tau q_cls k^T / sqrt(d)) per head: ``B*H*T*hd`` work, no T x T
        matrix; per group, then put in canonical head order on the small (H, T) sum."""
        sums = []
        for q, k, _ in groups:
            logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0].float(), k.float())
            sums.append(torch.softmax(logits / math.sqrt(self.head_dim), dim=-1).sum(0))  # (Hg, T)
        s = torch.cat(sums).index_select(0, self.inverse) if len(sums) > 1 else sums[0]
        self.cls_attn_sum = s if self.cls_attn_sum is None else self.cls_attn_sum + s
        self.cls_attn_count += groups[0][0].shape[0]

    def reset_readout(self) -> None:
        self.cls_attn_sum = None
        self.cls_attn_count = 0

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        """x: (B, T, D) -> (B, T, D); with ``return_attn`` also the weights (B, H, T, T).

        Each head group runs its own projection, attention and slice of the output projection,
        so no activation is concatenated or re-ordered; in ``detach`` mode the frozen group's
        q/k/v and attention run under ``no_grad`` on the detached input (its output still
        feeds the trainable output projection)."""
        B, T, D = x.shape
        detach = self.freeze_mode == "detach"
        names = [g for g, hs in (("active", self.active_heads), ("frozen", self.frozen_heads)) if hs]
        groups = []
        for g in names:
            if g == "frozen" and detach:
                with torch.no_grad():
                    groups.append(self._group_qkv(x.detach(), g))
            else:
                groups.append(self._group_qkv(x, g))
        if self.record_cls:
            self._record([(q.detach(), k.detach(), v) for q, k, v in groups])
        if len(names) == 1:  # every head in one group: one attention, the whole projection
            with torch.no_grad() if names[0] == "frozen" and detach else contextlib.nullcontext():
                out, attn = self._attend(*groups[0], return_attn)
            if attn is not None and names[0] == "frozen":
                attn = attn.index_select(1, self.inverse)
            out = self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
            return (out, attn) if return_attn else out
        y, attns = self.proj.bias, []
        for g, qkv in zip(names, groups):
            with torch.no_grad() if g == "frozen" and detach else contextlib.nullcontext():
                out, attn = self._attend(*qkv, return_attn)  # (B, Hg, T, hd)
            attns.append(attn)
            w = self.proj.weight.index_select(1, getattr(self, f"cols_{g}"))  # (D, Hg*hd)
            y = y + F.linear(out.transpose(1, 2).reshape(B, T, -1), w)
        attn = torch.cat(attns, 1).index_select(1, self.inverse) if return_attn else None
        return (y, attn) if return_attn else y
