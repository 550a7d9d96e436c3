"""ViTCAE: a ViT encoder whose CLS token becomes the global latent z_cls, a neural prior
p(z_patch | z_cls), and a decoder from the patch latents FiLM-conditioned on z_cls.

    x -> patches + CLS -> encoder (per-head tau) -> q(z_cls|x), q(z_patch|x)
    z_cls -> prior MLP -> p(z_patch | z_cls) = N(mu_p, exp(logvar_p)), Z~_patch
    (z_patch, z_cls) -> decoder (FiLM(z_cls) in every block) -> x_hat in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block; with ``cond_dim`` the normed inputs of both sub-layers are
    FiLM-modulated, ``h * (1 + gamma(c)) + beta(c)`` (zero-initialised, so identity at start)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, fused: bool,
                 cond_dim: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, fused=fused)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.film = nn.Linear(cond_dim, 4 * dim) if cond_dim else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h1 = self.norm1(x)
        if self.film is not None:
            g1, b1, g2, b2 = self.film(cond).unsqueeze(1).chunk(4, dim=-1)  # each (B, 1, D)
            h1 = h1 * (1 + g1) + b1
        x = x + self.attn(h1)
        h2 = self.norm2(x)
        if self.film is not None:
            h2 = h2 * (1 + g2) + b2
        return x + self.mlp(h2)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I)."""
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + torch.exp(0.5 * logvar) * eps


@dataclass
class ViTCAEOutput:
    recon: torch.Tensor  # (B, C, S, S) in [0, 1]
    z_cls: torch.Tensor  # (B, Zc)
    mu_cls: torch.Tensor
    logvar_cls: torch.Tensor
    z_patch: torch.Tensor  # (B, N, Zp)
    mu_patch: torch.Tensor
    logvar_patch: torch.Tensor
    prior_mu: torch.Tensor  # (B, N, Zp), p(z_patch | z_cls)
    prior_logvar: torch.Tensor
    z_patch_tilde: torch.Tensor  # (B, N, Zp), deterministic estimate from z_cls


