"""Multi-head self-attention with a learnable inverse temperature per head.

Head h of a layer computes ``softmax(tau_h * factor_h * q_h k_h^T / sqrt(d_h)) v_h``, where
``tau_h`` is learned and ``factor_h`` is a non-learned buffer set by the convergence scheduler
(1 until it acts). The q/k/v weights are stored per head, ``(3, H, d_h, D)``, so a head's
weights are addressable as ``qkv_weight[:, h]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
        self.qkv_weight = nn.Parameter(torch.empty(3, num_heads, self.head_dim, dim))
        self.qkv_bias = nn.Parameter(torch.zeros(3, num_heads, self.head_dim))
        self.tau = nn.Parameter(torch.ones(num_heads))  # learned inverse temperature
        self.register_buffer("tau_factor", torch.ones(num_heads))  # scheduler's factor
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.qkv_weight, std=0.02)
        # CLS->token readout, accumulated while ``record_cls`` is on. Plain attributes, not
        # buffers: DDP would broadcast buffers from rank 0 and overwrite each rank's sums.
        self.record_cls = False
        self.cls_attn_sum: torch.Tensor | None = None  # (H, T), summed over the batch
        self.cls_attn_count = 0

    def effective_tau(self) -> torch.Tensor:
        """``(H,)`` inverse temperatures applied to the logits."""
        return self.tau * self.tau_factor

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        w = self.qkv_weight.reshape(-1, D)  # (3*H*hd, D)
        qkv = F.linear(x, w, self.qkv_bias.reshape(-1))  # (B, T, 3*H*hd)
        qkv = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (B, H, T, hd)

    def _scaled_q(self, q: torch.Tensor) -> torch.Tensor:
        return q * self.effective_tau().view(1, -1, 1, 1).to(q.dtype)  # (B, H, T, hd)

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
        q, k, v = self._qkv(x)
        q = self._scaled_q(q)
        if self.record_cls:
            self._record(q.detach(), k.detach())
        if self.fused and not return_attn:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
            attn = None
        else:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
            attn = logits.softmax(dim=-1)
            out = attn @ v  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, D)
        out = self.proj(out)
        return (out, attn) if return_attn else out
