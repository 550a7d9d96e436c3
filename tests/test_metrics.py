import math

import numpy as np
import pytest
import torch

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


def test_sample_score_of_real_images_exceeds_noise_and_is_bounded():
    from vitcae_ray.data import build_datasets

    train_set, val_set, _ = build_datasets(build_config({"data.image_size": 16}).data)
    xtr = torch.stack([train_set[i][0] for i in range(len(train_set))])
    ytr = np.array([train_set[i][1] for i in range(len(train_set))])
    xv = torch.stack([val_set[i][0] for i in range(len(val_set))])
    yv = np.array([val_set[i][1] for i in range(len(val_set))])
    clf = M.PixelClassifier(xtr, ytr)
    assert clf.accuracy(xv, yv) > 0.85
    real = M.inception_style_score(clf.proba(xv))
    noise = M.inception_style_score(clf.proba(torch.rand(len(xv), 1, 16, 16)))
    one_class = M.inception_style_score(clf.proba(xv[yv == 3]))
    assert 1.0 <= noise < real <= 10.0 and real > 5.0
    assert one_class < 2.0  # confident but all alike: the score punishes a collapsed sampler
    assert M.max_class_share(clf.proba(xv[yv == 3])) > 0.9
    assert M.max_class_share(clf.proba(xv)) < 0.2


def test_inception_style_score_closed_form():
    K = 4
    assert M.inception_style_score(np.eye(K)) == pytest.approx(K)  # confident, even
    assert M.inception_style_score(np.full((8, K), 1 / K)) == pytest.approx(1.0)


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


def test_fid_reads_the_given_weights_file_and_separates_noise_from_real(tmp_path, monkeypatch):
    """FID through torchmetrics with a user-supplied Inception weights file: here a randomly
    initialised one (nothing is downloaded), so only the ordering of the values is checked."""
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    from vitcae_ray.data import build_datasets
    from vitcae_ray.evaluate import EvalError, fid

    with monkeypatch.context() as m:  # build a weights file of the right layout, offline
        m.setattr(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        m.setattr(fx, "load_state_dict_from_url", lambda *a, **k: None)
        torch.manual_seed(0)
        net = fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    _, val_set, _ = build_datasets(build_config({"data.image_size": 16}).data)
    real = torch.stack([val_set[i][0] for i in range(60)])
    noise = torch.rand(30, 1, 16, 16)
    close = fid(real[30:], real[:30], str(weights), torch.device("cpu"))
    far = fid(noise, real[:30], str(weights), torch.device("cpu"))
    assert 0 <= close < far
    with pytest.raises(EvalError, match="not found"):
        fid(noise, real, str(tmp_path / "missing.pth"), torch.device("cpu"))
