"""``python -m vitcae_ray.evaluate``: the paper's tasks on a trained model, each beside its
baselines.

    recon    MSE, PSNR and SSIM at the posterior means; the negative ELBO (sampled latents) and
             the importance-weighted bound iwae/nll_k<K>, nats per image
    inpaint  centre and random patch masks (25%, 50%), leak-free: the model vs the mean image
             and biharmonic fill, PSNR on the masked pixels
    sample   FID, KID, k-NN precision/recall, memorisation and class shares of samples, beside
             held-out real images, class-mean prototypes, copies and noise
    interp   slerp of z_cls and lerp of z_patch between validation pairs
    probe    cross-validated logistic regression on the model's representations, beside PCA-k
             and raw pixels

Writes ``OUT/metrics.json`` (flat keys) and one PNG grid per task, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from .. import filesystem
from ..config import ConfigError
from ..errors import fail
from .features import InceptionFeatures, feature_net
from .generation import SANITY_ROWS, GenerationReference, task_sample
from .inpaint import METHODS, task_inpaint
from .interp import task_interp
from .loading import EvalError, load_data, load_model
from .probe import task_probe
from .recon import task_recon

TASKS = ("recon", "inpaint", "sample", "interp", "probe")
SAMPLE_ROWS = (  # the sample task's figures in the printed table, with their formats
    ("kid", "{:.4f}"),
    ("fid", "{:.2f}"),
    ("precision", "{:.2f}"),
    ("recall", "{:.2f}"),
    ("memorisation", "{:.2f}"),
    ("low_confidence_share", "{:.2f}"),
    ("max_class_share", "{:.2f}"),
    ("seam_ratio", "{:.2f}"),
)
IWAE_K = 64


def _save_grid(images: torch.Tensor, nrow: int, path) -> None:
    from ..outputs import grid_image, save_png

    save_png(grid_image(images, nrow), path)


class Context:
    """What the tasks share: the model, its config, the data, and the feature spaces (built
    at first use)."""

    def __init__(self, model, cfg, data, device, seed, iwae_k, features, fid_weights, feature_cache, log):
        self.model, self.cfg, self.device, self.seed, self.log = model, cfg, device, seed, log
        self.xtr, self.ytr, self.xv, self.yv = data
        self.iwae_k, self.features = iwae_k, features
        self.fid_weights, self.feature_cache = fid_weights, feature_cache

    def run(self, task: str):
        if task == "recon":
            loss = self.cfg.loss
            return task_recon(
                self.model, self.xv, self.device, loss.recon_weight, loss.elbo_samples, self.iwae_k, self.seed
            )
        if task == "inpaint":
            return task_inpaint(self.model, self.xtr, self.xv, self.seed, self.cfg.loss.recon_weight)
        if task == "sample":
            net, acc = feature_net(
                self.cfg.data.dataset, self.xtr, self.ytr, self.xv, self.yv, self.feature_cache, self.log
            )
            try:
                embed = InceptionFeatures(self.fid_weights) if self.features == "inception" else net
            except ModuleNotFoundError as e:
                raise EvalError(str(e)) from None
            ref = GenerationReference(embed, net, self.xtr, self.xv, self.model.cfg.patch_size, self.seed)
            return task_sample(self.model, ref, self.ytr, self.device, self.seed, acc)
        if task == "interp":
            return task_interp(self.model, self.xv, self.yv, self.seed)
        x = torch.cat([self.xtr, self.xv])
        return task_probe(self.model, x, np.concatenate([self.ytr, self.yv]), self.seed)


def table(m: dict[str, Any]) -> list[str]:
    """The printed summary: each task's figures beside its baselines."""
    rows = [("metric", "model", "baselines")]
    if "recon/mse" in m:
        rows.append(
            (
                "recon mse / psnr / ssim",
                f"{m['recon/mse']:.5f} / {m['recon/psnr']:.2f} / {m['recon/ssim']:.3f}",
                "",
            )
        )
        nll = next(k for k in m if k.startswith("iwae/nll_k"))
        rows.append((f"-elbo / {nll} (nats)", f"{m['recon/elbo']:.1f} / {m[nll]:.1f}", ""))
        rows.append(
            ("recon seam ratio", f"{m['recon/seam_ratio']:.2f}", f"real {m['recon/real/seam_ratio']:.2f}")
        )
    for mask in ("center25", "center50", "random25", "random50"):
        if f"inpaint/{mask}/psnr_model" in m:
            base = " | ".join(f"{meth} {m[f'inpaint/{mask}/psnr_{meth}']:.2f}" for meth in METHODS[1:])
            rows.append((f"inpaint {mask} psnr (dB)", f"{m[f'inpaint/{mask}/psnr_model']:.2f}", base))
    if "sample/fid" in m:
        for key, fmt in SAMPLE_ROWS:
            base = " | ".join(f"{r} {fmt.format(m[f'sample/{r}/{key}'])}" for r in SANITY_ROWS)
            label = f"sample {key}" + (" (trust KID on small data)" if key == "fid" else "")
            rows.append((label, fmt.format(m[f"sample/{key}"]), base))
    if "sample/mixture/fid" in m:
        mixture = f"z_cls ~ mixture of {m['sample/mixture/components']:.0f}"
        for key, fmt in SAMPLE_ROWS:
            rows.append((f"sample {key}, {mixture}", fmt.format(m[f"sample/mixture/{key}"]), ""))
    if "interp/smoothness" in m:
        rows.append(
            (
                "interp step change / max:mean",
                f"{m['interp/step_change']:.3f} / {m['interp/smoothness']:.2f}",
                "",
            )
        )
    if "probe/acc" in m:
        names = [k[6:-4] for k in m if k.startswith("probe/") and k.endswith("/acc") and k != "probe/acc"]
        pixel = [n for n in names if n.endswith("pixels")]
        for name in (n for n in names if n not in pixel):
            base = " | ".join(f"{p} {m[f'probe/{p}/acc']:.1%} ± {m[f'probe/{p}/acc_std']:.1%}" for p in pixel)
            rows.append(
                (
                    f"probe {name} ({m['probe/folds']}-fold)",
                    f"{m[f'probe/{name}/acc']:.1%} ± {m[f'probe/{name}/acc_std']:.1%}",
                    base,
                )
            )
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return [f"{a:<{width[0]}}  {b:<{width[1]}}  {c}".rstrip() for a, b, c in rows]


