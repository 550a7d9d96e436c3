"""``python -m vitcae_ray.evaluate``: the paper's tasks on a trained model.

    recon    MSE, PSNR and SSIM of the validation split (latents at the posterior means)
    inpaint  centre-block and random-patch masks at 25% and 50% of the patches, filled by the
             model (:func:`vitcae_ray.metrics.inpaint`), PSNR on the hole next to a fill with
             the mean training image
    sample   z_cls ~ N(0, I) -> z_patch ~ p(z_patch | z_cls) -> decode; the sample score
             exp(E KL(p(y|x) || p(y))) of a pixel classifier fitted here on the training split,
             for samples and for real validation images, and the largest class share; FID
             with ``--fid-weights``
    interp   slerp of z_cls and lerp of z_patch between validation pairs: mean step-to-step
             pixel change and its max/mean ratio
    probe    logistic regression on the training split's z_cls means, validation accuracy;
             ``--baseline MODEL`` probes a second model the same way

Writes ``OUT/metrics.json`` (flat keys) and one PNG grid per task.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from . import filesystem
from . import metrics as M
from .checkpoints import (
    CHECKPOINT_FILE,
    DIGEST_FILE,
    MODEL_FILE,
    CheckpointError,
    check_digest,
    load_model_file,
    model_from_state,
)
from .config import SELECT_METRIC, Config, ConfigError, build_config
from .data import DataError, build_datasets
from .errors import fail, first_line

TASKS = ("recon", "inpaint", "sample", "interp", "probe")


class EvalError(ValueError):
    """A one-line reason the evaluation cannot run (exit code 2)."""


# --- loading --------------------------------------------------------------------------------


def _state_bytes(path: str) -> tuple[bytes, str, str | None]:
    """(bytes, where, the digest of a training checkpoint) of the model/checkpoint file behind
    ``path``: an exported model directory (``model.pt``), a run directory (its best checkpoint
    by ``val/elbo``), a checkpoint directory, or a file."""
    from .export import ExportError, choose_checkpoint, surviving_checkpoints, train_folder

    try:
        kind = filesystem.kind(path)
    except filesystem.FileSystemError as e:
        raise EvalError(str(e)) from None
    if kind == filesystem.FileType.NotFound:
        raise EvalError(
            f"model {path!r} not found: pass an exported model directory, a run directory or a checkpoint"
        )
    if kind == filesystem.FileType.File:
        return filesystem.read_bytes(path), path, None
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        data = filesystem.read_bytes(filesystem.join(path, name))
        if data is not None:
            return data, filesystem.join(path, name), _digest(path, name)
    try:
        ckpts = surviving_checkpoints(train_folder(path))
        if ckpts:
            try:
                ckpt = choose_checkpoint(
                    {"trial_id": path, "run_dir": path}, path, SELECT_METRIC, "min"
                ).checkpoint
            except ExportError:  # no metrics for the surviving checkpoints: the latest
                ckpt = ckpts[max(ckpts)]
            data = filesystem.read_bytes(filesystem.join(ckpt, CHECKPOINT_FILE))
            if data is not None:
                return data, filesystem.join(ckpt, CHECKPOINT_FILE), _digest(ckpt, CHECKPOINT_FILE)
    except ExportError as e:
        raise EvalError(str(e)) from None
    raise EvalError(
        f"{path!r} holds no model.pt, checkpoint.pt or checkpoints: pass an exported "
        "model directory, a run directory or a checkpoint"
    )


def _digest(folder: str, name: str) -> str | None:
    """A training checkpoint's digest text (None for a model file or a checkpoint without one)."""
    return filesystem.read_text(filesystem.join(folder, DIGEST_FILE)) if name == CHECKPOINT_FILE else None


def load_model(path: str, device: torch.device):
    """(model in eval mode, its Config, where it was read from)."""
    data, where, digest = _state_bytes(os.fspath(path))
    try:
        check_digest(data, digest, where)  # a training checkpoint against its digest
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    try:
        state = load_model_file(data, where, device)
        model = model_from_state(state)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise EvalError(first_line(e) if str(e) else f"{where}: not a model") from None
    return model.to(device).eval(), build_config(state["config"]), where


