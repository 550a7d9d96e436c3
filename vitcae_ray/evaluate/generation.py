"""``sample``: generation metrics from the field, for the model's samples and for sanity rows.

Every row holds the same number of images, n = the held-out split's size capped at 10,000:
the held-out real images, the model's samples, and three sets a metric must rank below real
data (class-mean prototypes, copies of 16 training images, Gaussian noise). Per row:

- ``fid``: Frechet distance (torchmetrics) between the row's features and the whole training
  split's. Biased at small n: compare rows of the same n only.
- ``kid``: kernel (polynomial) MMD^2, unbiased (torchmetrics): the figure to trust on small data.
- ``precision`` / ``recall``: k-NN manifolds (Kynkaanniemi et al. 2019, k = 3) against n
  training images.
- ``memorisation``: the median pixel distance from each image to its nearest training image,
  over the same for held-out real images: about 1 for new images, near 0 for copies.
- ``max_class_share``: the largest share of the row given one class by the feature classifier;
  ``low_confidence_share``: the share below the held-out real images' 5th percentile of
  the classifier's confidence (max softmax), about 0.05 for real images.

Features are the penultimate layer of the dataset's cached feature classifier
(:mod:`.features`), or Inception-v3's pool features with a weights file.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from .. import metrics as M
from ..cls_mixture import fit_cls_mixture
from . import baselines

MAX_IMAGES = 10_000
MAX_REFERENCE = 50_000  # training images behind the FID/KID reference statistics
SANITY_ROWS = ("real", "prototypes", "copies", "noise")
KNN_K = 3


class _Given(nn.Module):
    """Features already computed, passed through: torchmetrics' metrics take a feature
    module, and each row's features are computed once for every metric."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def fid_kid(reference: torch.Tensor, feats: torch.Tensor, seed: int = 0) -> tuple[float, float, float]:
    """(FID, KID mean, KID std over subsets) of ``feats`` against ``reference`` (n, d)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    d = feats.shape[1]
    # one process computes (evaluate, or rank 0 in training): no gather across ranks, which
    # would wait forever for the ranks that do not call it
    local = {"sync_on_compute": False}
    fid = FrechetInceptionDistance(feature=_Given(d), **local)
    subset = min(1000, len(feats), len(reference))
    with warnings.catch_warnings():  # "will save all extracted features": n is capped above
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Given(d), subsets=50, subset_size=subset, **local)
    for metric in (fid, kid):
        metric.update(reference.double(), real=True)
        metric.update(feats.double(), real=False)
    with torch.random.fork_rng():  # KID draws its subsets from the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return float(fid.compute()), float(kid_mean), float(kid_std)


@torch.no_grad()
def draw_samples(
    model, n: int, seed: int, device, batch: int = 250, cls_prior=None, standard_normal: bool = False
) -> torch.Tensor:
    """``n`` samples of ``model.generate`` (its own sampler, or as the arguments say)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.cat(
        [
            model.generate(
                min(batch, n - i), generator=gen, cls_prior=cls_prior, standard_normal=standard_normal
            )
            .float()
            .cpu()
            for i in range(0, n, batch)
        ]
    )


def subset(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """At most ``n`` of ``x``, a fixed random choice in index order."""
    if len(x) <= n:
        return x
    pick = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return x[torch.as_tensor(pick)]


class GenerationReference:
    """What every row is measured against, computed once per evaluation: the training
    split's features (FID/KID), n training images' features (precision/recall), the training
    pixels (memorisation), and the held-out images' confidence and nearest distances."""

    def __init__(self, embed, clf, xtr, xv, patch: int, seed: int = 0) -> None:
        self.embed, self.clf, self.xtr, self.patch, self.seed = embed, clf, xtr, patch, seed
        self.n = min(len(xv), MAX_IMAGES)
        self.real = subset(xv, self.n, seed)
        self.ref_feats = embed.features(subset(xtr, MAX_REFERENCE, seed))
        self.knn_feats = embed.features(subset(xtr, self.n, seed + 1)).double().numpy()
        self.real_confidence = np.percentile(clf.proba(self.real).max(1), 5)
        self.real_distance = float(np.median(M.nearest_distance(self.real, xtr)))

    def row(self, images: torch.Tensor) -> dict[str, float]:
        """The metrics of one row of ``self.n`` images."""
        feats = self.embed.features(images)
        fid, kid, kid_std = fid_kid(self.ref_feats, feats, self.seed)
        precision, recall = M.knn_precision_recall(self.knn_feats, feats.double().numpy(), KNN_K)
        proba = self.clf.proba(images)
        distance = float(np.median(M.nearest_distance(images, self.xtr)))
        return {
            "fid": fid,
            "kid": kid,
            "kid_std": kid_std,
            "precision": precision,
            "recall": recall,
            "memorisation": distance / max(self.real_distance, 1e-12),
            "max_class_share": M.max_class_share(proba),
            "low_confidence_share": float((proba.max(1) < self.real_confidence).mean()),
            "seam_ratio": M.seam_ratio(images, self.patch),
        }

    def sanity_sets(self, ytr: np.ndarray) -> dict[str, torch.Tensor]:
        return {
            "real": self.real,
            "prototypes": baselines.prototypes(self.xtr, ytr, self.n),
            "copies": baselines.copies(self.xtr, self.n, seed=self.seed),
            "noise": baselines.noise(self.xtr, self.n, seed=self.seed),
        }


def sanity_holds(m: dict[str, float]) -> bool:
    """Held-out real images beat every other sanity row on FID and recall, and the copies
    are flagged by the memorisation figure."""
    real = (m["sample/real/fid"], m["sample/real/recall"])
    beaten = all(
        real[0] < m[f"sample/{r}/fid"] and real[1] > m[f"sample/{r}/recall"] for r in SANITY_ROWS[1:]
    )
    return beaten and m["sample/copies/memorisation"] < 0.5


@torch.no_grad()
def task_sample(model, ref: GenerationReference, ytr, device, seed: int, feature_acc: float):
    """-> (metrics, the grid's samples, grid columns). ``sample/*``: z_cls ~ N(0, I). A model
    with ``z_cls`` also samples it from its Gaussian mixture on the training images' posterior
    means (``sample/mixture/*``, :mod:`vitcae_ray.cls_mixture`: the model's own, what
    ``generate`` uses, or fitted here when it has none; ``sample/mixture/fitted_epoch`` is -1
    then); the grid then shows 32 of each (16 a row), N(0, I) in the top two rows."""
    samples = draw_samples(model, ref.n, seed, device, standard_normal=True)
    grid = samples[:64]
    out = {f"sample/{k}": v for k, v in ref.row(samples).items()}
    if model.has_z_cls:
        mixture, fitted = model.cls_mixture, model.cls_mixture_epoch
        if mixture is None:
            mixture = fit_cls_mixture(model, subset(ref.xtr, MAX_IMAGES, seed), device, seed)
            fitted = -1
        mixed = draw_samples(model, ref.n, seed, device, cls_prior=mixture)
        out.update({f"sample/mixture/{k}": v for k, v in ref.row(mixed).items()})
        out["sample/mixture/components"] = mixture.components
        out["sample/mixture/fitted_epoch"] = fitted
        grid = torch.cat([samples[:32], mixed[:32]])
    for name, images in ref.sanity_sets(ytr).items():
        out.update({f"sample/{name}/{k}": v for k, v in ref.row(images).items()})
    out["sample/images"] = ref.n
    out["sample/feature_acc"] = feature_acc
    out["sample/sanity_holds"] = float(sanity_holds(out))
    return out, grid, 16
