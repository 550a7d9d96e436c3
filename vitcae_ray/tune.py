"""``python -m vitcae_ray.tune``: ASHA search over the scheduler and freezing hyperparameters.

Each trial is a full Ray Train run (its own ``TorchTrainer`` and head-convergence actor) whose
per-epoch metrics reach Tune through ``TuneReportCallback``. The experiment directory holds:

    EXP/tune/                 Ray Tune's experiment state (what ``--resume`` restores)
    EXP/trials/<trial_id>/    each trial's run directory (metrics.jsonl, heads.parquet, tb/,
                              train/checkpoint_epoch_NNNN/)
    EXP/results.csv, .parquet one row per trial: parameters, final and best metrics, epochs,
                              heads frozen, FLOPs saved, and the quality/compute Pareto front
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import filesystem
from .config import (
    EPOCHS_DONE,
    SELECT_METRIC,
    Config,
    ConfigError,
    absolute_paths,
    build_config,
    load_yaml,
    resolve,
)
from .data import DataError
from .errors import fail
from .filesystem import join
from .outputs import METRICS_FILE, RESULTS_CSV, RESULTS_FILE, TRIALS_DIR, TUNE_NAME, check_directory

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
RESULT_METRICS = (
    "val/elbo",
    "val/loss",
    "val/mse",
    "val/psnr",
    "train/loss",
    "flops/saved_frac",
    "flops/cumulative_saved_frac",
    "heads/frozen",
)


class SpaceError(ConfigError):
    """A malformed search-space file; one line naming the key."""


def load_space(path: str) -> dict[str, tuple[str, Any]]:
    """Read a space file: ``dotted.key: {distribution: args}`` -> {key: (distribution, args)}.

    ``path`` is a file or the name of one in ``tune_spaces/`` (``default``, ``small``). Every
    key must be a config key that accepts the distribution's values. A plain value
    (``train.epochs: 8``) is ``("fixed", value)``: a base-config value the space sets for every
    trial (below the command line's flags), not a searched key.
    """
    data = load_yaml(path, "search space", "tune_spaces", SpaceError)
    if not data:
        raise SpaceError(f"search space {path!r} must map dotted config keys to distributions")
    space: dict[str, tuple[str, Any]] = {}
    for key, spec in data.items():
        if not isinstance(spec, (dict, list)):
            try:
                build_config({key: spec})
            except ConfigError as e:
                raise SpaceError(f"search space key {key!r}: {e}") from None
            space[key] = ("fixed", spec)
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            raise SpaceError(
                f"search space key {key!r} needs exactly one distribution, e.g. {{loguniform: [0.001, 0.1]}}"
            )
        ((dist, args),) = spec.items()
        if dist not in DISTRIBUTIONS:
            raise SpaceError(
                f"search space key {key!r}: unknown distribution {dist!r}; "
                f"use one of {', '.join(DISTRIBUTIONS)}"
            )
        if not isinstance(args, list) or not args:
            raise SpaceError(f"search space key {key!r}: {dist} needs a list of values")
        if dist in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]:
                raise SpaceError(f"search space key {key!r}: {dist} needs [low, high] with low < high")
            if dist == "loguniform" and args[0] <= 0:
                raise SpaceError(f"search space key {key!r}: loguniform needs low > 0")
            samples = args if dist != "randint" else [int(args[0]), int(args[1]) - 1]
        else:
            samples = args
        for value in samples:  # the trainer's own validation: unknown key, wrong type, range
            try:
                build_config({key: value})
            except ConfigError as e:
                raise SpaceError(f"search space key {key!r}: {e}") from None
        space[key] = (dist, args)
    return space


def split_space(space: dict[str, tuple[str, Any]]) -> tuple[dict[str, tuple[str, list]], dict[str, Any]]:
    """(searched keys, fixed base values) of a loaded space."""
    searched = {k: v for k, v in space.items() if v[0] != "fixed"}
    return searched, {k: v[1] for k, v in space.items() if v[0] == "fixed"}


def param_space(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    from ray import tune

    make: dict[str, Callable] = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(int(a[0]), int(a[1])),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {key: make[dist](args) for key, (dist, args) in space.items()}


class TrialFailed(RuntimeError):
    """A trial's training stopped on an error (a non-finite loss); Tune records it as errored."""


def worst(mode: str) -> float:
    return math.inf if mode == "min" else -math.inf


def trial_fn(config: dict[str, Any], base: dict[str, Any], experiment: str, metric: str, mode: str) -> None:
    """One Tune trial: the searched keys (``config``) over the base config, trained with Ray
    Train in the trial's own run directory (its storage, run name and actor are the trial's)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import run

    trial_id = tune.get_context().get_trial_id()
    cfg = build_config(
        {**base, **config, "train.output": join(experiment, TRIALS_DIR, trial_id), "train.storage_path": None}
    )
    result = run(
        cfg,
        verbose=False,
        callbacks=[TuneReportCallback()],
        fail_metrics={metric: worst(mode)},
        check_cluster=False,
    )
    error = (result.metrics or {}).get("error")
    if error:
        raise TrialFailed(error)


def _read_metrics(run_dir: str) -> list[dict[str, Any]]:
    text = filesystem.read_text(join(run_dir, METRICS_FILE)) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Non-dominated flags for (quality loss, compute) pairs, both to minimise."""
    flags = []
    for i, (q, c) in enumerate(points):
        dominated = any(
            (q2 <= q and c2 <= c) and (q2 < q or c2 < c) for j, (q2, c2) in enumerate(points) if j != i
        )
        flags.append(not dominated and not (math.isnan(q) or math.isnan(c)))
    return flags


def results_table(
    results, space_keys: list[str], experiment: str, max_epochs: int, metric: str, mode: str
) -> list[dict[str, Any]]:
    """One row per trial from its run directory's metrics.jsonl (the source of truth)."""
    rows = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[1]
        run_dir = join(experiment, TRIALS_DIR, trial_id)
        history = _read_metrics(run_dir)
        # the sweep's metric: python -m vitcae_ray.export ranks by it unless given --metric
        row: dict[str, Any] = {"trial_id": trial_id, "run_dir": run_dir, "select_metric": metric}
        row.update({k: result.config.get(k) for k in space_keys})
        row["epochs"] = len(history)
        row["status"] = (
            "error"
            if result.error is not None or "error" in (result.metrics or {})
            else "completed"
            if len(history) >= max_epochs
            else "stopped"
        )
        for key in dict.fromkeys((*RESULT_METRICS, metric)):
            values = [m[key] for m in history if isinstance(m.get(key), (int, float))]
            row[f"final/{key}"] = values[-1] if values else math.nan
            lower_is_better = (
                mode == "min" if key == metric else any(w in key for w in ("loss", "elbo", "mse"))
            )
            row[f"best/{key}"] = (min if lower_is_better else max)(values) if values else math.nan
        rows.append(row)
    sign = 1.0 if mode == "min" else -1.0
    flags = pareto_front(
        [(sign * r[f"best/{metric}"], 1.0 - r["final/flops/cumulative_saved_frac"]) for r in rows]
    )
    for r, f in zip(rows, flags):
        r["pareto"] = f
    rows.sort(key=lambda r: (math.isnan(r[f"best/{metric}"]), sign * r[f"best/{metric}"]))
    return rows


def write_results(rows: list[dict[str, Any]], experiment: str) -> None:
    """``results.parquet`` and ``results.csv`` in the experiment directory, each written whole
    (:func:`vitcae_ray.filesystem.write_bytes`)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    for name, write in ((RESULTS_FILE, pq.write_table), (RESULTS_CSV, pacsv.write_csv)):
        buf = pa.BufferOutputStream()
        write(table, buf)
        filesystem.write_bytes(join(experiment, name), buf.getvalue().to_pybytes())


def format_results(rows: list[dict[str, Any]], space_keys: list[str], metric: str) -> str:
    cols = [
        "trial_id",
        *space_keys,
        "status",
        "epochs",
        f"best/{metric}",
        "final/val/mse",
        "final/heads/frozen",
        "final/flops/cumulative_saved_frac",
        "pareto",
    ]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)


def run_sweep(
    base: Config,
    space: dict[str, tuple[str, list]],
    experiment: str,
    num_samples: int,
    metric: str = SELECT_METRIC,
    mode: str = "min",
    grace_period: int = 1,
    reduction_factor: float = 2,
    search: str = "random",
    resume: bool = False,
    driver_cpus: float = 0.25,
    driver_resource: str | None = None,
    callbacks: list | None = None,
    max_concurrent_trials: int = 0,
):
    """Run (or resume) the sweep; returns (ResultGrid, rows of the results table).

    Before anything starts: the base config's paths are made absolute, one trial (its driver
    and workers) is checked against the cluster, and a local experiment directory is checked
    to be visible to every node. ``max_concurrent_trials`` (Tune's own, saved with the
    experiment) 0 is what fits the cluster at start, after ``train.wait_for_workers``.
    """
    from .cluster import (
        check_shared_output,
        driver_request,
        node_resources,
        settle_resources,
        trials_that_fit,
        worker_request,
    )

    if base.train.storage_path is not None:
        raise ConfigError(
            "train.storage_path cannot be set for a sweep: each trial keeps its "
            "checkpoints in its own run directory under --output; remove it"
        )
    experiment = filesystem.absolute(experiment)
    check_directory(experiment, "--output")
    driver = driver_request(driver_cpus, driver_resource)
    if base.train.wait_for_workers:  # a local output is refused before waiting for nodes
        check_shared_output(experiment, base.train.shared_fs, more_nodes=True)
    base = settle_resources(absolute_paths(base), driver)
    t = base.train
    fit = trials_that_fit(node_resources(), driver, worker_request(base), t.num_workers)
    concurrent = max_concurrent_trials or max(fit, 1)
    if not t.wait_for_workers:
        # trials beyond what fits now run on nodes not up yet (the autoscaler's, or none)
        check_shared_output(experiment, t.shared_fs, more_nodes=concurrent > fit)
    space, fixed = split_space(space)
    if fixed:  # a space's fixed values (main() merges them below the command line instead)
        base = build_config(fixed, base)
        t = base.train
    trainable = _trainable(base, experiment, metric, mode, driver)
    if resume:
        tuner = _restored_tuner(experiment, trainable)
    else:
        print(f"trials at once: {concurrent} (the cluster holds {fit} now)", flush=True)
        asha = _asha(t.epochs, grace_period, reduction_factor)
        tuner = _new_tuner(
            experiment, trainable, space, num_samples, metric, mode, search, asha, callbacks, concurrent
        )
    results = tuner.fit()
    rows = results_table(list(results), list(space), experiment, t.epochs, metric, mode)
    write_results(rows, experiment)
    return results, rows


def _trainable(base: Config, experiment: str, metric: str, mode: str, driver: dict[str, float]):
    """:func:`trial_fn` with its arguments, requesting ``driver`` for each trial's driver.

    The base config travels with the trainable (not the search space), so the trial table and
    TensorBoard's hyperparameters show only what is searched."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(trial_fn, base=base.to_dict(), experiment=experiment, metric=metric, mode=mode),
        driver,
    )


