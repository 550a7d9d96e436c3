"""``probe``: the paper's classification metric. Logistic regression (scikit-learn) on
standardised features, stratified k-fold cross-validated over the whole dataset (training and
validation splits together, at most 10,000 images), on:

- every vector of the model's ``representations(x)`` (ViTCAE: ``z_cls``'s posterior mean;
  ViT-VAE: the encoder's final CLS feature and the pooled patch posterior means);
- PCA-k of the pixels, k = ``model.z_cls_dim`` (fitted inside each fold);
- the raw pixels.

Each row is the mean accuracy over the folds and its standard deviation.
"""

from __future__ import annotations

import numpy as np
import torch

from .baselines import pca_pixels

MAX_IMAGES = 10_000


def linear_probe(transform=None):
    """Standardised logistic regression (scikit-learn), after ``transform`` when given."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [transform] if transform is not None else []
    return make_pipeline(*steps, StandardScaler(), LogisticRegression(max_iter=3000))


def cross_validated(features: np.ndarray, y: np.ndarray, folds: int, seed: int, transform=None):
    """(mean accuracy, std over folds, out-of-fold predictions) of :func:`linear_probe`,
    ``transform`` fitted per fold when given."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    pred = np.empty_like(y)
    accs = []
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, y):
        clf = linear_probe(clone(transform) if transform is not None else None).fit(features[tr], y[tr])
        pred[te] = clf.predict(features[te])
        accs.append(float((pred[te] == y[te]).mean()))
    return float(np.mean(accs)), float(np.std(accs)), pred


@torch.no_grad()
def representations(model, x: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
    device = next(model.parameters()).device
    parts = [model.representations(x[i : i + batch].to(device)) for i in range(0, len(x), batch)]
    return {k: torch.cat([p[k].float().cpu() for p in parts]).numpy() for k in parts[0]}


def task_probe(model, x: torch.Tensor, y: np.ndarray, seed: int, folds: int = 5):
    """-> (metrics, the primary representation's row-normalised confusion matrix, 1)."""
    from sklearn.metrics import confusion_matrix

    if len(x) > MAX_IMAGES:
        pick = np.sort(np.random.default_rng(seed).choice(len(x), MAX_IMAGES, replace=False))
        x, y = x[torch.as_tensor(pick)], y[pick]
    folds = max(2, min(folds, int(np.bincount(y).min())))
    pixels = x.flatten(1).numpy()
    k = model.cfg.z_cls_dim
    rows = {name: (feats, None) for name, feats in representations(model, x).items()}
    rows[f"pca{k}_pixels"] = (pixels, pca_pixels(k))
    rows["pixels"] = (pixels, None)
    out: dict[str, float] = {"probe/images": len(x), "probe/folds": folds}
    preds = {}
    for name, (feats, transform) in rows.items():
        mean, std, preds[name] = cross_validated(feats, y, folds, seed, transform)
        out[f"probe/{name}/acc"], out[f"probe/{name}/acc_std"] = mean, std
    primary = next(iter(rows))  # representations() lists representation(x)'s vector first
    out["probe/acc"] = out[f"probe/{primary}/acc"]
    cm = confusion_matrix(y, preds[primary], labels=np.unique(y))
    return out, confusion_image(cm), 1


def confusion_image(cm: np.ndarray, cell: int = 12) -> torch.Tensor:
    """Row-normalised confusion matrix as a grayscale image (rows true, columns predicted)."""
    c = torch.as_tensor(cm, dtype=torch.float32)
    c = c / c.sum(1, keepdim=True).clamp_min(1)
    return c.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None, None]
