"""freeze: what head freezing saves per training step.

Variants: no head frozen, then 25/50/75/100% of every encoder layer's heads frozen in each mode
(``weights``, ``detach``), each with and without the output projection's frozen-head columns
frozen (``out_proj``). For each, the step's FLOPs (counted as executed, by
:func:`vitcae_ray.freezing.flop_counter`), the gradient elements DDP would all-reduce, and the
time of full training steps (zero_grad, forward under bf16 autocast on GPUs, loss, backward,
AdamW step), interleaved round by round; ``time_ratio`` is the median step time over the
unfrozen one's.
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
SUMMARY = "training step with frozen heads vs no head frozen (ratios: lower is cheaper)"
DEFAULT_CONFIG = None  # the built-in defaults: the quickstart's tiny model
DEFAULTS = {"rounds": 7, "steps": 5, "batch_size": 64}
QUICK = {"rounds": 1, "steps": 1, "batch_size": 8}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MODES = ("weights", "detach")
WARMUP_STEPS = 2


def variants() -> list[tuple[str, bool, float]]:
    """(mode, out_proj, frozen fraction); the unfrozen baseline first."""
    return [("none", False, 0.0)] + [
        (mode, out_proj, frac) for mode in MODES for out_proj in (False, True) for frac in FRACTIONS
    ]


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
            out = r.model(x, decode_prior=decode_prior(cfg))
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
    for mode, out_proj, frac in variants():
        torch.manual_seed(0)
        model = build_model(cfg.model, size, chans).to(device)
        heads = frozen_sets(cfg.model.depth, cfg.model.num_heads, frac)
        if frac:
            apply_frozen(model, heads, mode, out_proj=out_proj)
        runs.append(
            SimpleNamespace(
                mode=mode,
                out_proj=out_proj,
                frac=frac,
                heads=len(heads[0]),
                model=model,
                opt=build_optimizer(model, cfg.optim),
                flops=train_step_flops(model, x, cfg, epoch),
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
        "mode": r.mode,
        "out_proj": r.out_proj,
        "frozen_frac": r.frac,
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
            ("mode", "mode", str),
            ("out_proj", "out_proj", lambda v: "yes" if v else "no"),
            ("frozen_frac", "frozen", lambda v: f"{v:.0%}"),
            ("step_ms", "step ms", num(2)),
            ("time_ratio", "time x", num(3)),
            ("time_spread", "time x min..max", fmt_spread),
            ("flops", "GFLOP", lambda v: f"{v / 1e9:.3f}"),
            ("flop_ratio", "FLOP x", num(3)),
            ("grad_elements", "grad elems", lambda v: f"{v:,}"),
        ],
    )
