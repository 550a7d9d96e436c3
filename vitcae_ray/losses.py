"""ViTCAE loss: reconstruction + KL terms + IMQ-MMD (after the curriculum's warm-up) +
patch-token discrepancy. Every per-sample term is summed over its dimensions and averaged
over the batch, so the weights in :class:`LossConfig` are comparable across image sizes.

``loss`` is the training objective; its weights change along the curriculum, so it is not
comparable across epochs or trials. ``elbo`` is the negative ELBO in nats per image with
weight 1 on every term, under the Gaussian decoder the reconstruction weight implies
(sigma^2 = 1 / (2 recon_weight)), at the latents ``out`` holds: in training (``model(x)``
samples z_cls, then z_patch given it) a one-sample estimate with analytic KL terms. At the
posterior means it is no ELBO estimate; validation replaces it with
:func:`vitcae_ray.likelihood.elbo` (``val/elbo``, what checkpoint ranking, ASHA and export
use by default).

Without z_cls (the ViT-VAE, z_cls of width 0) its KL and MMD are exactly 0, and so is the
discrepancy term: there is no Z~_patch for the patch posterior to stay near.
"""

from __future__ import annotations

import math

import torch

from .config import LossConfig
from .model.vitcae import ViTCAEOutput, reparameterize


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(0, I)) = 1/2 sum(e^logvar + mu^2 - 1 - logvar), batch mean."""
    kl = 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def kl_free_bits(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) with free bits: sum_d max(lambda, E_batch[KL_d]). Below lambda nats a
    dimension costs nothing, which keeps the global latent from collapsing early in training."""
    kl_d = (0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar)).flatten(1).mean(0)  # (d,)
    return kl_d.clamp_min(free_bits).sum()


def kl_gaussians(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, e^lv_q) || N(mu_p, e^lv_p)) summed over dims, batch mean:
    1/2 sum(lv_p - lv_q + (e^lv_q + (mu_q - mu_p)^2) / e^lv_p - 1)."""
    kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1.0)
    return kl.flatten(1).sum(1).mean()


def gaussian_nll(sse: torch.Tensor, pixels: int, recon_weight: float) -> torch.Tensor:
    """-log N(x | x_hat, sigma^2 I) with sigma^2 = 1 / (2 recon_weight), given the summed
    squared error: recon_weight * SSE + P/2 log(2 pi sigma^2)."""
    return recon_weight * sse + 0.5 * pixels * math.log(math.pi / recon_weight)


class _IMQMMD(torch.autograd.Function):
    """The unbiased IMQ-MMD^2 of :func:`imq_mmd` and its gradient in one pass over the
    (2n, 2n) distance matrix per scale, nothing per scale kept for the backward: autograd
    through ``cdist`` and a division per scale took a quarter of a training step."""

    @staticmethod
    def forward(ctx, xy: torch.Tensor, n: int, consts: tuple[float, ...]) -> torch.Tensor:
        with torch.autocast(xy.device.type, enabled=False):  # fp32 under AMP too
            return _IMQMMD._forward(ctx, xy, n, consts)

    @staticmethod
    def _forward(ctx, xy: torch.Tensor, n: int, consts: tuple[float, ...]) -> torch.Tensor:
        sq = xy.pow(2).sum(1)
        d2 = torch.addmm(sq[:, None] + sq[None, :], xy, xy.T, alpha=-2.0).clamp_min_(0.0)
        k, dk = torch.zeros_like(d2), torch.zeros_like(d2) if ctx.needs_input_grad[0] else None
        for c in consts:
            r = (d2 + c).reciprocal_()  # 1 / (C_s + ||a - b||^2)
            k.add_(r, alpha=c)
            if dk is not None:
                dk.addcmul_(r, r, value=-c)  # d/d(||a - b||^2) of C_s / (C_s + ||a - b||^2)
        sign = torch.ones(2 * n, device=xy.device, dtype=xy.dtype)
        sign[n:] = -1.0
        # sign^T K sign weighs xx and yy by +1, xy and yx by -1; the unbiased estimate leaves
        # out the pairs of one index (i, i) in each block: K's diagonal and kxy's, twice
        total = (k @ sign) @ sign - k.diagonal().sum() + 2.0 * k[:n, n:].diagonal().sum()
        if dk is not None:
            ctx.save_for_backward(xy, dk, sign)
            ctx.n = n
        return total / (n * (n - 1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xy, dk, sign = ctx.saved_tensors
        n = ctx.n
        g = dk * (sign[:, None] * sign[None, :])  # the weights of the forward's sum
        for block in (g, g[:n, n:], g[n:, :n]):
            block.diagonal().zero_()
        g.mul_(grad / (n * (n - 1)))
        # d ||a - b||^2 / d a = 2 (a - b), from both (a, b) and (b, a): g is symmetric
        return 4.0 * (g.sum(1, keepdim=True) * xy - g @ xy), None, None


def imq_mmd(x: torch.Tensor, y: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """Unbiased MMD^2 between samples x, y (B, d) with the inverse-multiquadric kernel
    k(a, b) = sum_s C_s / (C_s + ||a - b||^2), C_s = 2 d s (WAE-MMD, prior variance 1):
    1/(n(n-1)) sum_{i != j} k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    n, d = x.shape
    if n < 2 or d == 0:  # no pair, or zero-width samples (the kernel would be 0 / 0)
        return x.new_zeros(())
    return _IMQMMD.apply(torch.cat([x, y]), n, tuple(2.0 * d * s for s in scales))


