"""The run directory: ``config.yaml``, ``metrics.jsonl``, TensorBoard events, image grids and
the per-head table (``heads.parquet``) with its heatmaps; the run's progress lines.

The output may be a local directory or a pyarrow filesystem URI (``s3://bucket/run``); for a
URI, files are written to a local staging directory and copied up after every epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import filesystem
from .config import SELECT_METRIC, Config, ConfigError, from_dict

if TYPE_CHECKING:  # torch is imported where it is used: export imports this module light
    import torch

    from .convergence import HeadDecision
    from .model import ViTCAE

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
HEADS_FILE = "heads.parquet"
# a Tune experiment directory: its results table, one run directory per trial, Tune's state
RESULTS_FILE, RESULTS_CSV = "results.parquet", "results.csv"
TRIALS_DIR, TUNE_NAME = "trials", "tune"
PNG_GRIDS = ("reconstructions", "samples", "inpainting", "interpolation")  # also written as PNGs
# Changing these between a run and its resumption would make the checkpoint meaningless.
RESUME_KEYS = (
    "model",
    "loss",
    "optim",
    "data.dataset",
    "data.image_size",
    "data.channels",
    "data.val_fraction",
    "data.split_seed",
    "train.batch_size",
    "train.seed",
)


def check_directory(path: str, flag: str) -> None:
    """Raise ``ConfigError`` unless ``path`` (local or URI) can be the run's directory: a new
    one or an earlier run's, not a file, and (locally) under a writable directory."""
    fix = "pass a new directory (or an earlier run's to resume it)"
    if filesystem.is_uri(path):
        try:
            kind = filesystem.kind(path)
        except filesystem.FileSystemError as e:
            raise ConfigError(f"{flag} {e}") from None
        if kind not in (filesystem.FileType.NotFound, filesystem.FileType.Directory):
            raise ConfigError(f"{flag} {path} is a file, not a directory: {fix}")
        return
    target = Path(filesystem.absolute(path))
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == target else f"lies under the file {existing}"
        raise ConfigError(f"{flag} {path} {what}, not a directory: {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable: {fix}")


def run_config(run_dir: str) -> Config | None:
    """The config a run saved in its ``config.yaml`` (keys it predates rebuilt by
    :func:`vitcae_ray.config.from_dict`), or None when it has none; a local path or a URI."""
    import yaml

    text = filesystem.read_text(filesystem.join(run_dir, CONFIG_FILE))
    return None if text is None else from_dict(yaml.safe_load(text) or {})


def select_metric_of(run_dir: str) -> str:
    """The run's ``train.select_metric`` from its ``config.yaml`` (the default without one)."""
    cfg = run_config(run_dir)
    return SELECT_METRIC if cfg is None else cfg.train.select_metric


def check_run_dir(output: str, cfg: Config) -> None:
    """Refuse a run directory that is no directory, or that holds a run whose settings differ
    in ways a checkpoint can't absorb (:data:`RESUME_KEYS`)."""
    check_directory(output, "--output")
    saved = run_config(output)
    if saved is None:
        return
    old = saved.to_dict()
    new = cfg.to_dict()

    def get(d: dict, key: str):
        for part in key.split("."):
            d = d[part]
        return d

    for key in RESUME_KEYS:
        a, b = get(old, key), get(new, key)
        if a != b:
            if isinstance(a, dict):
                diff = next(k for k in a if a[k] != b[k])
                key, a, b = f"{key}.{diff}", a[diff], b[diff]
            raise ConfigError(
                f"run directory {output!r} holds a run with {key}={a!r} (now {b!r}); "
                "pass another --output to start a new run, or the same settings to resume it"
            )


class RunDir:
    """Local view of the run directory; ``sync()`` mirrors it to the URI when there is one."""

    def __init__(self, output: str) -> None:
        self.output = output
        if filesystem.is_uri(output):
            digest = hashlib.sha1(output.encode()).hexdigest()[:12]
            self.local = Path.home() / ".cache" / "vitcae_ray" / "runs" / digest
        else:
            self.local = Path(filesystem.absolute(output))
        self.local.mkdir(parents=True, exist_ok=True)

    def read_text(self, name: str) -> str | None:
        """A file of the run directory (from the URI when there is one), or None."""
        return filesystem.read_text(filesystem.join(self.output, name))

    def write_text(self, name: str, text: str) -> None:
        """Write atomically, so an interrupted write never truncates."""
        filesystem.atomic_write(self.local / name, lambda tmp: tmp.write_text(text))

    def sync(self) -> None:
        if filesystem.is_uri(self.output):
            filesystem.upload_dir(self.local, self.output)


class RunLogger:
    """Rank 0's writer of ``metrics.jsonl`` and TensorBoard events.

    ``history`` (from the checkpoint) is the source of truth: on resume the JSON-lines file is
    rewritten from it and TensorBoard events past the resumed epoch are purged.
    """

    def __init__(self, run_dir: RunDir, history: list[dict[str, Any]]) -> None:
        from tensorboardX import SummaryWriter

        self.run_dir = run_dir
        self.history = list(history)
        run_dir.write_text(METRICS_FILE, "".join(json.dumps(m) + "\n" for m in self.history))
        self.tb = SummaryWriter(str(run_dir.local / "tb"), purge_step=len(self.history))

    def log_epoch(
        self,
        metrics: dict[str, Any],
        images: dict[str, torch.Tensor] | None = None,
        head_rows: list[dict[str, Any]] | None = None,
    ) -> None:
        """Append one epoch; ``head_rows`` is the whole per-head table so far (rewritten)."""
        epoch = int(metrics["epoch"])
        self.history.append(metrics)
        with open(self.run_dir.local / METRICS_FILE, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for k, v in metrics.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, epoch)
        for name, grid in (images or {}).items():
            self.tb.add_image(name, grid, epoch)
            if name in PNG_GRIDS:
                save_png(grid, self.run_dir.local / f"{name}.png")
        if head_rows is not None:
            write_heads_table(self.run_dir.local / HEADS_FILE, head_rows)
        self.tb.flush()
        self.run_dir.sync()

    def close(self) -> None:
        self.tb.close()
        self.run_dir.sync()


