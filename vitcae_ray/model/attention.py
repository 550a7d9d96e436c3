"""Multi-head self-attention with a learnable inverse temperature per head, and heads that
can be frozen for real compute savings at a constant kernel count.

Head h of a layer computes ``softmax(tau_h * factor_h * q_h k_h^T / sqrt(d_h)) v_h``, where
``tau_h`` is learned and ``factor_h`` is a non-learned buffer set by the convergence scheduler
(1 until it acts).

Layout. Heads are kept in *group order*: the active heads first, then the frozen ones. Every
per-head tensor lives in one contiguous store in that order (the fused q/k/v weight as
``(H * 3 * d_h, D)`` rows, head h's q, k and v rows together; its bias; tau; the output
projection's weight input-major, ``(D, D)``, head h's ``d_h`` input rows together). The
trainable parameter of each store is a view of its leading rows (``*_active``), the frozen
rows another view (``*_frozen``, no grad), so the optimizer, DDP and ``load_state_dict``
update the store in place. A layer then runs one q/k/v matmul, one attention call and one
output matmul whatever is frozen; small ``autograd.Function`` s form the weight gradients
of the active rows only. The group order changes (a one-off copy) only when the frozen
set does. The state dict is always the canonical per-head layout (``qkv_weight``
``(3, H, d_h, D)``, ``qkv_bias``, ``tau``, ``proj.weight``, ``proj.bias``), whatever the
grouping.

Freeze modes:
- ``weights``: frozen heads' q/k/v weights, bias and tau get no gradient (the gradient to
  the layer input is exact).
- ``detach``: as well, no gradient flows back through the frozen heads' q/k/v into earlier
  layers; with every head of a layer frozen, its q/k/v and attention run without autograd.
- ``out_proj`` (with either mode): the frozen heads' columns of the output projection are
  frozen too.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

FREEZE_MODES = ("weights", "detach")
# per-head stores: name -> rows per head is (3 * d_h, 3 * d_h, 1, d_h)
GROUPED = ("qkv_weight", "qkv_bias", "tau", "proj_weight")


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype when autocast is on, once, so the backward reuses the
    low-precision copies instead of casting again."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


class _ActiveRowsLinear(torch.autograd.Function):
    """``x W^T + b`` in one matmul over every row of ``W`` (out-features); the leading rows
    are the trainable views ``w_active``/``b_active``. The backward forms the input gradient
    from the leading ``grad_rows`` rows and the weight and bias gradients of the active rows
    only: the kernels of a plain linear layer, with smaller weight-gradient matmuls."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_active, b_active, grad_rows: int):
        x, weight, bias = _autocast_inputs(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.n, ctx.grad_rows = w_active.shape[0], grad_rows
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            r = ctx.grad_rows
            grad_x = grad[..., :r].matmul(weight[:r])
        g = grad.reshape(-1, grad.shape[-1])[:, : ctx.n]
        if ctx.needs_input_grad[3]:
            grad_w = g.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[4]:
            grad_b = g.sum(0)
        return grad_x, None, None, grad_w, grad_b, None


class _ActiveInputsLinear(torch.autograd.Function):
    """``x W + b`` with ``W`` stored input-major, ``(in, out)``; its leading rows (the input
    features of the active heads) are the trainable view ``w_active``. The input gradient
    is full; the weight gradient covers the active rows only."""

    @staticmethod
    def forward(ctx, x, weight_t, bias, w_active):
        x, weight_t, bias_c = _autocast_inputs(x, weight_t, bias)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, weight_t.t(), bias_c)
        ctx.save_for_backward(x, weight_t)
        ctx.n = w_active.shape[0]
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight_t = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight_t.t())
        if ctx.needs_input_grad[3]:
            grad_w = x.reshape(-1, x.shape[-1])[:, : ctx.n].t().mm(g)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, None, grad_b, grad_w


