"""The paper's tasks: ``python -m vitcae_ray.evaluate`` on a briefly trained model, and what
the training must give the global latent z_cls."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vitcae_ray import evaluate as ev
from vitcae_ray.config import build_config
from vitcae_ray.data import build_datasets
from vitcae_ray.engine import seed_everything, train_one_epoch
from vitcae_ray.model import build_model
from vitcae_ray.optim import build_lr_schedule, build_optimizer

# the quickstart model on the digits at their native 8x8, trained in-process (no Ray: the
# trainer is tested elsewhere) for 30 epochs, about a minute here. Measured with this set-up:
# a model whose prior ignores z_cls (before the generative pass and the residual patch
# posterior) decodes 64 prior means into 3 classes (80% one class), pixel spread 0.06, and
# shuffling z_cls moves its reconstructions 0.06x as much as shuffling z_patch; this model:
# 10 classes (16%), spread 0.15, 0.27x. The thresholds sit between.
SHORT = {"data.image_size": 8, "model.patch_size": 2, "train.epochs": 30, "train.batch_size": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, config, model.pt path) after a short training on the embedded digits."""
    cfg = build_config(SHORT)
    train_set, val_set, channels = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size, channels)
    optimizer = build_optimizer(model, cfg.optim)
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    sched = build_lr_schedule(optimizer, cfg.optim, cfg.train.epochs, len(loader))
    for epoch in range(cfg.train.epochs):
        seed_everything(0, epoch, 0)
        train_one_epoch(model, loader, optimizer, sched, epoch, cfg, torch.device("cpu"))
    model.eval()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "model_args": {"img_size": model.img_size, "in_chans": model.in_chans},
        },
        path,
    )
    xv = torch.stack([val_set[i][0] for i in range(64)])
    return model, cfg, path, xv


