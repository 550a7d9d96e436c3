"""Likelihood bounds in nats per image: the sampled negative ELBO and the IWAE bound.

The generative model, with p(x | z) = N(x_hat(z), sigma^2 I), sigma^2 = 1 / (2 recon_weight)
(the decoder variance the loss's reconstruction weight implies, see ``losses.gaussian_nll``):

    ViTCAE:  p(z_cls) = N(0, I),  p(z_patch | z_cls) = N(Z~_patch(z_cls), e^prior_logvar(z_cls))
    q:       q(z_cls | x) = N(mu_cls, e^logvar_cls),
             q(z_patch | x, z_cls) = N(Z~_patch(z_cls) + delta(x), e^logvar_patch)

(the ViT-VAE and the ``conditional_prior: false`` ablation: p(z_patch) = N(0, I)). The
posterior of z_patch depends on the *sampled* z_cls, so every draw takes z_cls first and
z_patch given it. With log w = log p(x, z) - log q(z | x), z ~ q:

    -ELBO    = E_q[-log w]                         (>= -log p(x))
    IWAE_K   = -(logsumexp_k log w_k - log K)      (>= -log p(x), tighter as K grows)

A model provides ``latent_groups(x, generator) -> (x_hat, groups)``: one posterior draw, the
decoder mean x_hat (B, ...) and, in the generative order, each latent group's
``(z, q_mu, q_logvar, p_mu, p_logvar)`` (B, ...), with the posterior and the prior of a group
taken at the draws of the groups before it. Every density is computed in fp32 with
``torch.distributions``. Pure torch: no Ray.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch.distributions import Normal, kl_divergence

from .losses import gaussian_nll

Group = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class LatentVariableModel(Protocol):
    def latent_groups(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[Group]]: ...


def _normal(mu: torch.Tensor, logvar: torch.Tensor) -> Normal:
    return Normal(mu.float(), torch.exp(0.5 * logvar.float()), validate_args=False)


def _per_image(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,), summed over every other dimension (a zero-width group sums to 0)."""
    return t.flatten(1).sum(1)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1 posterior samples, got {k}")


@torch.no_grad()
def log_weights(
    model: LatentVariableModel,
    x: torch.Tensor,
    k: int,
    *,
    recon_weight: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """log w = log p(x | z) + log p(z) - log q(z | x) for k posterior draws z: (k, B), fp32."""
    _check_k(k)
    x = x.float()
    sigma = math.sqrt(0.5 / recon_weight)
    rows = []
    for _ in range(k):
        x_hat, groups = model.latent_groups(x, generator)
        log_w = _per_image(Normal(x_hat.float(), sigma, validate_args=False).log_prob(x))
        for z, q_mu, q_logvar, p_mu, p_logvar in groups:
            z = z.float()
            log_w = log_w + _per_image(_normal(p_mu, p_logvar).log_prob(z))
            log_w = log_w - _per_image(_normal(q_mu, q_logvar).log_prob(z))
        rows.append(log_w)
    return torch.stack(rows)  # (k, B)


@torch.no_grad()
def elbo(
    model: LatentVariableModel,
    x: torch.Tensor,
    k: int,
    *,
    recon_weight: float,
    generator: torch.Generator | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """The negative ELBO in nats per image, (B,): the mean over k posterior draws of
    -log p(x | z) + sum over groups of the analytic KL(q(z_g | x, z_<g) || p(z_g | z_<g)),
    each group's KL at the draws before it. Same expectation as the mean of -log w, lower
    variance. ``prefix``: the output of the model's frozen encoder prefix for ``x``, passed
    on to its ``latent_groups`` (a ViTCAE's prefix cache)."""
    _check_k(k)
    x = x.float()
    pixels = x[0].numel()
    total = x.new_zeros(x.shape[0])
    extra = {} if prefix is None else {"prefix": prefix}
    for _ in range(k):
        x_hat, groups = model.latent_groups(x, generator, **extra)
        sse = _per_image((x_hat.float() - x).pow(2))
        total = total + gaussian_nll(sse, pixels, recon_weight)
        for _z, q_mu, q_logvar, p_mu, p_logvar in groups:
            total = total + _per_image(kl_divergence(_normal(q_mu, q_logvar), _normal(p_mu, p_logvar)))
    return total / k


@torch.no_grad()
def iwae_nll(
    model: LatentVariableModel,
    x: torch.Tensor,
    k: int,
    *,
    recon_weight: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The importance-weighted bound (Burda et al., 2016) on -log p(x) in nats per image, (B,):
    -(logsumexp_k log w_k - log k). k = 1 is a one-sample (Monte Carlo KL) negative ELBO."""
    w = log_weights(model, x, k, recon_weight=recon_weight, generator=generator).double()
    return (math.log(k) - torch.logsumexp(w, dim=0)).float()


__all__ = ["Group", "LatentVariableModel", "elbo", "iwae_nll", "log_weights"]