def run(
    model_path: str,
    dataset: str | None,
    data_root: str | None,
    out: str,
    tasks: tuple[str, ...] = TASKS,
    gpu: bool = False,
    seed: int = 0,
    iwae_k: int = IWAE_K,
    features: str = "classifier",
    fid_weights: str | None = None,
    feature_cache: str | None = None,
    download: bool = False,
    log=print,
) -> dict[str, Any]:
    """Run ``tasks``; returns the metrics written to ``out/metrics.json``."""
    from pathlib import Path

    device = torch.device("cuda" if gpu else "cpu")
    if iwae_k < 1:
        raise EvalError(f"--iwae-k {iwae_k}: the number of importance samples must be at least 1")
    if out and os.path.isfile(out):
        raise EvalError(f"--out {out!r} is a file: pass a directory")
    if gpu and not torch.cuda.is_available():
        raise EvalError("--gpu given but no CUDA device is visible: drop --gpu")
    if fid_weights:
        features = "inception"
        if not os.path.isfile(fid_weights):
            raise EvalError(
                f"--fid-weights {fid_weights!r} not found: pass the Inception weights file "
                "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
            )
    elif features == "inception":
        raise EvalError(
            "--features inception needs the Inception weights file (nothing is downloaded): "
            "pass --fid-weights PATH, or use --features classifier"
        )
    model, cfg, where = load_model(model_path, device)
    data = load_data(cfg, model, dataset, data_root, download)
    if dataset is not None:
        from dataclasses import replace

        cfg = replace(cfg, data=replace(cfg.data, dataset=dataset))
    outdir = Path(out)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise EvalError(f"--out {out!r} cannot be a directory ({e.strerror}): pass another --out") from None
    log(f"model {where} ({cfg.model.variant}): {len(data[0])} training and {len(data[2])} validation images")
    torch.manual_seed(seed)
    results: dict[str, Any] = {
        "model": where,
        "variant": cfg.model.variant,
        "dataset": cfg.data.dataset,
        "seed": seed,
    }
    ctx = Context(model, cfg, data, device, seed, iwae_k, features, fid_weights, feature_cache, log)
    for task in tasks:
        start = time.perf_counter()
        m, grid, nrow = ctx.run(task)
        _save_grid(grid, nrow, outdir / f"{task}.png")
        results.update(m)
        log(f"{task}: done in {time.perf_counter() - start:.1f}s -> {outdir / (task + '.png')}")
    for line in table(results):
        log(line)
    if "sample/sanity_holds" in results:
        ok = results["sample/sanity_holds"] == 1.0
        verdict = "yes" if ok else "NO: the generation metrics cannot be trusted here"
        log(
            "sanity: held-out real images beat prototypes, copies and noise on FID and recall, "
            f"and the copies are flagged as memorised: {verdict}"
        )
    text = json.dumps(results, indent=2) + "\n"
    filesystem.atomic_write(outdir / "metrics.json", lambda tmp: tmp.write_text(text))
    log(f"wrote {outdir / 'metrics.json'}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitcae_ray.evaluate",
        description="Reconstruction and likelihood, inpainting, generation, interpolation and the "
        "linear probe on a trained model, each beside its baselines.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR_OR_CHECKPOINT",
        help="exported model directory, run directory (its best checkpoint by the run's "
        "train.select_metric) or checkpoint directory/file",
    )
    p.add_argument("--dataset", help="dataset to evaluate on (default: the model's own)")
    p.add_argument("--data-root", help="dataset root, as for training")
    p.add_argument(
        "--download", action="store_true", help="let torchvision download the dataset into --data-root"
    )
    p.add_argument("--out", required=True, metavar="EVAL_DIR", help="where metrics.json and the PNGs go")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--gpu", action="store_true", help="run on the first CUDA device")
    p.add_argument("--seed", type=int, default=0, help="seed of masks, samples, pairs and folds")
    p.add_argument(
        "--iwae-k", type=int, default=IWAE_K, metavar="K", help="importance samples of iwae/nll_k<K>"
    )
    p.add_argument(
        "--features",
        choices=("classifier", "inception"),
        default="classifier",
        help="feature space of FID/KID/precision/recall: the dataset's cached CNN classifier, or "
        "Inception-v3 (needs --fid-weights)",
    )
    p.add_argument(
        "--fid-weights", metavar="PATH", help="Inception weights file (implies --features inception)"
    )
    p.add_argument(
        "--feature-cache",
        metavar="DIR",
        help="where the feature classifier is cached (default $VITCAE_RAY_CACHE or ~/.cache/vitcae_ray)",
    )
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
            args.iwae_k,
            args.features,
            args.fid_weights,
            args.feature_cache,
            args.download,
            log=lambda s: print(s, flush=True),
        )
    except (EvalError, ConfigError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
