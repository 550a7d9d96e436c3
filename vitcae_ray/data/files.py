"""Datasets read from files: a class-per-folder image tree and Parquet (local or any pyarrow URI).

Both keep only labels plus paths or encoded bytes in memory and decode one image per item,
so a bad file surfaces as a :class:`DataError` naming it when that item is loaded.
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from vitcae_ray import filesystem
from vitcae_ray.config import DataConfig
from vitcae_ray.errors import first_line

from .datasets import (
    DataError,
    DatasetTriple,
    image_to_tensor,
    native_channels,
    pil_mode,
    register,
    require_root,
    split_indices,
)

# Marker left by to_parquet while it writes; its presence means the output is unusable.
INCOMPLETE_MARKER = "_INCOMPLETE"
SUCCESS_MARKER = "_SUCCESS"
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class EncodedImageDataset(Dataset):
    """Base for lazily decoded images; ``mode`` is set once the channel count is decided."""

    def __init__(self, labels: list[int], size: int) -> None:
        self.labels = labels
        self.size = size
        self.mode = "RGB"

    def _open(self, i: int) -> Image.Image:
        raise NotImplementedError

    def _where(self, i: int) -> str:
        raise NotImplementedError

    def _load(self, i: int) -> Image.Image:
        try:
            img = self._open(i)
            img.load()
            return img
        except _PIL_ERRORS as err:
            raise DataError(
                f"{self._where(i)} is not a readable image ({first_line(err)}); fix or remove it"
            ) from None

    def native_channels(self) -> int:
        return native_channels(self._load(0))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self._load(i)
        try:
            return image_to_tensor(img, self.mode, self.size), self.labels[i]
        except _PIL_ERRORS as err:
            raise DataError(
                f"{self._where(i)} cannot be converted to {self.mode} ({first_line(err)}); fix or remove it"
            ) from None


def _finish(cfg: DataConfig, train: EncodedImageDataset, val: EncodedImageDataset) -> DatasetTriple:
    """Decide the channel count from the first train image unless ``cfg.channels`` forces it."""
    channels = cfg.channels or train.native_channels()
    train.mode = val.mode = pil_mode(channels)
    return train, val, channels


# ---------------------------------------------------------------------------------------------
# imagefolder


class ImageFolderDataset(EncodedImageDataset):
    def __init__(self, paths: list[str], labels: list[int], classes: list[str], size: int) -> None:
        super().__init__(labels, size)
        self.paths = paths
        self.classes = classes

    def _open(self, i: int) -> Image.Image:
        return Image.open(self.paths[i])

    def _where(self, i: int) -> str:
        return f"image file {self.paths[i]!r}"


def _is_image(path: str) -> bool:
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(path, IMG_EXTENSIONS)


def _class_folders(folder: str) -> list[str]:
    """The class folders torchvision's ``ImageFolder`` sees (symlinks followed), less hidden ones."""
    if not os.path.isdir(folder):
        raise DataError(
            f"dataset 'imagefolder': folder {folder!r} not found; "
            "pass --data-root DIR (one sub-folder per class)"
        )
    try:
        classes = [c for c in find_classes(folder)[0] if not c.startswith(".")]
    except FileNotFoundError:  # no sub-folder at all
        classes = []
    if not classes:
        raise DataError(
            f"dataset 'imagefolder': no class folders in {folder!r}; "
            "expected one sub-folder of images per class"
        )
    return classes


def _scan(folder: str, class_to_idx: dict[str, int]) -> tuple[list[str], list[int]]:
    """(paths, labels) of the images in ``folder``'s class folders, which must all be train
    classes and hold an image each; hidden files are left out."""
    names = _class_folders(folder)
    unknown = [n for n in names if n not in class_to_idx]
    if unknown:
        raise DataError(
            f"dataset 'imagefolder': class folder {os.path.join(folder, unknown[0])!r} "
            "has no matching train class; val/ must use the train class names"
        )
    index = {n: class_to_idx[n] for n in names}
    found = make_dataset(folder, index, is_valid_file=_is_image, allow_empty=True)
    paths, labels = [path for path, _ in found], [label for _, label in found]
    present = set(labels)
    empty = [n for n in names if index[n] not in present]
    if empty:
        raise DataError(
            f"dataset 'imagefolder': class folder {os.path.join(folder, empty[0])!r} "
            f"holds no images ({', '.join(IMG_EXTENSIONS)}); add images or remove it"
        )
    return paths, labels


@register("imagefolder")
def _imagefolder(cfg: DataConfig) -> DatasetTriple:
    root = os.path.expanduser(require_root(cfg, "DIR (one sub-folder of images per class)"))
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    size = cfg.image_size
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        classes = _class_folders(train_dir)
        index = {c: i for i, c in enumerate(classes)}
        train = ImageFolderDataset(*_scan(train_dir, index), classes, size)
        val = ImageFolderDataset(*_scan(val_dir, index), classes, size)
    else:
        classes = _class_folders(root)
        paths, labels = _scan(root, {c: i for i, c in enumerate(classes)})
        tr, va = split_indices(
            len(paths), cfg.val_fraction, cfg.split_seed, f"dataset 'imagefolder' {root!r}"
        )
        train = ImageFolderDataset([paths[i] for i in tr], [labels[i] for i in tr], classes, size)
        val = ImageFolderDataset([paths[i] for i in va], [labels[i] for i in va], classes, size)
    return _finish(cfg, train, val)


