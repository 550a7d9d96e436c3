"""Dataset registry, the embedded ``digits`` set and the torchvision datasets.

Every builder returns ``(train, val, channels)`` whose items are ``(image, label)``: a float32
tensor ``(C, S, S)`` in [0, 1] and an ``int``. ``digits`` is resized once and held as one tensor
because it feeds the CPU training loop, where per-item decoding would dominate the step time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from vitcae_ray.config import DataConfig
from vitcae_ray.errors import first_line

DatasetTriple = tuple[Dataset, Dataset, int]
Builder = Callable[[DataConfig], DatasetTriple]

DATASETS: dict[str, Builder] = {}

MIN_IMAGE_SIZE = 8
# PIL modes with one intensity band; everything else is treated as colour.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class DataError(ValueError):
    """A bad dataset path, file or setting; the message is one line naming it and the fix."""


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        DATASETS[name] = fn
        return fn

    return deco


def build_datasets(cfg: DataConfig) -> DatasetTriple:
    """Return ``(train, val, channels)`` for ``cfg.dataset``, checked on their first items."""
    if cfg.dataset not in DATASETS:
        raise DataError(
            f"unknown dataset {cfg.dataset!r}: registered datasets are {', '.join(sorted(DATASETS))}"
        )
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise DataError(f"data.image_size must be >= {MIN_IMAGE_SIZE}, got {cfg.image_size}")
    if cfg.channels not in (0, 1, 3):
        raise DataError(f"data.channels must be 0, 1 or 3, got {cfg.channels}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    train, val, channels = DATASETS[cfg.dataset](cfg)
    for split, ds in (("train", train), ("val", val)):
        _check_first_item(cfg.dataset, split, ds, channels, cfg.image_size)
    return train, val, channels


def _check_first_item(name: str, split: str, ds: Dataset, channels: int, size: int) -> None:
    """One cheap look at item 0 catches a wrong transform before a long run starts."""
    if len(ds) == 0:  # type: ignore[arg-type]
        raise DataError(f"dataset {name!r}: the {split} split is empty; check --data-root")
    image, label = ds[0]
    want = (channels, size, size)
    if not isinstance(image, torch.Tensor) or image.dtype != torch.float32 or tuple(image.shape) != want:
        got = (
            f"{tuple(image.shape)} {image.dtype}" if isinstance(image, torch.Tensor) else type(image).__name__
        )
        raise DataError(
            f"dataset {name!r}: {split} images are {got}, expected float32 {want}; check data.image_size"
        )
    if not isinstance(label, int):
        raise DataError(f"dataset {name!r}: {split} labels are {type(label).__name__}, expected int")


def split_indices(n: int, val_fraction: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """Seeded permutation split; both halves sorted so reads keep the source order."""
    if n < 2:
        raise DataError(f"{what} holds {n} item(s); at least 2 are needed for a train/val split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def pil_mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def native_channels(img: Image.Image) -> int:
    return 1 if img.mode in GRAY_MODES else 3


def image_to_tensor(img: Image.Image, mode: str, size: int) -> torch.Tensor:
    """PIL image -> float32 (C, size, size) in [0, 1]; PIL's bilinear resize antialiases."""
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))
    arr = arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)
    return arr.to(torch.float32).div_(255.0).contiguous()


class TensorImageDataset(Dataset):
    """Preloaded images: an item is a tensor view, so nothing is decoded per step.

    ``images`` (N, C, S, S) float32 and ``targets`` (N,) int64 allow whole-batch indexing;
    ``indices`` are the positions in the source dataset.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, indices: Sequence[int]) -> None:
        self.images = images
        self.targets = targets
        self.indices = list(indices)
        self._labels: list[int] = targets.tolist()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self._labels[i]


@register("digits")
def _digits(cfg: DataConfig) -> DatasetTriple:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32).div_(16.0).unsqueeze(1)
    size = cfg.image_size
    if images.shape[-1] != size:
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    images = images.clamp_(0.0, 1.0)
    channels = cfg.channels or 1
    if channels == 3:
        images = images.expand(-1, 3, -1, -1)
    targets = torch.from_numpy(bunch.target).to(torch.int64)
    tr, va = split_indices(len(targets), cfg.val_fraction, cfg.split_seed, "dataset 'digits'")
    return (
        TensorImageDataset(images[tr].contiguous(), targets[tr], tr),
        TensorImageDataset(images[va].contiguous(), targets[va], va),
        channels,
    )


class ConvertMode:
    """Picklable PIL mode conversion (a lambda would break DataLoader worker processes)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)


def require_root(cfg: DataConfig, what: str, download_hint: bool = False) -> str:
    hint = f"pass --data-root {what}" + (" (and --download to fetch it)" if download_hint else "")
    if cfg.root is None:
        if cfg.download:
            raise DataError(f"dataset {cfg.dataset!r}: --download needs a folder; pass --data-root DIR")
        raise DataError(f"dataset {cfg.dataset!r}: no root given; {hint}")
    return cfg.root


def _torchvision_root(cfg: DataConfig) -> str:
    root = os.path.expanduser(require_root(cfg, "DIR", download_hint=True))
    if not os.path.exists(root) and not cfg.download:
        raise DataError(
            f"dataset {cfg.dataset!r}: root {root!r} not found; "
            "pass --data-root DIR (and --download to fetch it)"
        )
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"dataset {cfg.dataset!r}: root {root!r} is not a folder; pass --data-root DIR")
    return root


def _torchvision_builder(
    cls_name: str, own_channels: int, splits: tuple[dict, dict], crop: int | None = None
) -> Builder:
    def build(cfg: DataConfig) -> DatasetTriple:
        import torchvision.datasets as tvd
        from torchvision import transforms as T

        root = _torchvision_root(cfg)
        channels = cfg.channels or own_channels
        steps: list[Callable] = [ConvertMode(pil_mode(channels))] if channels != own_channels else []
        if crop is not None:
            steps.append(T.CenterCrop(crop))
        steps += [T.Resize((cfg.image_size, cfg.image_size), antialias=True), T.ToTensor()]
        transform = T.Compose(steps)
        cls = getattr(tvd, cls_name)
        extra = {"target_type": "identity"} if cls_name == "CelebA" else {}
        try:
            train, val = (
                cls(root, download=cfg.download, transform=transform, target_transform=int, **extra, **kw)
                for kw in splits
            )
        except (RuntimeError, OSError) as err:
            raise DataError(
                f"dataset {cfg.dataset!r}: cannot load it from {root!r} ({first_line(err)}); "
                "pass --data-root DIR holding it (and --download to fetch it)"
            ) from None
        return train, val, channels

    return build


_TRAIN_TEST = ({"train": True}, {"train": False})
register("mnist")(_torchvision_builder("MNIST", 1, _TRAIN_TEST))
register("fashion_mnist")(_torchvision_builder("FashionMNIST", 1, _TRAIN_TEST))
register("cifar10")(_torchvision_builder("CIFAR10", 3, _TRAIN_TEST))
register("cifar100")(_torchvision_builder("CIFAR100", 3, _TRAIN_TEST))
# CelebA's faces sit in the centre 140 px of the 178x218 frames; 64x64 is the intended size.
register("celeba")(_torchvision_builder("CelebA", 3, ({"split": "train"}, {"split": "valid"}), crop=140))
