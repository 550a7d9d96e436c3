"""attention: encoder forward+backward throughput against timm's VisionTransformer.

Ours is ``ViTCAE.forward_features`` (patch embedding, CLS token, position embedding, the
encoder blocks with per-head temperatures, final norm); timm's is
``VisionTransformer.forward_features`` at the same width, depth, heads, MLP ratio, patch size
and image size (so the same token count), with q/k/v bias as ours. A step is zero_grad, the
forward (bf16 autocast on GPUs), a mean-square of the tokens and its backward; no optimizer.
Two comparisons: both on ``F.scaled_dot_product_attention`` (ours ``model.fused_attn``,
timm's default), and both on their manual softmax path. ``ratio`` = ours / timm throughput.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from types import SimpleNamespace

import torch
from torch import nn

from ..config import Config
from ..engine import autocast
from ..model import build_model
from .common import BenchError, device_sync, fmt_spread, interleave, num, ratio_stats, table, timed

NAME = "attention"
SUMMARY = "encoder forward+backward throughput, ours / timm (target >= 0.95)"
DEFAULT_CONFIG = None  # the built-in defaults: the quickstart's tiny model
DEFAULTS = {"rounds": 7, "steps": 10, "batch_size": 64}
QUICK = {"rounds": 1, "steps": 2, "batch_size": 8}
TARGET = 0.95
WARMUP_STEPS = 3


def timm_encoder(cfg: Config, chans: int, fused: bool) -> nn.Module:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise BenchError(
            "the attention suite compares against timm: pip install 'vitcae_ray[bench]' (or timm)"
        ) from None
    m = cfg.model
    model = VisionTransformer(
        img_size=cfg.data.image_size,
        patch_size=m.patch_size,
        in_chans=chans,
        num_classes=0,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        qkv_bias=True,
        class_token=True,
    )
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused
    return model


def encoder_params(model: nn.Module) -> int:
    """Parameters of what ``forward_features`` runs (ours also holds a prior and a decoder)."""
    if hasattr(model, "to_z_cls"):  # ViTCAE
        parts = [model.patch_embed, model.blocks, model.norm]
        return (
            sum(p.numel() for part in parts for p in part.parameters())
            + model.cls_token.numel()
            + model.pos_embed.numel()
        )
    return sum(p.numel() for p in model.parameters())


def run(cfg: Config, opts: SimpleNamespace) -> list[dict]:
    device = opts.device
    size, chans = cfg.data.image_size, 3 if cfg.data.channels == 3 else 1
    tokens = 1 + (size // cfg.model.patch_size) ** 2
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    x = torch.rand(opts.batch_size, chans, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    pairs = _pairs(cfg, size, chans, device)
    runs = [r for _, a, b in pairs for r in (a, b)]

    def steps(r: SimpleNamespace, n: int) -> None:
        for _ in range(n):
            r.model.zero_grad(set_to_none=True)
            with autocast(device, amp_dtype):
                t = r.model.forward_features(x)  # (B, T, D)
            t.float().square().mean().backward()

    sync = device_sync(device)
    times = interleave(
        runs,
        lambda r: timed(lambda: steps(r, opts.steps), sync) / opts.steps,
        opts.rounds,
        warmup=lambda r: steps(r, WARMUP_STEPS),
    )
    by_run = {id(r): t for r, t in zip(runs, times)}
    return [
        _row(cfg, opts, fused, ours, theirs, by_run[id(ours)], by_run[id(theirs)], tokens)
        for fused, ours, theirs in pairs
    ]


def _pairs(
    cfg: Config, size: int, chans: int, device: torch.device
) -> list[tuple[bool, SimpleNamespace, SimpleNamespace]]:
    """(fused, ours, timm's) for SDPA and for the manual path, in train mode on ``device``; ours
    built with torch's seed at 0."""
    pairs = []
    for fused in (True, False):
        torch.manual_seed(0)
        ours = build_model(replace(cfg.model, fused_attn=fused), size, chans).to(device).train()
        theirs = timm_encoder(cfg, chans, fused).to(device).train()
        pairs.append(
            (fused, SimpleNamespace(name="ours", model=ours), SimpleNamespace(name="timm", model=theirs))
        )
    return pairs


def _row(
    cfg: Config,
    opts: SimpleNamespace,
    fused: bool,
    ours: SimpleNamespace,
    theirs: SimpleNamespace,
    t_ours: list[float],
    t_timm: list[float],
    tokens: int,
) -> dict:
    """One attention path's row from the per-round step times of ours and timm's."""
    ratio, spread = ratio_stats(t_timm, t_ours)  # time timm / time ours = throughput ours / timm
    ips_ours = opts.batch_size / statistics.median(t_ours)
    ips_timm = opts.batch_size / statistics.median(t_timm)
    return {
        "attention": "sdpa" if fused else "manual",
        "embed_dim": cfg.model.embed_dim,
        "depth": cfg.model.depth,
        "num_heads": cfg.model.num_heads,
        "mlp_ratio": cfg.model.mlp_ratio,
        "tokens": tokens,
        "batch_size": opts.batch_size,
        "ours_step_ms": 1e3 * statistics.median(t_ours),
        "timm_step_ms": 1e3 * statistics.median(t_timm),
        "ours_images_per_s": ips_ours,
        "timm_images_per_s": ips_timm,
        "ours_tokens_per_s": ips_ours * tokens,
        "timm_tokens_per_s": ips_timm * tokens,
        "ours_params": encoder_params(ours.model),
        "timm_params": encoder_params(theirs.model),
        "ratio": ratio,
        "ratio_spread": spread,
        "target": TARGET,
        "meets_target": ratio >= TARGET,
        "rounds": opts.rounds,
        "steps": opts.steps,
        "device": opts.device.type,
    }


def render(rows: list[dict]) -> str:
    return table(
        rows,
        [
            ("attention", "attention", str),
            ("tokens", "tokens", str),
            ("ours_images_per_s", "ours img/s", num(1)),
            ("timm_images_per_s", "timm img/s", num(1)),
            ("ours_tokens_per_s", "ours tok/s", lambda v: f"{v:,.0f}"),
            ("ratio", "ours/timm", num(3)),
            ("ratio_spread", "min..max", fmt_spread),
            ("meets_target", f">= {TARGET}", lambda v: "yes" if v else "no"),
        ],
    )
