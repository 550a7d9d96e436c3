"""The likelihood bounds against a linear-Gaussian VAE whose log p(x) is known in closed form,
then on the real model: the sampled analytic-KL ELBO against the Monte Carlo one."""

import math

import pytest
import torch

from vitcae_ray.likelihood import elbo, iwae_nll, log_weights

D, d, SIGMA = 6, 3, 0.5  # data dim, latent dim, decoder standard deviation
RECON_WEIGHT = 1.0 / (2.0 * SIGMA**2)  # sigma^2 = 1 / (2 recon_weight), as in the loss


class LinearGaussianVAE:
    """p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I), so p(x) = N(b, W W^T + sigma^2 I).
    W has orthogonal columns, so the exact posterior is diagonal:
    p(z|x) = N(S W^T (x - b) / sigma^2, S) with S = (I + W^T W / sigma^2)^-1.
    q(z|x) = N(A (x - b) + c, diag(e^logvar)); the exact posterior unless perturbed."""

    def __init__(self, perturb: float = 0.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
        self.W = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)  # (D, d)
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        s = 1.0 / (1.0 + (self.W**2).sum(0) / SIGMA**2)  # (d,) posterior variances
        self.A = s[:, None] * self.W.T / SIGMA**2  # (d, D)
        self.c = torch.zeros(d, dtype=torch.float64)
        self.logvar = s.log()
        if perturb:
            self.A = self.A + perturb * torch.randn(d, D, generator=g, dtype=torch.float64)
            self.c = self.c + perturb * torch.randn(d, generator=g, dtype=torch.float64)
            self.logvar = self.logvar + perturb * torch.randn(d, generator=g, dtype=torch.float64)

    def latent_groups(self, x, generator=None):
        x = x.double()
        mu = (x - self.b) @ self.A.T + self.c  # (B, d)
        logvar = self.logvar.expand_as(mu)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps
        zeros = torch.zeros_like(mu)
        return z @ self.W.T + self.b, [(z, mu, logvar, zeros, zeros)]

    def true_nll(self, x):
        cov = self.W @ self.W.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
        return -torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.double())

    def exact_negative_elbo(self, x):
        """-ELBO in closed form: E_q[-log p(x|z)] + KL(q || N(0, I))."""
        x = x.double()
        mu = (x - self.b) @ self.A.T + self.c
        var = self.logvar.exp()
        sse = ((x - mu @ self.W.T - self.b) ** 2).sum(1) + ((self.W**2) * var).sum()
        nll = sse / (2 * SIGMA**2) + 0.5 * D * math.log(2 * math.pi * SIGMA**2)
        kl = 0.5 * (var + mu**2 - 1 - self.logvar).sum(1)
        return nll + kl


def _data(vae, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (z @ vae.W.T + vae.b + SIGMA * torch.randn(n, D, generator=g, dtype=torch.float64)).float()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_with_the_exact_posterior_every_log_weight_is_log_p_x():
    vae = LinearGaussianVAE()
    x = _data(vae, 16)
    true = vae.true_nll(x).float()
    w = log_weights(vae, x, 8, recon_weight=RECON_WEIGHT, generator=_gen())
    assert w.shape == (8, 16) and w.dtype == torch.float32
    # log p(x, z) - log p(z | x) = log p(x) for every z: one sample is already exact
    torch.testing.assert_close(-w, true.expand(8, -1), rtol=0, atol=2e-4)
    torch.testing.assert_close(
        iwae_nll(vae, x, 1, recon_weight=RECON_WEIGHT, generator=_gen()), true, atol=2e-4, rtol=0
    )
    # the analytic-KL ELBO is exact in expectation (its reconstruction term is sampled)
    torch.testing.assert_close(vae.exact_negative_elbo(x).float(), true, atol=1e-4, rtol=0)
    est = elbo(vae, x, 4000, recon_weight=RECON_WEIGHT, generator=_gen())
    assert (est - true).abs().max() < 0.05


def test_elbo_matches_its_closed_form_and_bounds_the_true_nll():
    vae = LinearGaussianVAE(perturb=0.3)
    x = _data(vae, 16)
    true = vae.true_nll(x).float()
    exact = vae.exact_negative_elbo(x).float()
    gap = exact - true  # KL(q(z|x) || p(z|x)) > 0
    assert gap.min() > 0.1
    k = 2000
    draws = torch.stack([elbo(vae, x, 1, recon_weight=RECON_WEIGHT, generator=_gen(s)) for s in range(200)])
    est = elbo(vae, x, k, recon_weight=RECON_WEIGHT, generator=_gen(7))
    se = draws.std(0) / math.sqrt(k)
    assert ((est - exact).abs() < 4 * se + 1e-3).all()
    assert (est > true + gap / 2).all()
    # the Monte Carlo ELBO (mean of -log w) has the same expectation
    mc = -log_weights(vae, x, k, recon_weight=RECON_WEIGHT, generator=_gen(8))
    assert ((mc.mean(0) - exact).abs() < 4 * mc.std(0) / math.sqrt(k)).all()


def test_iwae_bounds_tighten_with_k_towards_the_true_nll():
    vae = LinearGaussianVAE(perturb=0.15)
    x0 = _data(vae, 4)
    reps = 400  # independent estimates of each image's bound, as a batch
    x = x0.repeat_interleave(reps, 0)
    true = vae.true_nll(x0).float()
    means, ses = {}, {}
    for k in (1, 8, 64):
        b = iwae_nll(vae, x, k, recon_weight=RECON_WEIGHT, generator=_gen(k)).view(4, reps)
        means[k], ses[k] = b.mean(1), b.std(1) / math.sqrt(reps)
    for k in (1, 8, 64):
        assert (means[k] > true - 4 * ses[k]).all()  # an upper bound on -log p(x) in expectation
    assert (means[1] > means[8]).all() and (means[8] > means[64]).all()
    gap1, gap64 = means[1] - true, means[64] - true
    assert (gap64 < 0.15 * gap1).all()  # close to the true NLL at large K
    # K = 1 is a one-sample negative ELBO: the same expectation as the analytic-KL estimate
    exact = vae.exact_negative_elbo(x0).float()
    assert ((means[1] - exact).abs() < 4 * ses[1]).all()
    est = elbo(vae, x, 1, recon_weight=RECON_WEIGHT, generator=_gen(5)).view(4, reps).mean(1)
    assert ((est - exact).abs() < 4 * ses[1]).all()


def test_k_must_be_positive():
    vae = LinearGaussianVAE()
    x = _data(vae, 2)
    for fn in (elbo, iwae_nll, log_weights):
        with pytest.raises(ValueError, match="k must be"):
            fn(vae, x, 0, recon_weight=RECON_WEIGHT)


# --- the real model ----------------------------------------------------------------------


def _model(variant: str):
    from vitcae_ray.config import build_config
    from vitcae_ray.model import build_model

    cfg = build_config({"model.variant": variant, "data.image_size": 16, "model.patch_size": 4})
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, 16, 1).eval()


