import math

import torch

from vitcae_ray.config import LossConfig
from vitcae_ray.losses import curriculum, imq_mmd, kl_gaussians, kl_standard_normal


def test_kl_standard_normal_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6) * 0.5
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(4, 6), torch.ones(4, 6))
    expected = torch.distributions.kl_divergence(q, p).sum(1).mean()
    torch.testing.assert_close(kl_standard_normal(mu, logvar), expected)
    assert kl_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5)).item() == 0.0


def test_kl_gaussians_matches_closed_form_per_dimension():
    torch.manual_seed(1)
    mq, lq, mp, lp = (torch.randn(3, 7, 2) for _ in range(4))
    q = torch.distributions.Normal(mq, (0.5 * lq).exp())
    p = torch.distributions.Normal(mp, (0.5 * lp).exp())
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    torch.testing.assert_close(kl_gaussians(mq, lq, mp, lp), expected)
    # one scalar by hand: KL(N(1, 1) || N(0, 4)) = log 2 + (1 + 1) / 8 - 1/2
    one = kl_gaussians(
        torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), math.log(4.0))
    )
    assert abs(one.item() - (math.log(2.0) + 2.0 / 8.0 - 0.5)) < 1e-6


def test_imq_mmd_zero_for_identical_samples_and_grows_with_shift():
    torch.manual_seed(0)
    scales = LossConfig().mmd_scales
    x = torch.randn(128, 8)
    same = imq_mmd(x, x.clone(), scales).item()
    assert abs(same) < 1e-6
    fresh = imq_mmd(x, torch.randn(128, 8), scales).item()
    values = [imq_mmd(x, torch.randn(128, 8) + s, scales).item() for s in (0.5, 1.0, 2.0)]
    assert abs(fresh) < values[0] < values[1] < values[2]


def _imq_mmd_reference(x, y, scales):
    """The estimator written out with autograd: cdist, a kernel matrix per scale, the
    off-diagonal means of the four blocks."""
    n, d = x.shape
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy).pow(2)
    k = sum(2.0 * d * s / (2.0 * d * s + d2) for s in scales)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    off = 1.0 - torch.eye(n, dtype=x.dtype)
    return ((kxx + kyy - kxy - kxy.T) * off).sum() / (n * (n - 1))


def test_imq_mmd_and_its_gradient_match_the_autograd_reference():
    from vitcae_ray.losses import _IMQMMD

    torch.manual_seed(0)
    scales = LossConfig().mmd_scales
    for n, d in ((512, 8), (64, 8), (3, 2)):
        x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
        y = (torch.randn(n, d, dtype=torch.float64) * 1.3 + 0.2).requires_grad_()
        got = imq_mmd(x, y, scales)
        want = _imq_mmd_reference(x, y, scales)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
        for g, w in zip(torch.autograd.grad(got, (x, y)), torch.autograd.grad(want, (x, y))):
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-7)
    # the Function itself in float64, against finite differences
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _IMQMMD.apply(torch.cat([a, b]), 6, (1.0, 3.0)), (x, y))
    # a sample moved moves the estimate: the comparison above can fail
    moved = y.detach().clone()
    moved[0] += 3.0
    assert abs(imq_mmd(x, moved, (1.0, 3.0)).item() - imq_mmd(x, y, (1.0, 3.0)).item()) > 1e-3


def test_curriculum_kl_only_then_ramps_into_the_mix():
    cfg = LossConfig(kl_warmup_epochs=2, ramp_epochs=2, kl_mix=0.25)
    assert curriculum(0, cfg) == (1.0, 0.0)
    assert curriculum(1, cfg) == (1.0, 0.0)
    kl, mmd = curriculum(2, cfg)
    assert mmd == 0.5 and abs(kl - (1 - 0.5 * 0.75)) < 1e-12
    assert curriculum(3, cfg) == (0.25, 1.0)
    assert curriculum(10, cfg) == (0.25, 1.0)


def test_free_bits_charge_at_least_lambda_per_dimension_and_stop_its_gradient():
    from vitcae_ray.losses import kl_free_bits

    mu = torch.zeros(8, 4, requires_grad=True)
    mu.data[:, 0] = 3.0  # dimension 0 carries 4.5 nats, the others none
    logvar = torch.zeros(8, 4)
    kl = kl_free_bits(mu, logvar, 0.5)
    assert abs(kl.item() - (4.5 + 3 * 0.5)) < 1e-6
    kl.backward()
    assert mu.grad[:, 0].abs().sum() > 0 and mu.grad[:, 1:].abs().sum() == 0


