"""One epoch of training or evaluation, seeding, and the epoch's head statistics. No Ray here:
the launcher passes the loader, the (possibly DDP-wrapped) model and the optimizer; metrics are
summed across ranks with torch.distributed when it is initialised."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import Config, LossConfig
from .likelihood import elbo
from .losses import vitcae_loss
from .model import ViTCAE, build_model
from .prefix_cache import PrefixCache

TERMS = ("loss", "elbo", "recon", "prior_recon", "kl", "kl_cls", "kl_patch", "mmd", "discrepancy", "mse")


class NonFiniteLossError(RuntimeError):
    """The loss or its gradient stopped being finite at (epoch, step), with no skip left."""

    def __init__(self, epoch: int, step: int, bound: int = 0, every: bool = False) -> None:
        skipped = (
            f" after {bound} skipped non-finite steps (train.max_nonfinite_steps={bound})" if bound else ""
        )
        if every:
            skipped = ", and at every step of the epoch before it (nothing trained)"
        super().__init__(
            f"non-finite loss at epoch {epoch} step {step}{skipped}; the last good checkpoint "
            "is kept: lower optim.lr or optim.grad_clip and rerun, or let "
            "train.max_nonfinite_steps skip a few such steps"
        )
        self.epoch, self.step = epoch, step


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Every RNG is a function of (seed, epoch, rank), so a resumed epoch replays exactly."""
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def init_model(cfg: Config, channels: int, device: torch.device) -> ViTCAE:
    """The model's initial weights, a function of ``train.seed`` alone: every rank and every
    restart before the first checkpoint builds the same model."""
    seed_everything(cfg.train.seed, -1, 0)
    return build_model(cfg.model, cfg.data.image_size, channels).to(device)


def set_epoch(loader, epoch: int) -> None:
    """Tell the loader (or its distributed sampler) the epoch, for its per-epoch shuffle."""
    for obj in (loader, getattr(loader, "sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def wrap_model(model: nn.Module, prepare, compile_model: bool = False) -> nn.Module:
    """``prepare(model)`` (the launcher's DDP wrapper, e.g. Ray Train's ``prepare_model``) and,
    with ``train.compile``, ``torch.compile`` on top. Called at the start and after every
    change of the frozen set; compiled graphs of the previous set are dropped, so the model
    recompiles only when its frozen set changes."""
    wrapped = prepare(model)
    if compile_model:
        torch._dynamo.reset()
        wrapped = torch.compile(wrapped)
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def decode_prior(cfg: Config) -> bool:
    """Whether the loss needs x decoded from the prior alone (a second decoder pass); never for
    the ViT-VAE, which has no z_cls to decode a prior from."""
    return cfg.loss.prior_recon_weight > 0 and cfg.model.variant == "vitcae"


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return sums


@dataclass
class HeadStatistics:
    """An epoch's statistics for the convergence controller, summed over every rank; the
    arguments of ``HeadController.update`` after the epoch, in :meth:`args`' order."""

    cls: torch.Tensor  # (L, H, N) mean CLS->patch attention over every training image
    patch: torch.Tensor  # (L, H, N, N) mean patch->patch attention on the probe images
    cls_halves: torch.Tensor  # (2, L, H, N) the readout over the even- and odd-indexed samples
    block_maps: torch.Tensor | None  # (3, L, 1 + N, D) block outputs on the probe: all, even, odd
    # half; None when a half of the probe is empty (no floor to measure)
    probe_ran: bool = True  # False: the probe pass's result was reused (the whole encoder frozen)

    def args(self) -> tuple:
        return tuple(
            None if t is None else t.numpy() for t in (self.cls, self.patch, self.cls_halves, self.block_maps)
        )


@torch.no_grad()
def head_statistics(
    model, probe: torch.Tensor, probe_odd: torch.Tensor, memo: dict[str, Any] | None = None
) -> HeadStatistics:
    """The epoch's statistics for the convergence controller, summed over every rank:

    - mean CLS->patch attention per (layer, head), (L, H, N): the readout accumulated during
      the epoch's training steps, over every training image, renormalised over the patches,
      and the same over the even- and the odd-indexed samples of each batch (the noise floor);
    - on this rank's share of the fixed probe images (``probe_odd`` marks the probe's odd
      half): the mean patch->patch attention per (layer, head), (L, H, N, N), for kappa, and
      each encoder block's mean output over the whole probe and over each half.
    Call after a training epoch run with ``model.set_readout(True)``.

    With ``memo`` (a dict kept across epochs) and the whole encoder frozen, the probe pass runs
    once and later epochs reuse its result: the probe images, the frozen weights and the
    frozen heads' temperature factors are fixed, so it would compute the same maps again.
    """
    cls_sum, _ = model.cls_attention()  # (L, H, 1 + N); means come from renormalising sums
    cls_odd = model.cls_attention_odd()
    L, H, T = cls_sum.shape
    fixed = memo is not None and model.frozen_blocks == len(model.blocks)
    ran = True
    if fixed and "probe_pass" in memo:
        maps, blocks = memo["probe_pass"]
        ran = False
    elif len(probe):
        maps, blocks = model.probe_pass(probe, probe_odd)
        if fixed:
            memo["probe_pass"] = (maps, blocks)
    else:
        maps = cls_sum.new_zeros(L, H, T, T)
        blocks = cls_sum.new_zeros(2, L, T, model.cfg.embed_dim)
    counts = torch.stack([(~probe_odd).sum(), probe_odd.sum()]).to(cls_sum.device)
    parts = [cls_sum, cls_odd, maps, blocks, counts]
    flat = _reduce_sums(torch.cat([p.double().flatten() for p in parts]))
    cls_sum, cls_odd, maps, blocks, counts = (
        v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in parts]), parts)
    )
    halves = torch.stack([cls_sum - cls_odd, cls_odd])[..., 1:]
    cls, patch = cls_sum[:, :, 1:], maps[:, :, 1:, 1:]
    means = torch.cat([blocks.sum(0, keepdim=True), blocks]) / torch.cat(
        [counts.sum(0, True), counts]
    ).clamp_min(1).view(3, 1, 1, 1)
    return HeadStatistics(
        (cls / cls.sum(-1, keepdim=True)).float().cpu(),
        (patch / patch.sum(-1, keepdim=True)).float().cpu(),
        halves.float().cpu(),
        means.float().cpu() if bool((counts > 0).all()) else None,
        ran and len(probe) > 0,
    )


