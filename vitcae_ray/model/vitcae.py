"""ViTCAE: a ViT encoder whose CLS token becomes the global latent z_cls, a neural prior
p(z_patch | z_cls), and a decoder from the patch latents FiLM-conditioned on z_cls.

    x -> patches + CLS -> encoder (per-head tau) -> q(z_cls|x), q(z_patch|x)
    z_cls -> prior MLP -> p(z_patch | z_cls) = N(Z~_patch, exp(logvar_p))
    (z_patch, z_cls) -> decoder (FiLM(z_cls) in every block) -> per-patch pixels and
        feature maps -> + 3x3 convolutional correction across patch borders -> x_hat in [0, 1]

``Z~_patch`` is the prior's mean: the patch latents that z_cls alone implies. The patch
posterior is a residual on it, ``mu_patch = Z~_patch(z_cls) + delta(x)``, so the patch KL
charges only what z_cls does not explain. In training it is also the target of the
discrepancy term, and with ``loss.prior_recon_weight`` the image is decoded a second time
from prior samples alone (the generative path) and must match the input: that is what makes
z_cls carry the image's global content instead of collapsing onto N(0, I). At generation
time z_cls comes from the model's Gaussian mixture on the training posteriors
(``cls_mixture``, when fitted) or N(0, I), and the patch latents are ``Z~_patch +
temperature * sigma_p * eps``; temperature 0 decodes Z~_patch, and inpainting puts Z~_patch
in the holes.

``model.variant: vitvae`` builds the paper's ViT-VAE baseline from the same parts: the same
encoder (CLS token and per-head temperatures included), patch latents with an N(0, I) prior,
no z_cls, no prior MLP, no FiLM. Its z_cls is zero-width, (B, 0), so every interface (the
encoder's 7-tuple, ``forward_decoder(z_patch, z_cls)``, the loss) stays the same for both.

The latent heads and the prior run in fp32 even under autocast, and every log-variance is
soft-bounded to (-LOGVAR_BOUND, LOGVAR_BOUND).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention

LOGVAR_BOUND = 6.0  # |log-variance| < 6: standard deviations within (0.05, 20)


def bound_logvar(raw: torch.Tensor) -> torch.Tensor:
    """Soft bound ``c * tanh(raw / c)``: the identity near 0, smooth, never past +-c."""
    return LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)


def fp32(device: torch.device):
    """Autocast off: latent heads, prior and losses stay in fp32 under bf16 training."""
    return torch.autocast(device_type=device.type, enabled=False)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block; with ``cond_dim`` the normed inputs of both sub-layers are
    FiLM-modulated, ``h * (1 + gamma(c)) + beta(c)`` (zero-initialised, so identity at start)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, fused: bool, cond_dim: int = 0) -> None:
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


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I)."""
    if generator is None:  # randn_like also traces under torch.compile with dynamic shapes
        eps = torch.randn_like(mu)
    else:
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + torch.exp(0.5 * logvar) * eps


@dataclass
class ViTCAEOutput:
    recon: torch.Tensor  # (B, C, S, S) in [0, 1]
    z_cls: torch.Tensor  # (B, Zc); Zc = 0 in the ViT-VAE
    mu_cls: torch.Tensor
    logvar_cls: torch.Tensor
    z_patch: torch.Tensor  # (B, N, Zp)
    mu_patch: torch.Tensor
    logvar_patch: torch.Tensor
    prior_mu: torch.Tensor  # (B, N, Zp), mean of p(z_patch | z_cls): Z~_patch
    prior_logvar: torch.Tensor
    recon_prior: torch.Tensor | None = None  # (B, C, S, S): decoded from p(z_patch | z_cls) alone

    @property
    def z_patch_tilde(self) -> torch.Tensor:
        """Z~_patch, the deterministic patch latents z_cls implies (the prior mean)."""
        return self.prior_mu


