"""quality: what head freezing does to the trained model.

The quickstart (``configs/digits_tiny.yaml``) trained in-process (Ray Train's local mode)
with freezing off (``freeze.enabled=false``) and with freezing on in each mode, every variant
with the same seeds, each run in a directory of its own; the variants alternate seed by seed.
From each run's ``metrics.jsonl``: the final ``val/mse`` and ``val/elbo``, the last
``val/probe_acc`` and ``val/fid`` (epochs with the periodic evaluation),
``flops/cumulative_saved_frac``, the frozen heads, and the wall time. Per variant: means over
seeds and their ratio to freezing off (target: the default mode's val/mse within 3%).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from types import SimpleNamespace

from .. import filesystem
from ..config import Config
from ..outputs import METRICS_FILE
from .common import BenchError, progress, round_orders, spread, table, training_output

NAME = "quality"
SUMMARY = "final val/mse with freezing on vs off, same seeds (target: default mode within 3%)"
DEFAULT_CONFIG = "configs/digits_tiny.yaml"
DEFAULTS = {"seeds": 3, "epochs": None, "batch_size": None, "output": None, "variants": None}
QUICK = {"seeds": 1, "epochs": 3}
# --quick: heads may freeze from epoch 1 on, so the frozen variants freeze within 3 epochs.
QUICK_SETS = {
    "freeze.min_epoch": 1,
    "freeze.patience": 1,
    "freeze.kappa_window": 1,
    "freeze.drift_threshold": 1.0,
    "train.log_images": False,
}
TARGET = 1.03
MODES = ("weights", "detach")


# variant -> its freeze overrides; ``off`` first (the baseline)
VARIANTS = {
    "off": {"enabled": False},
    **{m: {"enabled": True, "mode": m} for m in MODES},
    "weights+out_proj": {"enabled": True, "mode": "weights", "out_proj": True},
}


def _final(history: list[dict], key: str):
    """The last value of ``key`` in the run's history (None if no epoch has it)."""
    return next((m[key] for m in reversed(history) if m.get(key) is not None), None)


