"""What every suite shares: interleaved timing, ratio statistics, the machine description, the
table on stdout and the JSON file.

A suite measures its variants side by side in one process. Each round runs every variant once
(the order reversed every other round, so no variant always goes first), and a ratio is taken
per round against the baseline measured in that same round: machine noise that lasts longer
than a round hits both sides of a ratio alike. Reported: the median and the spread (min, quartiles,
max) of the per-round ratios.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..filesystem import atomic_write


class BenchError(ValueError):
    """Bad input to a suite; the message is one line, ``code`` the command's exit code."""

    code = 2


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def training_output():
    """While a suite trains: the trainer's progress lines go to stderr (stdout holds the
    table), and Ray Train's local mode does not log every report's metrics at INFO."""
    logger = logging.getLogger("ray.train")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)


def round_orders(variants: Sequence[Any], rounds: int) -> Iterable[tuple[int, list[Any]]]:
    """``(round, variants in this round's order)``: forward on even rounds, reversed on odd."""
    for i in range(rounds):
        yield i, list(variants) if i % 2 == 0 else list(reversed(variants))


def interleave(
    variants: Sequence[Any],
    measure: Callable[[Any], float],
    rounds: int,
    warmup: Callable[[Any], None] | None = None,
) -> list[list[float]]:
    """Run ``measure(variant)`` once per variant per round, interleaved; returns per variant
    the list of its per-round values (index = round)."""
    if warmup is not None:
        for v in variants:
            warmup(v)
    index = {id(v): i for i, v in enumerate(variants)}
    values: list[list[float]] = [[math.nan] * rounds for _ in variants]
    for r, order in round_orders(variants, rounds):
        for v in order:
            values[index[id(v)]][r] = measure(v)
        progress(f"round {r + 1}/{rounds}")
    return values


def timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds ``fn()`` takes, with the device synchronised on both ends."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def device_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); every one equals the value when there is only one."""
    v = sorted(values)
    if len(v) == 1:
        return v[0], v[0], v[0]
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q1, q2, q3


def spread(values: Sequence[float]) -> dict[str, float]:
    """min, q1, q3, max of per-round values (the median is reported beside it)."""
    q1, _, q3 = quartiles(values)
    return {"min": min(values), "q1": q1, "q3": q3, "max": max(values)}


def ratio_stats(values: Sequence[float], base: Sequence[float]) -> tuple[float, dict[str, float]]:
    """The median of the per-round ratios ``values[r] / base[r]`` and their spread (what the
    tables label them: a ratio of two medians would pair rounds that ran apart)."""
    per_round = [a / b for a, b in zip(values, base)]
    return statistics.median(per_round), spread(per_round)


def fmt_spread(s: dict[str, float], digits: int = 3) -> str:
    return f"[{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


SETTLE_S = 10.0  # after Ray starts, its processes' own start-up work (seconds of CPU) is over


def start_ray(settle: bool = True) -> None:
    """A local Ray, started as the trainer starts one; with ``settle``, nothing is timed until
    its processes have finished starting up."""
    import ray

    progress("starting a local Ray")
    ray.init()
    if settle:
        time.sleep(SETTLE_S)


# --- machine and output --------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(argv: Sequence[str]) -> dict[str, Any]:
    from ..cluster import local_cpus

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover - a dependency
        ray_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": local_cpus(),
        "gpu": gpu,
        "torch": torch.__version__,
        "ray": ray_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "vitcae_ray.bench", *argv]),
    }


def write_json(path: str, suite: str, rows: list[dict[str, Any]], argv: Sequence[str]) -> None:
    """``{"suite", "machine", "rows"}``, written atomically."""
    doc = {"suite": suite, "machine": machine_info(argv), "rows": rows}
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


Column = tuple[str, str, Callable[[Any], str]]  # (row key, header, formatter)


def table(rows: list[dict[str, Any]], columns: Sequence[Column], left: Sequence[str] = ()) -> str:
    """A fixed-width text table of ``rows``; a missing value prints as ``-``. The first column
    and the columns whose row key is in ``left`` are left-aligned, the others right-aligned."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else f(r[k]) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lefts = [i == 0 or k in left for i, (k, _, _) in enumerate(columns)]
    lines = []
    for j, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if is_left else c.rjust(w) for c, w, is_left in zip(row, widths, lefts)
            ).rstrip()
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pct(v: float) -> str:
    return f"{v:.1%}"


def num(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"
