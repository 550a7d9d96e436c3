"""overhead: what the convergence machinery costs a training epoch.

Two copies of the quickstart model (same initialisation, same batches) train epochs in turn,
with the full loss. The plain one trains and nothing else. The other does what every epoch
of a run does for the head controller: the CLS readout on during the epoch
(``model.set_readout(True)``), the probe pass (:func:`vitcae_ray.engine.head_statistics`), the
all-reduce of those statistics (here in a one-process gloo group: no network), the
controller's update (W1 drift, kappa, decision) and the round trip to the run's Ray actor
(``update``, through the trainer's own client), and what one change of the frozen set
costs (``freeze_change``, on a scratch copy: freezing a head and a block, the optimizer
rebuild, the FLOP recount and the DDP re-wrap; it runs only in epochs whose decision changes
the frozen set, so counting it every epoch is an upper bound). Decisions are computed, not
applied, so both copies train the same network. Each part is reported as a fraction of the
plain epoch's time (target: all together at most 3%). The readout is timed where it runs (each
attention layer's accumulation in the forward pass); ``epoch_difference``, the two epochs'
difference, is the same cost as the epoch clock sees it, with the machine's noise in it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import statistics
import tempfile
import time
import uuid
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from ..config import Config
from ..data import build_datasets
from ..engine import head_statistics, train_one_epoch
from ..model import build_model
from ..optim import build_lr_schedule, build_optimizer
from .common import device_sync, pct, progress, quartiles, round_orders, spread, start_ray, table

NAME = "overhead"
SUMMARY = "convergence machinery per epoch, as a fraction of a plain epoch (target: total <= 3%)"
DEFAULT_CONFIG = "configs/digits_tiny.yaml"
DEFAULTS = {"rounds": 5, "steps": None, "batch_size": None}
QUICK = {"rounds": 1, "steps": 4, "batch_size": 16}
TARGET = 0.03
PARTS = ("readout", "probe", "all_reduce", "controller", "actor_round_trip", "freeze_change")
# rows: the plain epoch, each part, their total, and the readout seen by the epoch clock


class Limited:
    """The first ``steps`` batches of ``loader`` (all of them when ``steps`` is None)."""

    def __init__(self, loader: DataLoader, steps: int | None) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return len(self.loader) if self.steps is None else min(self.steps, len(self.loader))

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))


class _ProcessGroup:
    """A one-process gloo group for the statistics' all-reduce (unless one exists)."""

    def __enter__(self):
        import torch.distributed as dist

        self.owned = not dist.is_initialized()
        if self.owned:
            self.file = os.path.join(tempfile.gettempdir(), f"vitcae_bench_pg_{uuid.uuid4().hex}")
            dist.init_process_group("gloo", init_method=f"file://{self.file}", rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.owned:
            dist.destroy_process_group()
            if os.path.exists(self.file):
                os.remove(self.file)


class _Ray:
    """A local Ray for the actor, started here unless one is running; stopped on exit."""

    def __init__(self, settle: bool) -> None:
        self.settle = settle

    def __enter__(self):
        import ray

        self.owned = not ray.is_initialized()
        if self.owned:
            start_ray(self.settle)
        return self

    def __exit__(self, *exc):
        import ray

        if self.owned:
            ray.shutdown()


def run(cfg: Config, opts: SimpleNamespace) -> list[dict]:
    device = opts.device
    batch_size = opts.batch_size or cfg.train.batch_size
    train_set, val_set, chans = build_datasets(cfg.data)
    probe = torch.stack([val_set[i][0] for i in range(min(cfg.freeze.probe_size, len(val_set)))])
    plain = _variant("plain", cfg, opts, train_set, chans, batch_size)
    machinery = _variant("machinery", cfg, opts, train_set, chans, batch_size)
    bench = SimpleNamespace(
        cfg=cfg,
        device=device,
        probe=probe.to(device),
        amp_dtype=torch.bfloat16 if device.type == "cuda" else None,
        epoch_loss=cfg.loss.kl_warmup_epochs + cfg.loss.ramp_epochs,  # the full loss, MMD included
        readout_s=_time_readout(machinery.model, device_sync(device)),
        probe_odd=torch.arange(len(probe), device=device) % 2 == 1,
        scratch=None,
        local=None,
        remote=None,
    )
    with _Ray(settle=not opts.quick), _ProcessGroup(), _heads_clients(cfg) as (local, remote):
        bench.local, bench.remote = local, remote
        _measure_rounds(bench, plain, machinery, opts.rounds)
    return _rows(plain, machinery, batch_size, opts)


def _variant(
    name: str, cfg: Config, opts: SimpleNamespace, train_set, chans: int, batch_size: int
) -> SimpleNamespace:
    """One copy of the model with its loader, optimizer and LR schedule; the same
    initialisation and batches for every copy."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.image_size, chans).to(opts.device)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.loader_workers,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    opt = build_optimizer(model, cfg.optim)
    steps = len(Limited(loader, opts.steps))
    sched = build_lr_schedule(opt, cfg.optim, opts.rounds + 2, steps)
    return SimpleNamespace(
        name=name,
        model=model,
        loader=Limited(loader, opts.steps),
        opt=opt,
        sched=sched,
        steps=steps,
        times={p: [] for p in ("epoch", *PARTS)},
    )  # per round


def _time_readout(model, sync) -> list[float]:
    """Time every attention layer's readout accumulation, with a device sync on each side;
    returns the one-element list that sums it over an epoch's forward passes (reset it before
    each epoch)."""
    readout_s = [0.0]

    def timed_record(record):
        def call(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return record(*args, **kwargs)
            finally:
                sync()
                readout_s[0] += time.perf_counter() - t0

        return call

    for attn in model.attention_layers:
        attn.record_rows = timed_record(attn.record_rows)
    return readout_s


@contextlib.contextmanager
def _heads_clients(cfg: Config):
    """(in-process client, client of a Ray actor made for the bench): the trainer's own
    ``HeadsClient`` both ways; the actor is killed on exit."""
    import ray

    from ..convergence import controller_args
    from ..convergence.actor import HeadsClient, create_actor

    name = f"bench-heads-{uuid.uuid4().hex[:8]}"
    actor = create_actor(name, tempfile.mkdtemp(prefix="bench-heads-"), "none", *controller_args(cfg))
    try:
        remote = HeadsClient(name, controller_args(cfg))
        local = HeadsClient(None, controller_args(cfg))
        yield local, remote
    finally:
        ray.kill(actor)


def _time_freeze_change(bench: SimpleNamespace, v: SimpleNamespace, epoch: int) -> float:
    """One change of the frozen set on a scratch copy of ``v``'s model, as the trainer
    applies it: the heads and the block prefix, the optimizer rebuild, the FLOP recount and
    the DDP re-wrap. Each round toggles between nothing frozen and layer 0 frozen whole."""
    from torch.nn.parallel import DistributedDataParallel

    from ..freezing import FlopAccount, apply_frozen, rebuild_optimizer

    if bench.scratch is None:
        model = copy.deepcopy(v.model)
        opt = build_optimizer(model, bench.cfg.optim)
        sched = build_lr_schedule(opt, bench.cfg.optim, 2, v.steps)
        x = torch.zeros(2, *bench.probe.shape[1:], device=bench.device)
        bench.scratch = SimpleNamespace(
            model=model, opt=opt, sched=sched, flops=FlopAccount(model, x, bench.cfg, bench.probe)
        )
    s, layers = bench.scratch, bench.cfg.model.depth
    on = epoch % 2 == 1
    heads = [list(range(bench.cfg.model.num_heads)) if on and l == 0 else [] for l in range(layers)]
    sync = device_sync(bench.device)
    sync()
    t0 = time.perf_counter()
    apply_frozen(s.model, heads, int(on))
    s.opt, s.sched = rebuild_optimizer(s.model, s.opt, s.sched, bench.cfg, v.steps)
    s.flops.recount(s.model)
    DistributedDataParallel(s.model)
    sync()
    return time.perf_counter() - t0


def _measure_rounds(
    bench: SimpleNamespace, plain: SimpleNamespace, machinery: SimpleNamespace, rounds: int
) -> None:
    for v in (plain, machinery):  # warm-up: the controllers' first epoch has no drift
        _measure(bench, v, 0)
        for times in v.times.values():
            times.clear()
    for r, order in round_orders([plain, machinery], rounds):
        for v in order:
            _measure(bench, v, r + 1)
        progress(
            f"round {r + 1}/{rounds}: epoch {plain.times['epoch'][-1]:.3f}s "
            f"plain, {machinery.times['epoch'][-1]:.3f}s with the readout"
        )


def _measure(bench: SimpleNamespace, v: SimpleNamespace, epoch: int) -> None:
    """One epoch of ``v``; the machinery copy then runs each part once, each timed."""
    import torch.distributed as dist

    machinery = v.name == "machinery"
    bench.readout_s[0] = 0.0
    t0 = time.perf_counter()
    if machinery:
        v.model.set_readout(True)
    try:
        train_one_epoch(
            v.model, v.loader, v.opt, v.sched, bench.epoch_loss, bench.cfg, bench.device, bench.amp_dtype
        )
    finally:
        v.model.set_readout(False)
    t1 = time.perf_counter()
    v.times["epoch"].append(t1 - t0)
    if not machinery:
        return
    stats = head_statistics(v.model, bench.probe, bench.probe_odd)
    t2 = time.perf_counter()
    flat = torch.cat(
        [t.double().flatten() for t in (stats.cls, stats.patch, stats.cls_halves, stats.block_maps)]
    )
    dist.all_reduce(flat)  # what head_statistics does across ranks
    t3 = time.perf_counter()
    bench.local.update(epoch, *stats.args())
    t4 = time.perf_counter()
    bench.remote.update(epoch, *stats.args())
    t5 = time.perf_counter()
    change = _time_freeze_change(bench, v, epoch)
    for part, t in (
        ("freeze_change", change),
        ("readout", bench.readout_s[0]),
        ("probe", t2 - t1),
        ("all_reduce", t3 - t2),
        ("controller", t4 - t3),
        ("actor_round_trip", t5 - t4),
    ):
        v.times[part].append(t)


def _rows(
    plain: SimpleNamespace, machinery: SimpleNamespace, batch_size: int, opts: SimpleNamespace
) -> list[dict]:
    """The plain epoch, each part, their total and the epoch difference, as fractions of
    the plain epoch round by round."""
    base = plain.times["epoch"]
    m = machinery.times
    # The actor's part is the round trip less the controller work it also does (measured
    # in-process just before).
    per_round = {
        "readout": m["readout"],
        "probe": m["probe"],
        "all_reduce": m["all_reduce"],
        "controller": m["controller"],
        "actor_round_trip": [a - c for a, c in zip(m["actor_round_trip"], m["controller"])],
        "freeze_change": m["freeze_change"],  # as if every epoch changed the frozen set
    }
    per_round["total"] = [sum(vals) for vals in zip(*per_round.values())]
    # the readout as the epoch clock sees it: the two epochs' difference (noisier)
    per_round["epoch_difference"] = [a - b for a, b in zip(m["epoch"], base)]
    base_med = statistics.median(base)
    common = {
        "epoch_ms": 1e3 * base_med,
        "steps": plain.steps,
        "batch_size": batch_size,
        "rounds": opts.rounds,
        "device": opts.device.type,
    }
    rows = [
        {
            "part": "epoch",
            "ms": 1e3 * base_med,
            "epoch_frac": 1.0,
            "epoch_frac_spread": spread([1.0] * len(base)),
            **common,
        }
    ]
    for part, values in per_round.items():
        fracs = [v / b for v, b in zip(values, base)]
        rows.append(
            {
                "part": part,
                "ms": 1e3 * statistics.median(values),
                "epoch_frac": quartiles(fracs)[1],
                "epoch_frac_spread": spread(fracs),
                **common,
            }
        )
    total = rows[-2]
    total.update(target=TARGET, meets_target=total["epoch_frac"] <= TARGET)
    return rows


def render(rows: list[dict]) -> str:
    return table(
        rows,
        [
            ("part", "part", str),
            ("ms", "ms", lambda v: f"{v:.2f}"),
            ("epoch_frac", "of epoch", pct),
            ("epoch_frac_spread", "min..max", lambda s: f"[{s['min']:.1%}, {s['max']:.1%}]"),
        ],
    )
