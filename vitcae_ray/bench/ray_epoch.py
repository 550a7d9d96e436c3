"""ray: a one-worker TorchTrainer epoch against the same epoch in-process, and where the gap goes.

Each round trains the quickstart through ``vitcae_ray.train.run``, every run in a fresh run
directory with the same config and seed: ``ray`` with ``train.num_workers=1`` (a Ray Train
worker process), ``local`` with ``train.num_workers=0`` (Ray Train's local mode, in this
process) while Ray runs, and, when this suite started Ray itself (not with --quick),
``local_no_ray`` in local mode with Ray shut down, as ``python -m vitcae_ray.train --set
train.num_workers=0`` runs. The first two alternate round by round. The first epoch of every
run is a warm-up; a run's epoch time is the mean over the others (every variant trains the
same epochs, and the loss curriculum makes later ones dearer); ratios are per round, their
median and spread reported.

The per-worker loop is the trainer's own, with its phases timed on rank 0 (the calls it makes
are wrapped, nothing else changes): ``train`` (``train_one_epoch``), ``head_stats``, ``heads``
(the controller: the run's Ray actor, or in-process in local mode), ``evaluate``,
``evaluator`` (the periodic tasks), ``log`` (``metrics.jsonl``, TensorBoard, the heads table),
``ckpt_save`` (``torch.save``), ``persist`` (local mode's checkpoint copy), ``report``
(``ray.train.report``: under Ray, the checkpoint's upload into storage and the hand-over to
the controller), and ``other`` (the rest: image grids, checksums).
Also recorded inside the loop: torch's intra-/inter-op threads, ``OMP_NUM_THREADS``, the CPUs
the process may run on and its thread count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..config import Config
from ..train import train_fn_per_worker as _train_fn_per_worker
from .common import BenchError, progress, ratio_stats, round_orders, spread, start_ray, table, training_output

NAME = "ray"
SUMMARY = "epoch under Ray Train (1 worker) vs in-process (target: ratio <= 1.10)"
DEFAULT_CONFIG = "configs/digits_tiny.yaml"
DEFAULTS = {"rounds": 3, "epochs": 6, "batch_size": None, "output": None}
QUICK = {"rounds": 1, "epochs": 2}
QUICK_SETS = {"train.eval_every": 0, "train.log_images": False}
TARGET = 1.10
# variant -> train.num_workers; local_no_ray runs with this suite's Ray shut down
VARIANTS = {"ray": 1, "local": 0, "local_no_ray": 0}
TIMINGS_FILE = "bench_timings.jsonl"
PHASES = ("train", "head_stats", "heads", "evaluate", "evaluator", "log", "ckpt_save", "persist", "report")


# --- inside the training loop ----------------------------------------------------------------


class _Recorder:
    """Rank 0's per-epoch phase times, one JSON line per epoch in the run directory; its
    wrappers (:meth:`timer`, :meth:`begins_epoch`, :meth:`ends_epoch`) time the loop's calls."""

    def __init__(self, path: Path) -> None:
        self.path, self.epoch, self.phases, self.start = path, None, {}, 0.0

    def begin(self, epoch: int) -> None:
        self.epoch, self.phases, self.start = epoch, {}, time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def end(self) -> None:
        import torch

        if self.epoch is None:
            return
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS, Windows
            cpus = os.cpu_count() or 1
        now = time.perf_counter()  # CLOCK_MONOTONIC on Linux: comparable across processes
        line = {
            "epoch": self.epoch,
            "epoch_s": now - self.start,
            "t0": self.start,
            "t1": now,
            "phases": self.phases,
            "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpus": cpus,
            "python_threads": threading.active_count(),
            "os_threads": _os_threads(),
            "pid": os.getpid(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.epoch = None

    def timer(self, phase: str) -> Callable[[Callable], Callable]:
        """A wrapper that adds each call's time to ``phase``."""

        def wrap(fn: Callable) -> Callable:
            def timed_call(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.add(phase, time.perf_counter() - t0)

            return timed_call

        return wrap

    def begins_epoch(self, fn: Callable) -> Callable:
        """``fn(seed, epoch, rank)`` (the loop's per-epoch seeding) that first begins ``epoch``."""

        def call(seed, epoch, rank):
            self.begin(epoch)
            return fn(seed, epoch, rank)

        return call

    def ends_epoch(self, fn: Callable) -> Callable:
        """``fn`` (the epoch's report) timed as ``report``, then the epoch's line written."""
        timed = self.timer("report")(fn)

        def call(*args, **kwargs):
            try:
                return timed(*args, **kwargs)
            finally:
                self.end()

        return call


def _os_threads() -> int | None:
    """Threads of this process (Linux), the Python ones and every native one."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("Threads:"))
    except (OSError, StopIteration):
        return None


@contextlib.contextmanager
def _patched(patches: list[tuple[Any, str, Callable[[Callable], Callable]]]):
    """Replace ``obj.name`` by ``wrap(original)`` for each patch; restore on exit."""
    saved = []
    try:
        for obj, name, wrap in patches:
            original = getattr(obj, name)
            saved.append((obj, name, original))
            setattr(obj, name, wrap(original))
        yield
    finally:
        for obj, name, original in reversed(saved):
            setattr(obj, name, original)


def timed_train_fn(loop_config: dict[str, Any]) -> None:
    """The trainer's per-worker loop with its phases timed (see the module docstring)."""
    import ray.train
    import torch

    from .. import checkpoints, outputs
    from .. import evaluate as evaluate_module
    from .. import train as T
    from ..convergence import actor

    rank0 = ray.train.get_context().get_world_rank() == 0
    rec = _Recorder(Path(loop_config["config"]["train"]["output"]) / TIMINGS_FILE)

    # the loop's module globals (train_epoch's calls) and the classes whose methods it calls
    patches = [
        (T, "seed_everything", rec.begins_epoch),
        (T, "train_one_epoch", rec.timer("train")),
        (T, "head_statistics", rec.timer("head_stats")),
        (T, "evaluate", rec.timer("evaluate")),
        (actor.HeadsClient, "update", rec.timer("heads")),
        (T, "share_decision", rec.timer("heads")),
        (outputs.RunLogger, "log_epoch", rec.timer("log")),
        (torch, "save", rec.timer("ckpt_save")),
        (checkpoints.LocalCheckpoints, "save", rec.timer("persist")),
        (evaluate_module.EpochEvaluator, "__call__", rec.timer("evaluator")),
        (ray.train, "report", rec.ends_epoch),
    ]
    if not rank0:
        patches = []
    with _patched(patches):
        _train_fn_per_worker(loop_config)


# --- the driver --------------------------------------------------------------------------------


def _is_ray(cmd: str) -> bool:
    """A process of Ray's (any Ray on the machine): raylet, GCS, dashboard, log monitor, the
    actors and workers (``ray::...``)."""
    return (
        cmd.startswith(("ray::", "ray-dashboard")) or "/site-packages/ray/" in cmd or "/ray/core/src/" in cmd
    )


class _CpuSampler:
    """Every process's CPU time, sampled twice a second in a thread (Linux ``/proc``), so the
    CPU that Ray's own processes and the rest of the machine take during the timed epochs can
    be told apart from the training process's."""

    INTERVAL_S = 0.5

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.available = os.path.isdir("/proc/self")

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.available:
            self._stop.set()
            self._thread.join()

    def _loop(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while True:
            now, procs = time.perf_counter(), {}
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        stat = f.read()
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:  # ended meanwhile
                    continue
                fields = stat[stat.rindex(")") + 2 :].split()
                procs[int(pid)] = (cmd, (int(fields[11]) + int(fields[12])) / tick)
            self.samples.append((now, procs))
            if self._stop.wait(self.INTERVAL_S):
                return

    def cores(self, t0: float, t1: float, worker: int) -> dict[str, float] | None:
        """Mean cores used in [t0, t1] by the training process, by Ray's processes and by the
        rest of the machine (from the first and last samples inside the window)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        (a_t, a), (b_t, b) = inside[0], inside[-1]
        used = {"worker": 0.0, "ray": 0.0, "other": 0.0}
        for pid, (cmd, cpu) in b.items():
            delta = cpu - a[pid][1] if pid in a else 0.0  # a process started inside: not counted
            group = "worker" if pid == worker else "ray" if _is_ray(cmd) else "other"
            used[group] += delta
        return {k: v / (b_t - a_t) for k, v in used.items()}


def _one_run(cfg: Config, workers: int, output: str) -> SimpleNamespace:
    from .. import train as T

    cfg = replace(cfg, train=replace(cfg.train, num_workers=workers, output=output, max_failures=0))
    t0 = time.perf_counter()
    with (
        training_output(),
        _CpuSampler() as cpu,
        _patched([(T, "train_fn_per_worker", lambda _: timed_train_fn)]),
    ):
        result = T.run(cfg, verbose=False)
    wall = time.perf_counter() - t0
    if result.error is not None or "error" in (result.metrics or {}):
        raise RuntimeError(
            f"the {'Ray' if workers else 'local'} run failed: {result.error or result.metrics['error']}"
        )
    lines = [json.loads(x) for x in (Path(output) / TIMINGS_FILE).read_text().splitlines()]
    steady = _steady(lines)
    cores = cpu.cores(steady[0]["t0"], steady[-1]["t1"], lines[-1]["pid"])
    return SimpleNamespace(wall_s=wall, epochs=lines, cores=cores)


def _steady(lines: list[dict]) -> list[dict]:
    """Every epoch but the first (a warm-up), or the only one."""
    return lines[1:] or lines


def _other(e: dict) -> float:
    return e["epoch_s"] - sum(e["phases"].values())


def _per_round(runs: list[SimpleNamespace], key: Callable[[dict], float]) -> list[float]:
    """Per run (round), the mean of ``key`` over its steady epochs. Every variant trains the
    same epochs (the loss curriculum makes later epochs dearer), so these compare."""
    return [statistics.fmean(key(e) for e in _steady(run.epochs)) for run in runs]


def check(cfg: Config, opts: SimpleNamespace) -> None:
    if opts.output and os.path.isdir(opts.output) and os.listdir(opts.output):
        raise BenchError(f"--output {opts.output!r} is not empty: pass a new directory")


def run(cfg: Config, opts: SimpleNamespace) -> list[dict]:
    import ray

    cfg = _bench_config(cfg, opts)
    check(cfg, opts)
    root = opts.output or tempfile.mkdtemp(prefix="vitcae_bench_ray_")
    owned = not ray.is_initialized() and cfg.train.address is None
    names = list(VARIANTS) if owned and not opts.quick else ["ray", "local"]
    try:
        runs = _rounds(cfg, opts, root, names, owned)
    finally:
        if not opts.output:
            shutil.rmtree(root, ignore_errors=True)
    rows = [_row(v, runs, opts) for v in names]
    ray_row = rows[0]
    ray_row.update(
        target=TARGET,
        meets_target=ray_row["ratio"] <= TARGET
        and (ray_row["ratio_no_ray"] is None or ray_row["ratio_no_ray"] <= TARGET),
    )
    return rows


def _bench_config(cfg: Config, opts: SimpleNamespace) -> Config:
    """The suite's config: the GPU with --gpu, its epochs and batch size."""
    if opts.device.type == "cuda":
        cfg = replace(cfg, train=replace(cfg.train, gpu=True))
    return replace(
        cfg, train=replace(cfg.train, epochs=opts.epochs, batch_size=opts.batch_size or cfg.train.batch_size)
    )


def _rounds(
    cfg: Config, opts: SimpleNamespace, root: str, names: list[str], owned: bool
) -> dict[str, list[SimpleNamespace]]:
    """Every round's runs, per variant; ``owned``: this suite starts (and stops) Ray, and
    shuts it down for ``local_no_ray``."""
    import ray

    runs: dict[str, list[SimpleNamespace]] = {v: [] for v in names}

    def record(r: int, v: str) -> None:
        out = os.path.join(root, f"round{r}-{v}")
        runs[v].append(_one_run(cfg, VARIANTS[v], out))
        epoch = _per_round(runs[v][-1:], _epoch_s)[0]
        progress(f"round {r + 1}/{opts.rounds}: {v} epoch {epoch:.3f}s (run {runs[v][-1].wall_s:.1f}s)")

    try:
        if owned:
            start_ray(settle=not opts.quick)
        for r, order in round_orders(["ray", "local"], opts.rounds):
            if "local_no_ray" in names:
                ray.shutdown()
                record(r, "local_no_ray")
                start_ray()
            for v in order:
                record(r, v)
    finally:
        if owned and ray.is_initialized():
            ray.shutdown()
    return runs


def _epoch_s(e: dict) -> float:
    return e["epoch_s"]


def _train_s(e: dict) -> float:
    return e["phases"].get("train", 0.0)


def _row(v: str, runs: dict[str, list[SimpleNamespace]], opts: SimpleNamespace) -> dict:
    """Variant ``v``'s row: medians over its rounds, ratios to the local variants."""

    def ratios(base: str, key: Callable[[dict], float]):
        if base not in runs:
            return None, None
        return ratio_stats(_per_round(runs[v], key), _per_round(runs[base], key))

    epoch, train = _per_round(runs[v], _epoch_s), _per_round(runs[v], _train_s)
    ratio, ratio_spread = ratios("local", _epoch_s)
    train_ratio, train_spread = ratios("local", _train_s)
    ratio_no_ray, no_ray_spread = ratios("local_no_ray", _epoch_s)
    train_no_ray, _ = ratios("local_no_ray", _train_s)
    last = runs[v][-1].epochs[-1]
    startup = [run.wall_s - sum(e["epoch_s"] for e in run.epochs) for run in runs[v]]
    return {
        "variant": v,
        "num_workers": VARIANTS[v],
        "ray_running": v != "local_no_ray",
        "epoch_s": statistics.median(epoch),
        "epoch_spread": spread(epoch),
        "train_s": statistics.median(train),
        "rest_s": statistics.median(epoch) - statistics.median(train),
        "ratio": ratio,
        "ratio_spread": ratio_spread,
        "train_ratio": train_ratio,
        "train_ratio_spread": train_spread,
        "ratio_no_ray": ratio_no_ray,
        "ratio_no_ray_spread": no_ray_spread,
        "train_ratio_no_ray": train_no_ray,
        "phases_s": _phases(runs[v]),
        "run_wall_s": statistics.median(run.wall_s for run in runs[v]),
        "startup_s": statistics.median(startup),
        "torch_threads": last["torch_threads"],
        "interop_threads": last["interop_threads"],
        "omp_num_threads": last["omp_num_threads"],
        "cpus": last["cpus"],
        "python_threads": last["python_threads"],
        "os_threads": last["os_threads"],
        "cores_used": _cores(runs[v]),
        "epochs": opts.epochs,
        "rounds": opts.rounds,
    }


def _phases(runs: list[SimpleNamespace]) -> dict[str, float]:
    """Median seconds per epoch of every phase the runs timed, and of the rest (``other``)."""
    phases = {
        p: statistics.median(_per_round(runs, lambda e, p=p: e["phases"].get(p, 0.0)))
        for p in PHASES
        if any(p in e["phases"] for run in runs for e in run.epochs)
    }
    phases["other"] = statistics.median(_per_round(runs, _other))
    return phases


def _cores(runs: list[SimpleNamespace]) -> dict[str, float] | None:
    """Median cores used by the training process, Ray and the rest (None: not sampled)."""
    cores = [run.cores for run in runs if run.cores]
    return {k: statistics.median(c[k] for c in cores) for k in cores[0]} if cores else None


def render(rows: list[dict]) -> str:
    def x(v: float) -> str:
        return f"{v:.3f}"

    main = table(
        rows,
        [
            ("variant", "variant", str),
            ("epoch_s", "epoch s", x),
            ("ratio", "x local", x),
            ("ratio_spread", "min..max", lambda s: f"[{s['min']:.3f}, {s['max']:.3f}]"),
            ("ratio_no_ray", "x no Ray", x),
            ("train_s", "train s", x),
            ("train_ratio", "x local", x),
            ("train_ratio_no_ray", "x no Ray", x),
            ("rest_s", "rest s", x),
            ("torch_threads", "threads", str),
            (
                "cores_used",
                "cores: train/Ray/other",
                lambda c: f"{c['worker']:.2f}/{c['ray']:.2f}/{c['other']:.2f}",
            ),
            ("omp_num_threads", "OMP", str),
            ("startup_s", "startup s", lambda v: f"{v:.1f}"),
        ],
    )
    phases = sorted({p for r in rows for p in r["phases_s"]}, key=lambda p: (PHASES + ("other",)).index(p))
    breakdown = table(
        [{"phase": p, **{r["variant"]: r["phases_s"].get(p) for r in rows}} for p in phases],
        [("phase", "phase (median s/epoch)", str)]
        + [(r["variant"], r["variant"], lambda v: f"{v:.4f}") for r in rows],
    )
    return main + "\n\n" + breakdown