def _out(seed: int = 0, image_size: int = 16):
    from vitcae_ray.config import build_config
    from vitcae_ray.model import build_model

    torch.manual_seed(seed)
    cfg = build_config({"data.image_size": image_size, "model.patch_size": 2})
    model = build_model(cfg.model, image_size, 1)
    x = torch.rand(6, 1, image_size, image_size)
    return cfg, model, x


def test_elbo_is_the_fixed_weight_negative_elbo_and_loss_adds_the_generative_pass():
    from vitcae_ray.losses import vitcae_loss

    cfg, model, x = _out()
    out = model(x, decode_prior=True)
    terms = vitcae_loss(out, x, epoch=0, cfg=cfg.loss)
    P = x[0].numel()
    w = cfg.loss.recon_weight
    expected = w * terms["recon"] + 0.5 * P * math.log(math.pi / w) + terms["kl_cls"] + terms["kl_patch"]
    torch.testing.assert_close(terms["elbo"], expected)
    # the Gaussian NLL with sigma^2 = 1 / (2 w), summed over pixels, for the decoder's mean
    nll = (
        -torch.distributions.Normal(out.recon.float(), math.sqrt(1 / (2 * w)))
        .log_prob(x)
        .flatten(1)
        .sum(1)
        .mean()
    )
    torch.testing.assert_close(
        w * terms["recon"] + 0.5 * P * math.log(math.pi / w), nll, rtol=1e-4, atol=1e-3
    )
    prior_sse = (out.recon_prior - x).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(terms["prior_recon"], prior_sse)
    # the elbo does not change with the training weights of the curriculum or the extra pass
    heavier = type(cfg.loss)(
        **{**cfg.loss.__dict__, "prior_recon_weight": 5.0, "kl_cls_free_bits": 3.0, "discrepancy_weight": 2.0}
    )
    again = vitcae_loss(out, x, epoch=0, cfg=heavier)
    torch.testing.assert_close(again["elbo"], terms["elbo"])
    assert again["loss"] > terms["loss"]


def test_discrepancy_uses_the_posterior_mean_not_the_sample():
    from vitcae_ray.losses import vitcae_loss

    cfg, model, x = _out()
    out = model(x)
    d = vitcae_loss(out, x, 0, cfg.loss)["discrepancy"]
    torch.testing.assert_close(d, (out.mu_patch - out.z_patch_tilde).pow(2).flatten(1).sum(1).mean())
    # its gradient does not reach the posterior log-variance
    out.logvar_patch.retain_grad()
    d.backward(retain_graph=True)
    assert out.logvar_patch.grad is None or out.logvar_patch.grad.abs().sum() == 0


def test_log_variances_are_bounded_and_latents_stay_fp32_under_autocast():
    from vitcae_ray.model.vitcae import LOGVAR_BOUND

    cfg, model, x = _out()
    with torch.no_grad():  # push the raw log-variances far out
        model.to_z_cls.bias[cfg.model.z_cls_dim :] = 1e4
        model.to_z_patch.bias[cfg.model.z_patch_dim :] = -1e4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, decode_prior=True)
    assert out.logvar_cls.max() <= LOGVAR_BOUND and out.logvar_patch.min() >= -LOGVAR_BOUND
    for t in (
        out.mu_cls,
        out.logvar_cls,
        out.mu_patch,
        out.logvar_patch,
        out.prior_mu,
        out.prior_logvar,
        out.z_cls,
        out.z_patch,
    ):
        assert t.dtype == torch.float32
    assert out.recon.dtype == torch.bfloat16  # the transformer itself still runs in bf16


def test_patch_posterior_is_a_residual_on_the_prior_of_z_cls():
    _, model, x = _out()
    model.eval()
    with torch.no_grad():
        z0, mu_cls, _, mu0, lv0, prior0, _ = model.forward_encoder(x)
        assert torch.equal(z0, mu_cls)  # without sampling, z_cls is the posterior mean
        draws = [
            model.forward_encoder(x, sample=True, generator=torch.Generator().manual_seed(s)) for s in (1, 2)
        ]
    (z1, _, _, mu1, lv1, prior1, _), (z2, _, _, mu2, lv2, prior2, _) = draws
    assert not torch.allclose(z1, z2)
    # another z_cls moves the prior mean Z~_patch, and mu_patch with it ...
    assert (prior1 - prior2).abs().max() > 1e-3 and (mu1 - mu2).abs().max() > 1e-3
    torch.testing.assert_close(prior1, model.forward_prior(z1)[0])
    # ... while the residual delta(x) and the posterior variance depend on x alone
    torch.testing.assert_close(mu1 - prior1, mu2 - prior2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu1 - prior1, mu0 - prior0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lv1, lv2)


