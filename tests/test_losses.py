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
    one = kl_gaussians(torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1, 1),
                       torch.full((1, 1), math.log(4.0)))
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


def test_curriculum_kl_only_then_ramps_into_the_mix():
    cfg = LossConfig(warmup_epochs=2, ramp_epochs=2, kl_mix=0.25)
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
