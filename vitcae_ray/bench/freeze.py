"""freeze: what freezing saves per training step.

Variants: nothing frozen, then 25/50/75/100% of every encoder layer's heads frozen (a frozen
head runs its forward without autograd), then every head frozen with a frozen prefix of 1..L
whole encoder blocks (run under ``no_grad``, the embedding with them), then the same prefixes
served by the prefix cache (its output computed once, as the cache holds it after the first
epoch; the step starts at block k). For each, the step's
FLOPs (counted as executed, by :func:`vitcae_ray.freezing.flop_counter`), the gradient
elements DDP would all-reduce, and the time of full training steps (zero_grad, forward under
bf16 autocast on GPUs, loss, backward, AdamW step), interleaved round by round with a device
sync around each timing; ``time_ratio`` is the median of the per-round ratios to the unfrozen
step, with their range.
"""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import torch

from ..config import Config
from ..engine import autocast, decode_prior
from ..freezing import apply_frozen, grad_elements, train_step_flops
from ..losses import vitcae_loss
from ..model import build_model
from ..optim import build_optimizer
from .common import device_sync, fmt_spread, interleave, num, ratio_stats, table, timed

NAME = "freeze"
SUMMARY = "training step with frozen heads and blocks vs nothing frozen (ratios: lower is cheaper)"
DEFAULT_CONFIG = None  # the built-in defaults: the quickstart's tiny model
DEFAULTS = {"rounds": 7, "steps": 5, "batch_size": 64}
QUICK = {"rounds": 1, "steps": 1, "batch_size": 8}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
WARMUP_STEPS = 2


def variants(depth: int) -> list[tuple[float, int, bool]]:
    """(frozen fraction of each layer's heads, frozen blocks, prefix cached); the unfrozen
    baseline first."""
    prefixes = [(1.0, k, cached) for cached in (False, True) for k in range(1, depth + 1)]
    return [(0.0, 0, False)] + [(frac, 0, False) for frac in FRACTIONS] + prefixes


def frozen_sets(num_layers: int, num_heads: int, frac: float) -> list[list[int]]:
    """The first ``round(frac * H)`` heads of every layer."""
    k = round(frac * num_heads)
    return [list(range(k)) for _ in range(num_layers)]


def run(cfg: Config, opts: SimpleNamespace) -> list[dict]:
    device = opts.device
    size, chans = cfg.data.image_size, 3 if cfg.data.channels == 3 else 1
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(opts.batch_size, chans, size, size, generator=gen).to(device)
    epoch = cfg.loss.kl_warmup_epochs + cfg.loss.ramp_epochs  # the full loss, MMD included
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # as in training
    runs = _runs(cfg, x, epoch, device)

    def step(r: SimpleNamespace) -> None:
        r.opt.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            out = r.model(x, decode_prior=decode_prior(cfg), prefix=r.prefix)
        vitcae_loss(out, x, epoch, cfg.loss)["loss"].backward()
        r.opt.step()

    def steps(r: SimpleNamespace, n: int) -> None:
        for _ in range(n):
            step(r)

    sync = device_sync(device)
    times = interleave(
        runs,
        lambda r: timed(lambda: steps(r, opts.steps), sync) / opts.steps,
        opts.rounds,
        warmup=lambda r: steps(r, WARMUP_STEPS),
    )
    return [_row(cfg, opts, r, t, runs[0], times[0]) for r, t in zip(runs, times)]


def _runs(cfg: Config, x: torch.Tensor, epoch: int, device: torch.device) -> list[SimpleNamespace]:
    """Per variant (:func:`variants`, in order): the model (built with torch's seed at 0, its
    heads frozen), its optimizer, its step's FLOPs on ``x`` and its gradient elements."""
    size, chans = x.shape[-1], x.shape[1]
    runs = []
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    for frac, blocks, cached in variants(cfg.model.depth):
        torch.manual_seed(0)
        model = build_model(cfg.model, size, chans).to(device)
        heads = frozen_sets(cfg.model.depth, cfg.model.num_heads, frac)
        apply_frozen(model, heads, blocks)
        prefix = None
        if cached:
            with autocast(device, amp_dtype):
                prefix = model.forward_prefix(x)
        runs.append(
            SimpleNamespace(
                blocks=blocks,
                frac=frac,
                cached=cached,
                prefix=prefix,
                heads=len(heads[0]),
                model=model,
                opt=build_optimizer(model, cfg.optim),
                flops=train_step_flops(model, x, cfg, epoch, cached=cached),
                grad_elements=grad_elements(model),
            )
        )
    return runs


def _row(
    cfg: Config,
    opts: SimpleNamespace,
    r: SimpleNamespace,
    t: list[float],
    base: SimpleNamespace,
    base_t: list[float],
) -> dict:
    """Variant ``r``'s row from its per-round step times ``t``, against the unfrozen ``base``."""
    ratio, spread = ratio_stats(t, base_t)
    return {
        "frozen_frac": r.frac,
        "frozen_blocks": r.blocks,
        "prefix_cached": r.cached,
        "frozen_heads_per_layer": r.heads,
        "num_heads": cfg.model.num_heads,
        "step_ms": 1e3 * statistics.median(t),
        "time_ratio": ratio,
        "time_spread": spread,
        "flops": r.flops,
        "flop_ratio": r.flops / base.flops,
        "grad_elements": r.grad_elements,
        "grad_ratio": r.grad_elements / base.grad_elements,
        "batch_size": opts.batch_size,
        "rounds": opts.rounds,
        "steps": opts.steps,
        "device": opts.device.type,
    }


def render(rows: list[dict]) -> str:
    return table(
        rows,
        [
            ("frozen_frac", "heads frozen", lambda v: f"{v:.0%}"),
            ("frozen_blocks", "blocks frozen", str),
            ("prefix_cached", "prefix cached", lambda v: "yes" if v else "no"),
            ("step_ms", "step ms", num(2)),
            ("time_ratio", "time x (median of rounds)", num(3)),
            ("time_spread", "time x min..max", fmt_spread),
            ("flops", "GFLOP", lambda v: f"{v / 1e9:.3f}"),
            ("flop_ratio", "FLOP x", num(3)),
            ("grad_elements", "grad elems", lambda v: f"{v:,}"),
        ],
    )
