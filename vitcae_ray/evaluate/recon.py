"""``recon``: the validation split through the posterior means (MSE, PSNR, SSIM), and the
likelihood bounds: the negative ELBO with sampled latents and the importance-weighted bound
``iwae/nll_k<K>`` (Burda et al. 2016), both in nats per image, lower is better; the patch
seams of the reconstructions and of the held-out images themselves
(:func:`vitcae_ray.metrics.seam_ratio`)."""

from __future__ import annotations

import torch

from .. import metrics as M
from ..likelihood import elbo, iwae_nll


@torch.no_grad()
def task_recon(model, xv, device, recon_weight: float, elbo_k: int, iwae_k: int, seed: int, batch: int = 256):
    """-> (metrics, grid of inputs above reconstructions, grid columns). The negative ELBO
    uses ``elbo_k`` latent draws per image (as ``val/elbo``), the IWAE bound ``iwae_k``."""
    sse, ss, nelbo, nll, n, recons = 0.0, 0.0, 0.0, 0.0, 0, []
    gen = torch.Generator(device=device).manual_seed(seed)
    for i in range(0, len(xv), batch):
        x = xv[i : i + batch].to(device)
        r = model(x, sample=False).recon.float()
        recons.append(r.cpu())
        sse += float(((r - x) ** 2).mean((1, 2, 3)).sum())
        ss += float(M.ssim(r, x).sum())
        nelbo += float(elbo(model, x, elbo_k, recon_weight=recon_weight, generator=gen).sum())
        nll += float(iwae_nll(model, x, iwae_k, recon_weight=recon_weight, generator=gen).sum())
        n += len(x)
    mse = sse / n
    k = min(16, len(xv))
    grid = torch.cat([xv[:k], model(xv[:k].to(device), sample=False).recon.float().cpu()])
    out = {"recon/mse": mse, "recon/psnr": M.psnr(mse), "recon/ssim": ss / n, "recon/elbo": nelbo / n}
    patch = model.cfg.patch_size
    out["recon/seam_ratio"] = M.seam_ratio(torch.cat(recons), patch)
    out["recon/real/seam_ratio"] = M.seam_ratio(xv, patch)
    out[f"iwae/nll_k{iwae_k}"] = nll / n
    return out, grid, k