def _as_metrics(prefix: str, sums: torch.Tensor) -> dict[str, float]:
    """sums: (len(TERMS) + 1,) of sample-weighted sums and the sample count."""
    vals = (sums[:-1] / sums[-1].clamp_min(1)).tolist()
    out = {f"{prefix}/{k}": v for k, v in zip(TERMS, vals)}
    out[f"{prefix}/samples"] = int(sums[-1].item())
    return out


def masked_keep(batch: int, grid: int, cfg: LossConfig, device: torch.device) -> torch.Tensor | None:
    """Masked training: with probability ``cfg.mask_prob`` the patches this batch's encoder
    sees, (B, Nk) ascending, else None. A share r ~ U(mask_ratio_min, mask_ratio_max) of the
    patches is hidden, the same count in every image: at random per image, or (half the
    masked batches) as a square block at a random place per image, as the inpainting
    masks hide them. Draws from the global RNG, which every epoch seeds."""
    if cfg.mask_prob <= 0 or float(torch.rand(())) >= cfg.mask_prob:
        return None
    N = grid * grid
    r = cfg.mask_ratio_min + (cfg.mask_ratio_max - cfg.mask_ratio_min) * float(torch.rand(()))
    if float(torch.rand(())) < 0.5:
        hidden = min(N - 1, max(1, round(r * N)))
        keep = torch.rand(batch, N).argsort(1)[:, hidden:]
        return keep.sort(1).values.to(device)
    side = min(grid - 1, max(1, round(grid * math.sqrt(r))))
    top, left = torch.randint(0, grid - side + 1, (2, batch, 1, 1))
    rows = torch.arange(grid).view(1, grid, 1)
    cols = torch.arange(grid).view(1, 1, grid)
    block = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)  # (B, g, g)
    return (~block.flatten(1)).nonzero()[:, 1].view(batch, -1).to(device)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    epoch: int,
    cfg: Config,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    skips_left: int = 0,
    cache: PrefixCache | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns metrics averaged over every rank's samples.
    The loader yields ``(x, y)`` or ``(x, y, row index)``; with the index and a ``cache``
    the frozen prefix's output comes from the cache (:mod:`vitcae_ray.prefix_cache`).
    ``model(x)`` samples z_cls and then z_patch given it, so ``train/elbo`` is a one-sample
    negative ELBO estimate (analytic KL terms) at the weights of each step.

    A step whose gradient norm is not finite is skipped (no optimizer step; its CLS readout
    and loss terms are dropped) while fewer than ``skips_left`` were skipped this epoch, and
    counted in ``train/nonfinite_steps``; past that it raises :class:`NonFiniteLossError`, as it
    does when every step of the epoch was skipped (there is nothing to measure or keep)."""
    model.train()
    inner = unwrap(model)
    sums = torch.zeros(len(TERMS) + 1, device=device, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    skipped = 0
    masked = [0, 0.0, 0.0]  # masked steps, and the sums of their encoder tokens and its square
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        x = batch[0].to(device, non_blocking=True)
        index = batch[2] if len(batch) > 2 else None
        readout = inner.readout_state() if skips_left else None  # to drop a skipped step's share
        keep = masked_keep(x.shape[0], inner.grid, cfg.loss, device)
        if keep is not None:
            tokens = 1 + keep.shape[1]
            masked[0] += 1
            masked[1] += tokens
            masked[2] += tokens * tokens
        with (
            autocast(device, amp_dtype),
            inner.readout_paused() if keep is not None else contextlib.nullcontext(),
        ):
            prefix = cache.prefix(inner, x, index) if cache is not None and keep is None else None
            out = model(x, decode_prior=decode_prior(cfg), prefix=prefix, keep=keep)
        terms = vitcae_loss(out, x, epoch, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        # DDP has all-reduced the gradients, so this norm (and the check) agrees on every rank.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not torch.isfinite(grad_norm):
            if skipped >= skips_left:
                raise NonFiniteLossError(epoch, step, cfg.train.max_nonfinite_steps)
            skipped += 1
            inner.restore_readout(readout)
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()  # the schedule keeps counting steps, as on a resume
            continue
        optimizer.step()
        lr_scheduler.step()
        n = x.shape[0]
        sums[:-1] += torch.stack([terms[k].detach().double() for k in TERMS]) * n
        sums[-1] += n
    if skipped and sums[-1] == 0:  # the same steps were skipped on every rank
        raise NonFiniteLossError(epoch, step, every=True)
    sums = _reduce_sums(sums)
    elapsed = time.perf_counter() - start
    metrics = _as_metrics("train", sums)
    metrics["train/nonfinite_steps"] = skipped
    if cfg.loss.mask_prob > 0:  # this rank's own (not reduced), for the FLOP count of its steps
        metrics.update(zip(("train/masked_steps", "train/masked_tokens", "train/masked_tokens_sq"), masked))
    metrics["time/epoch_s"] = elapsed
    metrics["throughput/images_per_s"] = metrics["train/samples"] / max(elapsed, 1e-9)
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    epoch: int,
    cfg: Config,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
    cache: PrefixCache | None = None,
) -> dict[str, float]:
    """Deterministic validation, every draw from a generator seeded with ``seed``:

    - ``val/elbo``: the negative ELBO in nats per image estimated with ``loss.elbo_samples``
      posterior draws and analytic KL terms (:func:`vitcae_ray.likelihood.elbo`);
    - ``val/mse`` (and ``val/psnr`` = 10 log10(1 / val/mse) for images in [0, 1]) and the
      other terms (``val/loss``, ``val/recon``, the KLs, ``val/discrepancy``): at the
      posterior means, MMD against prior samples.

    The loader yields ``(x, y)`` or ``(x, y, row index)``; with the index and a ``cache`` (of
    the validation rows, not the training cache) the frozen prefix's output comes from it:
    the same numbers, the prefix's forward run once per image instead of twice per epoch.
    """
    model.eval()
    inner = unwrap(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(len(TERMS) + 1, device=device, dtype=torch.float64)
    for batch in loader:
        x = batch[0].to(device, non_blocking=True)
        index = batch[2] if len(batch) > 2 else None
        with autocast(device, amp_dtype):
            prefix = cache.prefix(inner, x, index) if cache is not None else None
            # the module itself, not its DDP wrapper: DDP's forward broadcasts buffers, a
            # collective, and the ranks' shares of the validation split may differ in batches
            out = inner(x, sample=False, decode_prior=decode_prior(cfg), prefix=prefix)
        terms = vitcae_loss(out, x, epoch, cfg.loss, generator=gen)
        with autocast(device, amp_dtype):
            nelbo = elbo(
                inner,
                x,
                cfg.loss.elbo_samples,
                recon_weight=cfg.loss.recon_weight,
                generator=gen,
                prefix=prefix,
            )
        terms["elbo"] = nelbo.mean()
        n = x.shape[0]
        sums[:-1] += torch.stack([terms[k].double() for k in TERMS]) * n
        sums[-1] += n
    metrics = _as_metrics("val", _reduce_sums(sums))
    metrics["val/psnr"] = 10.0 * math.log10(1.0 / max(metrics["val/mse"], 1e-12))
    return metrics
