"""The Parquet train split streamed with Ray Data.

For a to_parquet output (``train/`` and ``val/`` folders, local or ``s3://``), a Ray Train run
does not load the train split on every worker: the driver hands Ray Train a
``ray.data.read_parquet`` dataset, Ray Data tasks read and decode it in blocks, and each worker
iterates its own shard (``ray.train.get_dataset_shard``), so a worker holds a few batches, not
the split. The validation split streams the same way, split without padding or dropping
(``ExactValidation``): every validation row is validated once, by one worker, and the
all-reduced sums are the split's whatever the number of workers. Map-style, each rank reads
only the first rows of the validation split (the head-convergence probe and the logged
images), and rank 0 at most 5,000 train rows (``train.EVAL_TRAIN_ROWS``) and 1,000 validation
rows (``train.EVAL_VAL_ROWS``) for its periodic evaluation; to_parquet shuffles the rows, so
the first rows are a random sample.

The order of a streamed epoch follows Ray Data's scheduling (files are shuffled every epoch,
then rows within a buffer with a per-epoch seed), so a replayed epoch is not bit-identical.
Which worker validates which rows follows it too: ``val/mse`` (at the posterior means) is the
same whatever the split, while the figures with random draws per batch (``val/elbo``'s
posterior samples, the MMD's prior samples) vary slightly from run to run.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitcae_ray import filesystem
from vitcae_ray.config import DataConfig
from vitcae_ray.errors import first_line

from .datasets import DataError, image_to_tensor, pil_mode
from .files import _PIL_ERRORS, parquet_rows, parquet_split, parquet_splits

TRAIN = "train"
VAL = "val"


def streams(cfg: DataConfig) -> bool:
    """Whether Ray Train streams this dataset's train split with Ray Data."""
    return cfg.dataset == "parquet" and parquet_splits(cfg) is not None


def channels_of(cfg: DataConfig) -> int:
    """The channel count: forced by ``data.channels`` or that of the first train image."""
    if cfg.channels:
        return cfg.channels
    first = parquet_split(cfg, "train", limit=1)
    return first.native_channels()


class Decode:
    """Ray Data batch function: encoded images -> uint8 ``(B, C, S, S)`` (a quarter of float32
    in the object store); labels pass through."""

    def __init__(self, channels: int, size: int, source: str) -> None:
        self.mode, self.size, self.source = pil_mode(channels), size, source

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = []
        for data in batch["image"]:
            try:
                img = Image.open(io.BytesIO(data or b""))
                images.append((image_to_tensor(img, self.mode, self.size) * 255).round().to(torch.uint8))
            except _PIL_ERRORS as err:
                raise DataError(
                    f"dataset 'parquet': an image of {self.source!r} is not readable "
                    f"({first_line(err)}); fix or remove it"
                ) from None
        return {"image": torch.stack(images).numpy(), "label": np.asarray(batch["label"], np.int64)}


def split_dataset(cfg: DataConfig, channels: int, split: str = TRAIN) -> tuple[Any, int]:
    """(the decoded Ray Dataset of ``split``, its row count from the Parquet footers). The
    train split's files are read in a new order every epoch."""
    import ray.data

    fs, path, shown = parquet_splits(cfg)
    order = {"shuffle": "files"} if split == TRAIN else {}
    ds = ray.data.read_parquet(filesystem.join(path, split), filesystem=fs, **order)
    ds = ds.select_columns(["image", "label"])
    rows = parquet_rows(fs, filesystem.join(path, split), filesystem.join(shown, split))
    decoded = ds.map_batches(
        Decode(channels, cfg.image_size, filesystem.join(shown, split)),
        batch_format="numpy",
        batch_size=256,
    )
    return decoded, rows


def exact_validation():
    """Ray Train's ``DataConfig``, but the val split streams to the workers with
    ``streaming_split(equal=False)``: every row goes to exactly one worker (the default
    ``equal=True`` drops rows to even the shards out, which would make the validation
    metrics depend on the number of workers). The train split is split as Ray Train does."""
    from ray.train import DataConfig as RayDataConfig  # here: importing this module stays light

    class ExactValidation(RayDataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != VAL}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if VAL in datasets:
                val = datasets[VAL]
                val.set_name(VAL)
                for shard, split in zip(
                    out, val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
                ):
                    shard[VAL] = split
            return out

    return ExactValidation(datasets_to_split=[TRAIN])


def local_splits(cfg: DataConfig, channels: int, train_rows: int | None, val_rows: int):
    """(the first ``train_rows`` train rows or None, the first ``val_rows`` val rows),
    map-style."""
    mode = pil_mode(channels)
    val = parquet_split(cfg, "val", limit=val_rows)
    val.mode = mode
    train = None
    if train_rows:
        train = parquet_split(cfg, "train", limit=train_rows)
        train.mode = mode
    return train, val


class StreamingLoader:
    """A worker's shard as ``(x, y)`` float batches, with a fixed number of steps per epoch
    (every rank the same, as DDP requires)."""

    def __init__(self, shard, batch_size: int, steps: int, seed: int) -> None:
        if steps < 1:
            raise DataError(
                f"dataset 'parquet': the train split holds fewer than batch_size "
                f"({batch_size}) rows per worker; lower --batch-size or --num-workers"
            )
        self.shard, self.batch_size, self.steps, self.seed = shard, batch_size, steps, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=8 * self.batch_size,
            local_shuffle_seed=self.seed * 1_009 + self.epoch,
        )
        for step, batch in enumerate(batches):
            if step == self.steps:
                break
            yield _tensors(batch)


def _tensors(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(batch["image"]).float().div_(255.0), torch.from_numpy(batch["label"])


class StreamingValLoader:
    """A worker's validation shard as ``(x, y)`` float batches: every row it is handed, in
    order, the last batch short (shards may differ in size, or be empty)."""

    def __init__(self, shard, batch_size: int) -> None:
        self.shard, self.batch_size = shard, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            yield _tensors(batch)