def test_decoded_prior_means_of_different_z_cls_differ(trained):
    from vitcae_ray.metrics import max_class_share

    model, cfg, _, _ = trained
    net = _feature_net(cfg)
    z_cls = torch.randn(64, cfg.model.z_cls_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_tilde, _ = model.forward_prior(z_cls)
        images = model.forward_decoder(z_tilde, z_cls)
    spread = (images - images.mean(0)).abs().mean().item()
    assert spread > 0.10
    # and they differ as digits do: the feature classifier sees many classes, none dominating
    proba = net.proba(images)
    assert len(np.unique(proba.argmax(1))) >= 6 and max_class_share(proba) <= 0.4


def _splits(cfg):
    train_set, val_set, _ = build_datasets(cfg.data)
    xtr, ytr = ev.stack_split(train_set)
    xv, yv = ev.stack_split(val_set)
    return xtr, ytr, xv, yv


def _feature_net(cfg):
    from vitcae_ray.evaluate.features import feature_net

    return feature_net(cfg.data.dataset, *_splits(cfg), log=lambda s: None)[0]


def test_shuffling_z_cls_changes_reconstructions_like_shuffling_z_patch(trained):
    model, _, _, xv = trained
    perm = torch.roll(torch.arange(len(xv)), 1)
    with torch.no_grad():
        _, mu_cls, _, mu_patch, *_ = model.forward_encoder(xv)
        base = model.forward_decoder(mu_patch, mu_cls)
        # z_patch = Z~_patch(z_cls) + delta(x): shuffling z_cls moves every patch latent's
        # prior part with it, shuffling z_patch keeps z_cls
        delta = mu_patch - model.forward_prior(mu_cls)[0]
        cls_shuffled = model.forward_decoder(model.forward_prior(mu_cls[perm])[0] + delta, mu_cls[perm])
        patch_shuffled = model.forward_decoder(mu_patch[perm], mu_cls)
    d_cls = (cls_shuffled - base).abs().mean().item()
    d_patch = (patch_shuffled - base).abs().mean().item()
    assert d_cls > 0.15 * d_patch


def test_every_task_writes_its_png_metrics_and_the_table_with_baselines(trained, tmp_path):
    _, _, path, _ = trained
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "vitcae_ray.evaluate", "--model", str(path), "--dataset", "digits"]
        + ["--out", str(out), "--iwae-k", "16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for task in ev.TASKS:  # a progress line and a PNG per task
        assert any(line.startswith(f"{task}:") for line in lines), proc.stdout
        assert (out / f"{task}.png").stat().st_size > 100
    m = json.loads((out / "metrics.json").read_text())
    masks = ("center25", "center50", "random25", "random50")
    keys = ["recon/mse", "recon/psnr", "recon/ssim", "recon/elbo", "iwae/nll_k16", "probe/acc"]
    keys += [f"inpaint/{k}/psnr_{v}" for k in masks for v in ("model", "mean_fill", "biharmonic")]
    rows = ("", "mixture/", "real/", "prototypes/", "copies/", "noise/")
    metrics = ("fid", "kid", "precision", "recall", "memorisation", "max_class_share", "low_confidence_share")
    keys += [f"sample/{r}{k}" for r in rows for k in metrics]
    keys += [f"probe/{r}/acc{s}" for r in ("z_cls", "pca8_pixels", "pixels") for s in ("", "_std")]
    for k in keys:
        assert isinstance(m[k], float) and np.isfinite(m[k]), k
    assert m["recon/psnr"] == pytest.approx(10 * np.log10(1 / m["recon/mse"]))
    # every row of the generation metrics holds the held-out split's size
    assert m["sample/images"] == 180 and m["sample/sanity_holds"] == 1.0
    assert m["sample/feature_acc"] > 0.9
    assert m["sample/mixture/components"] >= 1
    # the probe is cross-validated over all 1,797 digits; pixels are a strong baseline here
    assert m["probe/images"] == 1797 and m["probe/folds"] == 5
    assert m["probe/pixels/acc"] > 0.9 and 0 < m["probe/pixels/acc_std"] < 0.05
    assert m["probe/acc"] == m["probe/z_cls/acc"] > 0.3
    # the IWAE bound with 16 samples is tighter than the 1-sample ELBO (both -log p bounds)
    assert m["iwae/nll_k16"] < m["recon/elbo"]
    # the printed table puts the baselines beside the model
    text = "\n".join(lines)
    for needle in (
        "biharmonic",
        "mean_fill",
        "pca8_pixels",
        "prototypes",
        "copies",
        "noise",
        "sanity: ",
        "mixture",
    ):
        assert needle in text, needle
    assert "sanity: held-out real images beat" in text and text.count(": yes") == 1


def test_sanity_rows_move_the_generation_metrics_the_right_way(trained):
    """Held-out real images against sets a gameable metric would reward: prototypes (a
    collapsed model), 16 copies of training images (a memorising one), and noise."""
    from vitcae_ray.evaluate.generation import GenerationReference

    model, cfg, _, _ = trained
    xtr, ytr, xv, _ = _splits(cfg)
    net = _feature_net(cfg)
    ref = GenerationReference(net, net, xtr, xv, patch=cfg.model.patch_size, seed=0)
    rows = {name: ref.row(images) for name, images in ref.sanity_sets(ytr).items()}
    real = rows["real"]
    for name in ("prototypes", "copies", "noise"):
        assert real["fid"] < rows[name]["fid"] and real["kid"] < rows[name]["kid"], name
        assert real["recall"] > rows[name]["recall"] + 0.3, name
    assert rows["copies"]["memorisation"] < 0.05 < 0.8 < real["memorisation"] == 1.0
    assert rows["prototypes"]["memorisation"] < 1.0  # closer to the training set than new digits
    assert real["precision"] > 0.7
    # the real images' own share below their 5th-percentile confidence is about 5%
    assert real["low_confidence_share"] == pytest.approx(0.05, abs=0.02)


def test_probe_baselines_fall_to_chance_on_shuffled_labels(trained):
    from vitcae_ray.evaluate.baselines import pca_pixels
    from vitcae_ray.evaluate.probe import cross_validated

    _, cfg, _, _ = trained
    xtr, ytr, _, _ = _splits(cfg)
    pixels = xtr.flatten(1).numpy()
    acc, std, pred = cross_validated(pixels, ytr, 5, 0, pca_pixels(8))
    assert acc > 0.8 and std < 0.05 and (pred == ytr).mean() == pytest.approx(acc, abs=0.01)
    shuffled = np.random.default_rng(0).permutation(ytr)
    assert cross_validated(pixels, shuffled, 5, 0, pca_pixels(8))[0] < 0.2


def test_feature_classifier_is_trained_once_and_found_again(trained, tmp_path):
    from vitcae_ray.evaluate.features import feature_net

    _, cfg, _, _ = trained
    xtr, ytr, xv, yv = _splits(cfg)
    said = []
    net, acc = feature_net("digits", xtr, ytr, xv, yv, cache=str(tmp_path), log=said.append)
    assert acc > 0.9 and any("trained" in s for s in said)
    files = list((tmp_path / "features").glob("digits-1x8-*.pt"))
    assert len(files) == 1
    said.clear()
    again, acc2 = feature_net("digits", xtr, ytr, xv, yv, cache=str(tmp_path), log=said.append)
    assert acc2 == acc and not said  # loaded, not trained
    assert torch.equal(again.features(xv), net.features(xv))
    # other training images are another dataset: another cache entry
    feature_net("digits", xtr[:-1], ytr[:-1], xv, yv, cache=str(tmp_path), log=said.append)
    assert len(list((tmp_path / "features").glob("*.pt"))) == 2


def test_vitvae_variant_is_evaluated_through_the_same_tasks(tmp_path):
    """The ViT-VAE baseline (untrained here: the plumbing) reports both of its candidate
    representations beside the pixel baselines, and the likelihood bounds."""
    cfg = build_config({**SHORT, "model.variant": "vitvae"})
    torch.manual_seed(0)
    model = build_model(cfg.model, 8, 1)
    path = tmp_path / "vitvae.pt"
    torch.save(
        {"model": model.state_dict(), "config": cfg.to_dict(), "model_args": {"img_size": 8, "in_chans": 1}},
        path,
    )
    m = ev.run(
        str(path), "digits", None, str(tmp_path / "eval"), ("recon", "probe"), iwae_k=4, log=lambda s: None
    )
    assert m["variant"] == "vitvae"
    for k in ("probe/cls_feature/acc", "probe/patch_mean/acc", "probe/pca8_pixels/acc", "iwae/nll_k4"):
        assert np.isfinite(m[k]), k
    assert m["probe/acc"] == m["probe/cls_feature/acc"]


def _copy_checkpoint(model_file, directory) -> None:
    """A complete checkpoint directory: the file and its digest (sha256 and size)."""
    data = model_file.read_bytes()
    (directory / "checkpoint.pt").write_bytes(data)
    (directory / "checkpoint.sha256").write_text(f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")


def test_run_directory_and_checkpoint_inputs_resolve_to_a_model(trained, tmp_path):
    model, cfg, path, _ = trained
    ckpt = tmp_path / "run" / "train" / "checkpoint_epoch_0003"
    ckpt.mkdir(parents=True)
    _copy_checkpoint(path, ckpt)
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "model.pt").write_bytes(path.read_bytes())
    for given in (tmp_path / "run", ckpt, ckpt / "checkpoint.pt", exported):
        loaded, _, where = ev.load_model(str(given), torch.device("cpu"))
        assert where.endswith("model.pt" if given == exported else "checkpoint.pt")
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)
    # a run directory with metrics: the surviving checkpoint with the best val/elbo, not the latest
    earlier = tmp_path / "run" / "train" / "checkpoint_epoch_0001"
    earlier.mkdir()
    _copy_checkpoint(path, earlier)
    (tmp_path / "run" / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "val/elbo": -10.0}) + "\n" + json.dumps({"epoch": 3, "val/elbo": -5.0}) + "\n"
    )
    assert "checkpoint_epoch_0001" in ev.load_model(str(tmp_path / "run"), torch.device("cpu"))[2]