def load_data(cfg: Config, model, dataset: str | None, root: str | None, download: bool = False):
    """(train images, train labels, val images, val labels) of ``dataset`` at the model's image
    size and channels; a one-line error if the dataset does not fit the model."""
    data = replace(cfg.data, download=download)
    if dataset is not None:
        data = replace(data, dataset=dataset, root=root)
    elif root is not None:
        data = replace(data, root=root)
    try:
        train_set, val_set, channels = build_datasets(data)
    except DataError as e:
        raise EvalError(str(e)) from None
    x0 = val_set[0][0]
    if channels != model.in_chans or x0.shape[-1] != model.img_size:
        raise EvalError(
            f"dataset {data.dataset!r} gives {channels}-channel {x0.shape[-1]}x{x0.shape[-1]} images "
            f"but the model takes {model.in_chans}-channel {model.img_size}x{model.img_size}: "
            f"pass the dataset the model was trained on ({cfg.data.dataset!r})"
        )

    return (*stack_split(train_set), *stack_split(val_set))


def stack_split(ds, limit: int | None = None, rng: np.random.Generator | None = None):
    """(images (n, C, S, S), labels (n,)) of a dataset split; with ``limit`` a random subset
    of at most that many items, in index order."""
    idx = range(len(ds))
    if limit is not None and len(ds) > limit:
        idx = np.sort((rng or np.random.default_rng(0)).choice(len(ds), limit, replace=False))
    items = [ds[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), np.array([int(y) for _, y in items])


def hole_rows(x: torch.Tensor, filled: torch.Tensor, pm: torch.Tensor) -> list[torch.Tensor]:
    """The inpainting grid's rows: input with the hole drawn grey, fill, original."""
    return [torch.where(pm, torch.full_like(x, 0.5), x), filled, x]


# --- tasks ----------------------------------------------------------------------------------


@torch.no_grad()
def task_recon(model, xv, device, batch: int = 256):
    sse, ss, n = 0.0, 0.0, 0
    for i in range(0, len(xv), batch):
        x = xv[i : i + batch].to(device)
        r = model(x, sample=False).recon.float()
        sse += float(((r - x) ** 2).mean((1, 2, 3)).sum())
        ss += float(M.ssim(r, x).sum())
        n += len(x)
    mse = sse / n
    k = min(16, len(xv))
    grid = torch.cat([xv[:k], model(xv[:k].to(device), sample=False).recon.float().cpu()])
    return {"recon/mse": mse, "recon/psnr": M.psnr(mse), "recon/ssim": ss / n}, grid, k


@torch.no_grad()
def task_inpaint(model, xtr, xv, device, seed: int, show: int = 8):
    fill = xtr.mean(0, keepdim=True)
    out, rows = {}, []
    for name in M.MASKS:
        mask = M.patch_mask(name, len(xv), model.grid, torch.Generator().manual_seed(seed))
        pm = M.pixel_mask(mask, model.grid, model.cfg.patch_size)
        filled = torch.cat(
            [M.inpaint(model, xv[i : i + 256], mask[i : i + 256]).cpu() for i in range(0, len(xv), 256)]
        )
        out[f"inpaint/{name}/psnr_masked"] = M.psnr(M.masked_mse(filled, xv, pm))
        out[f"inpaint/{name}/psnr_mean_fill"] = M.psnr(M.masked_mse(fill.expand_as(xv), xv, pm))
        k = min(show, len(xv))
        rows += hole_rows(xv[:k], filled[:k], pm[:k])
    return out, torch.cat(rows), min(show, len(xv))


@torch.no_grad()
def task_sample(model, clf, xv, device, seed: int, n: int = 1000, fid_weights: str | None = None):
    gen = torch.Generator(device=device).manual_seed(seed)
    samples = torch.cat(
        [model.generate(min(250, n - i), generator=gen).float().cpu() for i in range(0, n, 250)]
    )
    ps = clf.proba(samples)
    out = {
        "sample/score": M.inception_style_score(ps),
        "sample/real_score": M.inception_style_score(clf.proba(xv)),
        "sample/max_class_share": M.max_class_share(ps),
    }
    if fid_weights:
        out["sample/fid"] = fid(samples, xv, fid_weights, device)
    return out, samples[:64], 16


def fid(samples: torch.Tensor, real: torch.Tensor, weights: str, device) -> float:
    """FID through torchmetrics' Inception-v3 with the user's weights file (no download)."""
    if not os.path.isfile(weights):
        raise EvalError(
            f"--fid-weights {weights!r} not found: pass the Inception weights file "
            "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
        )
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise EvalError('FID needs torchmetrics and torch-fidelity: pip install -e ".[fid]"') from None
    metric = FrechetInceptionDistance(
        feature=2048, normalize=True, feature_extractor_weights_path=weights
    ).to(device)
    for imgs, real_flag in ((real, True), (samples, False)):
        for i in range(0, len(imgs), 100):
            b = imgs[i : i + 100].to(device)
            metric.update(b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b, real=real_flag)
    return float(metric.compute())


@torch.no_grad()
def task_interp(model, xv, yv, seed: int, pairs: int = 8, steps: int = 10):
    """Pairs of validation images of different classes where possible."""
    rng = np.random.default_rng(seed)
    strips = []
    for _ in range(min(pairs, len(xv) // 2)):
        i = int(rng.integers(len(xv)))
        other = np.flatnonzero(yv != yv[i])
        j = int(rng.choice(other)) if len(other) else int((i + 1) % len(xv))
        strips.append(M.interpolate(model, xv[i], xv[j], steps))
    change, ratio = M.interpolation_smoothness(strips)
    return {"interp/step_change": change, "interp/smoothness": ratio}, torch.cat(strips), steps


@torch.no_grad()
def probe_accuracy(model, xtr, ytr, xv, yv) -> tuple[float, np.ndarray]:
    """(validation accuracy, confusion matrix) of the linear probe on z_cls means."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ztr, _ = M.encode_means(model, xtr)
    zv, _ = M.encode_means(model, xv)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(ztr.numpy(), ytr)
    pred = clf.predict(zv.numpy())
    return float((pred == yv).mean()), confusion_matrix(yv, pred, labels=np.unique(ytr))


def confusion_image(cm: np.ndarray, cell: int = 12) -> torch.Tensor:
    """Row-normalised confusion matrix as a grayscale image (rows true, columns predicted)."""
    c = torch.as_tensor(cm, dtype=torch.float32)
    c = c / c.sum(1, keepdim=True).clamp_min(1)
    return c.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None, None]


# --- during training ---------------------------------------------------------------------------


class EpochEvaluator:
    """The trainer's periodic evaluation (rank 0, every ``train.eval_every`` epochs):
    ``val/probe_acc`` and ``val/sample_score`` with fixed data, seed and sample count, so
    epochs and trials compare, and the sample, inpainting and interpolation grids.

    Holds at most ``max_train`` training and ``max_val`` validation images; the pixel
    classifier behind the sample score is fitted once, here."""

    def __init__(
        self,
        train_set,
        val_set,
        seed: int = 0,
        max_train: int = 5000,
        max_val: int = 1000,
        num_samples: int = 500,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.xtr, self.ytr = stack_split(train_set, max_train, rng)
        self.xv, self.yv = stack_split(val_set, max_val, rng)
        self.seed, self.num_samples = seed, num_samples
        self.clf = M.PixelClassifier(self.xtr, self.ytr, seed=seed)

    @torch.no_grad()
    def __call__(self, model, device) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """-> (metrics, {name: grid image (C, H, W)}); ``model`` is the unwrapped model."""
        from .outputs import grid_image

        was_training = model.training
        model.eval()
        acc, _ = probe_accuracy(model, self.xtr, self.ytr, self.xv, self.yv)
        gen = torch.Generator(device=device).manual_seed(self.seed)
        samples = model.generate(self.num_samples, generator=gen).float().cpu()
        k = min(8, len(self.xv))
        x = self.xv[:k]
        mask = M.patch_mask("center25", k, model.grid)
        pm = M.pixel_mask(mask, model.grid, model.cfg.patch_size)
        filled = M.inpaint(model, x, mask).cpu()
        _, strips, steps = task_interp(model, self.xv, self.yv, self.seed, pairs=2)
        model.train(was_training)
        metrics = {"val/probe_acc": acc, "val/sample_score": M.inception_style_score(self.clf.proba(samples))}
        images = {
            "inpainting": grid_image(torch.cat(hole_rows(x, filled, pm)), k),
            "interpolation": grid_image(strips, steps),
        }
        return metrics, images


# --- the CLI ---------------------------------------------------------------------------------


def _save_grid(images: torch.Tensor, nrow: int, path) -> None:
    from .outputs import grid_image, save_png

    save_png(grid_image(images, nrow), path)


def _run_task(task: str, model, base, data, device, seed: int, fid_weights: str | None, classifier):
    """One task's (metrics, grid, grid columns); ``data`` is (train images, train labels, val
    images, val labels), ``classifier()`` the sample score's pixel classifier and ``base`` the
    baseline model (or None) that ``probe`` also probes."""
    xtr, ytr, xv, yv = data
    if task == "recon":
        return task_recon(model, xv, device)
    if task == "inpaint":
        return task_inpaint(model, xtr, xv, device, seed)
    if task == "sample":
        return task_sample(model, classifier(), xv, device, seed, fid_weights=fid_weights)
    if task == "interp":
        return task_interp(model, xv, yv, seed)
    acc, cm = probe_accuracy(model, xtr, ytr, xv, yv)  # probe
    m, grid = {"probe/acc": acc}, confusion_image(cm)
    if base is not None:
        m["probe/baseline_acc"] = probe_accuracy(base, xtr, ytr, xv, yv)[0]
    return m, grid, 1


def run(
    model_path: str,
    dataset: str | None,
    data_root: str | None,
    out: str,
    tasks: tuple[str, ...] = TASKS,
    gpu: bool = False,
    seed: int = 0,
    baseline: str | None = None,
    fid_weights: str | None = None,
    download: bool = False,
    log=print,
) -> dict[str, Any]:
    """Run ``tasks``; returns the metrics written to ``out/metrics.json``."""
    from pathlib import Path

    device = torch.device("cuda" if gpu else "cpu")
    if out and os.path.isfile(out):
        raise EvalError(f"--out {out!r} is a file: pass a directory")
    if gpu and not torch.cuda.is_available():
        raise EvalError("--gpu given but no CUDA device is visible: drop --gpu")
    if fid_weights and not os.path.isfile(fid_weights):
        raise EvalError(f"--fid-weights {fid_weights!r} not found: pass the Inception weights file")
    model, cfg, where = load_model(model_path, device)
    base = load_model(baseline, device)[0] if baseline else None
    xtr, ytr, xv, yv = load_data(cfg, model, dataset, data_root, download)
    if base is not None and (base.in_chans, base.img_size) != (model.in_chans, model.img_size):
        raise EvalError(
            f"--baseline {baseline!r} takes other images than --model: pass a model trained on the same data"
        )
    outdir = Path(out)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise EvalError(f"--out {out!r} cannot be a directory ({e.strerror}): pass another --out") from None
    log(f"model {where}: {len(xtr)} training and {len(xv)} validation images")
    torch.manual_seed(seed)
    results: dict[str, Any] = {"model": where, "dataset": dataset or cfg.data.dataset, "seed": seed}
    data = (xtr, ytr, xv, yv)
    classifier = functools.cache(lambda: M.PixelClassifier(xtr, ytr, seed=seed))  # fitted at first use
    for task in tasks:
        start = time.perf_counter()
        m, grid, nrow = _run_task(task, model, base, data, device, seed, fid_weights, classifier)
        _save_grid(grid, nrow, outdir / f"{task}.png")
        results.update(m)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items())
        log(f"{task}: {shown} ({time.perf_counter() - start:.1f}s) -> {outdir / (task + '.png')}")
    text = json.dumps(results, indent=2) + "\n"
    filesystem.atomic_write(outdir / "metrics.json", lambda tmp: tmp.write_text(text))
    log(f"wrote {outdir / 'metrics.json'}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitcae_ray.evaluate",
        description="Reconstruction, inpainting, sampling, interpolation "
        "and the z_cls probe on a trained ViTCAE.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR_OR_CHECKPOINT",
        help="exported model directory, run directory (its best checkpoint by "
        "val/elbo) or checkpoint directory/file",
    )
    p.add_argument("--dataset", help="dataset to evaluate on (default: the model's own)")
    p.add_argument("--data-root", help="dataset root, as for training")
    p.add_argument(
        "--download", action="store_true", help="let torchvision download the dataset into --data-root"
    )
    p.add_argument("--out", required=True, metavar="EVAL_DIR", help="where metrics.json and the PNGs go")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--gpu", action="store_true", help="run on the first CUDA device")
    p.add_argument("--seed", type=int, default=0, help="seed of masks, samples and pairs")
    p.add_argument("--baseline", metavar="MODEL", help="a second model for the probe, side by side")
    p.add_argument("--fid-weights", metavar="PATH", help="Inception weights file: also report FID")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    try:
        if unknown or not tasks:
            raise EvalError(
                f"--tasks: unknown task(s) {', '.join(unknown) or '(none)'}; choose from {','.join(TASKS)}"
            )
        run(
            args.model,
            args.dataset,
            args.data_root,
            args.out,
            tasks,
            args.gpu,
            args.seed,
            args.baseline,
            args.fid_weights,
            args.download,
            log=lambda s: print(s, flush=True),
        )
    except (EvalError, ConfigError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
