"""Image and latent metrics for the paper's tasks: PSNR/SSIM, k-NN precision/recall and
nearest-neighbour distances, posterior means, the inpainting masks and fill, and latent
interpolation. Pure functions of models and tensors (no Ray), shared by
``python -m vitcae_ray.evaluate`` and the trainer's periodic evaluation.
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


def seam_ratio(images: torch.Tensor, patch: int) -> float:
    """Patch seams: the mean absolute step between horizontally and vertically adjacent
    pixels that straddle a patch border, over the mean step between adjacent pixels inside
    a patch. Images (B, C, H, W); about 1 when the patch grid leaves no trace (real digits
    score about 1.2 at patch 4: their strokes are not aligned with the grid)."""
    x = images.double()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()  # step between columns j and j + 1
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    across_x = (torch.arange(1, x.shape[-1], device=x.device) % patch) == 0  # j + 1 starts a patch
    across_y = (torch.arange(1, x.shape[-2], device=x.device) % patch) == 0
    border = torch.cat([dx[..., across_x].flatten(), dy[..., across_y, :].flatten()])
    inside = torch.cat([dx[..., ~across_x].flatten(), dy[..., ~across_y, :].flatten()])
    return float(border.mean() / inside.mean().clamp_min(1e-12))


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


# --- generation: k-NN manifolds and memorisation -----------------------------------------------


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of feature sets (n, d):
    each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour in the set. Precision: the share of ``fake`` inside the real manifold; recall:
    the share of ``real`` inside the fake manifold."""
    from sklearn.neighbors import NearestNeighbors

    def radii(x: np.ndarray) -> np.ndarray:  # distance to the k-th neighbour, the point itself excluded
        return NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[0][:, -1]

    def inside(points: np.ndarray, centres: np.ndarray, r: np.ndarray) -> float:
        c, rr = torch.from_numpy(centres), torch.from_numpy(r)
        hits = [
            (torch.cdist(torch.from_numpy(points[i : i + 512]), c) <= rr).any(1)  # (chunk, n_c) -> (chunk,)
            for i in range(0, len(points), 512)
        ]
        return float(torch.cat(hits).double().mean())

    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def nearest_distance(images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Per image, the Euclidean pixel distance to its nearest image in ``reference``, (n,)."""
    from sklearn.neighbors import NearestNeighbors

    ref = reference.flatten(1).double().numpy()
    return NearestNeighbors(n_neighbors=1).fit(ref).kneighbors(images.flatten(1).double().numpy())[0][:, 0]


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


def hidden_region(pm: torch.Tensor, band: int) -> torch.Tensor:
    """The pixels an inpainting input hides: the masked pixels ``pm`` (B, 1, S, S) grown by
    ``band`` pixels on every side (a square dilation). A resize from a smaller native image
    spreads each source pixel over its neighbours (bilinear x4 reaches 2 pixels); hiding that
    reach too leaves nothing of the masked content in the visible pixels."""
    if band <= 0:
        return pm
    return F.max_pool2d(pm.float(), 2 * band + 1, stride=1, padding=band).bool()


def hide(x: torch.Tensor, hidden: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``x`` with the ``hidden`` pixels replaced by ``fill`` (broadcast, e.g. the mean image)."""
    return torch.where(hidden.to(x.device), fill.to(x.device).expand_as(x), x)


INPAINT_STEPS = 100  # Adam steps of the z_cls fit to the visible pixels
INPAINT_LR = 0.05


def inpaint(
    model,
    x: torch.Tensor,
    mask: torch.Tensor,
    paste: torch.Tensor | None = None,
    recon_weight: float = 10.0,
    steps: int = INPAINT_STEPS,
    lr: float = INPAINT_LR,
) -> torch.Tensor:
    """Fill the masked patches of ``x`` (B, C, S, S); ``mask`` (B, N) bool, the same number
    of masked patches in every image.

    The encoder sees only the visible patches (the masked ones are dropped from its tokens),
    which gives z_cls; the visible patches keep their posterior means (the prior's mean given
    z_cls plus the encoder's residual), and the masked ones get Z~_patch, the mean of the prior
    given that z_cls. Then ``steps`` Adam steps move z_cls to the maximum of the model's joint
    density of the visible pixels and z_cls, ``recon_weight * ||x_visible - x_hat_visible||^2
    + ||z_cls||^2 / 2`` (the Gaussian decoder ``loss.recon_weight`` implies and the N(0, I)
    prior): the encoder saw part of a digit, the fit asks the whole decoder which digit
    explains it. Only pixels outside ``paste`` (B, 1, S, S) bool, the pixels to take from
    the decoded image (default: the masked patches'), enter the fit; the decoded ones are
    pasted into the input, so visible pixels are returned unchanged. ``steps = 0`` keeps the
    encoder's z_cls. A model without z_cls (ViT-VAE) has nothing to fit."""
    device = next(model.parameters()).device
    x, mask = x.to(device), mask.to(device)
    counts = (~mask).sum(1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise ValueError("inpaint needs the same, non-zero number of visible patches per image")
    keep = (~mask).nonzero()[:, 1].view(x.shape[0], -1)  # (B, Nk), ascending per row
    pm = (pixel_mask(mask, model.grid, model.cfg.patch_size) if paste is None else paste).to(device)
    with torch.no_grad():
        _, mu_cls, _, mu_patch, _, prior_mu, _ = model.forward_encoder(x, keep=keep)
    delta = (mu_patch - prior_mu).float()  # 0 on the masked patches
    z_cls = mu_cls.float()
    if steps > 0 and model.has_z_cls:
        z_cls = fit_cls_to_visible(model, x, ~pm, z_cls, delta, recon_weight, steps, lr)
    with torch.no_grad():
        decoded = model.forward_decoder(model.forward_prior(z_cls)[0] + delta, z_cls).float()
    return torch.where(pm, decoded, x)


def visible_nll(model, x, visible, z_cls, delta, recon_weight: float) -> torch.Tensor:
    """Per image, ``recon_weight * ||x - x_hat||^2`` over the ``visible`` pixels (B, 1, S, S)
    bool ``+ ||z_cls||^2 / 2``: the negative log joint density of the visible pixels and z_cls
    (constants dropped), x_hat decoded from z_patch = Z~_patch(z_cls) + ``delta``."""
    decoded = model.forward_decoder(model.forward_prior(z_cls)[0] + delta, z_cls).float()
    sse = ((decoded - x) ** 2 * visible.float()).flatten(1).sum(1)
    return recon_weight * sse + 0.5 * z_cls.pow(2).sum(1)


def fit_cls_to_visible(
    model, x, visible, z_cls, delta, recon_weight: float, steps: int = INPAINT_STEPS, lr: float = INPAINT_LR
) -> torch.Tensor:
    """``steps`` Adam steps from ``z_cls`` down :func:`visible_nll` (each image its own
    problem: the sum's gradient is per image); only z_cls moves."""
    z = z_cls.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            (z.grad,) = torch.autograd.grad(visible_nll(model, x, visible, z, delta, recon_weight).sum(), [z])
            opt.step()
    return z.detach()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, pm: torch.Tensor) -> float:
    """Mean squared error over the masked pixels (``pm`` (B, 1, S, S) bool) and channels."""
    m = pm.expand_as(target).to(target.device)
    return float(((pred - target) ** 2)[m].mean())
