import pytest
import torch

from vitcae_ray.config import MODEL_PRESETS, build_config
from vitcae_ray.model import Attention, build_model


def _model(preset: str, image_size: int, chans: int = 3):
    cfg = build_config({"model.preset": preset, "data.image_size": image_size})
    return build_model(cfg.model, image_size, chans)


def _without_gradient(model) -> list[str]:
    """Trainable parameters whose gradient is missing, non-finite or all zero."""
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_preset_forward_shapes_finite_and_every_param_gets_a_gradient(preset):
    torch.manual_seed(0)
    size = 32 if preset == "tiny" else 64
    model = _model(preset, size)
    cfg = model.cfg
    # the decoder's convolutional correction starts at zero, so its first layer has no gradient
    # until that last layer has moved: move it, as a first training step would
    torch.nn.init.normal_(model.dec_conv[-1].weight, std=0.01)
    x = torch.rand(2, 3, size, size)
    out = model(x)
    n = (size // cfg.patch_size) ** 2
    assert out.recon.shape == x.shape
    assert out.z_cls.shape == out.mu_cls.shape == (2, cfg.z_cls_dim)
    for t in (out.z_patch, out.mu_patch, out.logvar_patch, out.prior_mu, out.prior_logvar, out.z_patch_tilde):
        assert t.shape == (2, n, cfg.z_patch_dim)
    assert 0 <= out.recon.min() and out.recon.max() <= 1
    loss = sum(
        t.float().pow(2).mean()
        for t in (
            out.recon,
            out.z_cls,
            out.logvar_cls,
            out.z_patch,
            out.logvar_patch,
            out.prior_mu,
            out.prior_logvar,
            out.z_patch_tilde,
        )
    )
    assert torch.isfinite(loss)
    loss.backward()
    missing = _without_gradient(model)
    # FiLM layers start at zero, so their gradient is nonzero only through z_cls: still nonzero
    assert missing == []
    samples = model.generate(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 3, size, size) and torch.isfinite(samples).all()


def test_fused_and_manual_attention_agree_with_temperatures():
    torch.manual_seed(0)
    attn = Attention(32, 4, fused=True)
    with torch.no_grad():
        for head, tau in zip(attn.heads, [0.5, 1.0, 2.0, 3.0]):
            head.tau.fill_(tau)
        attn.tau_factor.copy_(torch.tensor([1.0, 0.7, 1.0, 0.4]))
    x = torch.randn(3, 17, 32)
    fused = attn(x)
    manual, weights = attn(x, return_attn=True)
    torch.testing.assert_close(fused, manual, rtol=1e-5, atol=1e-5)
    assert weights.shape == (3, 4, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 17))
    # the temperature really changes the attention: tau = 1 everywhere gives other weights
    with torch.no_grad():
        for head in attn.heads:
            head.tau.fill_(1.0)
        attn.tau_factor.fill_(1.0)
    _, plain = attn(x, return_attn=True)
    assert not torch.allclose(plain, weights, atol=1e-3)


def test_model_fused_flag_does_not_change_outputs():
    torch.manual_seed(0)
    fused = _model("tiny", 32, 1)
    manual_cfg = build_config({"model.fused_attn": False})
    manual = build_model(manual_cfg.model, 32, 1)
    manual.load_state_dict(fused.state_dict())
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(
        fused(x, sample=False).recon, manual(x, sample=False).recon, rtol=1e-4, atol=1e-5
    )


def test_cls_readout_equals_the_diagnostic_attention_cls_row_without_the_factor():
    torch.manual_seed(0)
    model = _model("tiny", 32, 1)
    for a in model.attention_layers:
        with torch.no_grad():
            for head in a.heads:
                head.tau.uniform_(0.5, 2.0)
            a.tau_factor.uniform_(0.2, 0.9)  # the scheduler's factor: left out of the diagnostics
    x = torch.rand(5, 1, 32, 32)
    model.set_readout(True)
    model(x, sample=False)
    readout, count = model.cls_attention()
    model.set_readout(False)
    assert count == 5
    # recompute each layer's manual attention on the same inputs and compare CLS rows
    t = model.patch_embed(x).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(5, -1, -1), t], 1) + model.pos_embed
    for layer, blk in enumerate(model.blocks):
        weights = blk.attn.diagnostic_attention(blk.norm1(t))
        torch.testing.assert_close(readout[layer], weights[:, :, 0].sum(0), rtol=1e-4, atol=1e-5)
        # the same weights as the manual path with factor 1
        factor = blk.attn.tau_factor.clone()
        blk.attn.tau_factor.fill_(1.0)
        _, manual = blk.attn(blk.norm1(t), return_attn=True)
        blk.attn.tau_factor.copy_(factor)
        torch.testing.assert_close(weights, manual, rtol=1e-4, atol=1e-6)
        t = blk(t)
    assert readout.shape == (len(model.blocks), model.cfg.num_heads, model.num_patches + 1)


