"""Multi-head self-attention with a learnable inverse temperature per head, and heads that
can be frozen.

Head h of a layer computes ``softmax(tau_h * factor_h * q_h k_h^T / sqrt(d_h)) v_h``, where
``tau_h`` is learned and ``factor_h`` is a non-learned buffer set by the convergence scheduler
(1 until it acts).

Each head's q/k/v projection and tau are one :class:`HeadProjection` (plain parameters), so
the module is an ordinary ``nn.Module``: its state dict is the natural one (``heads.{h}.weight``,
``heads.{h}.bias``, ``heads.{h}.tau``, ``proj.weight``, ``proj.bias``, ``tau_factor``), and
``load_state_dict(assign=True)``, ``torch.func.functional_call``, ``.to()``, ``deepcopy``,
FSDP, double backward and ``torch.compile`` work as for any module.

Freezing (:meth:`Attention.set_frozen`) turns off ``requires_grad`` on the frozen heads'
parameters (never replacing them: the optimizer holds parameters by identity) and runs those
heads under ``no_grad`` from the detached input: their forward is unchanged, their backward is
gone (no attention backward, no q/k/v weight gradients, no gradient through them into the
input). The active heads and the frozen heads each run one q/k/v matmul and one attention call;
the output projection stays trainable.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn


class HeadProjection(nn.Module):
    """One head's q/k/v projection and learned inverse temperature.

    ``weight`` ``(3 * d_h, D)``: the q rows, then k, then v; ``bias`` ``(3 * d_h,)``; ``tau``
    a scalar (init 1).
    """

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3 * head_dim, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(3 * head_dim))
        self.tau = nn.Parameter(torch.tensor(1.0))


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
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        self.heads = nn.ModuleList(HeadProjection(dim, self.head_dim) for _ in range(num_heads))
        self.proj = nn.Linear(dim, dim)  # its default init; ViTCAE re-initialises it
        self.register_buffer("tau_factor", torch.ones(num_heads))  # scheduler's factor
        self.frozen_heads: list[int] = []
        self.active_heads: list[int] = list(range(num_heads))
        # CLS->token readout, accumulated while ``record_cls`` is on. Plain attributes, not
        # buffers: DDP would broadcast buffers from rank 0 and overwrite each rank's sums.
        self.record_cls = False
        self.cls_attn_sum: torch.Tensor | None = None  # (H, T), summed over the batch
        self.cls_attn_odd: torch.Tensor | None = None  # (H, T), over its odd samples only
        # With a list here the readout rows of each forward go to it instead of the sums
        # (``ViTCAE.forward_prefix``: the prefix cache keeps them per image).
        self.rows_sink: list[torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, fused={self.fused}, frozen={self.frozen_heads}"

    # --- freezing ------------------------------------------------------------------------
    def set_frozen(self, heads: list[int]) -> None:
        """Freeze ``heads`` (canonical indices) and make every other head trainable: flips
        ``requires_grad`` on the heads' own parameters, never replaces them. ``proj`` stays
        trainable. Rebuild the optimizer (and re-wrap DDP) around the trainable parameters."""
        heads, frozen = list(heads), []
        for h in heads:
            if isinstance(h, bool):
                raise ValueError(f"head index must be an int, got {h!r}")
            try:
                h = operator.index(h)
            except TypeError:
                raise ValueError(f"head index must be an int, got {h!r}") from None
            if not 0 <= h < self.num_heads:
                raise ValueError(f"head index {h} out of range for {self.num_heads} heads")
            if h in frozen:
                raise ValueError(f"head index {h} given twice in {heads}")
            frozen.append(h)
        frozen.sort()
        for h, head in enumerate(self.heads):
            head.requires_grad_(h not in frozen)
        self.frozen_heads = frozen
        self.active_heads = [h for h in range(self.num_heads) if h not in frozen]

    # --- canonical views -----------------------------------------------------------------
    @property
    def qkv_weight(self) -> torch.Tensor:
        """``(3, H, d_h, D)``; head h's weights are ``qkv_weight[:, h]`` (a detached copy)."""
        w = torch.stack([head.weight.detach() for head in self.heads])
        return w.view(self.num_heads, 3, self.head_dim, self.dim).transpose(0, 1).contiguous()

    @property
    def qkv_bias(self) -> torch.Tensor:
        """``(3, H, d_h)`` (a detached copy)."""
        b = torch.stack([head.bias.detach() for head in self.heads])
        return b.view(self.num_heads, 3, self.head_dim).transpose(0, 1).contiguous()

    @property
    def tau(self) -> torch.Tensor:
        """The learned inverse temperatures, ``(H,)`` (a detached copy)."""
        return torch.stack([head.tau.detach() for head in self.heads])

    @property
    def proj_weight(self) -> torch.Tensor:
        """The output projection's ``(D_out, D_in)`` weight (a detached copy)."""
        return self.proj.weight.detach().clone()

    @torch.no_grad()
    def init_proj_(self, init=nn.init.xavier_uniform_) -> None:
        """Re-initialise the output projection: ``init`` on its weight, zero bias."""
        init(self.proj.weight)
        self.proj.bias.zero_()

    def effective_tau(self) -> torch.Tensor:
        """``(H,)`` inverse temperatures applied to the logits (canonical head order)."""
        return self.tau * self.tau_factor

    # --- forward -------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor, heads: list[int]) -> tuple[torch.Tensor, ...]:
        """Unscaled q, k, v of ``heads`` (in that order) from one matmul, each (B, G, T, d_h)."""
        B, T, _ = x.shape
        weight = torch.cat([self.heads[h].weight for h in heads])
        bias = torch.cat([self.heads[h].bias for h in heads])
        qkv = F.linear(x, weight, bias)  # (B, T, G * 3 * d_h)
        return qkv.view(B, T, len(heads), 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)

    def _learned_tau(self, heads: list[int]) -> torch.Tensor:
        return torch.stack([self.heads[h].tau for h in heads])

    def _group(self, x: torch.Tensor, heads: list[int], return_attn: bool):
        """One group of heads: (out (B, G, T, d_h), weights (B, G, T, T) or None, CLS readout
        rows (B, G, T) or None)."""
        q, k, v = self._qkv(x, heads)
        rows = self._cls_rows(q, k, heads) if self.record_cls or self.rows_sink is not None else None
        if len(heads) == self.num_heads:
            factor = self.tau_factor
        else:
            factor = torch.stack([self.tau_factor[h] for h in heads])
        scale = (self._learned_tau(heads) * factor).view(1, -1, 1, 1).to(q.dtype)
        q = q * scale
        if self.fused and not return_attn:
            return F.scaled_dot_product_attention(q, k, v), None, rows
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)).softmax(dim=-1)
        return attn @ v, attn, rows

    def _canonical(self, active: torch.Tensor, frozen: torch.Tensor, dim: int) -> torch.Tensor:
        """Stack the heads of the active and frozen groups (head dim 1) in canonical order
        along ``dim`` of the result."""
        parts = dict(zip(self.active_heads, active.unbind(1)))
        parts.update(zip(self.frozen_heads, frozen.unbind(1)))
        return torch.stack([parts[h] for h in range(self.num_heads)], dim)

    @torch.no_grad()
    def _cls_rows(self, q: torch.Tensor, k: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """softmax(tau q_cls k^T / sqrt(d)) per head, (B, G, T), with the learned tau alone
        (factor 1, so the scheduler's own factor never shows up as drift), in fp32 with
        autocast off: ``B*G*T*d_h`` work, no T x T matrix."""
        with torch.autocast(q.device.type, enabled=False):
            tau = self._learned_tau(heads).float().view(1, -1, 1)
            q0 = q[:, :, 0].float() * tau  # (B, G, d_h)
            logits = torch.einsum("bgd,bgtd->bgt", q0, k.float()) / math.sqrt(self.head_dim)
            return logits.softmax(dim=-1)

    def record_rows(self, rows: torch.Tensor) -> None:
        """Add the readout rows (B, H, T) to the sums: every sample, and the odd ones."""
        s, odd = rows.sum(0), rows[1::2].sum(0)
        self.cls_attn_sum = s if self.cls_attn_sum is None else self.cls_attn_sum + s
        self.cls_attn_odd = odd if self.cls_attn_odd is None else self.cls_attn_odd + odd

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        """x: (B, T, D) -> (B, T, D); with ``return_attn`` also the weights used (B, H, T, T),
        canonical head order.

        The active heads run with autograd, the frozen ones under ``no_grad`` from
        ``x.detach()``: one q/k/v matmul and one attention call per group."""
        B, T, D = x.shape
        active = frozen = None
        if self.active_heads:
            active = self._group(x, self.active_heads, return_attn)
        if self.frozen_heads:
            with torch.no_grad():
                frozen = self._group(x.detach(), self.frozen_heads, return_attn)
        if active is None or frozen is None:  # one group: already in canonical order
            out, attn, rows = active if frozen is None else frozen
            out = out.transpose(1, 2).reshape(B, T, D)
        else:
            out = self._canonical(active[0], frozen[0], dim=2).reshape(B, T, D)
            attn = self._canonical(active[1], frozen[1], dim=1) if return_attn else None
            rows = self._canonical(active[2], frozen[2], dim=1) if active[2] is not None else None
        if self.rows_sink is not None:
            self.rows_sink.append(rows)
        elif rows is not None:
            self.record_rows(rows)
        y = self.proj(out)
        return (y, attn) if return_attn else y

    # --- readout and diagnostics ---------------------------------------------------------
    def reset_readout(self) -> None:
        self.cls_attn_sum = None
        self.cls_attn_odd = None

    def readout_count(self) -> int:
        """Samples in the readout: each adds one softmax row (summing to 1) per head. No
        Python counter in ``forward``: under ``torch.compile`` it would recompile per step."""
        return 0 if self.cls_attn_sum is None else round(float(self.cls_attn_sum[0].sum()))

    @torch.no_grad()
    def diagnostic_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights with the learned tau alone (factor 1), fp32, canonical head
        order: (B, H, T, T). What the convergence diagnostics measure."""
        B, T, _ = x.shape
        H = self.num_heads
        with torch.autocast(x.device.type, enabled=False):
            weight = torch.cat([head.weight for head in self.heads]).float()
            bias = torch.cat([head.bias for head in self.heads]).float()
            qkv = F.linear(x.float(), weight, bias).view(B, T, H, 3, self.head_dim)
            q, k, _ = qkv.permute(3, 0, 2, 1, 4).unbind(0)
            q = q * self._learned_tau(list(range(H))).float().view(1, -1, 1, 1)
            return ((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)).softmax(dim=-1)