class ViTCAE(nn.Module):
    """Args:
        cfg: the model section of the config (sizes, latent dims, fused attention flag).
        img_size: input side S (a multiple of ``cfg.patch_size``).
        in_chans: image channels C.
    """

    def __init__(self, cfg: ModelConfig, img_size: int, in_chans: int) -> None:
        super().__init__()
        if img_size % cfg.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg, self.img_size, self.in_chans = cfg, img_size, in_chans
        p, D = cfg.patch_size, cfg.embed_dim
        self.grid = img_size // p
        self.num_patches = N = self.grid * self.grid

        # encoder
        self.patch_embed = nn.Conv2d(in_chans, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.fused_attn) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(D)
        self.to_z_cls = nn.Linear(D, 2 * cfg.z_cls_dim)  # -> (mu, logvar)
        self.to_z_patch = nn.Linear(D, 2 * cfg.z_patch_dim)

        # neural prior: z_cls -> (mu_p, logvar_p, Z~) for every patch position
        Zp = cfg.z_patch_dim
        self.prior = nn.Sequential(
            nn.Linear(cfg.z_cls_dim, cfg.prior_hidden), nn.GELU(),
            nn.Linear(cfg.prior_hidden, cfg.prior_hidden), nn.GELU(),
            nn.Linear(cfg.prior_hidden, N * 3 * Zp),
        ) if cfg.conditional_prior else None

        # decoder: patch latents -> tokens, FiLM(z_cls) in every block -> pixels
        Dd = cfg.dec_dim
        self.dec_embed = nn.Linear(Zp, Dd)
        self.dec_pos_embed = nn.Parameter(torch.zeros(1, N, Dd))
        self.dec_blocks = nn.ModuleList(
            Block(Dd, cfg.dec_heads, cfg.mlp_ratio, cfg.fused_attn, cond_dim=cfg.z_cls_dim)
            for _ in range(cfg.dec_depth)
        )
        self.dec_norm = nn.LayerNorm(Dd)
        self.dec_pred = nn.Linear(Dd, p * p * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        for t in (self.cls_token, self.pos_embed, self.dec_pos_embed):
            nn.init.trunc_normal_(t, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith(".film"):  # FiLM stays identity
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def attention_layers(self) -> list[Attention]:
        """The encoder's attention modules, layer l at index l (the scheduler's heads)."""
        return [blk.attn for blk in self.blocks]

    # --- encoder -------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, S, S) -> normed tokens (B, 1 + N, D), CLS first."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)  # (B, 1+N, D)
        t = t + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def forward_encoder(self, x: torch.Tensor):
        """-> mu_cls, logvar_cls (B, Zc); mu_patch, logvar_patch (B, N, Zp)."""
        t = self.forward_features(x)
        mu_cls, logvar_cls = self.to_z_cls(t[:, 0]).chunk(2, dim=-1)
        mu_patch, logvar_patch = self.to_z_patch(t[:, 1:]).chunk(2, dim=-1)
        return mu_cls, logvar_cls, mu_patch, logvar_patch

    # --- prior ---------------------------------------------------------------------------
    def forward_prior(self, z_cls: torch.Tensor):
        """z_cls (B, Zc) -> prior_mu, prior_logvar, z_patch_tilde, each (B, N, Zp).
        With ``conditional_prior`` off (ablation) all three are zero: p(z_patch) = N(0, I)."""
        if not self.cfg.conditional_prior:
            zeros = z_cls.new_zeros(z_cls.shape[0], self.num_patches, self.cfg.z_patch_dim)
            return zeros, zeros, zeros
        out = self.prior(z_cls).view(z_cls.shape[0], self.num_patches, 3, self.cfg.z_patch_dim)
        return out[:, :, 0], out[:, :, 1], out[:, :, 2]

    # --- decoder -------------------------------------------------------------------------
    def forward_decoder(self, z_patch: torch.Tensor, z_cls: torch.Tensor) -> torch.Tensor:
        """z_patch (B, N, Zp), z_cls (B, Zc) -> image (B, C, S, S) in [0, 1]."""
        h = self.dec_embed(z_patch) + self.dec_pos_embed  # (B, N, Dd)
        for blk in self.dec_blocks:
            h = blk(h, z_cls)
        h = self.dec_pred(self.dec_norm(h))  # (B, N, p*p*C)
        return torch.sigmoid(self.unpatchify(h))

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, S, S)."""
        B, g, p, C = h.shape[0], self.grid, self.cfg.patch_size, self.in_chans
        h = h.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return h.reshape(B, C, g * p, g * p)

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> ViTCAEOutput:
        """Encode, sample (or take the means when ``sample`` is False), and decode."""
        mu_cls, logvar_cls, mu_patch, logvar_patch = self.forward_encoder(x)
        if sample:
            z_cls = reparameterize(mu_cls, logvar_cls, generator)
            z_patch = reparameterize(mu_patch, logvar_patch, generator)
        else:
            z_cls, z_patch = mu_cls, mu_patch
        prior_mu, prior_logvar, z_tilde = self.forward_prior(z_cls)
        recon = self.forward_decoder(z_patch, z_cls)
        return ViTCAEOutput(recon, z_cls, mu_cls, logvar_cls, z_patch, mu_patch, logvar_patch,
                            prior_mu, prior_logvar, z_tilde)

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z_cls ~ N(0, I) -> z_patch ~ p(z_patch | z_cls) -> decode: (n, C, S, S)."""
        device = self.cls_token.device
        z_cls = torch.randn(n, self.cfg.z_cls_dim, device=device, generator=generator)
        prior_mu, prior_logvar, _ = self.forward_prior(z_cls)
        z_patch = reparameterize(prior_mu, prior_logvar, generator)
        return self.forward_decoder(z_patch, z_cls)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder attention weights summed over the batch: (L, H, 1 + N, 1 + N) (manual path)."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        maps = []
        for blk in self.blocks:
            _, attn = blk.attn(blk.norm1(t), return_attn=True)  # (B, H, T, T)
            maps.append(attn.float().sum(0))
            t = blk(t)
        return torch.stack(maps)

    def set_readout(self, on: bool) -> None:
        """Start (resetting the sums) or stop the encoder's CLS attention readout."""
        for attn in self.attention_layers:
            attn.record_cls = on
            if on:
                attn.reset_readout()

    def cls_attention(self) -> tuple[torch.Tensor, int]:
        """Accumulated CLS->token attention, (L, H, 1 + N) summed over samples, and the count."""
        layers = self.attention_layers
        if layers[0].cls_attn_sum is None:
            raise RuntimeError("no CLS attention recorded: call set_readout(True) before forward")
        return torch.stack([a.cls_attn_sum for a in layers]), layers[0].cls_attn_count


def build_model(cfg: ModelConfig, img_size: int, in_chans: int) -> ViTCAE:
    return ViTCAE(cfg, img_size=img_size, in_chans=in_chans)
