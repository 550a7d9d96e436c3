"""Applying head-convergence decisions to a model and its optimizer, and measuring what
freezing saves.

Freezing sets ``requires_grad=False`` on the frozen heads' own parameters (each head has
its own, see ``model/attention.py``) and, for a frozen prefix of whole encoder blocks, on
those blocks and the embedding below them (``ViTCAE.set_frozen_blocks``). The optimizer is
rebuilt around the parameters that still train, each keeping its AdamW state (the same
parameter objects), and DDP is re-wrapped on every rank, so the frozen gradients leave the
all-reduce. :func:`apply_decision` does all of it in one call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .config import Config
from .convergence import HeadDecision
from .engine import decode_prior
from .losses import curriculum, vitcae_loss
from .model import ViTCAE
from .optim import build_lr_schedule, build_optimizer
from .prefix_cache import PrefixCache


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter(display: bool = False) -> FlopCounterMode:
    """The project's FLOP counter: torch's ``FlopCounterMode`` plus the formulas it lacks for
    CPU attention (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward,
    counted as 0 by torch), with the same formulas torch uses for the CUDA flash kernels:
    the forward's two matmuls, and the backward's four plus the recomputed scores."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=display,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
        },
    )


def frozen_heads(model: ViTCAE) -> list[list[int]]:
    """Per encoder layer, the frozen head indices."""
    return [list(a.frozen_heads) for a in model.attention_layers]


def set_tau_factors(model: ViTCAE, factors: Sequence[Sequence[float]]) -> None:
    """Set the scheduler's non-learned factor of every encoder head, ``(L, H)``."""
    for attn, row in zip(model.attention_layers, factors):
        attn.tau_factor.copy_(torch.tensor(row, dtype=attn.tau_factor.dtype))


def apply_frozen(model: ViTCAE, frozen: Sequence[Sequence[int]], frozen_blocks: int = 0) -> bool:
    """Freeze ``frozen[l]`` heads of each encoder layer (the others train) and the bottom
    ``frozen_blocks`` encoder blocks whole. Parameters keep their identity; only their
    ``requires_grad`` changes. Returns whether anything changed."""
    changed = frozen_blocks != model.frozen_blocks
    for attn, heads in zip(model.attention_layers, frozen):
        heads = sorted(heads)
        if heads != attn.frozen_heads:
            attn.set_frozen(heads)
            changed = True
    model.set_frozen_blocks(frozen_blocks)
    return changed


def rebuild_optimizer(
    model: ViTCAE, optimizer: torch.optim.Optimizer, lr_sched, cfg: Config, steps_per_epoch: int
):
    """A new AdamW over the model's trainable parameters, each keeping its state, with the
    same learning rates and an LR schedule continuing at the same step."""
    old_state = {
        id(p): optimizer.state[p] for g in optimizer.param_groups for p in g["params"] if p in optimizer.state
    }
    new_opt = build_optimizer(model, cfg.optim)
    for g in new_opt.param_groups:
        for p in g["params"]:
            if id(p) in old_state:
                new_opt.state[p] = old_state[id(p)]
    new_sched = build_lr_schedule(new_opt, cfg.optim, cfg.train.epochs, steps_per_epoch)
    new_sched.load_state_dict(lr_sched.state_dict())
    for g_new, g_old in zip(new_opt.param_groups, optimizer.param_groups):
        g_new["lr"] = g_old["lr"]  # the constructor's initial step reset it
    return new_opt, new_sched


def grad_elements(model: torch.nn.Module) -> int:
    """Gradient elements DDP all-reduces per step: every parameter that requires grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mmd_active(epoch: int, cfg: Config) -> bool:
    """Whether the loss at ``epoch`` computes the MMD terms (not during the KL warm-up)."""
    return curriculum(epoch, cfg.loss)[1] > 0


def train_step_flops(
    model: ViTCAE,
    x: torch.Tensor,
    cfg: Config,
    epoch: int,
    readout: bool = False,
    cached: bool = False,
    kept: int | None = None,
) -> int:
    """Forward + backward FLOPs of one training step on ``x`` with the loss of ``epoch``
    (optimizer excluded), as executed: weight gradients skipped for frozen heads are not
    counted. ``readout`` includes the CLS attention readout the convergence scheduler runs
    in every training step. ``cached``: the frozen prefix's output comes from the prefix
    cache, so its forward is not counted (:func:`prefix_image_flops` counts a cache fill).
    ``kept``: a masked step whose encoder sees that many patches (no readout, no cache, as
    masked steps run). Call it on the model without its DDP wrapper, before wrapping: the
    backward would fire DDP's hooks."""
    was_training = model.training
    saved = [(a.record_cls, a.cls_attn_sum, a.cls_attn_odd) for a in model.attention_layers]
    model.train()
    model.set_readout(readout and kept is None)
    prefix = keep = None
    if kept is not None:
        keep = torch.arange(kept, device=x.device).expand(len(x), kept)
    elif cached:
        prefix, rows = model.forward_prefix(x, with_rows=True)
    with flop_counter() as counter:
        if prefix is not None:
            model.record_prefix_readout(rows)
        out = model(x, decode_prior=decode_prior(cfg), prefix=prefix, keep=keep)
        vitcae_loss(out, x, epoch, cfg.loss)["loss"].backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    for a, (on, total, odd) in zip(model.attention_layers, saved):
        a.record_cls, a.cls_attn_sum, a.cls_attn_odd = on, total, odd
    return int(counter.get_total_flops())