def _one_run(cfg: Config, output: str) -> dict:
    from .. import train as T

    t0 = time.perf_counter()
    with training_output():
        result = T.run(cfg, verbose=False)
    wall = time.perf_counter() - t0
    error = result.error or (result.metrics or {}).get("error")
    if error:
        raise RuntimeError(f"the run in {output} failed: {error}")
    text = filesystem.read_text(filesystem.join(output, METRICS_FILE)) or ""
    history = [json.loads(x) for x in text.splitlines()]
    if not history:
        raise RuntimeError(f"the run in {output} wrote no metrics")
    return {
        "epochs": len(history),
        "val_mse": history[-1]["val/mse"],
        "val_elbo": history[-1]["val/elbo"],
        "probe_acc": _final(history, "val/probe_acc"),
        "fid": _final(history, "val/fid"),
        "flops_saved_frac": history[-1]["flops/cumulative_saved_frac"],
        "heads_frozen": history[-1]["heads/frozen"] + history[-1]["heads/newly_frozen"],
        "heads_total": history[-1]["heads/total"],
        "train_s": sum(m["time/epoch_s"] for m in history),
        "wall_s": wall,
    }


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def check(cfg: Config, opts: SimpleNamespace) -> dict[str, dict]:
    """The variants to run (``off`` always, the baseline); BenchError for bad options."""
    if opts.output and os.path.isdir(opts.output) and os.listdir(opts.output):
        raise BenchError(f"--output {opts.output!r} is not empty: pass a new directory")
    if not opts.variants:
        return VARIANTS
    wanted = [v.strip() for v in opts.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        raise BenchError(f"unknown --variants {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    return {v: VARIANTS[v] for v in VARIANTS if v == "off" or v in wanted}


def run(cfg: Config, opts: SimpleNamespace) -> list[dict]:
    cfg = _bench_config(cfg, opts)
    names = check(cfg, opts)
    root = opts.output or tempfile.mkdtemp(prefix="vitcae_bench_quality_")
    seeds = [cfg.train.seed + i for i in range(opts.seeds)]
    try:
        runs = _train_all(cfg, names, seeds, root)
    finally:
        if not opts.output:
            shutil.rmtree(root, ignore_errors=True)

    common = {"epochs": cfg.train.epochs, "seeds": len(seeds)}
    rows = [
        {
            "kind": "run",
            "variant": name,
            "seed": seed,
            "mode": names[name].get("mode"),
            **runs[name, seed],
            **common,
        }
        for name in names
        for seed in seeds
    ]
    return rows + [_mean_row(cfg, name, names, runs, seeds, common) for name in names]


def _bench_config(cfg: Config, opts: SimpleNamespace) -> Config:
    """The suite's config: in-process, the GPU with --gpu, no retries, its epochs and batch size."""
    train = replace(cfg.train, num_workers=0, gpu=opts.device.type == "cuda", max_failures=0)
    if opts.epochs:
        train = replace(train, epochs=opts.epochs)
    if opts.batch_size:
        train = replace(train, batch_size=opts.batch_size)
    return replace(cfg, train=train)


def _train_all(
    cfg: Config, names: dict[str, dict], seeds: list[int], root: str
) -> dict[tuple[str, int], dict]:
    """Every variant's run per seed, the variants alternating seed by seed, each in
    ``root/VARIANT-seedSEED``."""
    runs: dict[tuple[str, int], dict] = {}
    for r, order in round_orders(list(names), len(seeds)):
        seed = seeds[r]
        for name in order:
            out = os.path.join(root, f"{name}-seed{seed}")
            run_cfg = replace(
                cfg,
                freeze=replace(cfg.freeze, **names[name]),
                train=replace(cfg.train, seed=seed, output=out),
            )
            runs[name, seed] = _one_run(run_cfg, out)
            progress(
                f"seed {seed} {name}: val/mse {runs[name, seed]['val_mse']:.5f} "
                f"in {runs[name, seed]['wall_s']:.0f}s"
            )
    return runs


def _mean_row(
    cfg: Config,
    name: str,
    names: dict[str, dict],
    runs: dict[tuple[str, int], dict],
    seeds: list[int],
    common: dict,
) -> dict:
    """Variant ``name``'s means over the seeds and their ratios to ``off``; the default mode's
    row carries the target."""
    mine = [runs[name, s] for s in seeds]
    ratios = [runs[name, s]["val_mse"] / runs["off", s]["val_mse"] for s in seeds]
    mse = _mean([m["val_mse"] for m in mine])
    row = {
        "kind": "mean",
        "variant": name,
        "seed": None,
        "mode": names[name].get("mode"),
        "val_mse": mse,
        "mse_ratio": mse / _mean([runs["off", s]["val_mse"] for s in seeds]),
        "mse_ratio_spread": spread(ratios),
        "val_elbo": _mean([m["val_elbo"] for m in mine]),
        "probe_acc": _mean([m["probe_acc"] for m in mine]),
        "fid": _mean([m["fid"] for m in mine]),
        "flops_saved_frac": _mean([m["flops_saved_frac"] for m in mine]),
        "heads_frozen": _mean([m["heads_frozen"] for m in mine]),
        "heads_total": mine[0]["heads_total"],
        "train_s": _mean([m["train_s"] for m in mine]),
        "wall_s": _mean([m["wall_s"] for m in mine]),
        "wall_ratio": _mean([m["wall_s"] for m in mine]) / _mean([runs["off", s]["wall_s"] for s in seeds]),
        **common,
    }
    if name == cfg.freeze.mode:  # the default mode carries the target
        row.update(target=TARGET, meets_target=row["mse_ratio"] <= TARGET)
    return row


def render(rows: list[dict]) -> str:
    def opt(fmt):
        return lambda v: fmt.format(v)

    shown = [{**r, "seed": r["seed"] if r["kind"] == "run" else "mean"} for r in rows]
    return table(
        shown,
        [
            ("variant", "variant", str),
            ("seed", "seed", lambda v: str(v)),
            ("val_mse", "val/mse", opt("{:.5f}")),
            ("mse_ratio", "x off", opt("{:.3f}")),
            ("mse_ratio_spread", "min..max", lambda s: f"[{s['min']:.3f}, {s['max']:.3f}]"),
            ("probe_acc", "probe acc", opt("{:.1%}")),
            ("fid", "FID", opt("{:.1f}")),
            ("flops_saved_frac", "FLOPs saved", opt("{:.1%}")),
            ("heads_frozen", "frozen", opt("{:g}")),
            ("wall_s", "wall s", opt("{:.1f}")),
        ],
    )
