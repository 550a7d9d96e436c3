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
    from vitcae_ray.metrics import PixelClassifier, max_class_share

    model, cfg, _, _ = trained
    train_set, _, _ = build_datasets(cfg.data)
    xtr = torch.stack([train_set[i][0] for i in range(len(train_set))])
    ytr = np.array([train_set[i][1] for i in range(len(train_set))])
    z_cls = torch.randn(64, cfg.model.z_cls_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_tilde, _ = model.forward_prior(z_cls)
        images = model.forward_decoder(z_tilde, z_cls)
    spread = (images - images.mean(0)).abs().mean().item()
    assert spread > 0.10
    # and they differ as digits do: a pixel classifier sees many classes, none dominating
    proba = PixelClassifier(xtr, ytr).proba(images)
    assert len(np.unique(proba.argmax(1))) >= 6 and max_class_share(proba) <= 0.4


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


def test_every_task_writes_its_png_and_metrics(trained, tmp_path):
    _, _, path, _ = trained
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitcae_ray.evaluate",
            "--model",
            str(path),
            "--dataset",
            "digits",
            "--out",
            str(out),
            "--baseline",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for task in ev.TASKS:  # a progress line and a PNG per task
        assert any(line.startswith(f"{task}:") for line in proc.stdout.splitlines()), proc.stdout
        assert (out / f"{task}.png").stat().st_size > 100
    m = json.loads((out / "metrics.json").read_text())
    keys = [
        "recon/mse",
        "recon/psnr",
        "recon/ssim",
        "sample/score",
        "sample/real_score",
        "sample/max_class_share",
        "interp/smoothness",
        "interp/step_change",
        "probe/acc",
        "probe/baseline_acc",
    ]
    keys += [
        f"inpaint/{k}/{v}"
        for k in ("center25", "center50", "random25", "random50")
        for v in ("psnr_masked", "psnr_mean_fill")
    ]
    for k in keys:
        assert isinstance(m[k], float) and np.isfinite(m[k]), k
    assert m["recon/psnr"] == pytest.approx(10 * np.log10(1 / m["recon/mse"]))
    assert 0 < m["recon/ssim"] <= 1 and 0 < m["sample/max_class_share"] <= 1
    assert m["probe/acc"] == m["probe/baseline_acc"] > 0.3  # the same model twice, above chance
    assert m["sample/real_score"] > 5


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


@pytest.mark.parametrize("case", ["missing", "size", "channels", "task"])
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
    else:
        args[-1] = "recon,nope"
    assert ev.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    expected = {"missing": "not found", "size": "8x8", "channels": "3-channel", "task": "nope"}[case]
    assert expected in err[0]
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_epoch_evaluator_gives_probe_sample_score_and_grids(trained):
    model, cfg, _, _ = trained
    train_set, val_set, _ = build_datasets(cfg.data)
    evaluator = ev.EpochEvaluator(train_set, val_set, max_train=600, max_val=200, num_samples=100)
    model.train()
    metrics, images = evaluator(model, torch.device("cpu"))
    assert model.training  # restored
    assert set(metrics) == {"val/probe_acc", "val/sample_score"}
    assert 0.3 < metrics["val/probe_acc"] <= 1.0 and 1.0 <= metrics["val/sample_score"] <= 10.0
    assert set(images) == {"inpainting", "interpolation"}
    for grid in images.values():
        assert grid.dim() == 3 and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
