import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitcae_ray import metrics as M
from vitcae_ray.config import build_config
from vitcae_ray.model import build_model


def test_psnr_and_ssim_agree_with_scikit_image():
    import skimage.metrics as skm

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(3, 3, 32, 32, generator=g)).clamp(0, 1)
    ours = M.ssim(y, x)
    for i in range(3):
        a, b = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        ref = skm.structural_similarity(
            a,
            b,
            data_range=1.0,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)
        mse = float(((y[i] - x[i]) ** 2).mean())
        assert M.psnr(mse) == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)
    # grayscale, and identical images
    gray = x[:, :1]
    assert M.ssim(gray, gray).allclose(torch.ones(3, dtype=torch.float64))
    # images smaller than the window (8x8 digits) get the largest odd window that fits
    small_x, small_y = x[:, :1, :8, :8], y[:, :1, :8, :8]
    assert M.ssim(small_x, small_x).allclose(torch.ones(3, dtype=torch.float64))
    assert (M.ssim(small_y, small_x) < 0.99).all()


def _brute_precision_recall(real, fake, k):
    """Kynkaanniemi et al.'s definition written out with explicit loops over points."""

    def radius(points, i):
        d = sorted(float(np.linalg.norm(points[i] - q)) for j, q in enumerate(points) if j != i)
        return d[k - 1]

    def inside(p, centres):
        return any(np.linalg.norm(p - c) <= radius(centres, j) for j, c in enumerate(centres))

    precision = np.mean([inside(f, real) for f in fake])
    recall = np.mean([inside(r, fake) for r in real])
    return precision, recall


def test_knn_precision_recall_matches_the_definition_and_punishes_collapse():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 3))
    fake = rng.normal(0.5, 1.2, size=(40, 3))
    p, r = M.knn_precision_recall(real, fake, k=3)
    assert (p, r) == pytest.approx(_brute_precision_recall(real, fake, 3))
    assert M.knn_precision_recall(real, real, 3) == (1.0, 1.0)
    # a generator collapsed onto a few real points: precise, but it recalls little
    collapsed = real[np.arange(40) % 3] + 1e-6
    p_c, r_c = M.knn_precision_recall(real, collapsed, 3)
    assert p_c == 1.0 and r_c < 0.3
    # far away: neither
    assert M.knn_precision_recall(real, real + 100.0, 3) == (0.0, 0.0)


def test_nearest_distance_agrees_with_scipy():
    from scipy.spatial.distance import cdist

    g = torch.Generator().manual_seed(0)
    ref, x = torch.rand(30, 1, 4, 4, generator=g), torch.rand(7, 1, 4, 4, generator=g)
    expected = cdist(x.flatten(1).numpy(), ref.flatten(1).numpy()).min(1)
    assert M.nearest_distance(x, ref) == pytest.approx(expected, rel=1e-6)
    assert M.nearest_distance(ref[:5], ref) == pytest.approx(np.zeros(5), abs=1e-9)  # copies


def test_fid_and_kid_agree_with_closed_forms():
    """torchmetrics through our feature pass-through, against scipy's matrix square root
    (FID) and the unbiased cubic-polynomial-kernel MMD^2 written out (KID)."""
    from scipy import linalg

    from vitcae_ray.evaluate.generation import fid_kid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(0.3, 1.5, size=(200, 6))
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref_fid = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)

    def unbiased_mmd(x, y):
        k = lambda u, v: (u @ v.T / x.shape[1] + 1.0) ** 3  # noqa: E731
        m, n = len(x), len(y)
        kxx, kyy = k(x, x), k(y, y)
        return (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * k(x, y).mean()
        )

    fid, kid, kid_std = fid_kid(torch.from_numpy(a), torch.from_numpy(b))
    assert fid == pytest.approx(ref_fid, rel=1e-4)
    # every KID subset is all 200 fake and 200 of the 300 real: the mean over subsets is close
    # to the full-sample statistic, and well away from 0
    full = unbiased_mmd(a, b)
    assert kid == pytest.approx(full, rel=0.1) and kid_std >= 0
    same, kid_same, _ = fid_kid(torch.from_numpy(a), torch.from_numpy(a[:200]))
    assert abs(kid_same) < 0.05 * full and same < 0.1 * fid


