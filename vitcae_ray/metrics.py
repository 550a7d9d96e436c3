"""Image and latent metrics for the paper's tasks: PSNR/SSIM, the sample score, posterior
means, the inpainting masks and fill, and latent interpolation. Pure functions of
models and tensors (no Ray), shared by ``python -m vitcae_ray.evaluate`` and the trainer's
periodic evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

MASKS = ("center25", "center50", "random25", "random50")  # inpainting masks, by name


# --- pixels ---------------------------------------------------------------------------------


def psnr(mse: float) -> float:
    """10 log10(1 / mse) for images in [0, 1]."""
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image, (B,), of images in [0, 1], (B, C, H, W): Gaussian window
    (``window``, ``sigma``; narrowed to the largest odd size that fits smaller images),
    K1 = 0.01, K2 = 0.03, the mean over channels and over the positions where the window
    fits (Wang et al. 2004)."""
    x, y = x.double(), y.double()
    C = x.shape[1]
    window = min(window, (min(x.shape[-2:]) - 1) // 2 * 2 + 1)
    half = window // 2
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - half) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=C)

    mx, my = blur(x), blur(y)
    # population (co)variances, as in the reference implementation
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


# --- a pixel classifier and the sample score --------------------------------------------------


def _features(images: torch.Tensor, side: int = 16) -> np.ndarray:
    """(B, C, S, S) -> (B, C * side^2): average-pooled to at most ``side`` pixels a side."""
    x = images.float().cpu()
    if x.shape[-1] > side:
        x = F.adaptive_avg_pool2d(x, side)
    return x.flatten(1).numpy()


class PixelClassifier:
    """Logistic regression on (pooled) pixels of real training images: the classifier behind
    the sample score. Fitted on at most ``max_images`` images."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor | np.ndarray, seed: int = 0, max_images: int = 10000
    ) -> None:
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels)
        if len(labels) > max_images:
            keep = np.random.default_rng(seed).choice(len(labels), max_images, replace=False)
            images, labels = images[torch.as_tensor(keep)], labels[keep]
        self.clf = LogisticRegression(max_iter=2000, C=1.0).fit(_features(images), labels)

    def proba(self, images: torch.Tensor) -> np.ndarray:
        """p(y | x), (B, K)."""
        return self.clf.predict_proba(_features(images))

    def accuracy(self, images: torch.Tensor, labels) -> float:
        return float((self.clf.predict(_features(images)) == np.asarray(labels)).mean())


def inception_style_score(proba: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the set: between 1 (every
    image alike or ambiguous) and K (confident and spread evenly over the K classes)."""
    p = np.clip(proba, 1e-12, 1.0)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))


def max_class_share(proba: np.ndarray) -> float:
    """The largest share of the set assigned (argmax) to one class."""
    counts = np.bincount(proba.argmax(1), minlength=proba.shape[1])
    return float(counts.max() / max(len(proba), 1))


# --- latents ----------------------------------------------------------------------------------


@torch.no_grad()
def encode_means(model, images: torch.Tensor, batch_size: int = 256):
    """Posterior means (mu_cls (B, Zc), mu_patch (B, N, Zp)) in batches."""
    device = next(model.parameters()).device
    cls, patch = [], []
    for i in range(0, len(images), batch_size):
        _, mu_cls, _, mu_patch, *_ = model.forward_encoder(images[i : i + batch_size].to(device))
        cls.append(mu_cls.float().cpu())
        patch.append(mu_patch.float().cpu())
    return torch.cat(cls), torch.cat(patch)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of (Zc,) vectors at the T weights ``t``: (T, Zc)."""
    na, nb = a / a.norm().clamp_min(1e-8), b / b.norm().clamp_min(1e-8)
    omega = torch.arccos((na * nb).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    t = t[:, None]
    if omega.abs() < 1e-4:  # nearly parallel: linear is exact enough
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@torch.no_grad()
def interpolate(model, x0: torch.Tensor, x1: torch.Tensor, steps: int) -> torch.Tensor:
    """Decoded path between two images, (steps, C, S, S): z_cls by slerp, z_patch linearly,
    both from the posterior means."""
    device = next(model.parameters()).device
    c, p = encode_means(model, torch.stack([x0, x1]))
    t = torch.linspace(0, 1, steps)
    z_cls = slerp(c[0], c[1], t)
    z_patch = (1 - t)[:, None, None] * p[0] + t[:, None, None] * p[1]
    return model.forward_decoder(z_patch.to(device), z_cls.to(device)).float().cpu()


def interpolation_smoothness(strips: Iterable[torch.Tensor]) -> tuple[float, float]:
    """(mean step-to-step mean absolute pixel change, mean over strips of max/mean step
    change): 1 is an even path, large values a jump."""
    changes, ratios = [], []
    for s in strips:
        step = (s[1:] - s[:-1]).abs().flatten(1).mean(1)  # (steps - 1,)
        changes.append(float(step.mean()))
        ratios.append(float(step.max() / step.mean().clamp_min(1e-12)))
    return float(np.mean(changes)), float(np.mean(ratios))


# --- inpainting -------------------------------------------------------------------------------


def patch_mask(name: str, batch: int, grid: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) bool patch mask: ``centerP`` a centred square block of about P% of the patches,
    ``randomP`` P% of the patches at random per image (the same count in every image)."""
    kind, frac = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")) :]) / 100
    N = grid * grid
    if kind == "center":
        side = max(1, round(grid * math.sqrt(frac)))
        lo = (grid - side) // 2
        m = torch.zeros(grid, grid, dtype=torch.bool)
        m[lo : lo + side, lo : lo + side] = True
        return m.flatten().expand(batch, N).clone()
    if kind == "random":
        rank = torch.rand(batch, N, generator=generator).argsort(1).argsort(1)
        return rank < round(frac * N)
    raise ValueError(f"unknown mask {name!r}: use one of {', '.join(MASKS)}")


def pixel_mask(mask: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """(B, N) patch mask -> (B, 1, S, S) pixel mask."""
    m = mask.view(-1, 1, grid, grid).float()
    return F.interpolate(m, scale_factor=patch, mode="nearest").bool()


@torch.no_grad()
def inpaint(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill the masked patches of ``x`` (B, C, S, S); ``mask`` (B, N) bool, the same number
    of masked patches in every image.

    The encoder sees only the visible patches (the masked ones are dropped from its tokens),
    which gives z_cls; the visible patches keep their posterior means, and the masked ones
    get Z~_patch, the mean of the prior given that z_cls. The decoded hole is pasted into
    the input, so visible pixels are returned unchanged."""
    device = next(model.parameters()).device
    x, mask = x.to(device), mask.to(device)
    counts = (~mask).sum(1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise ValueError("inpaint needs the same, non-zero number of visible patches per image")
    keep = (~mask).nonzero()[:, 1].view(x.shape[0], -1)  # (B, Nk), ascending per row
    _, mu_cls, _, mu_patch, *_ = model.forward_encoder(x, keep=keep)
    decoded = model.forward_decoder(mu_patch, mu_cls).float()
    pm = pixel_mask(mask, model.grid, model.cfg.patch_size).to(device)
    return torch.where(pm, decoded, x)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, pm: torch.Tensor) -> float:
    """Mean squared error over the masked pixels (``pm`` (B, 1, S, S) bool) and channels."""
    m = pm.expand_as(target).to(target.device)
    return float(((pred - target) ** 2)[m].mean())