def prefix_image_flops(model: ViTCAE, x: torch.Tensor) -> float:
    """FLOPs of the frozen prefix's forward (its readout rows included) per image of ``x``:
    what filling one image's entry of the prefix cache costs."""
    with flop_counter() as counter:
        model.forward_prefix(x, with_rows=True)
    return counter.get_total_flops() / len(x)


def step_flops_by_phase(
    model: ViTCAE, x: torch.Tensor, cfg: Config, readout: bool = True, cached: bool = False
) -> dict[bool, int]:
    """One training step's FLOPs in each loss phase, ``{mmd_active: flops}`` (the phases
    differ by the MMD terms); by default with the readout, as training runs."""
    epochs = {mmd_active(e, cfg): e for e in (0, cfg.loss.kl_warmup_epochs)}
    return {phase: train_step_flops(model, x, cfg, e, readout, cached) for phase, e in epochs.items()}


def masked_step_flops_by_phase(model: ViTCAE, x: torch.Tensor, cfg: Config) -> dict[bool, np.ndarray]:
    """A masked step's FLOPs in each loss phase as a polynomial in the encoder's tokens
    T = 1 + kept patches, ``{mmd_active: (a, b, c)}`` with FLOPs = a + b T + c T^2. Exact:
    the encoder's matmuls are linear in T and its attention quadratic, and nothing else
    depends on T (the patch embedding runs on the whole image, the prior, decoder and loss
    on every patch), so three counts determine it."""
    n = model.num_patches
    # a masked step keeps 1..n-1 patches; with fewer than 3 such counts, a lower degree
    # through all of them is just as exact
    kept = np.array(sorted({1, max(1, n // 2), max(1, n - 1)}))
    tokens = 1.0 + kept
    epochs = {mmd_active(e, cfg): e for e in (0, cfg.loss.kl_warmup_epochs)}
    out = {}
    for phase, e in epochs.items():
        counts = [train_step_flops(model, x, cfg, e, kept=int(k)) for k in kept]
        coef = np.polyfit(tokens, counts, len(kept) - 1)[::-1]
        out[phase] = np.pad(coef, (0, 3 - len(coef)))
    return out


def masked_flops(coef: np.ndarray, steps: int, tokens: float, tokens_sq: float) -> int:
    """FLOPs of ``steps`` masked steps whose encoder token counts sum to ``tokens`` and their
    squares to ``tokens_sq`` (:func:`masked_step_flops_by_phase`'s polynomial)."""
    return round(coef[0] * steps + coef[1] * tokens + coef[2] * tokens_sq)


def unfrozen_step_flops(model: ViTCAE, x: torch.Tensor, cfg: Config) -> dict[bool, int]:
    """The baseline: :func:`step_flops_by_phase` for a copy of ``model`` with nothing frozen,
    the readout on: the same run without freezing, which runs the scheduler all the same."""
    return step_flops_by_phase(_unfrozen(model), x, cfg, readout=True)


def _unfrozen(model: ViTCAE) -> ViTCAE:
    baseline = copy.deepcopy(model)
    apply_frozen(baseline, [[] for _ in baseline.attention_layers], 0)
    return baseline


def probe_flops(model: ViTCAE, probe: torch.Tensor) -> int:
    """FLOPs of the epoch's probe pass (attention maps and block outputs; its cost does not
    depend on what is frozen)."""
    if not len(probe):
        return 0
    with flop_counter() as counter:
        model.probe_pass(probe)
    return int(counter.get_total_flops())


class FlopAccount:
    """What training costs in FLOPs, counted once on the unwrapped model (FLOPs do not depend
    on the data): one step in each loss phase as it runs now (``step``, recounted when the
    frozen set changes; with the prefix cache serving, without the prefix's forward, which
    ``prefix_image`` counts per image the cache fills), the same step with nothing frozen
    (``unfrozen``: the run without freezing, readout included, the baseline), and the
    epoch's probe pass (in both, unless the whole encoder is frozen and the epoch reused it)."""

    def __init__(
        self,
        model: ViTCAE,
        x: torch.Tensor,
        cfg: Config,
        probe: torch.Tensor,
        cache: PrefixCache | None = None,
    ) -> None:
        self.x, self.cfg, self.cache = x, cfg, cache
        self.masking = cfg.loss.mask_prob > 0
        self.unfrozen = unfrozen_step_flops(model, x, cfg)
        self.unfrozen_masked = masked_step_flops_by_phase(_unfrozen(model), x, cfg) if self.masking else None
        self.probe = probe_flops(model, probe)
        self.recount(model)

    def recount(self, model: ViTCAE) -> None:
        cached = self.cache is not None and self.cache.serves(model)
        self.step = step_flops_by_phase(model, self.x, self.cfg, cached=cached)
        self.masked = masked_step_flops_by_phase(model, self.x, self.cfg) if self.masking else None
        self.prefix_image = prefix_image_flops(model, self.x) if cached else 0.0

    def epoch_metrics(
        self,
        epoch: int,
        steps: int,
        history: list[dict[str, Any]],
        prefix_images: int = 0,
        masked: tuple[int, float, float] = (0, 0.0, 0.0),
        probe_ran: bool = True,
    ) -> dict[str, float]:
        """``flops/*`` of an epoch of ``steps`` steps trained with the current frozen set (call
        before the epoch's decision changes it), ``prefix_images`` of them filling the prefix
        cache; ``masked``: (masked steps among them, the sum of their encoder token counts,
        the sum of the squares; :func:`vitcae_ray.engine.train_one_epoch` returns them);
        ``probe_ran`` False: the epoch reused the probe pass of an earlier one (the whole
        encoder frozen), which the run without freezing runs every epoch; cumulative over
        ``history`` (earlier epochs)."""
        phase = mmd_active(epoch, self.cfg)
        trained = self.step[phase]
        n_masked = masked[0]
        probe = self.probe if probe_ran else 0
        spent = (steps - n_masked) * trained + round(prefix_images * self.prefix_image) + probe
        unfrozen = (steps - n_masked) * self.unfrozen[phase] + self.probe
        if n_masked:
            spent += masked_flops(self.masked[phase], *masked)
            unfrozen += masked_flops(self.unfrozen_masked[phase], *masked)
        seen = [m for m in history if "flops/epoch_unfrozen" in m]
        total_spent = spent + sum(m["flops/epoch"] for m in seen)
        total_unfrozen = unfrozen + sum(m["flops/epoch_unfrozen"] for m in seen)
        return {
            "flops/train_step": trained,
            "flops/epoch": spent,
            "flops/epoch_unfrozen": unfrozen,
            "flops/saved_frac": 1.0 - spent / unfrozen,
            "flops/cumulative_saved_frac": 1.0 - total_spent / total_unfrozen,
        }


@dataclass
class Trainee:
    """The model and what a change of its frozen set replaces: the optimizer and LR schedule
    (rebuilt around the surviving parameters), the wrapped model (``wrap``: DDP, and
    ``torch.compile`` with ``train.compile``) and the FLOP count of a step."""

    model: ViTCAE
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    wrap: Callable[[ViTCAE], nn.Module]
    flops: FlopAccount
    wrapped: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.wrapped is None:
            self.wrapped = self.wrap(self.model)


def apply_decision(
    trainee: Trainee, decision: HeadDecision, cfg: Config, steps_per_epoch: int, world: int
) -> float:
    """Apply an epoch's decision, on every rank at the same point: the temperature factors,
    then (if the frozen set changed) the frozen heads and blocks, the optimizer rebuild, the
    FLOP recount and the re-wrap. Returns :func:`rank_spread`, measured before the re-wrap
    (DDP's construction copies rank 0's weights to every rank, which would hide a
    difference)."""
    model = trainee.model
    set_tau_factors(model, decision.tau_factor)
    changed = (decision.frozen_heads, decision.frozen_blocks) != (frozen_heads(model), model.frozen_blocks)
    if changed:
        trainee.wrapped = None  # DDP's reducer holds the old set of trainable parameters
        apply_frozen(model, decision.frozen_heads, decision.frozen_blocks)
        trainee.optimizer, trainee.lr_schedule = rebuild_optimizer(
            model, trainee.optimizer, trainee.lr_schedule, cfg, steps_per_epoch
        )
    spread = rank_spread(model, world)
    if changed:
        trainee.flops.recount(model)
        trainee.wrapped = trainee.wrap(model)
    return spread


def rank_spread(model: ViTCAE, world: int) -> float:
    """Largest difference across ranks of (a parameter checksum, the frozen-head signature):
    0 when every rank holds the same weights and frozen set, as DDP requires."""
    if world == 1:
        return 0.0
    import torch.distributed as dist

    with torch.no_grad():
        checksum = sum(p.double().sum() for p in model.parameters()).item()
    # hashes of int tuples are the same in every process
    signature = float(hash((model.frozen_blocks, *map(tuple, frozen_heads(model)))) % 2**52)
    local = torch.tensor([checksum, signature], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        local = local.cuda()
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)
    return float((stacked.max(0).values - stacked.min(0).values).max())
