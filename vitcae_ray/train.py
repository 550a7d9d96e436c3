"""The Ray Train glue: the driver's ``TorchTrainer`` (:func:`run`) and the per-worker loop
(:func:`train_fn_per_worker`) in named steps: set up or restore, train an epoch, apply the
epoch's decision, report and checkpoint. The steps call down into the modules that do the
work (``engine``, ``freezing``, ``convergence``, ``checkpoints``, ``outputs``).

``python -m vitcae_ray.train`` is the command line (:mod:`vitcae_ray.cli`). Rerunning the same
command resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from . import checkpoints, filesystem
from .cls_mixture import restore_mixture
from .cluster import check_shared_output, connect, settle_resources, torch_threads, worker_request
from .config import EPOCHS_DONE, SELECT_METRIC, Config, absolute_paths, build_config, dump_yaml
from .convergence import HeadController, controller_args
from .convergence.actor import HeadsClient, share_decision
from .data import build_datasets
from .data.streaming import (
    TRAIN,
    VAL,
    StreamingLoader,
    StreamingValLoader,
    channels_of,
    exact_validation,
    local_splits,
    split_dataset,
    streams,
)
from .engine import (
    NonFiniteLossError,
    evaluate,
    head_statistics,
    init_model,
    seed_everything,
    set_epoch,
    train_one_epoch,
    wrap_model,
)
from .freezing import FlopAccount, Trainee, apply_decision, apply_frozen, frozen_heads, grad_elements
from .optim import build_lr_schedule, build_optimizer, load_optimizer_state
from .outputs import (
    CONFIG_FILE,
    RunDir,
    RunLogger,
    check_run_dir,
    head_heatmaps,
    head_rows,
    image_grids,
    progress_line,
    say,
)
from .prefix_cache import Indexed, PrefixCache

EVAL_TRAIN_ROWS = 5000  # training images rank 0's periodic evaluation holds at most
EVAL_VAL_ROWS = 1000  # validation images it holds at most (EpochEvaluator's max_val)


@dataclass
class Worker:
    """What one worker carries through its epochs; ``logger``, ``fixed_batch`` and
    ``evaluator`` exist on rank 0 only, ``heads`` (the controller's client) too."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    train_loader: Any
    val_loader: Any
    trainee: Trainee
    probe: torch.Tensor
    probe_odd: torch.Tensor  # which of this rank's probe images are in the probe's odd half
    start_epoch: int
    history: list[dict[str, Any]]
    head_rows: list[dict[str, Any]]
    heads: HeadsClient | None
    local_checkpoints: checkpoints.LocalCheckpoints | None
    logger: RunLogger | None = None
    fixed_batch: torch.Tensor | None = None
    evaluator: Any = None
    fail_metrics: dict[str, float] | None = None
    cache: PrefixCache | None = None  # the frozen prefix's outputs per training image
    val_cache: PrefixCache | None = None  # the same per validation image of this rank
    probe_memo: dict[str, Any] = field(default_factory=dict)  # the probe pass, once the encoder is frozen


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    w = setup(loop_config)
    try:
        for epoch in range(w.start_epoch, w.cfg.train.epochs):
            metrics = train_epoch(w, epoch)
            if metrics is None:  # the loss turned non-finite: reported, the run stops
                return
            report_and_checkpoint(w, epoch, metrics)
    finally:
        if w.logger is not None:
            w.logger.close()


# --- set up or restore ---------------------------------------------------------------------


def setup(loop_config: dict[str, Any]) -> Worker:
    """Data, model, optimizer and head controller of this worker, restored from the run's
    latest checkpoint when there is one (the source of truth, the heads' state included)."""
    import ray.train
    import ray.train.torch

    local = loop_config["local_mode"]
    _quiet_report_log(local)
    cfg = build_config(loop_config["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(torch_threads(t.cpus_per_worker))
    train_set, val_set, channels, train_loader, val_loader = _loaders(
        cfg, loop_config.get("stream"), rank, world, device
    )
    local_ckpts = (
        checkpoints.LocalCheckpoints(loop_config["storage"], t.run_name, t.num_checkpoints, t.select_metric)
        if local
        else None
    )
    state = _latest_state(local_ckpts, device, rank)
    cache = val_cache = None  # a streamed split carries no row index to key the caches by
    if not loop_config.get("stream"):
        cache = PrefixCache(len(train_set), cfg.freeze.cache_mb)
        val_cache = PrefixCache(len(val_loader.dataset), cfg.freeze.cache_mb, readout=False)
    probe = torch.stack([val_set[i][0] for i in range(min(cfg.freeze.probe_size, len(val_set)))])
    probe_odd = (torch.arange(len(probe)) % 2 == 1)[rank::world].to(device)
    probe = probe[rank::world].to(device)
    w = Worker(
        cfg,
        rank,
        world,
        device,
        torch.bfloat16 if device.type == "cuda" else None,
        train_loader,
        val_loader,
        _trainee(cfg, state, channels, len(train_loader), probe, device, cache),
        probe,
        probe_odd,
        start_epoch=0 if state is None else state["epoch"] + 1,
        history=[] if state is None else state["history"],
        head_rows=[] if state is None else state.get("head_rows", []),
        heads=_heads_client(cfg, state, loop_config.get("heads_actor")) if rank == 0 else None,
        local_checkpoints=local_ckpts,
        fail_metrics=loop_config.get("fail_metrics"),
        cache=cache,
        val_cache=val_cache,
    )
    if rank == 0:
        _setup_rank0(w, train_set, val_set)
    return w


def _latest_state(local_ckpts: checkpoints.LocalCheckpoints | None, device, rank: int) -> dict | None:
    """The state of the run's latest checkpoint (Ray Train's, or local mode's own), or None."""
    import ray.train

    checkpoint = local_ckpts.latest() if local_ckpts is not None else ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state = checkpoints.load(d, device)
    if rank == 0:
        say(f"resuming from {checkpoint.path} at epoch {state['epoch'] + 2}")
    return state


def _trainee(
    cfg: Config, state: dict | None, channels: int, steps_per_epoch: int, probe, device, cache=None
) -> Trainee:
    """The model (initial weights from ``train.seed``, then the checkpoint's frozen set and
    weights), its optimizer and LR schedule, the FLOP account (of steps served by ``cache``
    where it serves), and the model wrapped for DDP."""
    import ray.train.torch

    t = cfg.train
    model = init_model(cfg, channels, device)
    if state is not None:  # the frozen set first, so the optimizer is built around the trainable rest
        apply_frozen(model, state["frozen_heads"], state["frozen_blocks"])
    optimizer = build_optimizer(model, cfg.optim)
    lr_schedule = build_lr_schedule(optimizer, cfg.optim, t.epochs, steps_per_epoch)
    if state is not None:
        model.load_state_dict(state["model"])
        restore_mixture(model, state)
        load_optimizer_state(model, optimizer, state["optimizer"])
        lr_schedule.load_state_dict(state["lr_scheduler"])
    flop_x = torch.zeros(t.batch_size, channels, cfg.data.image_size, cfg.data.image_size, device=device)
    wrap = functools.partial(wrap_model, prepare=ray.train.torch.prepare_model, compile_model=t.compile)
    return Trainee(model, optimizer, lr_schedule, wrap, FlopAccount(model, flop_x, cfg, probe, cache))


def _heads_client(cfg: Config, state: dict | None, actor_name: str | None) -> HeadsClient:
    """Rank 0's client of the run's controller, holding the checkpoint's controller state."""
    heads = HeadsClient(actor_name, controller_args(cfg))
    heads.load_state_dict((state or {}).get("heads") or HeadController(*controller_args(cfg)).state_dict())
    return heads


def _setup_rank0(w: Worker, train_set, val_set) -> None:
    """The run directory's writer, the images every epoch shows and the periodic evaluator."""
    t = w.cfg.train
    w.logger = RunLogger(RunDir(t.output), w.history)
    n = min(t.num_image_samples, len(val_set))
    w.fixed_batch = torch.stack([val_set[i][0] for i in range(n)]).to(w.device)
    if t.eval_every > 0:
        from .evaluate import EpochEvaluator

        w.evaluator = EpochEvaluator(
            train_set,
            val_set,
            w.cfg.data.dataset,
            seed=t.seed,
            max_train=EVAL_TRAIN_ROWS,
            max_val=EVAL_VAL_ROWS,
            log=say,
            recon_weight=w.cfg.loss.recon_weight,
        )


def _loaders(cfg: Config, stream: dict[str, int] | None, rank: int, world: int, device):
    """(train set or None, val set, channels, train loader, val loader). With ``stream`` (the
    driver handed Ray Train both splits as Ray Datasets) the loaders iterate this worker's
    shards, and the val set is the split's first rows (the probe and logged images; on rank
    0, the periodic evaluation's), as is rank 0's train set."""
    import ray.train
    import ray.train.torch

    t = cfg.train
    if stream:
        evaluating = rank == 0 and t.eval_every > 0
        head = max(cfg.freeze.probe_size, t.num_image_samples, EVAL_VAL_ROWS if evaluating else 0)
        train_set, val_set = local_splits(
            cfg.data, stream["channels"], EVAL_TRAIN_ROWS if evaluating else None, head
        )
        channels = stream["channels"]
        train_loader = StreamingLoader(
            ray.train.get_dataset_shard(TRAIN),
            t.batch_size,
            (stream["rows"] // world) // t.batch_size,
            t.seed,
        )
        # every validation row once, on one worker (exact_validation)
        val_loader = StreamingValLoader(ray.train.get_dataset_shard(VAL), t.batch_size)
        return train_set, val_set, channels, train_loader, val_loader
    train_set, val_set, channels = build_datasets(cfg.data)
    train_loader = ray.train.torch.prepare_data_loader(
        DataLoader(
            Indexed(train_set),  # (x, y, row): the prefix cache's key
            batch_size=t.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.data.loader_workers,
            pin_memory=device.type == "cuda",
        )
    )
    # every validation image once, on one rank: no sampler padding, so the all-reduced
    # validation metrics are those of the split whatever the number of workers
    val_loader = DataLoader(
        Indexed(val_shard(val_set, rank, world)),  # (x, y, row of the shard): the validation cache's key
        batch_size=t.batch_size,
        shuffle=False,
        num_workers=cfg.data.loader_workers,
        pin_memory=device.type == "cuda",
    )
    return train_set, val_set, channels, train_loader, val_loader


def val_shard(val_set, rank: int, world: int) -> Subset:
    """Rank ``rank``'s validation images: every ``world``-th from ``rank`` on (shares differ
    by at most one image; none is repeated or left out)."""
    return Subset(val_set, range(rank, len(val_set), world))


def _quiet_report_log(local: bool) -> None:
    """Ray Train logs every report's full metrics at INFO; the progress line already says
    what matters. A worker process is ours: its root logger is raised to WARNING (the report
    log's logger is named by its file, outside ``ray.train``). In local mode the process is
    the caller's, and only the ``ray.train`` loggers are raised."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    if not local:
        logging.getLogger().setLevel(logging.WARNING)


# --- train an epoch, apply its decision ------------------------------------------------------


def train_epoch(w: Worker, epoch: int) -> dict[str, Any] | None:
    """One epoch: train, send the all-reduced head statistics to the controller, apply its
    decision on every rank, validate. The epoch's metrics, or None when the loss turned
    non-finite (that is reported, and the run stops)."""
    import ray.train

    cfg, tr, model = w.cfg, w.trainee, w.trainee.model
    seed_everything(cfg.train.seed, epoch, w.rank)
    set_epoch(w.train_loader, epoch)
    start = time.perf_counter()
    frozen_before = sum(len(f) for f in frozen_heads(model))
    blocks_before = model.frozen_blocks
    elements = grad_elements(model)
    factors_used = [a.tau_factor.tolist() for a in model.attention_layers]
    try:
        metrics = _train_steps(w, epoch)
    except NonFiniteLossError as e:
        # Every rank sees the same all-reduced gradient norm, so all stop here together;
        # inf metrics keep Tune's metric checks and ASHA working on the stop.
        failed = {
            "error": str(e),
            "val/loss": math.inf,
            SELECT_METRIC: math.inf,
            cfg.train.select_metric: math.inf,
            **(w.fail_metrics or {}),
        }
        ray.train.report({"epoch": epoch, EPOCHS_DONE: epoch + 1, **failed})
        return None
    steps_s = metrics["time/epoch_s"]
    stats = head_statistics(model, w.probe, w.probe_odd, w.probe_memo)
    decision = w.heads.update(epoch, *stats.args()) if w.rank == 0 else None
    decision = share_decision(decision, w.world)
    w.head_rows.extend(head_rows(model, decision, factors_used))
    prefix_images = w.cache.take_computed() if w.cache is not None else 0
    masked = tuple(metrics.get(f"train/masked_{k}", 0) for k in ("steps", "tokens", "tokens_sq"))
    flops = tr.flops.epoch_metrics(
        epoch, len(w.train_loader), w.history, prefix_images, masked, probe_ran=stats.probe_ran
    )
    applied = time.perf_counter()
    spread = apply_decision(tr, decision, cfg, len(w.train_loader), w.world)
    applied = time.perf_counter() - applied
    # validation sees the model exactly as the checkpoint stores it
    metrics.update(
        evaluate(
            tr.wrapped,
            w.val_loader,
            epoch,
            cfg,
            w.device,
            w.amp_dtype,
            seed=cfg.train.seed,
            cache=w.val_cache,
        )
    )
    return {
        "epoch": epoch,
        EPOCHS_DONE: epoch + 1,
        **metrics,
        # the whole epoch: steps, the scheduler's statistics and decision, validation
        "time/epoch_s": time.perf_counter() - start,
        "time/train_steps_s": steps_s,
        "time/freeze_apply_s": applied,
        "heads/frozen": frozen_before,
        "heads/total": cfg.model.depth * cfg.model.num_heads,
        "heads/newly_frozen": len(decision.newly_frozen),
        "blocks/frozen": blocks_before,
        **flops,
        "freeze/mean_drift": decision.mean_drift,
        "freeze/mean_floor": decision.mean_floor,
        "comm/grad_elements": elements,
        "time/step_s": steps_s / max(len(w.train_loader), 1),
        "ddp/rank_spread": spread,
        "cache/prefix_images": prefix_images,
        "cache/mb": w.cache.nbytes() / 2**20 if w.cache is not None else 0.0,
    }


def _train_steps(w: Worker, epoch: int) -> dict[str, Any]:
    """The epoch's training steps, with the CLS attention readout on; at most the run's
    remaining ``train.max_nonfinite_steps`` steps skipped."""
    t, tr = w.cfg.train, w.trainee
    skips_left = t.max_nonfinite_steps - sum(m.get("train/nonfinite_steps", 0) for m in w.history)
    tr.model.set_readout(True)
    try:
        return train_one_epoch(
            tr.wrapped,
            w.train_loader,
            tr.optimizer,
            tr.lr_schedule,
            epoch,
            w.cfg,
            w.device,
            w.amp_dtype,
            skips_left,
            w.cache,
        )
    finally:
        tr.model.set_readout(False)


# --- report and checkpoint -------------------------------------------------------------------


def report_and_checkpoint(w: Worker, epoch: int, metrics: dict[str, Any]) -> None:
    """Rank 0 runs the periodic evaluation, logs the epoch and writes the checkpoint; every
    rank reports (Ray Train needs the same number of reports from each)."""
    import ray.train

    t = w.cfg.train
    task_grids = {}
    if w.evaluator is not None and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs):
        task_metrics, task_grids = w.evaluator(w.trainee.model, w.device, epoch)
        metrics.update(task_metrics)
    w.history.append(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if w.rank == 0:
            _log_epoch(w, metrics, task_grids)
            tr = w.trainee
            checkpoints.write(
                checkpoints.training_state(
                    tr.model,
                    tr.optimizer,
                    tr.lr_schedule,
                    epoch,
                    w.cfg,
                    w.history,
                    w.heads.state_dict(),
                    w.head_rows,
                ),
                tmp,
            )
            ckpt = (
                w.local_checkpoints.save(tmp, epoch, w.history)
                if w.local_checkpoints
                else ray.train.Checkpoint.from_directory(tmp)
            )
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoints.dir_name(epoch))


def _log_epoch(w: Worker, metrics: dict[str, Any], task_grids: dict[str, torch.Tensor]) -> None:
    """metrics.jsonl, TensorBoard (scalars, the image grids, the head heatmaps), heads.parquet
    and the progress line."""
    cfg, model = w.cfg, w.trainee.model
    images = {}
    if cfg.train.log_images:
        with torch.no_grad():
            model.eval()
            recon = model(w.fixed_batch, sample=False).recon
            gen = torch.Generator(device=w.device).manual_seed(cfg.train.seed)
            samples = model.generate(len(w.fixed_batch), generator=gen)
        images = {**image_grids(w.fixed_batch, recon, samples), **task_grids}
    epoch_rows = [r for r in w.head_rows if r["epoch"] == metrics["epoch"]]
    images.update(head_heatmaps(epoch_rows, cfg.model.depth, cfg.model.num_heads))
    w.logger.log_epoch(metrics, images, w.head_rows)
    say(progress_line(metrics, cfg.train.epochs))


# --- driver ----------------------------------------------------------------------------------


def run(
    cfg: Config,
    verbose: bool = True,
    callbacks: list | None = None,
    fail_metrics: dict[str, float] | None = None,
    check_cluster: bool = True,
):
    """Train ``cfg`` with Ray Train; returns the ``ray.train.Result``. ``callbacks`` are Ray
    Train callbacks (a Tune trial passes ``TuneReportCallback``); ``fail_metrics`` are reported
    when the loss turns non-finite (a trial's Tune metric at its worst). ``check_cluster``:
    check the request and the output against the cluster first (a sweep does it once)."""
    import ray

    cfg, datasets, stream_info = _prepare(cfg, check_cluster)
    t = cfg.train
    storage = filesystem.absolute(t.storage_path or t.output)
    actor, actor_name = None, None
    if t.num_workers > 0:  # the run's head-convergence actor lives with the driver, not a worker
        from .convergence.actor import actor_name as name_for
        from .convergence.actor import create_actor

        actor_name = name_for(storage, t.run_name)
        actor = create_actor(actor_name, storage, t.run_name, *controller_args(cfg))
    trainer = _trainer(
        cfg,
        datasets,
        storage,
        callbacks,
        {
            "config": cfg.to_dict(),
            "local_mode": t.num_workers == 0,
            "storage": storage,
            "heads_actor": actor_name,
            "fail_metrics": fail_metrics or {},
            "stream": stream_info,
        },
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except SystemExit:
        # Ray Train's Ctrl-C handler aborts the run, then exits; it is the only exit in fit()
        raise KeyboardInterrupt from None
    finally:
        if actor is not None:
            ray.kill(actor)
    if verbose:
        from .cli import summary

        print(summary(result, cfg, time.perf_counter() - start), flush=True)
    return result


def _check_outputs(t, more_nodes: bool) -> None:
    """The output (and checkpoint storage) visible to every node (``check_shared_output``)."""
    check_shared_output(t.output, t.shared_fs, more_nodes=more_nodes)
    if t.storage_path is not None:
        check_shared_output(t.storage_path, t.shared_fs, "train.storage_path", more_nodes=more_nodes)


def _prepare(cfg: Config, check_cluster: bool):
    """Checks before anything starts (run directory, data, cluster fit, shared output), Ray
    started or joined, the run's config written; returns (cfg with worker CPUs resolved,
    Ray Train datasets or None, the streamed split's row count and channels or None)."""
    import ray

    cfg = absolute_paths(cfg)  # workers run in their own working directories
    t = cfg.train
    check_run_dir(t.output, cfg)
    local = t.num_workers == 0
    stream = not local and streams(cfg.data)
    if t.address is None and not stream:  # fail fast on bad data before starting anything
        build_datasets(cfg.data)
    if not local and not ray.is_initialized():
        connect(t.address)
    checked = not local and check_cluster
    if checked and t.wait_for_workers:  # a local output is refused before waiting for nodes
        _check_outputs(t, more_nodes=True)
    if check_cluster or local:  # a sweep settled (and waited) once for all its trials
        cfg = settle_resources(cfg)
    t = cfg.train
    if checked and not t.wait_for_workers:
        _check_outputs(t, more_nodes=False)
    datasets, stream_info = None, None
    if stream:  # Ray Data reads and decodes both splits; each worker iterates its shards
        channels = channels_of(cfg.data)
        train_ds, rows = split_dataset(cfg.data, channels, TRAIN)
        val_ds, _ = split_dataset(cfg.data, channels, VAL)
        datasets, stream_info = {TRAIN: train_ds, VAL: val_ds}, {"rows": rows, "channels": channels}
    run_dir = RunDir(t.output)
    run_dir.write_text(CONFIG_FILE, dump_yaml(cfg))
    run_dir.sync()
    return cfg, datasets, stream_info


def _trainer(cfg: Config, datasets, storage: str, callbacks, loop_config: dict[str, Any]):
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    return TorchTrainer(
        train_fn_per_worker,
        datasets=datasets,
        dataset_config=exact_validation(),
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.gpu, resources_per_worker=worker_request(cfg)
        ),
        run_config=ray.train.RunConfig(
            name=t.run_name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.num_checkpoints,
                checkpoint_score_attribute=t.select_metric,
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=t.max_failures, max_preemption_failures=t.max_preemption_failures
            ),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )


if __name__ == "__main__":
    from .cli import main

    sys.exit(main())
