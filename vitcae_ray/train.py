"""``python -m vitcae_ray.train``: train ViTCAE with Ray Train (the only Ray Train glue).

The driver resolves the config, checks the run directory, starts (or joins) Ray and runs a
``TorchTrainer``; every worker runs :func:`train_fn_per_worker`. Rerunning the same command
resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .cluster import check_shared_output, connect, settle_resources, torch_threads, worker_request
from .config import (EPOCHS_DONE, SELECT_METRIC, Config, ConfigError, absolute_paths, build_config,
                     dump_yaml, resolve)
from .data import DataError, build_datasets
from .data.streaming import TRAIN, StreamingLoader, channels_of, local_splits, streams, train_dataset
from .convergence import HeadController, HeadDecision
from .engine import NonFiniteLossError, evaluate, head_statistics, train_one_epoch
from .freezing import (apply_frozen, frozen_heads, grad_elements, mmd_active, probe_flops,
                       rebuild_optimizer, set_tau_factors, step_flops_by_phase, unfrozen_step_flops)
from .model import ViTCAE, build_model
from .optim import build_lr_schedule, build_optimizer
from .pretrained import model_from_state  # noqa: F401  (rebuilds a model from a checkpoint)
from . import checkpoints
from .checkpoints import CHECKPOINT_FILE, CheckpointError  # noqa: F401
from .outputs import (CONFIG_FILE, RunDir, RunLogger, check_directory, heatmap, image_grids, read_text,
                      storage_root)

EVAL_TRAIN_ROWS = 5000  # training images rank 0's periodic evaluation holds at most
# Changing these between a run and its resumption would make the checkpoint meaningless.
RESUME_KEYS = ("model", "loss", "optim", "data.dataset", "data.image_size", "data.channels",
               "data.val_fraction", "data.split_seed", "train.batch_size", "train.seed")


# --- checkpoints -------------------------------------------------------------------------

def wrap_model(model: ViTCAE, compile_model: bool) -> torch.nn.Module:
    """DDP (through Ray Train) and, with ``train.compile``, ``torch.compile`` on top. Called
    at the start and after every change of the frozen set; compiled graphs of the previous
    set are dropped, so the model recompiles only when its frozen set changes."""
    import ray.train.torch

    wrapped = ray.train.torch.prepare_model(model)
    if compile_model:
        torch._dynamo.reset()
        wrapped = torch.compile(wrapped)
    return wrapped


def checkpoint_state(model: ViTCAE, optimizer, lr_sched, epoch: int, cfg: Config,
                     history: list[dict[str, Any]], heads: dict[str, Any],
                     head_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything needed to rebuild the model alone (config + ``model_args``; the weights are
    the full per-head layout) or to resume, the head controller's whole state included."""
    return {
        "heads": heads,
        "frozen_heads": frozen_heads(model),
        "head_rows": head_rows,
        "model": model.state_dict(),
        "model_args": {"img_size": model.img_size, "in_chans": model.in_chans},
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_sched.state_dict(),
        "epoch": epoch,
        "config": cfg.to_dict(),
        "history": history,
    }


