"""What every result stands beside: methods that train nothing, and image sets that a metric
must rank below real data.

- inpainting: biharmonic fill (``skimage.restoration.inpaint_biharmonic``) of the hidden
  pixels from the visible ones (the mean-image fill is the hidden input itself,
  ``metrics.hide``);
- probe: PCA-k of the pixels and the raw pixels (the representations, not the classifier);
- generation sanity rows: class-mean prototypes, copies of 16 training images, and Gaussian
  noise with the training pixels' mean and spread.
"""

from __future__ import annotations

import numpy as np
import torch


def biharmonic_fill(x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Biharmonic inpainting of the ``hidden`` (B, 1, S, S) pixels of each image, per channel,
    from the visible ones alone (the hidden values are never read)."""
    from skimage.restoration import inpaint_biharmonic

    out = x.clone()
    for i in range(len(x)):
        m = hidden[i, 0].numpy()
        if not m.any():
            continue
        img = x[i].permute(1, 2, 0).double().numpy().copy()  # (S, S, C)
        img[m] = 0.0  # what the method sees there does not matter: make sure of it
        filled = inpaint_biharmonic(img, m, channel_axis=-1)
        out[i] = torch.from_numpy(filled).permute(2, 0, 1).to(x.dtype).clamp(0, 1)
    return out


def pca_pixels(k: int):
    """Pixels -> their first ``k`` principal components (scikit-learn; in a cross-validated
    probe it is fitted inside each fold, on that fold's training part)."""
    from sklearn.decomposition import PCA

    return PCA(n_components=k, random_state=0)


def prototypes(x: torch.Tensor, y: np.ndarray, n: int) -> torch.Tensor:
    """The class-mean images, cycled to ``n`` images: a collapsed model's output."""
    classes = np.unique(y)
    means = torch.stack([x[torch.as_tensor(y == c)].mean(0) for c in classes])
    return means[torch.arange(n) % len(classes)]


def copies(x: torch.Tensor, n: int, distinct: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` images made of ``distinct`` training images repeated: a memorising model's output."""
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: min(distinct, len(x))]
    return x[pick[torch.arange(n) % len(pick)]]


def noise(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Per-pixel Gaussian noise with the training images' pixel mean and standard deviation,
    clipped to [0, 1]: the right first and second moments per pixel, no structure."""
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0)
    return (mean + std * torch.randn((n, *x.shape[1:]), generator=g)).clamp(0, 1)
