"""Datasets: a registry of builders returning ``(train, val, channels)``.

Items are ``(image, label)``: a float32 tensor ``(C, S, S)`` in [0, 1] and an ``int``.
"""

from .datasets import DATASETS, DataError, TensorImageDataset, build_datasets, register
from .files import ImageFolderDataset, ParquetImageDataset  # registers imagefolder, parquet

__all__ = [
    "DATASETS",
    "DataError",
    "ImageFolderDataset",
    "ParquetImageDataset",
    "TensorImageDataset",
    "build_datasets",
    "register",
]
