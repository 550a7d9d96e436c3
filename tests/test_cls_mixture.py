"""The ex-post Gaussian mixture on z_cls (vitcae_ray.cls_mixture): its fit and sampler against
a mixture whose parameters are known, and generate() drawing z_cls from it."""

import numpy as np
import pytest
import torch

from vitcae_ray.cls_mixture import ClsMixture, fit_mixture
from vitcae_ray.config import build_config
from vitcae_ray.engine import init_model

MEANS = np.array([[-6.0, 0.0], [6.0, 0.0], [0.0, 8.0]])
COVS = np.array([[[1.0, 0.6], [0.6, 1.0]], [[0.5, 0.0], [0.0, 2.0]], [[1.5, -0.4], [-0.4, 0.5]]])
WEIGHTS = np.array([0.5, 0.3, 0.2])


def _truth(n: int, seed: int) -> np.ndarray:
    """Draws from the known mixture, with numpy (the independent reference)."""
    rng = np.random.default_rng(seed)
    k = rng.choice(3, n, p=WEIGHTS)
    return np.stack([rng.multivariate_normal(MEANS[i], COVS[i]) for i in k])


def _in_holes(z: np.ndarray) -> float:
    """The share of points farther than 4 standard deviations (Mahalanobis) from every
    component of the known mixture: where the data has no mass."""
    d = [np.einsum("ni,ij,nj->n", z - m, np.linalg.inv(c), z - m) for m, c in zip(MEANS, COVS)]
    return float((np.min(d, axis=0) > 16.0).mean())


def test_the_fitted_mixture_samples_like_the_known_one():
    mixture = fit_mixture(_truth(3000, 0), seed=0)
    assert mixture.components == 3  # BIC's choice among COMPONENTS
    order = np.argsort(mixture.means[:, 0].numpy() + 0.01 * mixture.means[:, 1].numpy())
    want = np.argsort(MEANS[:, 0] + 0.01 * MEANS[:, 1])
    np.testing.assert_allclose(mixture.weights.numpy()[order], WEIGHTS[want], atol=0.03)
    np.testing.assert_allclose(mixture.means.numpy()[order], MEANS[want], atol=0.15)
    covs = (mixture.scale_tril @ mixture.scale_tril.transpose(1, 2)).numpy()
    np.testing.assert_allclose(covs[order], COVS[want], atol=0.2)
    # its draws have the known mixture's moments and stay where the data is
    draws = mixture.sample(20000, torch.Generator().manual_seed(1)).numpy()
    ref = _truth(20000, 2)
    np.testing.assert_allclose(draws.mean(0), ref.mean(0), atol=0.15)
    np.testing.assert_allclose(np.cov(draws.T), np.cov(ref.T), rtol=0.05, atol=0.3)
    assert _in_holes(draws) < 0.002
    # a single Gaussian (one component: the deliberately wrong model) puts mass in the holes
    single = fit_mixture(_truth(3000, 0), seed=0, components=(1,))
    assert _in_holes(single.sample(20000, torch.Generator().manual_seed(1)).numpy()) > 0.05


def test_sample_draws_the_component_gaussian():
    """One component: the draws' covariance is L L^T (the Cholesky factor's product)."""
    scale = torch.tensor([[[2.0, 0.0], [1.0, 0.5]]])
    mixture = ClsMixture(torch.ones(1), torch.tensor([[1.0, -3.0]]), scale)
    draws = mixture.sample(50000, torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_allclose(draws.mean(0), [1.0, -3.0], atol=0.05)
    np.testing.assert_allclose(np.cov(draws.T), (scale[0] @ scale[0].T).numpy(), atol=0.06)
    again = ClsMixture.from_state_dict(mixture.state_dict())
    same = again.sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(same, mixture.sample(5, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("variant", ["vitcae", "vitvae"])
def test_generate_takes_z_cls_from_the_given_prior(variant, tiny_config):
    cfg = build_config({**tiny_config, "model.variant": variant})
    torch.manual_seed(0)
    model = init_model(cfg, 1, torch.device("cpu")).eval()

    class Fixed:  # a prior whose draws are known
        def sample(self, n, generator=None, device=None):
            return torch.full((n, model.z_cls_dim), 0.7)

    out = model.generate(4, torch.Generator().manual_seed(5), cls_prior=Fixed())
    plain = model.generate(4, torch.Generator().manual_seed(5))
    if variant == "vitvae":  # no z_cls: the prior is not used
        assert torch.equal(out, plain)
        return
    z = torch.full((4, model.z_cls_dim), 0.7)
    with torch.no_grad():
        want = model.forward_decoder(model.sample_prior(z, 1.0, torch.Generator().manual_seed(5)), z)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, plain)


def test_the_models_own_mixture_is_generates_default_and_survives_a_checkpoint(tiny_config, tmp_path):
    from vitcae_ray import checkpoints
    from vitcae_ray.optim import build_lr_schedule, build_optimizer

    cfg = build_config(tiny_config)
    torch.manual_seed(0)
    model = init_model(cfg, 1, torch.device("cpu")).eval()
    d = model.z_cls_dim
    # one component far from N(0, I)'s mass, with a tiny spread
    mixture = ClsMixture(torch.ones(1), torch.full((1, d), 5.0), 1e-3 * torch.eye(d)[None])
    model.cls_mixture, model.cls_mixture_epoch = mixture, 7

    def draws(m, **kw):
        return m.generate(4, torch.Generator().manual_seed(5), temperature=0.0, **kw)

    z = torch.full((4, d), 5.0)
    with torch.no_grad():
        want = model.forward_decoder(model.sample_prior(z, 0.0), z)
    torch.testing.assert_close(draws(model), want, atol=1e-3, rtol=0)
    normal = draws(model, standard_normal=True)
    assert (normal - want).abs().max() > 1e-2  # N(0, I) draws decode to other images

    opt = build_optimizer(model, cfg.optim)
    state = checkpoints.training_state(
        model, opt, build_lr_schedule(opt, cfg.optim, 2, 3), 7, cfg, [], {}, []
    )
    again = checkpoints.model_from_state(state).eval()
    assert again.cls_mixture_epoch == 7
    torch.testing.assert_close(draws(again), draws(model))
    # a model without one keeps N(0, I)
    model.cls_mixture = None
    plain = checkpoints.model_from_state(
        checkpoints.training_state(model, opt, build_lr_schedule(opt, cfg.optim, 2, 3), 7, cfg, [], {}, [])
    ).eval()
    assert plain.cls_mixture is None
    torch.testing.assert_close(draws(plain), normal)
