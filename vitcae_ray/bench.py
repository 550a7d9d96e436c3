"""``python -m vitcae_ray.bench``: what head freezing saves per training step.

For each setting (no head frozen; 50% and 100% of the encoder's heads frozen in ``weights`` and
``detach`` mode) it counts the step's FLOPs with FlopCounterMode and times full training steps
(forward, loss, backward, AdamW step; bf16 autocast on GPUs, as in training), interleaving the settings round by round so machine
noise hits them alike; it reports medians and ratios to the unfrozen step, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from .config import ConfigError, resolve
from .engine import autocast, decode_prior
from .freezing import apply_frozen, grad_elements, train_step_flops
from .losses import vitcae_loss
from .model import build_model
from .optim import build_optimizer

SETTINGS = (("none", 0.0), ("weights", 0.5), ("weights", 1.0), ("detach", 0.5), ("detach", 1.0))


def _autocast_dtype(device: torch.device):
    return torch.bfloat16 if device.type == "cuda" else None


def _frozen_sets(num_layers: int, num_heads: int, frac: float) -> list[list[int]]:
    k = round(frac * num_heads)
    return [list(range(k)) for _ in range(num_layers)]


def run_bench(cfg, batch_size: int, rounds: int, steps: int, device: torch.device) -> list[dict]:
    size, chans = cfg.data.image_size, 3 if cfg.data.channels == 3 else 1
    x = torch.rand(batch_size, chans, size, size, device=device)
    epoch = cfg.loss.warmup_epochs + cfg.loss.ramp_epochs  # the full loss, MMD included
    runs = []
    for mode, frac in SETTINGS:
        torch.manual_seed(0)
        model = build_model(cfg.model, size, chans).to(device)
        if frac:
            apply_frozen(model, _frozen_sets(cfg.model.depth, cfg.model.num_heads, frac), mode)
        opt = build_optimizer(model, cfg.optim)
        runs.append({"mode": mode, "frozen_frac": frac, "model": model, "opt": opt,
                     "flops": train_step_flops(model, x, cfg, epoch),
                     "grad_elements": grad_elements(model), "times": []})

    def step(r):
        r["opt"].zero_grad(set_to_none=True)
        with autocast(device, _autocast_dtype(device)):  # as in training: bf16 on GPUs
            out = r["model"](x, decode_prior=decode_prior(cfg))
        vitcae_loss(out, x, epoch, cfg.loss)["loss"].backward()
        r["opt"].step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for r in runs:  # warm-up
        for _ in range(2):
            step(r)
    for i in range(rounds):
        for r in runs:
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(r)
            sync()
            r["times"].append((time.perf_counter() - t0) / steps)
        print(f"round {i + 1}/{rounds}", file=sys.stderr, flush=True)
    base = runs[0]
    base_t = statistics.median(base["times"])
    return [{"mode": r["mode"], "frozen_frac": r["frozen_frac"],
             "step_ms": 1e3 * statistics.median(r["times"]),
             "step_ratio": statistics.median(r["times"]) / base_t,
             "flops": r["flops"], "flops_ratio": r["flops"] / base["flops"],
             "grad_elements": r["grad_elements"]} for r in runs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitcae_ray.bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML preset (model and data size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median)")
    p.add_argument("--steps", type=int, default=5, help="steps per setting per round")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    try:
        cfg = resolve(args.config, {}, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.gpu else "cpu")
    rows = run_bench(cfg, args.batch_size, args.rounds, args.steps, device)
    print(f"{'mode':8} {'frozen':>6} {'step ms':>9} {'time x':>7} {'GFLOP':>9} {'FLOP x':>7} {'grad elems':>11}")
    for r in rows:
        print(f"{r['mode']:8} {r['frozen_frac']:>6.0%} {r['step_ms']:>9.2f} {r['step_ratio']:>7.3f} "
              f"{r['flops'] / 1e9:>9.3f} {r['flops_ratio']:>7.3f} {r['grad_elements']:>11,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