def test_per_head_weights_are_addressable():
    attn = Attention(32, 4)
    x = torch.randn(2, 5, 32)
    q_all = torch.nn.functional.linear(x, attn.qkv_weight[0].reshape(-1, 32), attn.qkv_bias[0].reshape(-1))
    # head 2's query is the slice computed from qkv_weight[0, 2] alone
    q2 = x @ attn.qkv_weight[0, 2].T + attn.qkv_bias[0, 2]
    torch.testing.assert_close(q_all.view(2, 5, 4, 8)[:, :, 2], q2)


def test_unconditional_prior_ablation_uses_a_standard_normal_prior():
    cfg = build_config({"model.conditional_prior": False})
    model = build_model(cfg.model, 32, 1)
    assert model.prior is None
    out = model(torch.rand(2, 1, 32, 32))
    assert out.prior_mu.abs().sum() == 0 and out.prior_logvar.abs().sum() == 0
    assert model.generate(2).shape == (2, 1, 32, 32)


def _vitvae(image_size: int = 16, chans: int = 1):
    cfg = build_config({"model.variant": "vitvae", "data.image_size": image_size, "model.patch_size": 2})
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, image_size, chans)


def test_vitvae_has_no_global_latent_prior_mlp_or_film():
    cfg, model = _vitvae()
    assert model.to_z_cls is None and model.prior is None
    assert all(blk.film is None for blk in model.dec_blocks)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "film" in n or n.startswith(("prior.", "to_z_cls."))]
    # the same encoder as the ViTCAE: CLS token and per-head temperatures
    ref = build_model(build_config({"data.image_size": 16, "model.patch_size": 2}).model, 16, 1)
    encoder = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.", "to_z_patch.")
    assert [n for n in names if n.startswith(encoder)] == [
        n for n, _ in ref.named_parameters() if n.startswith(encoder)
    ]
    assert all(a.tau.numel() == len(a.heads) == cfg.model.num_heads for a in model.attention_layers)


def test_vitvae_forward_shapes_loss_and_every_param_gets_a_gradient():
    from vitcae_ray.losses import patch_mmd, vitcae_loss

    cfg, model = _vitvae()
    torch.nn.init.normal_(model.dec_conv[-1].weight, std=0.01)  # as after a first step
    x = torch.rand(6, 1, 16, 16)
    out = model(x, decode_prior=True)  # nothing to decode from a prior: ignored
    n, zp = model.num_patches, cfg.model.z_patch_dim
    assert out.recon.shape == x.shape and out.recon_prior is None
    for t in (out.z_cls, out.mu_cls, out.logvar_cls):
        assert t.shape == (6, 0)
    for t in (out.z_patch, out.mu_patch, out.logvar_patch, out.prior_mu, out.prior_logvar):
        assert t.shape == (6, n, zp)
    assert out.prior_mu.abs().sum() == 0 and out.prior_logvar.abs().sum() == 0  # N(0, I)
    epoch = cfg.loss.kl_warmup_epochs + cfg.loss.ramp_epochs  # KL and MMD both on
    terms = vitcae_loss(out, x, epoch, cfg.loss, generator=torch.Generator().manual_seed(3))
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["kl_cls"].item() == 0.0 and terms["discrepancy"].item() == 0.0
    assert terms["prior_recon"].item() == 0.0
    # the whole MMD is the patch MMD: the zero-width z_cls adds exactly 0
    only_patch = patch_mmd(
        out, cfg.loss.mmd_scales, cfg.loss.mmd_max_samples, torch.Generator().manual_seed(3)
    )
    assert terms["mmd"].item() == only_patch.item()
    terms["loss"].backward()
    missing = _without_gradient(model)
    assert missing == []
    samples = model.generate(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 16, 16) and torch.isfinite(samples).all()


def test_vitvae_inpainting_encoder_puts_the_standard_normal_prior_in_the_holes():
    _, model = _vitvae()
    x = torch.rand(2, 1, 16, 16)
    keep = torch.stack([torch.arange(0, model.num_patches, 2)] * 2)  # every other patch
    with torch.no_grad():
        z_cls, _, _, mu_patch, logvar_patch, _, _ = model.forward_encoder(x, keep=keep)
        full = model.forward_encoder(x)[3]
    assert z_cls.shape == (2, 0)
    holes = torch.arange(1, model.num_patches, 2)
    assert mu_patch[:, holes].abs().sum() == 0 and logvar_patch[:, holes].abs().sum() == 0
    assert not torch.allclose(mu_patch[:, keep[0]], full[:, keep[0]])  # seen through fewer patches
    assert model.forward_decoder(mu_patch, z_cls).shape == x.shape