@pytest.mark.parametrize("variant", ["vitcae", "vitvae"])
def test_model_analytic_kl_elbo_agrees_with_the_monte_carlo_elbo(variant):
    cfg, model = _model(variant)
    w = cfg.loss.recon_weight
    x0 = torch.rand(3, 1, 16, 16)
    reps, k = 64, 8  # 512 draws per image
    x = x0.repeat_interleave(reps, 0)
    analytic = elbo(model, x, k, recon_weight=w, generator=_gen(1)).view(3, reps * 1)
    mc = -log_weights(model, x, k, recon_weight=w, generator=_gen(2))  # (k, 3 * reps)
    mc = mc.view(k, 3, reps).permute(1, 0, 2).reshape(3, k * reps)
    a_mean, a_se = analytic.mean(1), analytic.std(1) / math.sqrt(reps)
    m_mean, m_se = mc.mean(1), mc.std(1) / math.sqrt(k * reps)
    assert ((a_mean - m_mean).abs() < 4 * (a_se**2 + m_se**2).sqrt() + 1e-3 * a_mean.abs()).all()
    # IWAE is below the mean of -log w drawn with the same samples (Jensen), and finite
    iw = iwae_nll(model, x0, 32, recon_weight=w, generator=_gen(3))
    mean_w = -log_weights(model, x0, 32, recon_weight=w, generator=_gen(3)).mean(0)
    assert torch.isfinite(iw).all() and (iw <= mean_w + 1e-3).all()


def _digits(n: int, offset: int = 0) -> torch.Tensor:
    """scikit-learn's 8x8 digits in [0, 1], upsampled to 16x16: (n, 1, 16, 16)."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[offset : offset + n], dtype=torch.float32) / 16.0
    return torch.nn.functional.interpolate(images[:, None], size=16, mode="bilinear")


@pytest.fixture(scope="module", params=["vitcae", "vitvae"])
def trained(request):
    """(cfg, the untrained model, the model after 150 steps on digits)."""
    import copy

    from vitcae_ray.losses import vitcae_loss

    cfg, model = _model(request.param)
    before = copy.deepcopy(model)
    train = _digits(1200)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(150):
        x = train[(step * 32) % 1184 :][:32]
        loss = vitcae_loss(model(x, decode_prior=True), x, 0, cfg.loss)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, before, model.eval()


def test_model_bounds_rank_digits_above_noise_and_fall_with_training(trained):
    cfg, before, model = trained
    w = cfg.loss.recon_weight
    held_out = _digits(8, offset=1500)
    noise = torch.rand(8, 1, 16, 16, generator=_gen(1))
    for fn in (elbo, iwae_nll):
        digits = fn(model, held_out, 8, recon_weight=w, generator=_gen(2))
        assert (digits < fn(model, noise, 8, recon_weight=w, generator=_gen(2))).all()
        assert (digits < fn(before, held_out, 8, recon_weight=w, generator=_gen(2))).all()


@pytest.mark.parametrize("variant", ["vitcae", "vitvae"])
def test_model_elbo_follows_the_decoder_variance(variant):
    cfg, model = _model(variant)
    w = cfg.loss.recon_weight
    x = torch.rand(4, 1, 16, 16, generator=_gen(1))
    # same draws, another decoder variance: -ELBO(w) = w * E[SSE] + P/2 log(pi / w) + KL,
    # so doubling w adds w * E[SSE] - P/2 log 2 and quadrupling it three times that SSE term
    P = x[0].numel()
    e1, e2, e4 = (elbo(model, x, 4, recon_weight=r * w, generator=_gen(3)) for r in (1, 2, 4))
    sse_term = e2 - e1 + 0.5 * P * math.log(2)
    assert (sse_term > 0).all()
    torch.testing.assert_close(e4 - e1, 3 * sse_term - 0.5 * P * math.log(4), rtol=1e-4, atol=1e-2)