def test_imq_mmd_and_kl_of_a_zero_width_latent_are_exactly_zero():
    from vitcae_ray.losses import kl_free_bits

    empty = torch.zeros(8, 0)
    scales = LossConfig().mmd_scales
    for value in (
        imq_mmd(empty, torch.randn(8, 0), scales),
        kl_standard_normal(empty, empty),
        kl_free_bits(empty, empty, 1.0),
    ):
        assert value.item() == 0.0  # not NaN


def test_patch_mmd_compares_patch_latents_and_scales_with_patches():
    from vitcae_ray.losses import patch_mmd
    from vitcae_ray.model.vitcae import ViTCAEOutput

    B, N, Zp = 8, 16, 4
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(B, N, Zp)

    def out(shift: float) -> ViTCAEOutput:
        mu = torch.randn(B, N, Zp, generator=g) + shift
        return ViTCAEOutput(torch.zeros(B, 1, 4, 4), z[:, 0], z[:, 0], z[:, 0], mu, mu, z, z, z)

    scales = LossConfig().mmd_scales
    near = patch_mmd(out(0.0), scales, 10_000, torch.Generator().manual_seed(1)).item()
    far = patch_mmd(out(2.0), scales, 10_000, torch.Generator().manual_seed(1)).item()
    assert abs(near) < 0.05 * far and far > 0
    capped = patch_mmd(out(2.0), scales, 32, torch.Generator().manual_seed(1)).item()
    assert capped > 0.5 * far  # a random subset measures the same shift


def test_masked_keep_hides_a_share_in_range_at_random_or_as_a_square_block():
    from vitcae_ray.config import LossConfig
    from vitcae_ray.engine import masked_keep

    cpu = torch.device("cpu")
    assert masked_keep(4, 8, LossConfig(mask_prob=0.0), cpu) is None
    cfg = LossConfig(mask_prob=1.0, mask_ratio_min=0.25, mask_ratio_max=0.75)
    torch.manual_seed(0)
    kinds = set()
    for _ in range(40):
        keep = masked_keep(5, 8, cfg, cpu)
        assert keep.shape[0] == 5 and (keep.diff(dim=1) > 0).all()  # ascending, no repeats
        hidden = torch.ones(5, 64, dtype=torch.bool).scatter(1, keep, False)
        share = hidden.sum(1).float() / 64
        # the block's side is rounded, so its share can sit a little outside the range
        assert (share >= 0.14).all() and (share <= 0.77).all()
        grid = hidden.view(5, 8, 8)
        rows, cols = grid.any(2).sum(1), grid.any(1).sum(1)
        block = bool((rows * cols == hidden.sum(1)).all())  # the hidden patches fill a rectangle
        kinds.add(block and bool((rows == cols).all()))
    assert kinds == {True, False}  # both square blocks and random patches occur
    # about half the batches are masked with mask_prob 0.5
    half = LossConfig(mask_prob=0.5)
    assert 60 < sum(masked_keep(2, 8, half, cpu) is not None for _ in range(200)) < 140


def test_a_masked_step_trains_without_touching_the_attention_readout():
    from vitcae_ray.config import build_config
    from vitcae_ray.engine import train_one_epoch
    from vitcae_ray.model import build_model

    def epoch(mask_prob: float):
        cfg = build_config({"data.image_size": 16, "loss.mask_prob": mask_prob})
        torch.manual_seed(0)
        model = build_model(cfg.model, 16, 1)
        model.set_readout(True)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        batches = [(torch.rand(4, 1, 16, 16), torch.zeros(4)) for _ in range(3)]
        metrics = train_one_epoch(model, batches, opt, sched, 0, cfg, torch.device("cpu"))
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return model.attention_layers[0].readout_count(), metrics, moved

    count, metrics, moved = epoch(1.0)
    assert count == 0 and moved and metrics["train/samples"] == 12
    count, _, moved = epoch(0.0)
    assert count == 12 and moved
