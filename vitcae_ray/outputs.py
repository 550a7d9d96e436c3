"""The run directory: ``config.yaml``, ``metrics.jsonl``, TensorBoard events and image grids.

The output may be a local directory or a pyarrow filesystem URI (``s3://bucket/run``); for a
URI, files are written to a local staging directory and copied up after every epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: export imports this module light
    import torch

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
HEADS_FILE = "heads.parquet"
PNG_GRIDS = ("reconstructions", "samples", "inpainting", "interpolation")  # also written as PNGs


def is_uri(path: str) -> bool:
    return "://" in path


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI; a URI's query (``?endpoint_override=...``)
    stays at the end."""
    base, sep, query = root.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def storage_root(path: str) -> str:
    """An absolute local path or the URI unchanged (what Ray Train's storage_path expects)."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def read_text(root: str, name: str) -> str | None:
    """``root/name`` as text, for a local directory or a pyarrow URI; None if it is not a file."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(root if is_uri(root) else "file://" + storage_root(root))
    path = f"{base.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def check_directory(path: str, flag: str) -> None:
    """Raise ``ConfigError`` unless ``path`` (local or URI) can be the run's directory: a new
    one or an earlier run's, not a file, and (locally) under a writable directory."""
    import pyarrow.fs as pafs

    from .config import ConfigError

    from .pretrained import filesystem

    fix = "pass a new directory (or an earlier run's to resume it)"
    if is_uri(path):
        try:
            fs, base = filesystem(path)
        except ValueError as e:
            raise ConfigError(f"{flag} {e}") from None
        if fs.get_file_info(base).type not in (pafs.FileType.NotFound, pafs.FileType.Directory):
            raise ConfigError(f"{flag} {path} is a file, not a directory: {fix}")
        return
    target = Path(storage_root(path))
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == target else f"lies under the file {existing}"
        raise ConfigError(f"{flag} {path} {what}, not a directory: {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable: {fix}")


class RunDir:
    """Local view of the run directory; ``sync()`` mirrors it to the URI when there is one."""

    def __init__(self, output: str) -> None:
        self.output = output
        if is_uri(output):
            digest = hashlib.sha1(output.encode()).hexdigest()[:12]
            self.local = Path.home() / ".cache" / "vitcae_ray" / "runs" / digest
        else:
            self.local = Path(storage_root(output))
        self.local.mkdir(parents=True, exist_ok=True)

    def read_text(self, name: str) -> str | None:
        """A file of the run directory (from the URI when there is one), or None."""
        return read_text(self.output, name)

    def write_text(self, name: str, text: str) -> None:
        """Write atomically (temp file + rename), so an interrupted write never truncates."""
        p = self.local / name
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)

    def sync(self) -> None:
        if is_uri(self.output):
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(self.output)
            pafs.copy_files(str(self.local), root, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)


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

    def log_epoch(self, metrics: dict[str, Any], images: dict[str, torch.Tensor] | None = None,
                  head_rows: list[dict[str, Any]] | None = None) -> None:
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
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)


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
    return {"reconstructions": grid_image(torch.cat([inputs, recon]), n),
            "samples": grid_image(samples, n)}



HEADS_SCHEMA_FIELDS = (("epoch", "int64"), ("layer", "int64"), ("head", "int64"),
                       ("drift_w1", "float64"), ("kappa", "int64"), ("tau", "float64"),
                       ("tau_factor", "float64"), ("frozen", "bool_"), ("frozen_epoch", "int64"))


def write_heads_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per (epoch, layer, head); written to a temp file, then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, t)()) for name, t in HEADS_SCHEMA_FIELDS])
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)


def heatmap(values: torch.Tensor, vmax: float | None = None, cell: int = 16) -> torch.Tensor:
    """(L, H) values -> (1, L*cell, H*cell) grayscale image in [0, 1]; rows are layers, columns
    heads; black is 0, white is ``vmax`` (default the maximum); NaN is drawn as 0."""
    import torch

    v = torch.nan_to_num(values.float(), nan=0.0)
    top = vmax if vmax is not None else float(v.max())
    v = (v / top).clamp(0, 1) if top > 0 else torch.zeros_like(v)
    return v.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None]