# ---------------------------------------------------------------------------------------------
# parquet


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or any pyarrow URI (s3://, gs://, hdfs://, file://) -> (filesystem, path)."""
    try:
        return filesystem.resolve(uri)
    except filesystem.FileSystemError as err:
        raise DataError(str(err)) from None


class ParquetImageDataset(EncodedImageDataset):
    def __init__(
        self, images: pa.Array, labels: list[int], rows: list[int] | None, source: str, size: int
    ) -> None:
        super().__init__(labels, size)
        self.images = images  # one contiguous large_binary array: O(1) lookup, cheap to pickle
        self.rows = rows
        self.source = source

    def _open(self, i: int) -> Image.Image:
        data = self.images[i].as_py()
        return Image.open(io.BytesIO(data or b""))

    def _where(self, i: int) -> str:
        row = i if self.rows is None else self.rows[i]
        return f"dataset 'parquet': row {row} of {self.source!r}"


def _read_table(fs: pafs.FileSystem, path: str, shown: str, limit: int | None = None) -> pa.Table:
    """The image and label columns of the Parquet files at ``path`` (the first ``limit`` rows)."""
    hint = "expected columns 'image' (encoded PNG/JPEG bytes) and 'label' (int)"
    try:
        dset = pads.dataset(path, filesystem=fs, format="parquet")
        files, schema = dset.files, dset.schema
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"dataset 'parquet': cannot read {shown!r} ({first_line(err)})") from None
    if not files:
        raise DataError(f"dataset 'parquet': no Parquet files in {shown!r}")
    for col, ok in (("image", _is_binary), ("label", pa.types.is_integer)):
        if col not in schema.names:
            raise DataError(
                f"dataset 'parquet': {shown!r} has no column {col!r} "
                f"(columns: {', '.join(schema.names)}); {hint}"
            )
        if not ok(schema.field(col).type):
            raise DataError(
                f"dataset 'parquet': column {col!r} of {shown!r} has type {schema.field(col).type}; {hint}"
            )
    try:
        table = (
            dset.to_table(columns=["image", "label"])
            if limit is None
            else dset.head(limit, columns=["image", "label"])
        )
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"dataset 'parquet': cannot read {shown!r} ({first_line(err)})") from None
    if table.column("label").null_count:
        raise DataError(f"dataset 'parquet': column 'label' of {shown!r} has missing values")
    return table


def parquet_rows(fs: pafs.FileSystem, path: str, shown: str) -> int:
    """Rows of the Parquet files at ``path``, from their footers alone (no data page read)."""
    try:
        return pads.dataset(path, filesystem=fs, format="parquet").count_rows()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"dataset 'parquet': cannot read {shown!r} ({first_line(err)})") from None


def _is_binary(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_binary_view", None)  # binary_view needs pyarrow >= 16
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or bool(is_view and is_view(t))


def _to_dataset(table: pa.Table, rows: list[int] | None, shown: str, size: int) -> ParquetImageDataset:
    images = table.column("image").cast(pa.large_binary()).combine_chunks()
    labels = [int(v) for v in table.column("label").to_pylist()]
    return ParquetImageDataset(images, labels, rows, shown, size)


def parquet_splits(cfg: DataConfig) -> tuple[pafs.FileSystem, str, str] | None:
    """(filesystem, path, shown root) when ``data.root`` is a finished to_parquet output with
    ``train/`` and ``val/`` folders, else None. Only such a root streams with Ray Data."""
    root = require_root(cfg, "PATH_OR_URI of a Parquet file or folder")
    fs, path = resolve(root)
    shown = root.rstrip("/")
    try:
        info = fs.get_file_info(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"dataset 'parquet': cannot access {shown!r} ({first_line(err)})") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(
            f"dataset 'parquet': {shown!r} not found; pass --data-root PATH_OR_URI of a "
            "Parquet file or folder (write one with python -m vitcae_ray.data.to_parquet)"
        )
    if info.type != pafs.FileType.Directory:
        return None
    if fs.get_file_info(filesystem.join(path, INCOMPLETE_MARKER)).type != pafs.FileType.NotFound:
        raise DataError(
            f"dataset 'parquet': {shown!r} is an unfinished to_parquet output; "
            "rerun to_parquet with --overwrite"
        )
    subs = fs.get_file_info([filesystem.join(path, "train"), filesystem.join(path, "val")])
    if all(s.type == pafs.FileType.Directory for s in subs):
        return fs, path, shown
    return None


def parquet_split(cfg: DataConfig, split: str, limit: int | None = None) -> ParquetImageDataset:
    """One split (``train`` or ``val``) of a to_parquet output as a map-style dataset, at most
    its first ``limit`` rows; the caller sets ``mode`` (see :func:`_finish`)."""
    found = parquet_splits(cfg)
    if found is None:
        raise DataError(
            f"dataset 'parquet': {cfg.root!r} has no train/ and val/ folders; "
            "write it with python -m vitcae_ray.data.to_parquet"
        )
    fs, path, shown = found
    where = filesystem.join(shown, split)
    table = _read_table(fs, filesystem.join(path, split), where, limit)
    return _to_dataset(table, None, where, cfg.image_size)


@register("parquet")
def _parquet(cfg: DataConfig) -> DatasetTriple:
    if parquet_splits(cfg) is not None:
        return _finish(cfg, parquet_split(cfg, "train"), parquet_split(cfg, "val"))
    root = require_root(cfg, "PATH_OR_URI of a Parquet file or folder")
    fs, path = resolve(root)
    shown = root.rstrip("/")
    size = cfg.image_size
    table = _read_table(fs, path, shown)
    tr, va = split_indices(table.num_rows, cfg.val_fraction, cfg.split_seed, f"dataset 'parquet' {shown!r}")
    train = _to_dataset(table.take(tr), tr, shown, size)
    val = _to_dataset(table.take(va), va, shown, size)
    return _finish(cfg, train, val)