def test_hidden_band_removes_the_upsampling_leak():
    """Digits are bilinearly upsampled 8 -> 32: a masked patch is one source pixel, and its
    neighbours' visible pixels mix part of it in. With the band of patch_size / 2 hidden,
    changing the masked source pixels changes nothing a method sees; without it, it does."""
    from sklearn.datasets import load_digits

    src = torch.from_numpy(load_digits().images[:16]).float().div(16).unsqueeze(1)  # (16, 1, 8, 8)

    def up(t):  # the digits dataset's own resize
        return F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)

    mask = M.patch_mask("random25", 16, 8, torch.Generator().manual_seed(0))  # (16, 64)
    changed = src.clone().flatten(1)
    changed[mask] = 1.0 - changed[mask]  # only the masked source pixels differ
    changed = changed.view_as(src)
    pm = M.pixel_mask(mask, 8, 4)
    fill = torch.full((1, 1, 32, 32), 0.3)
    for band, leaks in ((2, False), (0, True)):
        hidden = M.hidden_region(pm, band)
        a, b = M.hide(up(src), hidden, fill), M.hide(up(changed), hidden, fill)
        assert (not torch.equal(a, b)) == leaks
    assert M.hidden_region(pm, 2).sum() > pm.sum()  # the band is really there


def test_biharmonic_fill_ignores_hidden_values_and_continues_smooth_images():
    from vitcae_ray.evaluate.baselines import biharmonic_fill

    ramp = torch.linspace(0.1, 0.9, 16)
    x = (ramp[None, :] * 0.5 + ramp[:, None] * 0.5).expand(2, 1, 16, 16).clone()  # a plane
    hidden = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    hidden[:, :, 5:11, 5:11] = True
    filled = biharmonic_fill(x, hidden)
    assert torch.allclose(filled, x, atol=1e-3)  # a plane is biharmonic: filled exactly
    garbage = torch.where(hidden, torch.rand_like(x), x)
    assert torch.equal(biharmonic_fill(garbage, hidden), filled)
    mean = torch.full((1, 1, 16, 16), 0.5)
    assert M.masked_mse(M.hide(x, hidden, mean), x, hidden) > 100 * M.masked_mse(filled, x, hidden)


@pytest.mark.parametrize(
    "name,share", [("center25", 0.25), ("center50", 0.5), ("random25", 0.25), ("random50", 0.5)]
)
def test_masks_cover_their_share_of_patches(name, share):
    mask = M.patch_mask(name, 5, 8, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 64)
    frac = mask.float().mean(1)
    assert torch.allclose(frac, torch.full((5,), share), atol=0.07)
    if name.startswith("center"):
        grid = mask[0].view(8, 8)
        assert grid[3:5, 3:5].all() and not grid[0].any() and not grid[:, 0].any()
    else:
        assert not torch.equal(mask[0], mask[1])  # a fresh pattern per image


def test_inpainting_leaves_visible_pixels_unchanged_and_fills_the_hole():
    torch.manual_seed(0)
    cfg = build_config({})
    model = build_model(cfg.model, 32, 1).eval()
    x = torch.rand(4, 1, 32, 32)
    for name in M.MASKS:
        mask = M.patch_mask(name, 4, model.grid, torch.Generator().manual_seed(1))
        pm = M.pixel_mask(mask, model.grid, cfg.model.patch_size)
        out = M.inpaint(model, x, mask)
        assert out.shape == x.shape
        assert torch.equal(out[~pm.expand_as(x)], x[~pm.expand_as(x)])
        # the hole holds the model's decoding from the visible patches alone
        hole = pm.expand_as(x)
        assert not torch.allclose(out[hole], x[hole])
        changed = x.clone()
        changed[hole] = 1.0 - changed[hole]  # what hides under the mask cannot matter
        assert torch.equal(M.inpaint(model, changed, mask)[hole], out[hole])


def test_slerp_keeps_endpoints_and_norm_between_equal_norm_vectors():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    path = M.slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a) and torch.allclose(path[-1], b, atol=1e-6)
    assert torch.allclose(path.norm(dim=1), torch.ones(5), atol=1e-6)
    assert path[2] == pytest.approx(torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0]), abs=1e-6)


def test_interpolation_smoothness_is_one_for_an_even_path_and_grows_with_a_jump():
    even = torch.linspace(0, 1, 6)[:, None, None, None].expand(6, 1, 4, 4)
    jump = torch.tensor([0, 0, 0, 1, 1, 1.0])[:, None, None, None].expand(6, 1, 4, 4)
    change, ratio = M.interpolation_smoothness([even])
    assert change == pytest.approx(0.2) and ratio == pytest.approx(1.0)
    assert M.interpolation_smoothness([jump])[1] == pytest.approx(5.0)


