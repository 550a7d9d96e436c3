"""``inpaint``: fill masked patches, beside the mean image and biharmonic fill.

Leak-free protocol: the masks are drawn on the patch grid (``metrics.MASKS``), and every
method sees the image with the masked pixels *and a band of patch_size / 2 pixels around
them* hidden (set to the mean training image). A resize from the data's native resolution
spreads each source pixel over its neighbours (the digits' bilinear x4 by 2 pixels), so
without the band the visible pixels next to a hole would carry part of it. PSNR is measured
on the masked patches' pixels only; the band is hidden from every method but not scored.
"""

from __future__ import annotations

import torch

from .. import metrics as M
from .baselines import biharmonic_fill

METHODS = ("model", "mean_fill", "biharmonic")


def guard_band(model) -> int:
    """Pixels hidden around a hole: half a patch (covers bilinear resizing up to x patch_size)."""
    return model.cfg.patch_size // 2


def masked_inputs(model, xv: torch.Tensor, mean_image: torch.Tensor, name: str, seed: int):
    """(patch mask (B, N), scored pixels (B, 1, S, S), hidden pixels, the input every method
    sees) for mask ``name``."""
    mask = M.patch_mask(name, len(xv), model.grid, torch.Generator().manual_seed(seed))
    pm = M.pixel_mask(mask, model.grid, model.cfg.patch_size)
    hidden = M.hidden_region(pm, guard_band(model))
    return mask, pm, hidden, M.hide(xv, hidden, mean_image)


@torch.no_grad()
def fills(model, seen, mask, hidden, recon_weight: float, batch: int = 256) -> dict[str, torch.Tensor]:
    """Each method's completion of ``seen`` (the hidden pixels replaced, the rest kept)."""
    filled = [
        M.inpaint(
            model,
            seen[i : i + batch],
            mask[i : i + batch],
            paste=hidden[i : i + batch],
            recon_weight=recon_weight,
        ).cpu()
        for i in range(0, len(seen), batch)
    ]
    return {
        "model": torch.cat(filled),
        "mean_fill": seen,  # the hidden pixels already hold the mean training image
        "biharmonic": biharmonic_fill(seen, hidden),
    }


@torch.no_grad()
def task_inpaint(model, xtr, xv, seed: int, recon_weight: float, show: int = 8):
    """-> (metrics, grid: per mask, the input (hidden pixels grey), the model's fill, the
    biharmonic fill, the original; grid columns). The model's fill is
    :func:`vitcae_ray.metrics.inpaint` (z_cls fitted to the visible pixels under the decoder
    ``recon_weight`` implies)."""
    mean_image = xtr.mean(0, keepdim=True)
    out, rows = {}, []
    k = min(show, len(xv))
    for name in M.MASKS:
        mask, pm, hidden, seen = masked_inputs(model, xv, mean_image, name, seed)
        done = fills(model, seen, mask, hidden, recon_weight)
        for method, filled in done.items():
            out[f"inpaint/{name}/psnr_{method}"] = M.psnr(M.masked_mse(filled, xv, pm))
        grey = torch.where(hidden[:k], torch.full_like(xv[:k], 0.5), xv[:k])
        rows += [grey, done["model"][:k], done["biharmonic"][:k], xv[:k]]
    return out, torch.cat(rows), k