class _ScaledActiveRows(torch.autograd.Function):
    """``tau * factor`` over every head (group order), with the gradient of the leading rows
    sent to ``tau_active``, their trainable view."""

    @staticmethod
    def forward(ctx, tau, factor, tau_active):
        ctx.save_for_backward(factor)
        ctx.n = tau_active.shape[0]
        return tau * factor

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        grad_a = (grad * factor)[: ctx.n] if ctx.needs_input_grad[2] else None
        return None, None, grad_a


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
        self.freeze_mode = "weights"
        weight = torch.empty(3, num_heads, self.head_dim, dim)
        nn.init.trunc_normal_(weight, std=0.02)
        proj = nn.Linear(dim, dim)  # its default init; ViTCAE re-initialises it
        self.register_buffer("tau_factor", torch.ones(num_heads))  # scheduler's factor
        self.proj_bias = nn.Parameter(proj.bias.detach().clone())
        self._stores: dict[str, torch.Tensor] = {}
        self._set_groups(
            {
                "qkv_weight": weight,
                "qkv_bias": torch.zeros(3, num_heads, self.head_dim),
                "tau": torch.ones(num_heads),
                "proj_weight": proj.weight.detach(),
            },
            frozen=[],
            out_proj=False,
        )
        # CLS->token readout, accumulated while ``record_cls`` is on. Plain attributes, not
        # buffers: DDP would broadcast buffers from rank 0 and overwrite each rank's sums.
        self.record_cls = False
        self.cls_attn_sum: torch.Tensor | None = None  # (H, T), summed over the batch

    # --- head groups ---------------------------------------------------------------------
    def _rows_per_head(self, name: str) -> int:
        return {
            "qkv_weight": 3 * self.head_dim,
            "qkv_bias": 3 * self.head_dim,
            "tau": 1,
            "proj_weight": self.head_dim,
        }[name]

    def heads_in(self, name: str) -> list[int]:
        """The heads, in row order, that the trainable ``{name}_active`` view covers."""
        if name == "proj_weight" and not self.out_proj_frozen:
            return self.active_heads + self.frozen_heads
        return list(self.active_heads)

    def _to_group_order(self, name: str, full: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        H = self.num_heads
        if name == "qkv_weight":  # (3, H, hd, D) -> (H * 3 * hd, D)
            return full.permute(1, 0, 2, 3).index_select(0, order).reshape(-1, self.dim)
        if name == "qkv_bias":  # (3, H, hd) -> (H * 3 * hd,)
            return full.permute(1, 0, 2).index_select(0, order).reshape(-1)
        if name == "tau":
            return full.index_select(0, order)
        return full.t().reshape(H, self.head_dim, -1).index_select(0, order).reshape(self.dim, -1)

    def _canonical(self, name: str) -> torch.Tensor:
        """The full tensor of a store in canonical head order (a detached copy)."""
        H, hd, s = self.num_heads, self.head_dim, self._stores[name].detach()
        inv = self.inverse
        if name == "qkv_weight":
            return s.view(H, 3, hd, self.dim).index_select(0, inv).permute(1, 0, 2, 3).contiguous()
        if name == "qkv_bias":
            return s.view(H, 3, hd).index_select(0, inv).permute(1, 0, 2).contiguous()
        if name == "tau":
            return s.index_select(0, inv)
        return s.view(H, hd, -1).index_select(0, inv).reshape(self.dim, -1).t().contiguous()

    def _set_groups(self, full: dict[str, torch.Tensor], frozen: list[int], out_proj: bool) -> None:
        """(Re)build the stores in group order, and their active and frozen views, from the
        canonical tensors ``full``."""
        frozen = sorted(set(frozen))
        active = [h for h in range(self.num_heads) if h not in frozen]
        self.active_heads, self.frozen_heads, self.out_proj_frozen = active, frozen, out_proj
        order = torch.tensor(active + frozen, dtype=torch.long, device=full["tau"].device)
        # group position -> canonical head, and back
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        for name in GROUPED:
            store = self._to_group_order(name, full[name], order).contiguous()
            n = len(self.heads_in(name)) * self._rows_per_head(name)
            # an empty active view must not require grad: DDP would wait for its gradient
            setattr(self, f"{name}_active", nn.Parameter(store[:n], requires_grad=n > 0))
            setattr(self, f"{name}_frozen", nn.Parameter(store[n:], requires_grad=False))
            self._stores[name] = store
        hd3 = 3 * self.head_dim
        # rows of the q/k/v output whose gradient reaches the layer input
        self._grad_rows = (len(active) if self.freeze_mode == "detach" else self.num_heads) * hd3

    def _bind(self) -> None:
        """Make each store one contiguous tensor again, with the parameters as its views
        (after ``.to()``/``.cuda()``, which move each parameter on its own)."""
        for name in GROUPED:
            a, f = getattr(self, f"{name}_active"), getattr(self, f"{name}_frozen")
            store = torch.cat([a.data, f.data])
            a.data, f.data = store[: a.shape[0]], store[a.shape[0] :]
            self._stores[name] = store

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._bind()
        return self

    def __setstate__(self, state):  # copy.deepcopy / pickle: views come back as copies
        super().__setstate__(state)
        self._bind()

    @property
    def qkv_weight(self) -> torch.Tensor:
        """``(3, H, d_h, D)``; head h's weights are ``qkv_weight[:, h]`` (a detached copy)."""
        return self._canonical("qkv_weight")

    @property
    def qkv_bias(self) -> torch.Tensor:
        return self._canonical("qkv_bias")

    @property
    def tau(self) -> torch.Tensor:
        return self._canonical("tau")

    @property
    def proj_weight(self) -> torch.Tensor:
        """The output projection's ``(D_out, D_in)`` weight in canonical order (a copy)."""
        return self._canonical("proj_weight")

    @torch.no_grad()
    def init_proj_(self, init=nn.init.xavier_uniform_) -> None:
        """Re-initialise the output projection: ``init`` on its ``(D_out, D_in)`` weight,
        zero bias."""
        w = torch.empty(self.dim, self.dim, device=self.proj_bias.device)
        init(w)
        self._stores["proj_weight"].copy_(self._to_group_order("proj_weight", w, self.order))
        self.proj_bias.zero_()

    def set_frozen(self, heads: list[int], mode: str = "weights", out_proj: bool = False) -> None:
        """Move ``heads`` to the frozen group (the rest become active). New parameter objects
        replace the grouped ones: rebuild the optimizer and re-wrap DDP afterwards."""
        if mode not in FREEZE_MODES:
            raise ValueError(f"freeze mode must be one of {FREEZE_MODES}, got {mode!r}")
        if any(not 0 <= h < self.num_heads for h in heads):
            raise ValueError(f"head indices {heads} out of range for {self.num_heads} heads")
        self.freeze_mode = mode
        self._set_groups({name: self._canonical(name) for name in GROUPED}, list(heads), out_proj)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in GROUPED:
            destination.pop(prefix + name + "_active")
            destination.pop(prefix + name + "_frozen")
        bias = destination.pop(prefix + "proj_bias")
        for name in ("qkv_weight", "qkv_bias", "tau"):
            destination[prefix + name] = self._canonical(name)
        destination[prefix + "proj.weight"] = self._canonical("proj_weight")
        destination[prefix + "proj.bias"] = bias

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if prefix + "proj.bias" in state_dict:
            state_dict[prefix + "proj_bias"] = state_dict.pop(prefix + "proj.bias")
        keys = {
            "qkv_weight": "qkv_weight",
            "qkv_bias": "qkv_bias",
            "tau": "tau",
            "proj_weight": "proj.weight",
        }
        for name, key in keys.items():
            full = state_dict.pop(prefix + key, None)
            if full is None:
                continue  # reported as missing by the group keys below
            store = self._to_group_order(name, full, self.order.to(full.device))
            n = getattr(self, f"{name}_active").shape[0]
            state_dict[f"{prefix}{name}_active"] = store[:n]
            state_dict[f"{prefix}{name}_frozen"] = store[n:]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # --- forward -------------------------------------------------------------------------
    def effective_tau(self) -> torch.Tensor:
        """``(H,)`` inverse temperatures applied to the logits (canonical head order)."""
        return self._canonical("tau") * self.tau_factor

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Unscaled q, k, v over every head in group order, each (B, H, T, hd)."""
        B, T, _ = x.shape
        qkv = _ActiveRowsLinear.apply(
            x,
            self._stores["qkv_weight"],
            self._stores["qkv_bias"],
            self.qkv_weight_active,
            self.qkv_bias_active,
            self._grad_rows,
        )
        return qkv.view(B, T, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)

    def _attend(self, q, k, v, return_attn: bool):
        if self.fused and not return_attn:
            return F.scaled_dot_product_attention(q, k, v), None
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)).softmax(dim=-1)  # (B, H, T, T)
        return attn @ v, attn

    @torch.no_grad()
    def _record(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Accumulate softmax(tau q_cls k^T / sqrt(d)) per head with the learned tau alone
        (factor 1, so the scheduler's own factor never shows up as drift), in fp32 with
        autocast off: ``B*H*T*hd`` work, no T x T matrix; canonical head order."""
        with torch.autocast(q.device.type, enabled=False):
            q0 = q[:, :, 0].float() * self._stores["tau"].float().view(1, -1, 1)  # (B, H, hd)
            logits = torch.einsum("bhd,bhtd->bht", q0, k.float()) / math.sqrt(self.head_dim)
            s = logits.softmax(dim=-1).sum(0).index_select(0, self.inverse)  # (H, T)
        self.cls_attn_sum = s if self.cls_attn_sum is None else self.cls_attn_sum + s

    def reset_readout(self) -> None:
        self.cls_attn_sum = None

    def readout_count(self) -> int:
        """Samples in the readout: each adds one softmax row (summing to 1) per head. No
        Python counter in ``forward``: under ``torch.compile`` it would recompile per step."""
        return 0 if self.cls_attn_sum is None else round(float(self.cls_attn_sum[0].sum()))

    @torch.no_grad()
    def diagnostic_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights with the learned tau alone (factor 1), fp32, canonical head
        order: (B, H, T, T). What the convergence diagnostics measure."""
        with torch.autocast(x.device.type, enabled=False):
            q, k, _ = self._qkv(x.float())
            q = q * self._stores["tau"].view(1, -1, 1, 1)
            attn = ((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)).softmax(dim=-1)
        return attn.index_select(1, self.inverse)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        """x: (B, T, D) -> (B, T, D); with ``return_attn`` also the weights used (B, H, T, T).

        One q/k/v matmul, one attention call and one output matmul over every head, whatever
        is frozen. In ``detach`` mode with every head frozen, q/k/v and attention run under
        ``no_grad`` (their output still feeds the output projection)."""
        B, T, D = x.shape
        cut = self.freeze_mode == "detach" and not self.active_heads
        with torch.no_grad() if cut else contextlib.nullcontext():
            q, k, v = self._qkv(x)
            tau = _ScaledActiveRows.apply(
                self._stores["tau"], self.tau_factor.index_select(0, self.order), self.tau_active
            )
            if self.record_cls:
                self._record(q, k)
            out, attn = self._attend(q * tau.view(1, -1, 1, 1).to(q.dtype), k, v, return_attn)
        y = _ActiveInputsLinear.apply(
            out.transpose(1, 2).reshape(B, T, D),
            self._stores["proj_weight"],
            self.proj_bias,
            self.proj_weight_active,
        )
        if return_attn:
            return y, attn.index_select(1, self.inverse)
        return y