def test_inception_features_read_the_given_weights_file_and_separate_noise_from_real(tmp_path, monkeypatch):
    """Inception-v3 features through torchmetrics with a user-supplied weights file: here a
    randomly initialised one (nothing is downloaded), so only the ordering is checked."""
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    from vitcae_ray.data import build_datasets
    from vitcae_ray.evaluate.features import InceptionFeatures
    from vitcae_ray.evaluate.generation import fid_kid

    with monkeypatch.context() as m:  # build a weights file of the right layout, offline
        m.setattr(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        m.setattr(fx, "load_state_dict_from_url", lambda *a, **k: None)
        torch.manual_seed(0)
        net = fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    _, val_set, _ = build_datasets(build_config({"data.image_size": 16}).data)
    real = torch.stack([val_set[i][0] for i in range(60)])
    embed = InceptionFeatures(str(weights))
    ref = embed.features(real[:30])
    assert ref.shape == (30, 2048)
    close = fid_kid(ref, embed.features(real[30:]))[0]
    far = fid_kid(ref, embed.features(torch.rand(30, 1, 16, 16)))[0]
    assert 0 <= close < far


def _seam_ratio_loops(img: np.ndarray, patch: int) -> float:
    """The seam ratio pixel by pixel, for one (H, W) image."""
    border, inside = [], []
    h, w = img.shape
    for i in range(h):
        for j in range(w - 1):
            (border if (j + 1) % patch == 0 else inside).append(abs(img[i, j + 1] - img[i, j]))
    for i in range(h - 1):
        for j in range(w):
            (border if (i + 1) % patch == 0 else inside).append(abs(img[i + 1, j] - img[i, j]))
    return float(np.mean(border) / np.mean(inside))


def test_seam_ratio_matches_a_pixel_loop_and_sees_a_drawn_grid():
    rng = np.random.default_rng(0)
    img = rng.random((12, 12))
    got = M.seam_ratio(torch.from_numpy(img)[None, None], 4)
    assert got == pytest.approx(_seam_ratio_loops(img, 4), rel=1e-12)
    assert got == pytest.approx(1.0, abs=0.15)  # noise has no grid
    # a smooth ramp steps the same everywhere: exactly 1
    ramp = torch.linspace(0, 1, 16, dtype=torch.float64).expand(16, 16)[None, None]
    assert M.seam_ratio(ramp, 4) == pytest.approx(1.0, rel=1e-9)
    # constant 4x4 blocks of different values: every step is across a border
    blocks = torch.from_numpy(rng.random((3, 3))).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert M.seam_ratio(blocks[None, None] + 1e-3 * torch.from_numpy(img), 4) > 50
    # a grid drawn on the noise raises the ratio; the same lines off the grid lower it
    gridded = torch.from_numpy(img).clone()
    gridded[3::4, :] += 0.5
    off_grid = torch.from_numpy(img).clone()
    off_grid[1::4, :] += 0.5
    assert M.seam_ratio(gridded[None, None], 4) > 1.3 * got
    assert M.seam_ratio(off_grid[None, None], 4) < got


def test_the_inpainting_fit_of_z_cls_reaches_the_optimum_scipy_finds():
    """The z_cls fit against scipy's L-BFGS on the same objective (the negative log joint
    of the visible pixels and z_cls), one image at a time; hidden pixels do not enter it."""
    from scipy.optimize import minimize

    torch.manual_seed(0)
    cfg = build_config({"data.image_size": 16, "model.patch_size": 4})
    model = build_model(cfg.model, 16, 1).eval()
    x = torch.rand(2, 1, 16, 16)
    mask = M.patch_mask("center25", 2, model.grid)
    visible = ~M.pixel_mask(mask, model.grid, 4)
    keep = (~mask).nonzero()[:, 1].view(2, -1)
    with torch.no_grad():
        _, z0, _, mu_patch, _, prior_mu, _ = model.forward_encoder(x, keep=keep)
    delta = mu_patch - prior_mu
    fitted = M.fit_cls_to_visible(model, x, visible, z0, delta, 10.0, steps=400, lr=0.05)
    for i in range(2):
        sl = slice(i, i + 1)

        def f(z, sl=sl):
            zt = torch.tensor(z, dtype=torch.float32, requires_grad=True)
            v = M.visible_nll(model, x[sl], visible[sl], zt[None], delta[sl], 10.0).sum()
            (g,) = torch.autograd.grad(v, [zt])
            return float(v.detach()), g.double().numpy()

        ref = minimize(f, z0[i].double().numpy(), jac=True, method="L-BFGS-B")
        ours, start = f(fitted[i].double().numpy())[0], f(z0[i].double().numpy())[0]
        assert ours < start
        assert ours == pytest.approx(ref.fun, rel=1e-3)
    # what the hidden pixels hold does not move the fit
    changed = torch.where(visible, x, 1.0 - x)
    again = M.fit_cls_to_visible(model, changed, visible, z0, delta, 10.0, steps=400, lr=0.05)
    torch.testing.assert_close(again, fitted)
    # a fit over every pixel is another problem: the hidden ones move it
    everywhere = torch.ones_like(visible)
    assert not torch.allclose(
        M.fit_cls_to_visible(model, changed, everywhere, z0, delta, 10.0, steps=50), fitted
    )
