"""``python -m vitcae_ray.train``: the command line of a training run (flags, the summary, exit
codes); :func:`vitcae_ray.train.run` does the run.

Exit codes: 0 done; 1 the run failed (non-finite loss, workers out of restarts); 2 bad input,
with a one-line ``error: ...`` before anything starts; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys

from .checkpoints import CheckpointError
from .config import Config, ConfigError, resolve
from .data import DataError
from .errors import fail

# flag -> config key; the flags' values override the --config file, --set overrides them
FLAGS = {
    "dataset": "data.dataset",
    "data_root": "data.root",
    "download": "data.download",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "num_workers": "train.num_workers",
    "gpu": "train.gpu",
    "address": "train.address",
    "output": "train.output",
    "seed": "train.seed",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vitcae_ray.train", description="Train ViTCAE with Ray Train.")
    p.add_argument("--config", help="YAML preset, e.g. configs/cifar10_small.yaml, or a name from configs/")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--dataset",
        help="data.dataset: digits (embedded), mnist, fashion_mnist, "
        "cifar10, cifar100, celeba, imagefolder, parquet",
    )
    p.add_argument("--data-root", help="data.root: dataset directory, Parquet path or URI")
    p.add_argument("--download", action="store_const", const=True, help="data.download")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--batch-size", type=int, help="train.batch_size (per worker)")
    p.add_argument("--num-workers", type=int, help="train.num_workers; 0 = Ray Train local mode")
    p.add_argument("--gpu", action="store_const", const=True, help="train.gpu: one GPU per worker")
    p.add_argument("--address", help="train.address of a running Ray cluster, e.g. auto")
    p.add_argument("--output", help="train.output: the run directory (local path or URI)")
    p.add_argument("--seed", type=int, help="train.seed")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    return resolve(args.config, {key: getattr(args, flag) for flag, key in FLAGS.items()}, args.set)


def summary(result, cfg: Config, wall_s: float) -> str:
    """The lines printed when the run ends: epochs, final validation metrics, the best checkpoint
    by ``train.select_metric``, where to look."""
    m = result.metrics or {}
    if "error" in m:
        return f"stopped: {m['error']}"
    lines = [f"done in {wall_s:.0f}s: {int(m.get('epoch', -1)) + 1}/{cfg.train.epochs} epochs"]
    if "val/mse" in m:
        lines.append(
            f"  final val/elbo {m['val/elbo']:.2f}  val/mse {m['val/mse']:.5f}  "
            f"val/psnr {m['val/psnr']:.2f} dB"
        )
    if "flops/cumulative_saved_frac" in m:
        frozen = m.get("heads/frozen", 0) + m.get("heads/newly_frozen", 0)
        lines.append(
            f"  freezing: {frozen}/{m.get('heads/total', 0)} heads frozen; FLOPs saved "
            f"{100 * m['flops/cumulative_saved_frac']:.1f}% against the same run without freezing"
        )
    best = getattr(result, "best_checkpoints", None) or []
    if best:
        metric = cfg.train.select_metric
        ckpt, bm = min(best, key=lambda cm: cm[1].get(metric, float("inf")))
        lines.append(f"  best {metric} {bm[metric]:.6g} at epoch {int(bm['epoch']) + 1}: {ckpt.path}")
    out = cfg.train.output
    lines.append(f"  run directory {out} (tensorboard --logdir {out}/tb)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import ray.train

    from .train import run

    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = run(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        return fail(e)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    except ray.train.TrainingFailedError as e:
        # the workers' tracebacks are above; their last line is the one to act on
        cause = str(e.__cause__ or e).strip()
        return fail(
            f"training failed after {cfg.train.max_failures} restarts: "
            f"{cause.splitlines()[-1] if cause else type(e.__cause__ or e).__name__}",
            1,
        )
    error = (result.metrics or {}).get("error")
    return fail(error, 1) if error else 0


if __name__ == "__main__":
    sys.exit(main())