class ViTCAE(nn.Module):
    """Args:
    cfg: the model section of the config (variant, sizes, latent dims, fused attention flag).
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
        # the ViT-VAE has no global latent: z_cls is zero-width and nothing is conditioned on it
        self.has_z_cls = cfg.variant == "vitcae"
        self.z_cls_dim = Zc = cfg.z_cls_dim if self.has_z_cls else 0

        # encoder
        self.patch_embed = nn.Conv2d(in_chans, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.fused_attn) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(D)
        self.frozen_blocks = 0  # blocks 0..k-1 (and the embedding) frozen, run under no_grad
        self.to_z_cls = nn.Linear(D, 2 * Zc) if Zc else None  # -> (mu, logvar)
        self.to_z_patch = nn.Linear(D, 2 * cfg.z_patch_dim)

        # neural prior: z_cls -> (Z~ = mu_p, logvar_p) for every patch position
        Zp = cfg.z_patch_dim
        self.prior = (
            nn.Sequential(
                nn.Linear(Zc, cfg.prior_hidden),
                nn.GELU(),
                nn.Linear(cfg.prior_hidden, cfg.prior_hidden),
                nn.GELU(),
                nn.Linear(cfg.prior_hidden, N * 2 * Zp),
            )
            if cfg.conditional_prior and Zc
            else None
        )

        # decoder: patch latents -> tokens, FiLM(z_cls) in every block (none when Zc = 0) -> pixels
        Dd = cfg.dec_dim
        self.dec_embed = nn.Linear(Zp, Dd)
        self.dec_pos_embed = nn.Parameter(torch.zeros(1, N, Dd))
        self.dec_blocks = nn.ModuleList(
            Block(Dd, cfg.dec_heads, cfg.mlp_ratio, cfg.fused_attn, cond_dim=Zc) for _ in range(cfg.dec_depth)
        )
        self.dec_norm = nn.LayerNorm(Dd)
        # the output head: a token's patch as in_chans + dec_conv maps per pixel; the first
        # in_chans are the linear head's pixel logits, and two 3x3 convolutions over all of them
        # add a correction that sees across patch borders (a linear head alone cannot see the
        # next patch). The last convolution starts at zero, so training starts from the linear
        # head (a head that starts as a convolution stack can leave z_cls unused at small sizes)
        Fc = cfg.dec_conv
        self.dec_pred = nn.Linear(Dd, p * p * (in_chans + Fc))
        # the ex-post density of z_cls generate samples from (vitcae_ray.cls_mixture), fitted
        # after or during training; None: N(0, I)
        self.cls_mixture = None
        self.cls_mixture_epoch: int | None = None
        self.dec_conv = (
            nn.Sequential(
                nn.Conv2d(in_chans + Fc, Fc, 3, padding=1), nn.GELU(), nn.Conv2d(Fc, in_chans, 3, padding=1)
            )
            if Fc
            else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for t in (self.cls_token, self.pos_embed, self.dec_pos_embed):
            nn.init.trunc_normal_(t, std=0.02)
        if self.dec_conv is not None:  # the correction starts at zero
            nn.init.zeros_(self.dec_conv[-1].weight)
            nn.init.zeros_(self.dec_conv[-1].bias)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith(".film"):  # FiLM stays identity
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, Attention):  # its output projection
                m.init_proj_(nn.init.xavier_uniform_)

    @property
    def attention_layers(self) -> list[Attention]:
        """The encoder's attention modules, layer l at index l (the scheduler's heads)."""
        return [blk.attn for blk in self.blocks]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The parameters below encoder block 0: they freeze with the first frozen block."""
        return [*self.patch_embed.parameters(), self.cls_token, self.pos_embed]

    def set_frozen_blocks(self, k: int) -> None:
        """Freeze the encoder's bottom ``k`` blocks whole (attention, MLP, norms) with the
        embedding below them, and train the rest (their heads as ``Attention.set_frozen``
        left them): :meth:`forward_features` runs that prefix under ``no_grad``, so the
        backward stops above it. Rebuild the optimizer and re-wrap DDP afterwards."""
        if not 0 <= k <= len(self.blocks):
            raise ValueError(f"frozen blocks must be in 0..{len(self.blocks)}, got {k}")
        for p in self.embedding_parameters():
            p.requires_grad_(k == 0)
        for i, blk in enumerate(self.blocks):
            for name, p in blk.named_parameters():
                if not name.startswith("attn.heads."):  # the heads follow their own frozen set
                    p.requires_grad_(i >= k)
            if i < k:
                blk.attn.set_frozen(list(range(blk.attn.num_heads)))
        self.frozen_blocks = k

    # --- encoder -------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, S, S) -> tokens (B, 1 + N, D) with positions, CLS first."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)  # (B, 1+N, D)
        return t + self.pos_embed

    def forward_prefix(
        self, x: torch.Tensor, keep: torch.Tensor | None = None, with_rows: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The embedding and the frozen prefix (blocks ``0..frozen_blocks-1``), under ``no_grad``
        when the prefix is not empty: x (B, C, S, S) -> tokens (B, 1 + N, D) (``keep`` as in
        :meth:`forward_features`). With ``with_rows`` also the prefix layers' CLS readout rows,
        (B, frozen_blocks, H, 1 + N), handed back instead of added to the layers' sums."""
        k = self.frozen_blocks
        layers = self.attention_layers[:k] if with_rows else []
        for attn in layers:
            attn.rows_sink = []
        try:
            with torch.no_grad() if k else contextlib.nullcontext():
                t = self.embed(x)
                if keep is not None:  # CLS and the kept patches, positions embedded before the drop
                    idx = torch.cat([keep.new_zeros(keep.shape[0], 1), keep + 1], dim=1)
                    t = t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # (B, 1+Nk, D)
                for blk in self.blocks[:k]:
                    t = blk(t)
            if not with_rows:
                return t
            rows = [attn.rows_sink[0] for attn in layers]
            return t, torch.stack(rows, dim=1) if rows else t.new_zeros(len(t), 0, 0, t.shape[1])
        finally:
            for attn in layers:
                attn.rows_sink = None

    def record_prefix_readout(self, rows: torch.Tensor) -> None:
        """Add readout rows (B, frozen_blocks, H, 1 + N) from :meth:`forward_prefix` to the
        prefix layers' sums, as their forward would have (layers with the readout off skip)."""
        for l, attn in enumerate(self.attention_layers[: rows.shape[1]]):
            if attn.record_cls:
                attn.record_rows(rows[:, l])

    def forward_features(
        self, x: torch.Tensor, keep: torch.Tensor | None = None, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, S, S) -> normed tokens (B, 1 + N, D), CLS first; with ``keep`` (B, Nk)
        patch indices only those patches are encoded: (B, 1 + Nk, D). The frozen prefix
        (``frozen_blocks``) runs under ``no_grad``; ``prefix`` (B, 1 + N, D), its output for
        ``x`` as :meth:`forward_prefix` gave it (the prefix cache), skips it."""
        k = self.frozen_blocks
        t = self.forward_prefix(x, keep) if prefix is None else prefix
        for blk in self.blocks[k:]:
            t = blk(t)
        return self.norm(t)

    def latent_heads(self, t: torch.Tensor):
        """Normed tokens (B, 1 + N, D) -> mu_cls, logvar_cls (B, Zc) from the CLS token and
        delta, logvar_patch (B, N, Zp) from the patch tokens, fp32, log-variances bounded.
        Without z_cls (ViT-VAE) mu_cls and logvar_cls are (B, 0)."""
        with fp32(t.device):
            t = t.float()
            if self.to_z_cls is None:
                mu_cls = logvar_cls = t.new_zeros(t.shape[0], 0)
            else:
                mu_cls, logvar_cls = self.to_z_cls(t[:, 0]).chunk(2, dim=-1)
            delta, logvar_patch = self.to_z_patch(t[:, 1:]).chunk(2, dim=-1)
        return mu_cls, bound_logvar(logvar_cls), delta, bound_logvar(logvar_patch)

    def forward_encoder(
        self,
        x: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        keep: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ):
        """x -> the posteriors and the prior they are measured against, all fp32:
        z_cls, mu_cls, logvar_cls (B, Zc); mu_patch, logvar_patch, prior_mu, prior_logvar
        (B, N, Zp). z_cls is a sample with ``sample``, else mu_cls. With ``keep`` (B, Nk)
        only those patches are seen: z_cls is inferred from them, and the other patches'
        posterior is their prior (mean Z~_patch, the prior's variance).

        The patch posterior is a residual on the prior: mu_patch = Z~_patch(z_cls) + delta(x),
        so KL(q(z_patch|x) || p(z_patch|z_cls)) charges only what z_cls does not explain."""
        mu_cls, logvar_cls, delta, logvar_patch = self.latent_heads(self.forward_features(x, keep, prefix))
        z_cls = reparameterize(mu_cls, logvar_cls, generator) if sample else mu_cls
        prior_mu, prior_logvar = self.forward_prior(z_cls)
        if keep is not None:  # unseen patches: delta 0, the prior's variance
            index = keep.unsqueeze(-1).expand(-1, -1, delta.shape[-1])
            delta = torch.zeros_like(prior_mu).scatter(1, index, delta)
            logvar_patch = prior_logvar.scatter(1, index, logvar_patch)
        return (z_cls, mu_cls, logvar_cls, prior_mu + delta, logvar_patch, prior_mu, prior_logvar)

    # --- prior ---------------------------------------------------------------------------
    def forward_prior(self, z_cls: torch.Tensor):
        """z_cls (B, Zc) -> prior_mu (= Z~_patch), prior_logvar, each (B, N, Zp), fp32.
        With ``conditional_prior`` off (ablation) or no z_cls (ViT-VAE) both are zero:
        p(z_patch) = N(0, I)."""
        if self.prior is None:
            zeros = z_cls.new_zeros(z_cls.shape[0], self.num_patches, self.cfg.z_patch_dim)
            return zeros.float(), zeros.float()
        with fp32(z_cls.device):
            out = self.prior(z_cls.float())
        out = out.view(z_cls.shape[0], self.num_patches, 2, self.cfg.z_patch_dim)
        return out[:, :, 0], bound_logvar(out[:, :, 1])

    def sample_prior(
        self, z_cls: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z_patch ~ N(Z~_patch, (temperature * sigma_p)^2): (B, N, Zp)."""
        prior_mu, prior_logvar = self.forward_prior(z_cls)
        return (
            reparameterize(prior_mu, prior_logvar + 2.0 * math.log(temperature), generator)
            if temperature > 0
            else prior_mu
        )

    # --- decoder -------------------------------------------------------------------------
    def forward_decoder(self, z_patch: torch.Tensor, z_cls: torch.Tensor) -> torch.Tensor:
        """z_patch (B, N, Zp), z_cls (B, Zc) -> image (B, C, S, S) in [0, 1]. The ViT-VAE's
        blocks have no FiLM and ignore its (B, 0) z_cls."""
        h = self.dec_embed(z_patch) + self.dec_pos_embed  # (B, N, Dd)
        for blk in self.dec_blocks:
            h = blk(h, z_cls)
        return torch.sigmoid(self.output_head(self.dec_norm(h)))

    def output_head(self, h: torch.Tensor) -> torch.Tensor:
        """Normed decoder tokens (B, N, Dd) -> pixel logits (B, C, S, S): each token's patch
        (C logits and ``dec_conv`` feature maps per pixel), plus the convolutions' correction
        across patch borders."""
        h = self.unpatchify(self.dec_pred(h))  # (B, C + dec_conv, S, S), channels last
        logits = h[:, : self.in_chans]
        out = logits if self.dec_conv is None else logits + self.dec_conv(h)
        return out.contiguous()

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, S, S), C the maps per pixel, in channels-last memory
        order: the maps of a pixel stay together, as the tokens hold them, and the output
        head's convolutions run 2-3x faster on them than on (B, C, S, S)-contiguous maps."""
        B, g, p = h.shape[0], self.grid, self.cfg.patch_size
        C = h.shape[-1] // (p * p)
        h = h.view(B, g, g, p, p, C).permute(0, 1, 3, 2, 4, 5)  # (B, g, p, g, p, C)
        return h.reshape(B, g * p, g * p, C).permute(0, 3, 1, 2)

    def forward(
        self,
        x: torch.Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
        decode_prior: bool = False,
        prefix: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> ViTCAEOutput:
        """Encode, sample (or take the means when ``sample`` is False), and decode; with
        ``decode_prior`` also decode from p(z_patch | z_cls) alone (its mean without
        ``sample``) into ``recon_prior``; the ViT-VAE has no z_cls to decode a prior from and
        ignores ``decode_prior``. ``prefix``: the frozen prefix's output for ``x``
        (:meth:`forward_features`). ``keep`` (B, Nk): the encoder sees only those patches
        (:meth:`forward_encoder`; masked training)."""
        z_cls, mu_cls, logvar_cls, mu_patch, logvar_patch, prior_mu, prior_logvar = self.forward_encoder(
            x, sample, generator, keep=keep, prefix=prefix
        )
        z_patch = reparameterize(mu_patch, logvar_patch, generator) if sample else mu_patch
        recon = self.forward_decoder(z_patch, z_cls)
        recon_prior = None
        if decode_prior and self.has_z_cls:  # the generative path: every patch from p(z_patch | z_cls)
            z_prior = reparameterize(prior_mu, prior_logvar, generator) if sample else prior_mu
            recon_prior = self.forward_decoder(z_prior, z_cls)
        return ViTCAEOutput(
            recon,
            z_cls,
            mu_cls,
            logvar_cls,
            z_patch,
            mu_patch,
            logvar_patch,
            prior_mu,
            prior_logvar,
            recon_prior,
        )

    @torch.no_grad()
    def generate(
        self,
        n: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        cls_prior=None,
        standard_normal: bool = False,
    ) -> torch.Tensor:
        """z_cls from ``cls_prior`` (a :class:`~vitcae_ray.cls_mixture.ClsMixture`) if given, else
        from the model's own ``cls_mixture`` (fitted on the training posteriors) if it has one
        and ``standard_normal`` is off, else N(0, I); then z_patch ~ N(Z~_patch, (temperature
        sigma_p)^2) -> decode: (n, C, S, S). The ViT-VAE: z_patch ~ N(0, temperature^2 I)."""
        device = self.cls_token.device
        if cls_prior is None and not standard_normal:
            cls_prior = self.cls_mixture
        if cls_prior is not None and self.has_z_cls:
            z_cls = cls_prior.sample(n, generator=generator, device=device)
        else:
            z_cls = torch.randn(n, self.z_cls_dim, device=device, generator=generator)
        return self.forward_decoder(self.sample_prior(z_cls, temperature, generator), z_cls)

    def latent_groups(
        self, x: torch.Tensor, generator: torch.Generator | None = None, prefix: torch.Tensor | None = None
    ):
        """One draw from the posterior for :mod:`vitcae_ray.likelihood`: (x_hat (B, C, S, S),
        [(z, q_mu, q_logvar, p_mu, p_logvar) per latent group, in the generative order]).
        z_cls ~ q(z_cls|x) first (prior N(0, I)); then z_patch ~ q(z_patch | x, z_cls), whose
        mean and prior p(z_patch | z_cls) are taken at that sample. The ViT-VAE has the patch
        group alone. ``prefix``: as in :meth:`forward`."""
        out = self(x, sample=True, generator=generator, prefix=prefix)
        groups = [(out.z_patch, out.mu_patch, out.logvar_patch, out.prior_mu, out.prior_logvar)]
        if self.has_z_cls:
            zeros = torch.zeros_like(out.mu_cls)
            groups.insert(0, (out.z_cls, out.mu_cls, out.logvar_cls, zeros, zeros))
        return out.recon, groups

    @torch.no_grad()
    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The vectors a linear probe reads, at the posterior means, fp32: ViTCAE
        ``{"z_cls": mu_cls (B, Zc)}``; ViT-VAE ``{"cls_feature": the encoder's final normed
        CLS token (B, D), "patch_mean": the patch posterior means averaged over positions
        (B, Zp)}``."""
        was_training = self.training
        self.eval()
        try:
            t = self.forward_features(x)  # (B, 1 + N, D)
            mu_cls, _, delta, _ = self.latent_heads(t)
        finally:
            self.train(was_training)
        if self.has_z_cls:
            return {"z_cls": mu_cls}
        # the prior mean is 0 here, so the patch posterior mean is delta itself
        return {"cls_feature": t[:, 0].float(), "patch_mean": delta.mean(1)}

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """The probe's default vector, (B, d): ViTCAE z_cls's posterior mean, ViT-VAE the
        encoder's final normed CLS token."""
        return self.representations(x)["z_cls" if self.has_z_cls else "cls_feature"]

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder attention weights summed over the batch, (L, H, 1 + N, 1 + N), each layer's
        with its learned temperatures alone (the scheduler's factor left out, as in the CLS
        readout): what the convergence diagnostics measure."""
        return self.probe_pass(x)[0]

    @torch.no_grad()
    def probe_pass(
        self, x: torch.Tensor, odd: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The convergence scheduler's pass over the probe images: :meth:`attention_maps`, and
        each encoder block's output summed over the images of each half, (2, L, 1 + N, D):
        the even half (``odd`` False, all images when ``odd`` is None) first."""
        t = self.embed(x)
        odd = torch.zeros(len(x), dtype=torch.bool, device=x.device) if odd is None else odd
        maps, outs = [], []
        for blk in self.blocks:
            maps.append(blk.attn.diagnostic_attention(blk.norm1(t)).sum(0))  # (H, T, T)
            t = blk(t)
            outs.append(torch.stack([t[~odd].float().sum(0), t[odd].float().sum(0)]))  # (2, T, D)
        return torch.stack(maps), torch.stack(outs, dim=1)

    def set_readout(self, on: bool) -> None:
        """Start (resetting the sums) or stop the encoder's CLS attention readout."""
        for attn in self.attention_layers:
            attn.record_cls = on
            if on:
                attn.reset_readout()

    @contextlib.contextmanager
    def readout_paused(self):
        """Leave the CLS readout sums alone inside the block (a masked batch's rows are
        shorter than the readout's)."""
        on = [a.record_cls for a in self.attention_layers]
        for attn in self.attention_layers:
            attn.record_cls = False
        try:
            yield
        finally:
            for attn, was in zip(self.attention_layers, on):
                attn.record_cls = was

    def readout_state(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """The readout sums as they stand (each step replaces them, never edits them in place),
        for :meth:`restore_readout` to drop a skipped step's share."""
        return [(a.cls_attn_sum, a.cls_attn_odd) for a in self.attention_layers]

    def restore_readout(self, state: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> None:
        for attn, (total, odd) in zip(self.attention_layers, state):
            attn.cls_attn_sum, attn.cls_attn_odd = total, odd

    def cls_attention_odd(self) -> torch.Tensor:
        """The readout over the odd-indexed samples of each batch alone, (L, H, 1 + N)."""
        return torch.stack([a.cls_attn_odd for a in self.attention_layers])

    def cls_attention(self) -> tuple[torch.Tensor, int]:
        """Accumulated CLS->token attention, (L, H, 1 + N) summed over samples, and the count."""
        layers = self.attention_layers
        if layers[0].cls_attn_sum is None:
            raise RuntimeError("no CLS attention recorded: call set_readout(True) before forward")
        return torch.stack([a.cls_attn_sum for a in layers]), layers[0].readout_count()


def build_model(cfg: ModelConfig, img_size: int, in_chans: int) -> ViTCAE:
    return ViTCAE(cfg, img_size=img_size, in_chans=in_chans)
