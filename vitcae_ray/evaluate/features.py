"""The feature space of the generation metrics (FID, KID, precision/recall, class shares).

Small or grayscale data have no standard feature network, so ``evaluate`` trains a small CNN
classifier on the dataset's training split (fixed seed, fixed schedule) and uses its
penultimate layer. It is trained once per dataset and cached, keyed by the dataset's name,
image size, channels and a digest of its training images, so every evaluation of that dataset
(every model, variant, freezing setting, seed) measures in the same space. Its held-out
accuracy is stored with it and reported.

The cache lives in ``$VITCAE_RAY_CACHE`` (default ``~/.cache/vitcae_ray``) under
``features/``; ``--feature-cache DIR`` overrides it. With a user-supplied Inception weights
file (RGB data), torchmetrics' Inception-v3 features are used instead (:func:`inception`).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import filesystem

FEATURE_DIM = 128
EPOCHS = 12  # enough for ~98% on the digits; the schedule is part of the cache key
VERSION = 1  # bump when the network or its training changes: old cache files are ignored


def cache_dir(override: str | None = None) -> Path:
    root = override or os.environ.get("VITCAE_RAY_CACHE") or Path.home() / ".cache" / "vitcae_ray"
    return Path(root) / "features"


class FeatureNet(nn.Module):
    """Three conv blocks (32, 64, 128 channels, each halving the side), global average pool,
    a ``FEATURE_DIM`` penultimate layer and the class logits. ``forward`` returns the
    penultimate features (B, FEATURE_DIM), the space the metrics compare in."""

    def __init__(self, in_chans: int, num_classes: int) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(in_chans, 32), block(32, 64), block(64, 128))
        self.embed = nn.Sequential(nn.Linear(128, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.num_features = FEATURE_DIM  # read by torchmetrics for a custom feature extractor
        self.in_chans, self.num_classes = in_chans, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x.float())  # (B, 128, S/8, S/8)
        return self.embed(h.mean((2, 3)))  # (B, FEATURE_DIM)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self(x))

    @torch.no_grad()
    def proba(self, images: torch.Tensor, batch: int = 500) -> np.ndarray:
        """p(y | x), (B, K), in eval mode."""
        self.eval()
        device = next(self.parameters()).device
        out = [
            self.logits(images[i : i + batch].to(device)).softmax(1).cpu()
            for i in range(0, len(images), batch)
        ]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        self.eval()
        device = next(self.parameters()).device
        return torch.cat([self(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)])


def _key(dataset: str, xtr: torch.Tensor, ytr: np.ndarray) -> str:
    """Dataset name, shape and a digest of the training images and labels."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(xtr.numpy().astype(np.float16)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(ytr, dtype=np.int64)).tobytes())
    C, S = xtr.shape[1], xtr.shape[-1]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)
    return f"{safe}-{C}x{S}-n{len(xtr)}-v{VERSION}-{h.hexdigest()[:12]}"


def train_feature_net(
    xtr: torch.Tensor, ytr: np.ndarray, xv: torch.Tensor, yv: np.ndarray, seed: int = 0, log=print
) -> tuple[FeatureNet, float]:
    """Train the classifier on (xtr, ytr) with a fixed seed and schedule (Adam, cosine, light
    shift augmentation); returns (net in eval mode, accuracy on (xv, yv))."""
    classes = np.unique(ytr)
    if len(classes) < 2:
        raise ValueError("the feature classifier needs at least 2 classes in the training split")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = FeatureNet(xtr.shape[1], int(classes.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    batch = 64
    steps = EPOCHS * max(1, len(xtr) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    y = torch.as_tensor(np.asarray(ytr), dtype=torch.long)
    start = time.perf_counter()
    net.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr) - batch + 1, batch):
            idx = perm[i : i + batch]
            x = xtr[idx]
            # shifts of up to 1/16 of the side: the features should not hinge on exact positions
            pad = max(1, x.shape[-1] // 16)
            dx, dy = (int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=g))
            x = torch.roll(F.pad(x, (pad,) * 4), (dy, dx), (2, 3))[..., pad:-pad, pad:-pad]
            loss = F.cross_entropy(net.logits(x), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"  feature classifier epoch {epoch + 1}/{EPOCHS} loss {loss.item():.3f}")
    net.eval()
    acc = float((net.proba(xv).argmax(1) == np.asarray(yv)).mean()) if len(xv) else float("nan")
    log(f"  feature classifier trained in {time.perf_counter() - start:.0f}s, held-out accuracy {acc:.1%}")
    return net, acc


def feature_net(
    dataset: str,
    xtr: torch.Tensor,
    ytr: np.ndarray,
    xv: torch.Tensor,
    yv: np.ndarray,
    cache: str | None = None,
    log=print,
) -> tuple[FeatureNet, float]:
    """The dataset's cached feature classifier, trained and cached at first use:
    (net in eval mode, its held-out accuracy)."""
    path = cache_dir(cache) / f"{_key(dataset, xtr, ytr)}.pt"
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net = FeatureNet(int(state["in_chans"]), int(state["num_classes"]))
            net.load_state_dict(state["model"])
            return net.eval(), float(state["accuracy"])
        except (RuntimeError, KeyError, OSError, ValueError):
            log(f"  feature classifier cache {path} is unreadable: training it again")
    log(f"training the {dataset} feature classifier (once; cached in {path.parent})")
    net, acc = train_feature_net(xtr, ytr, xv, yv, log=log)
    state = {
        "model": net.state_dict(),
        "in_chans": net.in_chans,
        "num_classes": net.num_classes,
        "accuracy": acc,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        filesystem.atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:  # a read-only home: still usable, just not cached
        log(f"  cannot cache the feature classifier in {path.parent} ({e.strerror}): set VITCAE_RAY_CACHE")
    return net, acc


class InceptionFeatures(nn.Module):
    """torchmetrics' Inception-v3 (torch-fidelity's FID network) from a weights file, 2048-d
    pool features of images in [0, 1]; grayscale is repeated to three channels."""

    def __init__(self, weights: str) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModuleNotFoundError('Inception features need torch-fidelity: pip install -e ".[fid]"')
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights
        )
        self.num_features = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.net((x.clamp(0, 1) * 255).to(torch.uint8)).reshape(len(x), -1).float()

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return torch.cat([self(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)])
