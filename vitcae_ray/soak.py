"""``python -m vitcae_ray.soak``: a long 2-worker run with a worker killed every few epochs.

The soak starts Ray here (or joins ``--address``), runs ``python -m vitcae_ray.train`` as a
separate driver process on the embedded digits data, and while it trains:

- every ``--kill-every`` epochs SIGKILLs one Ray Train worker process, found through Ray's
  state API (the run restarts its workers from the latest checkpoint: ``train.max_failures``
  is unlimited here);
- samples the resident memory of the driver and of every Ray Train worker twice a second,
  and keeps each epoch's peak.

After ``--minutes`` it interrupts the driver (SIGINT, as Ctrl-C) and checks the run: every
epoch in ``metrics.jsonl`` exactly once, in order. It prints a table (epoch, peak driver and
worker memory, kills) and writes it with a summary to ``OUTPUT/soak.json``. Exit code 0 when
the run held together (every epoch once, memory not growing by more than ``--max-growth``
from the first to the last quarter of the epochs after the KL-only warm-up, whose steps do not
yet compute the MMD terms), 1 otherwise, 2 for bad arguments.
Linux only (memory is read from ``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import fail

WORKER_CLASS = "RayTrainWorker"
SAMPLE_S = 0.5
PIDS_EVERY_S = 5.0  # the state API is asked for the workers' pids this often


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def worker_pids(address: str | None = None) -> list[int]:
    """The Ray Train workers alive in the cluster at ``address`` (its GCS address; None:
    the one Ray finds on this machine, an error when there are several)."""
    from ray.util.state import list_actors

    return [
        a.pid
        for a in list_actors(
            address=address, filters=[("class_name", "=", WORKER_CLASS), ("state", "=", "ALIVE")]
        )
    ]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def growth(values: list[float]) -> float | None:
    """Median of the last quarter over the median of the first, less 1 (None: too few)."""
    q = len(values) // 4
    if q < 1:
        return None
    return statistics.median(values[-q:]) / statistics.median(values[:q]) - 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vitcae_ray.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0, help="how long to train (default 20)")
    p.add_argument("--kill-every", type=int, default=5, help="epochs between worker kills (default 5)")
    p.add_argument("--output", default="runs/soak", help="the run directory (must not exist yet)")
    p.add_argument("--address", help="a running Ray cluster to use instead of starting one here")
    p.add_argument(
        "--max-growth",
        type=float,
        default=0.10,
        help="largest allowed growth of the median peak memory, last quarter of "
        "the epochs after the KL-only warm-up over the first (default 0.10)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training config override, as for python -m vitcae_ray.train",
    )
    return p


def _check(args: argparse.Namespace) -> str | None:
    if args.minutes <= 0:
        return "--minutes must be > 0"
    if args.kill_every < 1:
        return "--kill-every must be >= 1"
    if Path(args.output).exists():
        return f"--output {args.output} already exists: the soak needs a new run directory"
    if not Path("/proc/self/status").is_file():
        return "the soak reads memory from /proc: run it on Linux"
    return None


def soak(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from .cluster import connect

    out = Path(args.output).resolve()
    if not ray.is_initialized():
        connect(args.address)
    address = ray.get_runtime_context().gcs_address
    cmd = _driver_command(args, out, address)
    out.mkdir(parents=True)
    log = open(out / "soak_driver.log", "w")
    driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    start = time.monotonic()
    try:
        peaks, kills = _watch(args, out, address, driver, start)
    finally:
        _interrupt(driver)
        log.close()
    return _report(args, cmd, out, driver, peaks, kills, time.monotonic() - start)


def _driver_command(args: argparse.Namespace, out: Path, address: str) -> list[str]:
    """``python -m vitcae_ray.train`` on 2 workers, epochs without end, restarts unlimited."""
    return [
        sys.executable,
        "-m",
        "vitcae_ray.train",
        "--address",
        address,
        "--num-workers",
        "2",
        "--epochs",
        "100000",
        "--output",
        str(out),
        "--set",
        "train.max_failures=-1",
        *[f"--set={s}" for s in args.set],
    ]


def _watch(
    args: argparse.Namespace, out: Path, address: str, driver: subprocess.Popen, start: float
) -> tuple[dict[int, dict[str, float]], list[dict[str, Any]]]:
    """Until ``--minutes`` are up or the driver exits: every epoch's peak memory (driver,
    workers) and a worker killed every ``--kill-every`` epochs; returns (peaks, kills)."""
    peaks: dict[int, dict[str, float]] = {}
    kills: list[dict[str, Any]] = []
    pids: list[int] = []
    next_pids = 0.0
    deadline = start + args.minutes * 60
    next_kill = args.kill_every
    last_report = start
    while time.monotonic() < deadline and driver.poll() is None:
        now = time.monotonic()
        if now >= next_pids:
            pids, next_pids = worker_pids(address), now + PIDS_EVERY_S
        done = len(metrics(out))  # the epoch in progress
        peak = peaks.setdefault(done, {"driver_mib": 0.0, "worker_mib": 0.0})
        peak["driver_mib"] = max(peak["driver_mib"], rss_mib(driver.pid) or 0.0)
        peak["worker_mib"] = max([peak["worker_mib"], *(rss_mib(p) or 0.0 for p in pids)])
        if done >= next_kill and pids:
            kills.append(_kill_worker(pids[0], done, now - start))
            next_kill, next_pids = done + args.kill_every, 0.0
        if now - last_report >= 60:
            print(f"[soak] {now - start:6.0f}s: {done} epochs, {len(kills)} kills", flush=True)
            last_report = now
        time.sleep(SAMPLE_S)
    return peaks, kills


def _kill_worker(pid: int, done: int, at_s: float) -> dict[str, Any]:
    """SIGKILL one Ray Train worker; the kill's record."""
    os.kill(pid, signal.SIGKILL)
    print(f"[soak] {at_s:6.0f}s: killed worker pid {pid} after {done} epochs", flush=True)
    return {"after_epochs": done, "pid": pid, "at_s": round(at_s, 1)}