def curriculum(epoch: int, cfg: LossConfig) -> tuple[float, float]:
    """(KL factor, MMD factor) at ``epoch`` (0-based): KL only for ``kl_warmup_epochs``, then a
    linear ramp over ``ramp_epochs`` to KL x ``kl_mix`` + MMD x 1."""
    if epoch < cfg.kl_warmup_epochs:
        return 1.0, 0.0
    r = min(1.0, (epoch - cfg.kl_warmup_epochs + 1) / max(cfg.ramp_epochs, 1))
    return 1.0 - r * (1.0 - cfg.kl_mix), r


def patch_mmd(
    out: ViTCAEOutput, scales: tuple[float, ...], max_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """IMQ-MMD^2 between posterior and prior patch latents, each patch latent (Zp,) one
    sample, times N: like KL(z_patch), a per-patch divergence summed over the N patches.
    At most ``max_samples`` of the B*N patch latents are compared (a random subset)."""
    B, N, Zp = out.mu_patch.shape
    post = reparameterize(out.mu_patch, out.logvar_patch, generator).reshape(B * N, Zp)
    prior = reparameterize(out.prior_mu, out.prior_logvar, generator).reshape(B * N, Zp)
    if B * N > max_samples:
        idx = torch.randperm(B * N, device=post.device, generator=generator)[:max_samples]
        post, prior = post[idx], prior[idx]
    return N * imq_mmd(post, prior, scales)


def vitcae_loss(
    out: ViTCAEOutput, x: torch.Tensor, epoch: int, cfg: LossConfig, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """All terms for one batch, in fp32; ``loss`` is the weighted total used for the
    gradient, ``elbo`` the fixed-weight negative ELBO (nats per image)."""
    kl_f, mmd_f = curriculum(epoch, cfg)
    recon = (out.recon.float() - x.float()).pow(2).flatten(1).sum(1).mean()
    kl_cls = kl_standard_normal(out.mu_cls.float(), out.logvar_cls.float())
    kl_patch = kl_gaussians(
        out.mu_patch.float(), out.logvar_patch.float(), out.prior_mu.float(), out.prior_logvar.float()
    )
    # on the posterior mean: the sampled z_patch would also push the posterior variance down
    disc = (out.mu_patch.float() - out.z_patch_tilde.float()).pow(2).flatten(1).sum(1).mean()
    if out.mu_cls.shape[-1] == 0:  # ViT-VAE: no z_cls, no Z~_patch to be near
        disc = torch.zeros_like(disc)
    if mmd_f > 0:
        # fresh posterior samples (validation decodes the means) vs prior samples:
        # z_cls vs N(0, I); patch latents vs p(z_patch | z_cls)
        z_cls = reparameterize(out.mu_cls.float(), out.logvar_cls.float(), generator)
        z_prior = torch.randn(z_cls.shape, device=x.device, generator=generator)
        mmd_cls = imq_mmd(z_cls, z_prior, cfg.mmd_scales)
        mmd_patch = patch_mmd(out, cfg.mmd_scales, cfg.mmd_max_samples, generator)
        mmd = mmd_cls + mmd_patch
    else:
        mmd = recon.new_zeros(())
    kl = cfg.kl_cls_weight * kl_cls + cfg.kl_patch_weight * kl_patch
    kl_charged = kl  # free bits change what the gradient sees, not the reported KL
    if cfg.kl_cls_free_bits > 0:
        kl_fb = kl_free_bits(out.mu_cls.float(), out.logvar_cls.float(), cfg.kl_cls_free_bits)
        kl_charged = cfg.kl_cls_weight * kl_fb + cfg.kl_patch_weight * kl_patch
    loss = cfg.recon_weight * recon + kl_f * kl_charged + cfg.discrepancy_weight * disc
    prior_recon = recon.new_zeros(())
    if out.recon_prior is not None:
        prior_recon = (out.recon_prior.float() - x.float()).pow(2).flatten(1).sum(1).mean()
        loss = loss + cfg.recon_weight * cfg.prior_recon_weight * prior_recon
    if mmd_f > 0:
        loss = loss + mmd_f * (cfg.mmd_cls_weight * mmd_cls + cfg.mmd_weight * mmd_patch)
    mse = (out.recon.float() - x.float()).pow(2).mean()
    elbo = gaussian_nll(recon, x[0].numel(), cfg.recon_weight) + kl_cls + kl_patch
    return {
        "loss": loss,
        "elbo": elbo,
        "recon": recon,
        "prior_recon": prior_recon,
        "kl": kl,
        "kl_cls": kl_cls,
        "kl_patch": kl_patch,
        "mmd": mmd,
        "discrepancy": disc,
        "mse": mse,
    }
