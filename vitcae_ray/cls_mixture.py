"""An ex-post density on ``z_cls``: a Gaussian mixture fitted on the training images'
posterior means, to sample the class latent from where the data is.

The model's prior is N(0, I), but the aggregate posterior of ``z_cls`` does not fill it, so
some draws from N(0, I) land where no training image's latent is and decode to no digit at
all. A mixture fitted after training on the posterior means (scikit-learn's
``GaussianMixture``, full covariances, the number of components chosen by BIC) samples
``z_cls`` from where the training images' latents are; ``z_patch`` then comes from the
model's conditional prior as before. Nothing in training changes. The number of components
is chosen by the data (BIC over ``COMPONENTS``), not set to a dataset's class count.

The trainer fits it at every periodic evaluation (rank 0) and keeps it on the model
(``model.cls_mixture``, with the epoch it was fitted at); checkpoints and exported models
carry it, and ``model.generate`` samples from it unless told to use N(0, I).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COMPONENTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # the candidates BIC chooses from
REG_COVAR = 1e-4  # added to each covariance's diagonal (posterior means may be near-collinear)


@dataclass(frozen=True)
class ClsMixture:
    """``sum_k weights[k] N(means[k], scale_tril[k] scale_tril[k]^T)`` over ``z_cls``."""

    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, d)
    scale_tril: torch.Tensor  # (K, d, d), lower-triangular Cholesky factors

    @property
    def components(self) -> int:
        return len(self.weights)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n, d) draws: a component by its weight, then its Gaussian."""
        device = device or self.means.device
        k = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], 1, device=device, generator=generator)
        return self.means.to(device)[k] + (self.scale_tril.to(device)[k] @ eps).squeeze(-1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights, "means": self.means, "scale_tril": self.scale_tril}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ClsMixture:
        return cls(state["weights"], state["means"], state["scale_tril"])


def fit_mixture(latents: np.ndarray, seed: int = 0, components=COMPONENTS) -> ClsMixture:
    """A full-covariance Gaussian mixture on ``latents`` (n, d), its component count the BIC's
    choice among ``components`` (those with at least ``d + 1`` points per component)."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(latents, dtype=np.float64)
    n, d = x.shape
    candidates = [k for k in components if n >= k * (d + 1)] or [1]
    best, best_bic = None, np.inf
    for k in candidates:
        gm = GaussianMixture(k, covariance_type="full", reg_covar=REG_COVAR, n_init=2, random_state=seed).fit(
            x
        )
        bic = gm.bic(x)
        if bic < best_bic:
            best, best_bic = gm, bic
    return ClsMixture(
        torch.as_tensor(best.weights_, dtype=torch.float32),
        torch.as_tensor(best.means_, dtype=torch.float32),
        torch.as_tensor(np.linalg.cholesky(best.covariances_), dtype=torch.float32),
    )


@torch.no_grad()
def fit_cls_mixture(model, images: torch.Tensor, device, seed: int = 0, batch: int = 256) -> ClsMixture:
    """The mixture on ``model``'s ``z_cls`` posterior means of ``images`` (training images; the
    caller bounds how many)."""
    latents = torch.cat(
        [
            model.representations(images[i : i + batch].to(device))["z_cls"].float().cpu()
            for i in range(0, len(images), batch)
        ]
    )
    return fit_mixture(latents.numpy(), seed)


def mixture_state(model) -> dict:
    """The model's mixture for a checkpoint or model file: ``{"cls_mixture": state or None,
    "cls_mixture_epoch": the epoch it was fitted at or None}``."""
    mixture = model.cls_mixture
    return {
        "cls_mixture": None if mixture is None else mixture.state_dict(),
        "cls_mixture_epoch": model.cls_mixture_epoch,
    }


def restore_mixture(model, state: dict) -> None:
    """Put a checkpoint's or model file's mixture (:func:`mixture_state`) back on the model."""
    if state.get("cls_mixture") is not None:
        model.cls_mixture = ClsMixture.from_state_dict(state["cls_mixture"])
        model.cls_mixture_epoch = state.get("cls_mixture_epoch")
