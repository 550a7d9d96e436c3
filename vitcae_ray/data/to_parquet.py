"""Convert a registered dataset to Parquet shards readable with ``--dataset parquet``.

Writes ``OUT/train/part-00000.parquet ...`` and ``OUT/val/part-...`` with columns ``image``
(PNG bytes of the resized uint8 image) and ``label`` (int64), the train rows in a random order
(``--shuffle-seed``: a streamed shard then mixes the classes, where a class-ordered source such
as an ImageFolder would hand it one class at a time); OUT is a local folder or any
pyarrow URI (s3://bucket/prefix). An ``_INCOMPLETE`` marker exists while writing (the reader
refuses such a folder) and ``_SUCCESS`` is written last.

    python -m vitcae_ray.data.to_parquet --dataset cifar10 --data-root ~/data --image-size 32 \\
        --out s3://bucket/cifar10-32
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from vitcae_ray import filesystem
from vitcae_ray.config import ConfigError, build_config
from vitcae_ray.errors import fail, first_line
from vitcae_ray.filesystem import join

from .datasets import DataError, build_datasets
from .files import INCOMPLETE_MARKER, SUCCESS_MARKER, resolve

SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64())])
_OWN_ENTRIES = {"train", "val", INCOMPLETE_MARKER, SUCCESS_MARKER}


def encode_png(image: torch.Tensor) -> bytes:
    """float (C, S, S) in [0, 1] -> PNG bytes of the uint8 image (L or RGB)."""
    arr = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    arr = arr[0] if arr.shape[0] == 1 else arr.permute(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr.contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def shuffled(ds: Dataset, seed: int) -> Dataset:
    """``ds`` in the row order a ``seed`` fixes: ``Subset(ds, randperm(len(ds)))``."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return Subset(ds, order.tolist())


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vitcae_ray.data.to_parquet", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--dataset", required=True, help="registered dataset name, e.g. digits, cifar10, imagefolder"
    )
    p.add_argument("--data-root", default=None, help="dataset root folder, Parquet path or URI")
    p.add_argument("--download", action="store_true", help="let torchvision download into --data-root")
    p.add_argument(
        "--image-size", type=int, default=None, help="output images are S x S (default: data.image_size)"
    )
    p.add_argument(
        "--channels", type=int, default=None, help="1 or 3 to force grayscale/RGB; 0 keeps the dataset's own"
    )
    p.add_argument(
        "--val-fraction", type=float, default=None, help="held-out fraction when the dataset has no val split"
    )
    p.add_argument("--split-seed", type=int, default=None, help="seed of that train/val split")
    p.add_argument("--out", default=None, help="output folder or URI (default: data/parquet/DATASET-SIZE)")
    p.add_argument("--shard-size", type=_positive_int, default=10_000, help="rows per Parquet file")
    p.add_argument(
        "--shuffle-seed", type=int, default=0, help="seed of the train rows' order (val keeps its own)"
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding the source images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing to_parquet output at --out")
    return p.parse_args(argv)


def _prepare_out(fs: pafs.FileSystem, path: str, out: str, overwrite: bool) -> None:
    """Refuse to clobber anything but an earlier to_parquet output, and that only with --overwrite."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise DataError(f"output {out!r} exists and is not a folder; choose another --out")
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if not entries:
        return
    if not overwrite:
        raise DataError(
            f"output {out!r} already exists and is not empty; pass --overwrite or choose another --out"
        )
    foreign = sorted({e.base_name for e in entries} - _OWN_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DataError(
            f"output {out!r} holds files other than a to_parquet output ({shown}); choose another --out"
        )
    fs.delete_dir_contents(path)


def _write_split(
    fs: pafs.FileSystem, base: str, out: str, split: str, ds: Dataset, shard_size: int, workers: int
) -> int:
    fs.create_dir(join(base, split), recursive=True)
    images: list[bytes] = []
    labels: list[int] = []
    shard = rows = 0

    def flush() -> None:
        nonlocal shard, images, labels
        name = f"part-{shard:05d}.parquet"
        table = pa.table(
            {"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())}, schema=SCHEMA
        )
        pq.write_table(table, join(base, split, name), filesystem=fs)
        print(f"wrote {join(out, split, name)} ({table.num_rows} rows)", flush=True)
        shard, images, labels = shard + 1, [], []

    # batch_size=None yields single items, so workers decode while this process encodes PNGs.
    for image, label in DataLoader(ds, batch_size=None, num_workers=workers):
        images.append(encode_png(image))
        labels.append(int(label))
        rows += 1
        if len(images) == shard_size:
            flush()
    if images:
        flush()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    flags = {
        "data.dataset": args.dataset,
        "data.root": args.data_root,
        "data.download": args.download,
        "data.image_size": args.image_size,
        "data.channels": args.channels,
        "data.val_fraction": args.val_fraction,
        "data.split_seed": args.split_seed,
    }
    try:
        # Shards do not depend on the model, so patch_size 1 keeps every image size valid here.
        cfg = build_config({"model.patch_size": 1, **{k: v for k, v in flags.items() if v is not None}}).data
        out = args.out or f"data/parquet/{cfg.dataset}-{cfg.image_size}"
        fs, base = resolve(out)
        _prepare_out(fs, base, out, args.overwrite)
        train, val, channels = build_datasets(cfg)
    except (DataError, ConfigError, pa.ArrowException, OSError) as err:  # OSError: e.g. a forbidden URI
        return fail(err)

    try:
        fs.create_dir(base, recursive=True)
        filesystem.write_bytes(join(out, INCOMPLETE_MARKER), b"")
        counts = {
            split: _write_split(fs, base, out, split, ds, args.shard_size, args.workers)
            for split, ds in (("train", shuffled(train, args.shuffle_seed)), ("val", val))
        }
        filesystem.write_bytes(join(out, SUCCESS_MARKER), b"")
        fs.delete_file(join(base, INCOMPLETE_MARKER))
    except DataError as err:  # a bad source image: the _INCOMPLETE marker stays behind
        return fail(err)
    except (pa.ArrowException, OSError) as err:
        return fail(f"writing {out!r} failed: {first_line(err)}", code=1)
    size = cfg.image_size
    print(f"done: {counts['train']} train + {counts['val']} val images ({channels}x{size}x{size}) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