def _interrupt(driver: subprocess.Popen) -> None:
    """SIGINT (as Ctrl-C) to a driver still running; killed if it has not exited in 2 min."""
    if driver.poll() is None:
        driver.send_signal(signal.SIGINT)
        try:
            driver.wait(timeout=120)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()


def _report(
    args: argparse.Namespace,
    cmd: list[str],
    out: Path,
    driver: subprocess.Popen,
    peaks: dict[int, dict[str, float]],
    kills: list[dict[str, Any]],
    wall: float,
) -> dict[str, Any]:
    """What ``soak.json`` holds: the run's epochs, the kills, each finished epoch's peaks."""
    history = metrics(out)
    epochs = [int(m["epoch"]) for m in history]
    complete = [e for e in sorted(peaks) if e < len(history)]  # epochs that finished
    first = warmup_epochs(out)
    driver_peaks = [peaks[e]["driver_mib"] for e in complete if e >= first]
    worker_peaks = [peaks[e]["worker_mib"] for e in complete if e >= first]
    return {
        "command": cmd,
        "minutes": args.minutes,
        "wall_s": round(wall, 1),
        "driver_exit": driver.returncode,
        "epochs": len(history),
        "every_epoch_once": epochs == list(range(len(history))),
        "kills": kills,
        "per_epoch": [{"epoch": e, **{k: round(v, 1) for k, v in peaks[e].items()}} for e in complete],
        "growth_from_epoch": first,
        "driver_growth": growth(driver_peaks),
        "worker_growth": growth(worker_peaks),
        "max_growth": args.max_growth,
    }


def warmup_epochs(out: Path) -> int:
    """The run's KL-only warm-up (``loss.kl_warmup_epochs`` of its ``config.yaml``): the
    epochs before the MMD terms, and their memory, join the step."""
    from .outputs import run_config

    cfg = run_config(str(out))
    return 0 if cfg is None else cfg.loss.kl_warmup_epochs  # None: the driver never wrote one


def table(report: dict[str, Any]) -> str:
    killed = {k["after_epochs"] for k in report["kills"]}
    lines = ["epoch  driver MiB  worker MiB  kill", "-----  ----------  ----------  ----"]
    for row in report["per_epoch"]:
        lines.append(
            f"{row['epoch']:5d}  {row['driver_mib']:10.1f}  {row['worker_mib']:10.1f}  "
            f"{'yes' if row['epoch'] in killed else ''}"
        )
    g = {k: ("n/a" if report[k] is None else f"{report[k]:+.1%}") for k in ("driver_growth", "worker_growth")}
    lines.append(
        f"{report['epochs']} epochs in {report['wall_s'] / 60:.1f} min, "
        f"{len(report['kills'])} workers killed, every epoch once: "
        f"{report['every_epoch_once']}; peak memory growth from epoch "
        f"{report['growth_from_epoch']} on, last quarter over the first: driver "
        f"{g['driver_growth']}, workers {g['worker_growth']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check(args)
    if problem:
        return fail(problem)
    from .config import ConfigError

    try:
        report = soak(args)
    except ConfigError as e:
        return fail(e)
    out = Path(args.output)
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"report: {out / 'soak.json'}; the run: {out} (driver log {out / 'soak_driver.log'})")
    grew = [
        g for g in (report["driver_growth"], report["worker_growth"]) if g is not None and g > args.max_growth
    ]
    ok = report["every_epoch_once"] and report["epochs"] > 0 and report["kills"] and not grew
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