def _asha(max_t: int, grace_period: int, reduction_factor: float):
    """The ASHA scheduler of a new experiment; its rungs and ``max_t`` count epochs, however
    the trial got there (resumes, restarts)."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=EPOCHS_DONE,
        max_t=max_t,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )


def _restored_tuner(experiment: str, trainable):
    """The interrupted experiment's tuner: unfinished and errored trials run again."""
    from ray import tune

    tune_path = join(experiment, TUNE_NAME)
    if not tune.Tuner.can_restore(tune_path):
        raise ConfigError(f"nothing to resume at {tune_path!r}: run without --resume first")
    return tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True)


def _new_tuner(
    experiment: str,
    trainable,
    space: dict[str, tuple[str, list]],
    num_samples: int,
    metric: str,
    mode: str,
    search: str,
    scheduler,
    callbacks: list | None,
    max_concurrent_trials: int,
):
    """A new experiment's tuner (refused where one exists); ``search`` picks the searcher
    (random: Tune's default generator)."""
    from ray import tune

    if filesystem.exists(join(experiment, TUNE_NAME)):
        raise ConfigError(
            f"experiment {experiment!r} already exists: pass --resume to continue it, or another --output"
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=num_samples,
            search_alg=None if search == "random" else _searcher(search, metric, mode),
            scheduler=scheduler,
            max_concurrent_trials=max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=TUNE_NAME, storage_path=experiment, callbacks=callbacks),
    )