def load_state(checkpoint_dir: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint directory's state, its digest checked (:mod:`vitcae_ray.checkpoints`)."""
    return checkpoints.load(checkpoint_dir, device)


class LocalCheckpoints:
    """Ray Train's local mode (``--num-workers 0``) keeps reported checkpoints in memory only;
    this persists them under the same storage layout so a rerun resumes there too."""

    def __init__(self, storage: str, name: str, keep: int) -> None:
        import pyarrow.fs as pafs

        self.fs, root = pafs.FileSystem.from_uri(storage if "://" in storage else "file://" + storage)
        self.root = f"{root.rstrip('/')}/{name}"
        self.keep = keep
        self.fs.create_dir(self.root, recursive=True)

    def _dirs(self) -> list[str]:
        return checkpoints.complete_dirs(self.fs, self.root)

    def latest(self):
        import ray.train

        dirs = self._dirs()
        return ray.train.Checkpoint(dirs[-1], filesystem=self.fs) if dirs else None

    def save(self, local_dir: str, epoch: int, history: list[dict[str, Any]]):
        import pyarrow.fs as pafs
        import ray.train

        dest = f"{self.root}/{checkpoints.dir_name(epoch)}"
        partial = f"{self.root}/.partial_{checkpoints.dir_name(epoch)}"
        self.fs.create_dir(partial, recursive=True)
        pafs.copy_files(local_dir, partial, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        if self.fs.get_file_info(dest).type != pafs.FileType.NotFound:
            self.fs.delete_dir(dest)  # a replayed epoch overwrites
        self.fs.move(partial, dest)  # a checkpoint appears only when complete
        # keep the latest and the best `keep` by the selection metric
        by_epoch = {f"{self.root}/{checkpoints.dir_name(int(m['epoch']))}": m[SELECT_METRIC]
                    for m in history}
        dirs = self._dirs()
        best = sorted((d for d in dirs if d in by_epoch), key=by_epoch.get)[: self.keep]
        for d in dirs:
            if d != dest and d not in best:
                self.fs.delete_dir(d)
        return ray.train.Checkpoint(dest, filesystem=self.fs)


# --- per-worker loop ---------------------------------------------------------------------

def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Every RNG is a function of (seed, epoch, rank), so a resumed epoch replays exactly."""
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def init_model(cfg: Config, channels: int, device: torch.device) -> ViTCAE:
    """The model's initial weights, a function of ``train.seed`` alone: every rank and every
    restart before the first checkpoint builds the same model."""
    seed_everything(cfg.train.seed, -1, 0)
    return build_model(cfg.model, cfg.data.image_size, channels).to(device)


def _set_epoch(loader, epoch: int) -> None:
    for obj in (loader, getattr(loader, "sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def _progress_line(m: dict[str, Any], epochs: int) -> str:
    evaluated = (f" probe {m['val/probe_acc']:.1%} sample score {m['val/sample_score']:.2f} |"
                 if "val/probe_acc" in m else "")
    return (f"epoch {int(m['epoch']) + 1}/{epochs} | loss {m['train/loss']:.2f} "
            f"recon {m['train/recon']:.2f} kl {m['train/kl']:.2f} mmd {m['train/mmd']:.4f} | "
            f"val elbo {m['val/elbo']:.1f} mse {m['val/mse']:.5f} psnr {m['val/psnr']:.2f} dB |"
            f"{evaluated} heads {m['heads/frozen']}/{m['heads/total']} frozen "
            f"(+{m['heads/newly_frozen']}), FLOPs saved {m['flops/saved_frac']:.1%} | "
            f"{m['time/epoch_s']:.1f}s {m['throughput/images_per_s']:.0f} img/s")


def _quiet_report_log(local: bool) -> None:
    """Ray Train logs every report's full metrics at INFO; the progress line already says
    what matters. A worker process is ours: its root logger is raised to WARNING (the report
    log's logger is named by its file, outside ``ray.train``). In local mode the process is
    the caller's, and only the ``ray.train`` loggers are raised."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    if not local:
        logging.getLogger().setLevel(logging.WARNING)


def say(line: str) -> None:
    """A progress line on stdout. Written to the stream, not through ``print``, which Ray
    Train's workers route into their logger (the line would show twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class HeadsClient:
    """Rank 0's access to the run's head controller: the driver's Ray actor, or in local mode
    an in-process controller. Both hand back :class:`HeadDecision` objects.

    A restarted actor reloads the latest checkpoint and Ray retries the call in flight (see
    the actor module). A restart between an epoch's ``update`` and the ``state_dict`` that goes
    into its checkpoint would hand back the state before that epoch: ``state_dict`` checks the
    epoch and sends the epoch's statistics again when it is behind."""

    def __init__(self, actor_name: str | None, controller_args: tuple) -> None:
        if actor_name is not None:
            from .convergence.actor import get_actor

            self.actor, self.local = get_actor(actor_name), None
        else:
            self.actor, self.local = None, HeadController(*controller_args)
        self._last_update: tuple | None = None

    def _call(self, method: str, *args):
        if self.actor is None:
            return getattr(self.local, method)(*args)
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    def update(self, epoch: int, cls_attn, patch_attn) -> HeadDecision:
        self._last_update = (epoch, cls_attn, patch_attn)
        d = self._call("update", epoch, cls_attn, patch_attn)
        return d if isinstance(d, HeadDecision) else HeadDecision.from_dict(d)

    def state_dict(self) -> dict:
        state = self._call("state_dict")
        epochs = [int(d["epoch"]) for d in state["decisions"]]
        if self._last_update is not None and max(epochs, default=-1) < self._last_update[0]:
            self._call("update", *self._last_update)
            state = self._call("state_dict")
        return state

    def load_state_dict(self, state: dict) -> None:
        self._last_update = None
        self._call("load_state_dict", state)


def controller_args(cfg: Config) -> tuple:
    """(layers, heads, patch grid, scheduler, freeze, min_epoch) for :class:`HeadController`."""
    min_epoch = cfg.freeze.min_epoch if cfg.freeze.min_epoch >= 0 else cfg.loss.warmup_epochs
    return (cfg.model.depth, cfg.model.num_heads, cfg.data.image_size // cfg.model.patch_size,
            cfg.scheduler, cfg.freeze, min_epoch)


def frozen_sets(dec: HeadDecision) -> list[list[int]]:
    """Per layer, the heads a decision has frozen."""
    return [[h for h, f in enumerate(row) if f] for row in dec.frozen]


def last_decision(cfg: Config, heads_state: dict) -> HeadDecision | None:
    controller = HeadController(*controller_args(cfg))
    controller.load_state_dict(heads_state)
    last = controller.last_epoch
    return None if last is None else controller.decision(last)


def share_decision(dec: HeadDecision | None, world: int) -> HeadDecision:
    """Rank 0's decision, on every rank (every other rank passes None)."""
    if world == 1:
        return dec
    import torch.distributed as dist

    box = [None if dec is None else dec.to_dict()]
    dist.broadcast_object_list(box, src=0)
    return HeadDecision.from_dict(box[0])


def rank_spread(model: ViTCAE, world: int) -> float:
    """Largest difference across ranks of (a parameter checksum, the frozen-head signature):
    0 when every rank holds the same weights and frozen set, as DDP requires."""
    if world == 1:
        return 0.0
    import torch.distributed as dist

    with torch.no_grad():
        checksum = sum(p.double().sum() for p in model.parameters()).item()
    # hashes of int tuples are the same in every process
    signature = float(hash(tuple(map(tuple, frozen_heads(model)))) % 2**52)
    local = torch.tensor([checksum, signature], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        local = local.cuda()
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)
    return float((stacked.max(0).values - stacked.min(0).values).max())


def _head_rows(model: ViTCAE, dec: HeadDecision, factors_used: list[list[float]]) -> list[dict]:
    rows = []
    for layer, attn in enumerate(model.attention_layers):
        tau = attn.tau.tolist()
        for head in range(attn.num_heads):
            drift = dec.drift[layer][head]
            rows.append({
                "epoch": dec.epoch, "layer": layer, "head": head,
                "drift_w1": None if drift is None or math.isnan(drift) else float(drift),
                "kappa": int(dec.kappa[layer][head]),
                "tau": tau[head] * factors_used[layer][head], "tau_factor": factors_used[layer][head],
                "frozen": bool(dec.frozen[layer][head]), "frozen_epoch": dec.frozen_epoch[layer][head],
            })
    return rows


def _head_heatmaps(rows: list[dict], num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    def grid(key: str) -> torch.Tensor:
        t = torch.zeros(num_layers, num_heads)
        for r in rows:
            t[r["layer"], r["head"]] = float("nan") if r[key] is None else float(r[key])
        return t

    return {"heads/drift_w1": heatmap(grid("drift_w1")), "heads/tau": heatmap(grid("tau")),
            "heads/frozen": heatmap(grid("frozen"), vmax=1.0)}


def _data(cfg: Config, stream: dict[str, int] | None, rank: int, world: int):
    """(train set or None, val set, channels, train loader or None). With ``stream`` (the
    driver handed Ray Train the train split as a Ray Dataset) the loader iterates this
    worker's shard, and only rank 0's evaluator reads some train rows itself."""
    if not stream:
        return (*build_datasets(cfg.data), None)
    import ray.train

    t = cfg.train
    evaluator_rows = EVAL_TRAIN_ROWS if rank == 0 and t.eval_every > 0 else None
    train_set, val_set = local_splits(cfg.data, stream["channels"], evaluator_rows)
    loader = StreamingLoader(ray.train.get_dataset_shard(TRAIN), t.batch_size,
                             (stream["rows"] // world) // t.batch_size, t.seed)
    return train_set, val_set, stream["channels"], loader


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _quiet_report_log(loop_config["local_mode"])
    cfg = build_config(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(torch_threads(cfg.train.cpus_per_worker))
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None

    t = cfg.train
    train_set, val_set, channels, train_loader = _data(cfg, loop_config.get("stream"), rank, world)
    if train_loader is None:
        train_loader = ray.train.torch.prepare_data_loader(DataLoader(
            train_set, batch_size=t.batch_size, shuffle=True, drop_last=True,
            num_workers=cfg.data.loader_workers, pin_memory=device.type == "cuda"))
    val_loader = ray.train.torch.prepare_data_loader(DataLoader(
        val_set, batch_size=t.batch_size, shuffle=False, num_workers=cfg.data.loader_workers))
    steps_per_epoch = len(train_loader)

    model = init_model(cfg, channels, device)
    local = loop_config["local_mode"]
    local_ckpts = LocalCheckpoints(loop_config["storage"], t.run_name, t.num_checkpoints) if local else None
    checkpoint = local_ckpts.latest() if local else ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d, device)

    # The checkpoint is the source of truth for the heads: push its controller state into the
    # actor (rank 0) and apply its frozen set before the optimizer sees the parameters.
    heads = HeadsClient(loop_config.get("heads_actor"), controller_args(cfg)) if rank == 0 else None
    heads_state = (state or {}).get("heads") or HeadController(*controller_args(cfg)).state_dict()
    if heads is not None:
        heads.load_state_dict(heads_state)
    dec = last_decision(cfg, heads_state)
    if dec is not None:
        apply_frozen(model, frozen_sets(dec), cfg.freeze.mode, out_proj=cfg.freeze.out_proj)
    optimizer = build_optimizer(model, cfg.optim)
    lr_sched = build_lr_schedule(optimizer, cfg.optim, t.epochs, steps_per_epoch)
    start_epoch, history, head_rows = 0, [], []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        head_rows = state.get("head_rows", [])
        if rank == 0:
            say(f"resuming from {checkpoint.path} at epoch {start_epoch + 1}")

    # What one step costs in each loss phase, counted on the unwrapped model before DDP wraps
    # it (FLOPs do not depend on the data); the baseline is an unfrozen step without readout.
    flop_x = torch.zeros(t.batch_size, channels, cfg.data.image_size, cfg.data.image_size, device=device)
    base_flops = unfrozen_step_flops(model, flop_x, cfg)
    step_flops = step_flops_by_phase(model, flop_x, cfg)
    ddp_model = wrap_model(model, t.compile)

    logger = RunLogger(RunDir(t.output), history) if rank == 0 else None
    n_img = min(t.num_image_samples, len(val_set))
    fixed_batch = torch.stack([val_set[i][0] for i in range(n_img)]).to(device) if rank == 0 else None
    evaluator = None
    if rank == 0 and t.eval_every > 0:
        from .evaluate import EpochEvaluator

        evaluator = EpochEvaluator(train_set, val_set, seed=t.seed, max_train=EVAL_TRAIN_ROWS)
    probe_all = torch.stack([val_set[i][0] for i in range(min(cfg.freeze.probe_size, len(val_set)))])
    probe = probe_all[rank::world].to(device)
    probe_cost = probe_flops(model, probe)
    total_heads = cfg.model.depth * cfg.model.num_heads

    for epoch in range(start_epoch, t.epochs):
        seed_everything(t.seed, epoch, rank)
        _set_epoch(train_loader, epoch)
        frozen_now = sum(len(f) for f in frozen_heads(model))
        elements = grad_elements(model)
        factors_used = [a.tau_factor.tolist() for a in model.attention_layers]
        skips_left = t.max_nonfinite_steps - sum(m.get("train/nonfinite_steps", 0) for m in history)
        model.set_readout(True)
        try:
            metrics = train_one_epoch(ddp_model, train_loader, optimizer, lr_sched, epoch, cfg,
                                      device, amp_dtype, skips_left)
        except NonFiniteLossError as e:
            # Every rank sees the same all-reduced gradient norm, so all stop here together.
            # inf metrics keep Tune's metric checks and schedulers working on the stop
            ray.train.report({"epoch": epoch, EPOCHS_DONE: epoch + 1, "error": str(e),
                              "val/loss": math.inf, SELECT_METRIC: math.inf,
                              **loop_config.get("fail_metrics", {})})
            if logger is not None:
                logger.close()
            return
        finally:
            model.set_readout(False)
        # Convergence: all-reduced statistics -> the run's controller -> one decision for all.
        cls_attn, patch_attn = head_statistics(model, probe)
        dec = heads.update(epoch, cls_attn.numpy(), patch_attn.numpy()) if rank == 0 else None
        dec = share_decision(dec, world)
        rows = _head_rows(model, dec, factors_used)
        head_rows.extend(rows)

        # Apply the decision on every rank at the same point: tau factors, then freezing.
        phase = mmd_active(epoch, cfg)
        trained_flops = step_flops[phase]
        set_tau_factors(model, dec.tau_factor)
        changed = frozen_sets(dec) != frozen_heads(model)
        if changed:
            del ddp_model  # its reducer holds the old parameters; re-wrap after the change
            carried = apply_frozen(model, frozen_sets(dec), cfg.freeze.mode, optimizer,
                                   out_proj=cfg.freeze.out_proj)
            optimizer, lr_sched = rebuild_optimizer(model, optimizer, lr_sched, cfg,
                                                    steps_per_epoch, carried)
        # Before any re-wrap: DDP's construction copies rank 0's weights to every rank.
        spread = rank_spread(model, world)
        if changed:
            step_flops = step_flops_by_phase(model, flop_x, cfg)
            ddp_model = wrap_model(model, t.compile)

        # Validation sees the model exactly as the checkpoint below stores it.
        metrics.update(evaluate(ddp_model, val_loader, epoch, cfg, device, amp_dtype, seed=t.seed))
        epoch_flops = steps_per_epoch * trained_flops + probe_cost
        unfrozen_flops = steps_per_epoch * base_flops[phase]
        seen = [m for m in history if "flops/epoch_unfrozen" in m]
        metrics = {
            "epoch": epoch, EPOCHS_DONE: epoch + 1, **metrics,
            "heads/frozen": frozen_now, "heads/total": total_heads,
            "heads/newly_frozen": len(dec.newly_frozen),
            "flops/train_step": trained_flops, "flops/epoch": epoch_flops,
            "flops/epoch_unfrozen": unfrozen_flops, "flops/saved_frac": 1.0 - epoch_flops / unfrozen_flops,
            "flops/cumulative_saved_frac":
                1.0 - (epoch_flops + sum(m["flops/epoch"] for m in seen))
                / (unfrozen_flops + sum(m["flops/epoch_unfrozen"] for m in seen)),
            "freeze/mean_drift": dec.mean_drift,
            "comm/grad_elements": elements,
            "time/step_s": metrics["time/epoch_s"] / max(steps_per_epoch, 1),
            "ddp/rank_spread": spread,
        }
        task_grids = {}
        if evaluator is not None and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs):
            task_metrics, task_grids = evaluator(model, device)
            metrics.update(task_metrics)
        history.append(metrics)

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                images = {}
                if t.log_images:
                    with torch.no_grad():
                        model.eval()
                        recon = model(fixed_batch, sample=False).recon
                        gen = torch.Generator(device=device).manual_seed(t.seed)
                        samples = model.generate(n_img, generator=gen)
                    images = {**image_grids(fixed_batch, recon, samples), **task_grids}
                images.update(_head_heatmaps(rows, cfg.model.depth, cfg.model.num_heads))
                logger.log_epoch(metrics, images, head_rows)
                say(_progress_line(metrics, t.epochs))
                checkpoints.write(checkpoint_state(model, optimizer, lr_sched, epoch, cfg, history,
                                                   heads.state_dict(), head_rows), tmp)
                ckpt = (local_ckpts.save(tmp, epoch, history) if local
                        else ray.train.Checkpoint.from_directory(tmp))
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoints.dir_name(epoch))
    if logger is not None:
        logger.close()


# --- driver ------------------------------------------------------------------------------

def check_run_dir(output: str, cfg: Config) -> None:
    """Refuse to resume a run directory whose settings differ in ways a checkpoint can't absorb."""
    import yaml

    check_directory(output, "--output")
    text = read_text(output, CONFIG_FILE)
    if text is None:
        return
    old = build_config(yaml.safe_load(text) or {}).to_dict()
    new = cfg.to_dict()

    def get(d: dict, key: str):
        for part in key.split("."):
            d = d[part]
        return d

    for key in RESUME_KEYS:
        a, b = get(old, key), get(new, key)
        if a != b:
            if isinstance(a, dict):
                diff = next(k for k in a if a[k] != b[k])
                key, a, b = f"{key}.{diff}", a[diff], b[diff]
            raise ConfigError(
                f"run directory {output!r} holds a run with {key}={a!r} (now {b!r}); "
                "pass another --output to start a new run, or the same settings to resume it"
            )


def run(cfg: Config, verbose: bool = True, callbacks: list | None = None,
        fail_metrics: dict[str, float] | None = None, check_cluster: bool = True):
    """Train ``cfg`` with Ray Train; returns the ``ray.train.Result``. ``callbacks`` are Ray
    Train callbacks (a Tune trial passes ``TuneReportCallback``); ``fail_metrics`` are reported
    when the loss turns non-finite (a trial's Tune metric at its worst). ``check_cluster``:
    check the request and the output against the cluster first (a sweep does it once)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    # Workers run in their own working directories: hand them absolute paths.
    cfg = absolute_paths(cfg)
    t = cfg.train
    check_run_dir(t.output, cfg)
    local = t.num_workers == 0
    stream = not local and streams(cfg.data)
    if t.address is None and not stream:  # fail fast on bad data before starting anything
        build_datasets(cfg.data)
    if not local and not ray.is_initialized():
        # The dashboard's state API lets Ray Train's placement-group cleaner see the run.
        connect(t.address)
    cfg = settle_resources(cfg)
    t = cfg.train
    if not local and check_cluster:
        check_shared_output(t.output, t.shared_fs)
        if t.storage_path is not None:
            check_shared_output(t.storage_path, t.shared_fs, "train.storage_path")
    datasets, stream_info = None, None
    if stream:  # Ray Data reads and decodes the train split; each worker iterates its shard
        channels = channels_of(cfg.data)
        train_ds, rows = train_dataset(cfg.data, channels)
        datasets, stream_info = {TRAIN: train_ds}, {"rows": rows, "channels": channels}
    run_dir = RunDir(t.output)
    run_dir.write_text(CONFIG_FILE, dump_yaml(cfg))
    run_dir.sync()

    storage = storage_root(t.storage_path or t.output)
    actor, actor_name = None, None
    if not local:  # the run's head-convergence actor lives with the driver, not a worker
        from .convergence.actor import actor_name as name_for, create_actor

        actor_name = name_for(storage, t.run_name)
        actor = create_actor(actor_name, storage, t.run_name, *controller_args(cfg))
    trainer = TorchTrainer(
        train_fn_per_worker,
        datasets=datasets,
        train_loop_config={"config": cfg.to_dict(), "local_mode": local, "storage": storage,
                           "heads_actor": actor_name, "fail_metrics": fail_metrics or {},
                           "stream": stream_info},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.gpu, resources_per_worker=worker_request(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=t.run_name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.num_checkpoints, checkpoint_score_attribute=SELECT_METRIC,
                checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
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
        print(summary(result, cfg, time.perf_counter() - start), flush=True)
    return result


def summary(result, cfg: Config, wall_s: float) -> str:
    m = result.metrics or {}
    if "error" in m:
        return f"stopped: {m['error']}"
    lines = [f"done in {wall_s:.0f}s: {int(m.get('epoch', -1)) + 1}/{cfg.train.epochs} epochs"]
    if "val/mse" in m:
        lines.append(f"  final val/elbo {m[SELECT_METRIC]:.2f}  val/mse {m['val/mse']:.5f}  "
                     f"val/psnr {m['val/psnr']:.2f} dB")
    best = getattr(result, "best_checkpoints", None) or []
    if best:
        ckpt, bm = min(best, key=lambda cm: cm[1].get(SELECT_METRIC, float("inf")))
        lines.append(f"  best {SELECT_METRIC} {bm[SELECT_METRIC]:.2f} at epoch "
                     f"{int(bm['epoch']) + 1}: {ckpt.path}")
    out = cfg.train.output
    lines.append(f"  run directory {out} (tensorboard --logdir {out}/tb)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vitcae_ray.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML preset, e.g. configs/cifar10_small.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--dataset", help="data.dataset: digits (embedded), mnist, fashion_mnist, "
                   "cifar10, cifar100, celeba, imagefolder, parquet")
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
    flags = {
        "data.dataset": args.dataset, "data.root": args.data_root, "data.download": args.download,
        "train.epochs": args.epochs, "train.batch_size": args.batch_size,
        "train.num_workers": args.num_workers, "train.gpu": args.gpu,
        "train.address": args.address, "train.output": args.output, "train.seed": args.seed,
    }
    return resolve(args.config, flags, args.set)


def main(argv: list[str] | None = None) -> int:
    import ray.train

    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = run(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    except ray.train.TrainingFailedError as e:
        # the workers' tracebacks are above; this is the line to act on
        cause = e.__cause__ or e
        print(f"error: training failed after {cfg.train.max_failures} restarts: "
              f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__}",
              file=sys.stderr)
        return 1
    error = (result.metrics or {}).get("error")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