@pytest.mark.parametrize("variant", ["vitcae", "vitvae"])
def test_representations_are_posterior_means_without_sampling(variant):
    cfg = build_config({"model.variant": variant, "data.image_size": 16, "model.patch_size": 2})
    torch.manual_seed(0)
    model = build_model(cfg.model, 16, 1).train()
    x = torch.rand(5, 1, 16, 16)
    reps = model.representations(x)
    assert model.training  # the mode is restored
    _, mu_cls, _, mu_patch, *_ = model.forward_encoder(x)
    if variant == "vitcae":
        assert list(reps) == ["z_cls"]
        torch.testing.assert_close(reps["z_cls"], mu_cls)
        torch.testing.assert_close(model.representation(x), mu_cls)
    else:
        assert list(reps) == ["cls_feature", "patch_mean"]
        assert reps["cls_feature"].shape == (5, cfg.model.embed_dim)
        assert reps["patch_mean"].shape == (5, cfg.model.z_patch_dim)
        torch.testing.assert_close(reps["cls_feature"], model.forward_features(x)[:, 0])
        torch.testing.assert_close(reps["patch_mean"], mu_patch.mean(1))
        torch.testing.assert_close(model.representation(x), reps["cls_feature"])
    assert all(not r.requires_grad and r.dtype == torch.float32 for r in reps.values())
    # deterministic: the same vectors twice
    for k, r in model.representations(x).items():
        assert torch.equal(r, reps[k])


def test_checkpoint_round_trip_rebuilds_the_variant():
    import io

    from vitcae_ray.checkpoints import load_model_file, model_from_state
    from vitcae_ray.freezing import frozen_heads

    cfg, model = _vitvae()
    state = {
        "model": model.state_dict(),
        "model_args": {"img_size": model.img_size, "in_chans": model.in_chans},
        "config": cfg.to_dict(),
        "frozen_heads": frozen_heads(model),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    again = model_from_state(load_model_file(buf.getvalue(), "model.pt"))
    assert again.cfg.variant == "vitvae" and not again.has_z_cls and again.prior is None
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(again(x, sample=False).recon, model(x, sample=False).recon)
    # the weights do not fit the other variant
    other = build_model(build_config({"data.image_size": 16, "model.patch_size": 2}).model, 16, 1)
    with pytest.raises(RuntimeError):
        other.load_state_dict(state["model"])


def test_variant_is_a_validated_config_key():
    from vitcae_ray.config import ConfigError

    assert build_config({}).model.variant == "vitcae"
    with pytest.raises(ConfigError, match="model.variant"):
        build_config({"model.variant": "vae"})


@pytest.mark.parametrize("dec_conv", [0, 8])
def test_only_the_convolutional_output_head_sees_across_patch_borders(dec_conv):
    """A pixel on a patch's right border: with the linear head its logit depends on its own
    token alone; the convolutional head also reads the token of the patch to its right."""
    cfg = build_config({"model.dec_conv": dec_conv})
    model = build_model(cfg.model, 32, 1)
    p = cfg.model.patch_size
    if dec_conv:  # the correction starts at zero; give it the weights training would
        torch.nn.init.normal_(model.dec_conv[-1].weight, std=0.1)
    h = torch.randn(1, model.num_patches, cfg.model.dec_dim, requires_grad=True)
    logits = model.output_head(h)
    assert logits.shape == (1, 1, 32, 32)
    logits[0, 0, 1, p - 1].backward()  # row 1, the last column of patch 0
    own, right, below_right = (h.grad[0, i].abs().sum() for i in (0, 1, model.grid + 1))
    assert own > 0
    if dec_conv:
        assert right > 0 and below_right == 0  # 3x3 twice: two pixels of reach, not a whole patch
    else:
        assert right == 0 and below_right == 0
    assert (dec_conv == 0) == (model.dec_conv is None)


def test_the_convolutional_head_starts_as_the_linear_head():
    """At initialisation its correction is zero: the logits are the linear head's."""
    torch.manual_seed(0)
    model = build_model(build_config({}).model, 32, 1)
    h = torch.randn(2, model.num_patches, model.cfg.dec_dim)
    linear = model.unpatchify(model.dec_pred(h))[:, :1]
    torch.testing.assert_close(model.output_head(h), linear)


@pytest.mark.parametrize("channels", [1, 3])
def test_unpatchify_puts_each_tokens_pixels_in_its_patch(channels):
    """Token n = (row, col) of the patch grid holds its patch's p x p pixels, each with C
    values, in (pixel row, pixel column, channel) order; the maps come back in channels-last
    memory order and equal to a loop over patches."""
    cfg = build_config({"model": {"dec_conv": 4}}).model
    model = build_model(cfg, 16, channels)
    p, g = cfg.patch_size, model.grid
    C = channels + cfg.dec_conv
    h = torch.randn(2, g * g, p * p * C)
    got = model.unpatchify(h)
    want = torch.empty(2, C, g * p, g * p)
    for n in range(g * g):
        r, c = divmod(n, g)
        want[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = h[:, n].view(2, p, p, C).permute(0, 3, 1, 2)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    # the image the head returns is plain (B, C, S, S)-contiguous
    assert model.output_head(torch.randn(2, g * g, cfg.dec_dim)).is_contiguous()