def _searcher(name: str, metric: str, mode: str):
    try:
        if name == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(metric=metric, mode=mode)
        if name == "hyperopt":
            from ray.tune.search.hyperopt import HyperOptSearch

            return HyperOptSearch(metric=metric, mode=mode)
    except (ImportError, AssertionError) as e:
        raise ConfigError(f"--search {name} needs its package: pip install {name} ({e})") from None
    raise ConfigError(f"--search must be random, optuna or hyperopt, got {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vitcae_ray.tune", description=__doc__.splitlines()[0])
    p.add_argument(
        "--space", default="default", help="search-space YAML, or a name from tune_spaces/ (default, small)"
    )
    p.add_argument(
        "--config", help="base training config YAML, or a name from configs/ (the searched keys override it)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config key (repeatable)",
    )
    p.add_argument("--num-samples", type=int, default=8, help="trials (per grid point)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial (ASHA's max_t)")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers of each trial")
    p.add_argument("--gpu", action="store_const", const=True, help="one GPU per worker")
    p.add_argument("--address", help="Ray cluster address, e.g. auto")
    p.add_argument(
        "--wait-for-workers",
        type=int,
        help="train.wait_for_workers: wait for the cluster to hold this many Ray Train workers "
        "(asking the autoscaler) before the sweep starts",
    )
    p.add_argument("--wait-timeout", type=float, help="train.wait_timeout_s: the most it waits (600)")
    p.add_argument(
        "--output",
        default="runs/tune",
        help="experiment directory: a local path (one machine, or a mount every node "
        "sees) or a URI such as s3://bucket/exp",
    )
    p.add_argument("--dataset", help="data.dataset")
    p.add_argument("--data-root", help="data.root")
    p.add_argument(
        "--metric",
        help=f"ASHA's and the results table's metric (default: the base config's train.select_metric, "
        f"{SELECT_METRIC} unless set)",
    )
    p.add_argument("--mode", choices=("min", "max"), default="min")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can stop")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor")
    p.add_argument("--search", default="random", help="random, optuna or hyperopt")
    p.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=0,
        help="trials at once (Tune's max_concurrent_trials, kept by --resume); 0 = what the "
        "cluster holds at start, after --wait-for-workers",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    p.add_argument(
        "--trial-driver-resource",
        help="custom resource each trial driver requests "
        "(cluster/aws.yaml gives the head node `trial_driver`)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.max_concurrent_trials < 0:
            raise ConfigError("--max-concurrent-trials must be >= 0 (0 = what the cluster holds)")
        space, fixed = split_space(load_space(args.space))
        flags = {
            "train.epochs": args.max_epochs,
            "train.num_workers": args.workers_per_trial,
            "train.gpu": args.gpu,
            "train.address": args.address,
            "train.wait_for_workers": args.wait_for_workers,
            "train.wait_timeout_s": args.wait_timeout,
            "data.dataset": args.dataset,
            "data.root": args.data_root,
        }
        # precedence: --config < the space's fixed values < flags < --set
        base = resolve(args.config, {**fixed, **{k: v for k, v in flags.items() if v is not None}}, args.set)
        metric = args.metric or base.train.select_metric
        if base.train.num_workers < 1:
            raise ConfigError("--workers-per-trial must be >= 1 (each trial is a Ray Train run)")
        check_directory(filesystem.absolute(args.output), "--output")
        import ray

        if not ray.is_initialized():
            from .cluster import connect

            connect(base.train.address)
        _, rows = run_sweep(
            base,
            space,
            args.output,
            args.num_samples,
            metric,
            args.mode,
            args.grace_period,
            args.reduction_factor,
            args.search,
            args.resume,
            driver_resource=args.trial_driver_resource,
            max_concurrent_trials=args.max_concurrent_trials,
        )
    except (ConfigError, DataError, filesystem.FileSystemError) as e:
        return fail(e)
    print(format_results(rows, list(space), metric))
    out = filesystem.absolute(args.output)
    stopped = sum(r["status"] == "stopped" for r in rows)
    failed = [r for r in rows if r["status"] == "error"]
    print(
        f"{len(rows)} trials in {time.perf_counter() - start:.0f}s ({stopped} stopped early by "
        f"ASHA, {len(failed)} failed); results: {out}/results.csv, {out}/results.parquet"
    )
    if rows and len(failed) == len(rows):
        print(
            f"error: every trial failed; see {failed[0]['run_dir']} and the trial errors above",
            file=sys.stderr,
        )
        return 1
    print(f"export the best: python -m vitcae_ray.export --experiment {out} --out model_dir")
    return 0


if __name__ == "__main__":
    sys.exit(main())