@pytest.mark.parametrize(
    "case", ["missing", "size", "channels", "task", "iwae_k", "inception", "no_checkpoint"]
)
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, case, capsys):
    _, _, path, _ = trained
    args = ["--model", str(path), "--out", str(tmp_path / "eval"), "--tasks", "recon"]
    if case == "missing":
        args[1] = str(tmp_path / "nope")
    elif case == "size":  # a 32x32 model evaluated on 8x8 digits
        cfg = build_config({})
        big = build_model(cfg.model, 32, 1)
        args[1] = str(tmp_path / "big.pt")
        torch.save(
            {
                "model": big.state_dict(),
                "config": {**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "image_size": 8}},
                "model_args": {"img_size": 32, "in_chans": 1},
            },
            args[1],
        )
    elif case == "channels":
        cfg = build_config({**SHORT})
        rgb = build_model(cfg.model, 8, 3)
        args[1] = str(tmp_path / "rgb.pt")
        torch.save(
            {
                "model": rgb.state_dict(),
                "config": cfg.to_dict(),
                "model_args": {"img_size": 8, "in_chans": 3},
            },
            args[1],
        )
    elif case == "iwae_k":
        args += ["--iwae-k", "0"]
    elif case == "inception":
        args += ["--features", "inception"]
    elif case == "no_checkpoint":  # a run directory whose checkpoints are gone
        run = tmp_path / "run"
        (run / "train").mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val/elbo": 1.0}) + "\n")
        args[1] = str(run)
    else:
        args[-1] = "recon,nope"
    assert ev.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    expected = {
        "missing": "not found",
        "size": "8x8",
        "channels": "3-channel",
        "task": "nope",
        "iwae_k": "at least 1",
        "inception": "--fid-weights",
        "no_checkpoint": "no model.pt, checkpoint.pt or checkpoints",
    }[case]
    assert expected in err[0]
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_epoch_evaluator_gives_probe_fid_kid_and_grids(trained):
    from vitcae_ray.evaluate.baselines import noise
    from vitcae_ray.evaluate.generation import fid_kid

    model, cfg, _, _ = trained
    train_set, val_set, _ = build_datasets(cfg.data)
    evaluator = ev.EpochEvaluator(
        train_set, val_set, "digits", max_train=600, max_val=200, log=lambda s: None
    )
    model.train()
    model.cls_mixture = None
    metrics, images = evaluator(model, torch.device("cpu"), epoch=3)
    assert model.training  # restored
    # the samples came from a mixture fitted on this model's training posteriors, kept on it
    assert model.cls_mixture is not None and model.cls_mixture_epoch == 3
    model.cls_mixture = None  # the fixture is shared
    assert set(metrics) == {"val/probe_acc", "val/fid", "val/kid"}
    assert 0.3 < metrics["val/probe_acc"] <= 1.0
    # the trained model's samples sit far closer to the digits than noise with their moments
    noise_fid, noise_kid, _ = fid_kid(evaluator.ref, evaluator.net.features(noise(evaluator.xtr, 180)))
    assert 0 < metrics["val/fid"] < 0.5 * noise_fid and metrics["val/kid"] < 0.5 * noise_kid
    assert set(images) == {"inpainting", "interpolation"}
    for grid in images.values():
        assert grid.dim() == 3 and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
