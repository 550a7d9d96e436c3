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
        for name, full in (("qkv_weight", weight), ("qkv_bias", bias)):
            setattr(self, f"{name}_active", nn.Parameter(full[:, ia].clone()))
            setattr(self, f"{name}_frozen", nn.Parameter(full[:, if_].clone(), requires_grad=False))
        self.tau_active = nn.Parameter(tau[ia].clone())
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
    def _record(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Accumulate softmax(tau q_cls k^T / sqrt(d)) per head: ``B*H*T*hd`` work, no T x T matrix."""
        logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0].float(), k.float())
        probs = torch.softmax(logits / math.sqrt(self.head_dim), dim=-1)  # (B, H, T)
        s = probs.sum(0)
        self.cls_attn_sum = s if self.cls_attn_sum is None else self.cls_attn_sum + s
        self.cls_attn_count += q.shape[0]

    def reset_readout(self) -> None:
        self.cls_attn_sum = None
        self.cls_attn_count = 0

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        """x: (B, T, D) -> (B, T, D); with ``return_attn`` also the weights (B, H, T, T)."""
        B, T, D = x.shape
        detach = self.freeze_mode == "detach" and self.frozen_heads
        groups = []
        if self.active_heads:
            groups.append(self._group_qkv(x, "active"))
        if self.frozen_heads:
            if detach:
                with torch.no_grad():
                    groups.append(self._group_qkv(x.detach(), "frozen"))
            else:
                groups.append(self._group_qkv(x, "frozen"))
        if self.record_cls:
            q = torch.cat([g[0] for g in groups], 1).index_select(1, self.inverse)
            k = torch.cat([g[1] for g in groups], 1).index_select(1, self.inverse)
            self._record(q.detach(), k.detach())
        if detach:
            # two attention calls: the frozen heads' one runs outside autograd
            out_a, attn_a = self._attend(*groups[0], return_attn) if self.active_heads else (None, None)
            with torch.no_grad():
                out_f, attn_f = self._attend(*groups[-1], return_attn)
            outs = [o for o in (out_a, out_f) if o is not None]
            attns = [a for a in (attn_a, attn_f) if a is not None]
            out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
            attn = (torch.cat(attns, 1) if len(attns) > 1 else attns[0]) if return_attn else None
        else:
            q, k, v = (torch.cat(t, 1) if len(groups) > 1 else t[0] for t in zip(*groups))
            out, attn = self._attend(q, k, v, return_attn)
        if self.frozen_heads:  # back to canonical head order
            out = out.index_select(1, self.inverse)
            attn = attn.index_select(1, self.inverse) if attn is not None else None
        out = self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        return (out, attn) if return_attn else out