def save_png(grid: torch.Tensor, path: Path) -> None:
    """(C, H, W) in [0, 1] -> PNG, written atomically."""
    import torch
    from PIL import Image

    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    filesystem.atomic_write(path, img.save)


def grid_image(images: torch.Tensor, nrow: int, upscale: int = 2) -> torch.Tensor:
    """(B, C, S, S) -> one (C, H, W) grid, ``nrow`` images a row, white padding, upscaled."""
    import torch
    from torchvision.utils import make_grid

    g = make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=1.0)
    return torch.nn.functional.interpolate(g[None], scale_factor=upscale, mode="nearest")[0]


def image_grids(inputs: torch.Tensor, recon: torch.Tensor, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reconstruction grid (inputs above reconstructions) and a grid of generated samples."""
    import torch

    n = inputs.shape[0]
    return {"reconstructions": grid_image(torch.cat([inputs, recon]), n), "samples": grid_image(samples, n)}


# heads.parquet: tau_effective = tau * f, the learned temperature times the schedule's factor
HEADS_SCHEMA_FIELDS = (
    ("epoch", "int64"),
    ("layer", "int64"),
    ("head", "int64"),
    ("drift_w1", "float64"),
    ("drift_floor", "float64"),  # the drift's noise floor (freeze.drift_ratio is relative to it)
    ("kappa", "int64"),
    ("tau_effective", "float64"),
    ("tau_factor", "float64"),
    ("frozen", "bool_"),
    ("frozen_epoch", "int64"),
    ("block_frozen_epoch", "int64"),  # the epoch the head's whole block froze (no_grad prefix)
)


def head_rows(model: ViTCAE, decision: HeadDecision, factors_used: list[list[float]]) -> list[dict]:
    """The epoch's rows of ``heads.parquet``, one per (layer, head); ``factors_used`` are the
    temperature factors the epoch trained with (the decision carries the next epoch's)."""
    rows = []
    for layer, attn in enumerate(model.attention_layers):
        tau = attn.tau.tolist()
        for head in range(attn.num_heads):
            drift, factor = decision.drift[layer][head], factors_used[layer][head]
            floor = decision.floor[layer][head]
            rows.append(
                {
                    "epoch": decision.epoch,
                    "layer": layer,
                    "head": head,
                    "drift_w1": None if drift is None or math.isnan(drift) else float(drift),
                    "drift_floor": None if math.isnan(floor) else float(floor),
                    "kappa": int(decision.kappa[layer][head]),
                    "tau_effective": tau[head] * factor,
                    "tau_factor": factor,
                    "frozen": bool(decision.frozen[layer][head]),
                    "frozen_epoch": decision.frozen_epoch[layer][head],
                    "block_frozen_epoch": decision.block_frozen_epoch[layer],
                }
            )
    return rows


def head_heatmaps(rows: list[dict], num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    """TensorBoard heatmaps (layers x heads) of one epoch's rows: drift, tau_effective, frozen."""
    import torch

    def grid(key: str) -> torch.Tensor:
        t = torch.zeros(num_layers, num_heads)
        for r in rows:
            t[r["layer"], r["head"]] = float("nan") if r[key] is None else float(r[key])
        return t

    return {
        "heads/drift_w1": heatmap(grid("drift_w1")),
        "heads/tau_effective": heatmap(grid("tau_effective")),
        "heads/frozen": heatmap(grid("frozen"), vmax=1.0),
    }


def write_heads_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per (epoch, layer, head), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, t)()) for name, t in HEADS_SCHEMA_FIELDS])
    table = pa.Table.from_pylist(rows, schema=schema)
    filesystem.atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def heatmap(values: torch.Tensor, vmax: float | None = None, cell: int = 16) -> torch.Tensor:
    """(L, H) values -> (1, L*cell, H*cell) grayscale image in [0, 1]; rows are layers, columns
    heads; black is 0, white is ``vmax`` (default the maximum); NaN is drawn as 0."""
    import torch

    v = torch.nan_to_num(values.float(), nan=0.0)
    top = vmax if vmax is not None else float(v.max())
    v = (v / top).clamp(0, 1) if top > 0 else torch.zeros_like(v)
    return v.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None]


def progress_line(m: dict[str, Any], epochs: int) -> str:
    """The epoch's one line on the console."""
    evaluated = (
        f" probe {m['val/probe_acc']:.1%} FID {m['val/fid']:.1f} KID {m['val/kid']:.3f} |"
        if "val/probe_acc" in m
        else ""
    )
    return (
        f"epoch {int(m['epoch']) + 1}/{epochs} | loss {m['train/loss']:.2f} "
        f"recon {m['train/recon']:.2f} kl {m['train/kl']:.2f} mmd {m['train/mmd']:.4f} | "
        f"val elbo {m['val/elbo']:.1f} mse {m['val/mse']:.5f} psnr {m['val/psnr']:.2f} dB |"
        f"{evaluated} heads {m['heads/frozen']}/{m['heads/total']} frozen "
        f"(+{m['heads/newly_frozen']}), FLOPs saved {m['flops/saved_frac']:.1%} | "
        f"{m['time/epoch_s']:.1f}s {m['throughput/images_per_s']:.0f} img/s"
    )


def say(line: str) -> None:
    """A progress line on stdout. Written to the stream, not through ``print``, which Ray
    Train's workers route into their logger (the line would show twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
