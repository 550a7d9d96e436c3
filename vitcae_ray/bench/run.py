"""run: the freezing benchmark a user runs: the quickstart trained with freezing on and off.

Two configurations of the quickstart (the built-in defaults, ``configs/digits_tiny.yaml``):
LONG (``--long-epochs``, 60) and SHORT (``--short-epochs``, 30). For each, every seed
0..N-1 trains two arms through the training command a user runs, each a subprocess in a run
directory of its own: ``on`` is ``python -m vitcae_ray.train --epochs E --seed S --output DIR``
and ``off`` the same plus ``--set freeze.enabled=false`` (both with ``train.eval_every=0`` and
``train.log_images=false``); the arm that goes first alternates seed by seed. Each run's
selected checkpoint (by its ``train.select_metric``) is then evaluated by
``python -m vitcae_ray.evaluate --tasks probe,sample``.

From each run's ``metrics.jsonl``: training FLOPs (the sum of ``flops/epoch``), training time
(the sum of ``time/epoch_s``), the selected epoch and its ``val/mse``, and the last epoch's
``flops/cumulative_saved_frac``; from the evaluation: the cross-validated probe accuracy and the
samples' FID and KID. Per configuration, paired by seed (on / off): the mean of the per-seed
ratios (FLOPs, val/mse, FID, KID), the median of the per-seed time ratios, the mean per-seed
probe difference in points; beside each, the off arm's seed-to-seed spread; and the targets.
Beside the time, a machine-drift control: per seed, the on / off training-step time over the
epochs before the on arm's first frozen head, where both arms do the same work.
"""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .. import filesystem
from ..config import Config
from ..outputs import METRICS_FILE, select_metric_of
from .common import BenchError, machine_info, progress, round_orders, table

NAME = "run"
SUMMARY = (
    "the quickstart trained with freezing on and off through python -m vitcae_ray.train, "
    "paired by seed; ratios are on / off"
)
DEFAULT_CONFIG = None  # the built-in defaults are the quickstart (configs/digits_tiny.yaml)
DEFAULTS = {
    "seeds": 3,
    "long_epochs": 60,
    "short_epochs": 30,
    "only": None,
    "output": None,
    "doc": None,
    "resume_existing": False,
}
# --quick: a head's first freeze decision comes after its second epoch (its first drift
# reading), so LONG has 3 epochs, one of them trained with the heads frozen.
QUICK = {"seeds": 1, "long_epochs": 3, "short_epochs": 1}
# --quick: every head freezes at its first drift reading; the runs train in Ray Train's local
# mode (no Ray to start: seconds instead of half a minute per run).
QUICK_SETS = {
    "train.num_workers": 0,
    "freeze.min_epoch": 0,
    "freeze.patience": 1,
    "freeze.kappa_window": 1,
    "freeze.drift_ratio": 1e6,
}

CONFIGS = ("long", "short")
ARMS = ("on", "off")
ARM_SETS = {"on": [], "off": ["freeze.enabled=false"]}
# set by the bench for every run (the bench evaluates the selected checkpoint itself)
RUN_SETS = ["train.eval_every=0", "train.log_images=false"]
# keys the bench sets per run: a --set of one of them would silently override the protocol
BENCH_KEYS = ("train.epochs", "train.seed", "train.output", "freeze.enabled")
EVAL_TASKS = "probe,sample"
EVAL_DIR, EVAL_FILE = "eval", "metrics.json"
RECORD_FILE = "bench_run.json"  # the bench's own record in each run directory: command, wall times
TAIL_LINES = 5  # the failed run's last output lines, in the error

# The targets. Ratios are on / off, paired by seed; the probe is on - off in points.
TIME_BOUNDS = {"long": 0.88, "short": 1.02}
FLOPS_BOUNDS = {"long": 0.85, "short": 1.00}
QUALITY_BOUNDS = {
    "val_mse": 1.03,
    "probe_acc": -1.0,
    "fid": 1.10,
    "kid": 1.10,
    "fid_normal": 1.10,
    "kid_normal": 1.10,
}
HONEST_TOLERANCE = 0.005  # claimed vs measured FLOPs saving, per seed (0.5 percentage points)


class RunFailed(BenchError):
    """A training or evaluation subprocess failed (exit code 1, not bad input)."""

    code = 1


# --- reading a run ---------------------------------------------------------------------------


def read_history(text: str) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, one per epoch in epoch order; where a resumed run
    repeated an epoch, its last record. A torn last line (a killed writer) is skipped."""
    by_epoch: dict[int, dict[str, Any]] = {}
    lines = [x for x in text.splitlines() if x.strip()]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def training_record(history: list[dict[str, Any]], select_metric: str) -> dict[str, Any]:
    """What the bench takes from one run's history: training FLOPs and time (summed over
    epochs), the selected epoch (minimising ``select_metric``) and its val/mse, and the last
    epoch's FLOPs saving and frozen heads/blocks, the prefix cache's peak memory (None where a
    key is absent)."""
    if not history:
        raise BenchError("the run wrote no metrics")
    scored = [m for m in history if _finite(m.get(select_metric)) is not None]
    best = min(scored, key=lambda m: m[select_metric]) if scored else None
    last = history[-1]
    return {
        "epochs_run": len(history),
        "flops": sum(m["flops/epoch"] for m in history),
        "train_s": sum(m["time/epoch_s"] for m in history),
        "select_metric": select_metric,
        "selected_epoch": None if best is None else int(best["epoch"]),
        "selected_value": None if best is None else _finite(best[select_metric]),
        "val_mse": None if best is None else _finite(best.get("val/mse")),
        "flops_saved_frac": _finite(last.get("flops/cumulative_saved_frac")),
        "heads_frozen": last.get("heads/frozen"),
        "heads_newly_frozen": last.get("heads/newly_frozen"),
        "heads_total": last.get("heads/total"),
        "blocks_frozen": last.get("blocks/frozen"),
        "cache_mb": max((m.get("cache/mb") or 0.0 for m in history), default=0.0),
        # the machine-drift control: training-step seconds per epoch, and the first epoch
        # that trained with a head frozen (before it both arms do the same work)
        "steps_s": [_finite(m.get("time/train_steps_s")) for m in history],
        "first_freeze_epoch": next(
            (i for i, m in enumerate(history) if (m.get("heads/frozen") or 0) > 0), None
        ),
    }


def evaluation_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's figures: the primary representation's cross-validated probe accuracy
    (mean over folds), and the FID and KID of samples in the cached feature space, both of
    ``generate``'s default sampler (the model's own z_cls mixture; N(0, I) for a model without
    one) and of z_cls ~ N(0, I)."""
    normal = {k: _finite(metrics.get(f"sample/{k}")) for k in ("fid", "kid")}
    default = {k: _finite(metrics.get(f"sample/mixture/{k}", metrics.get(f"sample/{k}"))) for k in normal}
    return {
        "probe_acc": _finite(metrics.get("probe/acc")),
        **default,
        **{f"{k}_normal": v for k, v in normal.items()},
    }


# --- statistics and targets ------------------------------------------------------------------


def _ratio(on: float | None, off: float | None) -> float | None:
    return on / off if on is not None and off is not None and off > 0 else None


def _cv(values: Sequence[float | None]) -> float | None:
    """Coefficient of variation (sample std / mean); None for fewer than 2 values."""
    v = [x for x in values if x is not None]
    if len(v) < 2 or len(v) != len(values) or statistics.fmean(v) == 0:
        return None
    return statistics.stdev(v) / abs(statistics.fmean(v))


def _std(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.stdev(v) if len(v) >= 2 and len(v) == len(values) else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# figure key -> (label, how the per-seed values combine); "diff" is on - off in points
FIGURES = {
    "flops": ("training FLOPs", "mean"),
    "train_s": ("training time", "median"),
    "val_mse": ("val/mse, selected checkpoint", "mean"),
    "probe_acc": ("probe accuracy, 5-fold CV", "diff"),
    "fid": ("FID of samples (generate's default)", "mean"),
    "kid": ("KID of samples (generate's default)", "mean"),
    "fid_normal": ("FID of samples, z_cls ~ N(0, I)", "mean"),
    "kid_normal": ("KID of samples, z_cls ~ N(0, I)", "mean"),
}


def bounds(config: str) -> dict[str, tuple[str, float]]:
    """figure -> (comparison, bound) of the configuration's targets."""
    return {
        "flops": ("<=", FLOPS_BOUNDS[config]),
        "train_s": ("<=", TIME_BOUNDS[config]),
        **{k: (">=" if k == "probe_acc" else "<=", b) for k, b in QUALITY_BOUNDS.items()},
    }


def _met(value: float | None, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value <= bound if op == "<=" else value >= bound


def figure_row(key: str, on: list[dict], off: list[dict], op: str, bound: float) -> dict[str, Any]:
    """One figure of one configuration: ``on``/``off`` are the arms' records in seed order."""
    label, how = FIGURES[key]
    n = len(on)
    if how == "diff":
        per_seed = [
            None if a[key] is None or b[key] is None else 100.0 * (a[key] - b[key]) for a, b in zip(on, off)
        ]
        statistic = f"mean of {_plural(n, 'per-seed difference')} (on - off), points"
        std = _std([b[key] for b in off])
        off_spread = {"kind": "std_points", "value": None if std is None else 100.0 * std}
    else:
        per_seed = [_ratio(a[key], b[key]) for a, b in zip(on, off)]
        noun = _plural(n, "per-seed ratio")
        statistic = f"median of {noun} (min-max)" if how == "median" else f"mean of {noun}"
        off_spread = {"kind": "cv", "value": _cv([b[key] for b in off])}
    known = None if any(v is None for v in per_seed) else per_seed
    if known is None:
        value = None
    elif how == "median":
        value = statistics.median(known)
    else:
        value = statistics.fmean(known)
    return {
        "kind": "target",
        "figure": key,
        "label": label,
        "value": value,
        "statistic": statistic,
        "per_seed": per_seed,
        "min": min(known) if known else None,
        "max": max(known) if known else None,
        "off_spread": off_spread,
        "op": op,
        "bound": bound,
        "met": _met(value, op, bound),
    }


def honest_row(on: list[dict], off: list[dict]) -> dict[str, Any]:
    """The on arm's claimed saving (its last ``flops/cumulative_saved_frac``) against the
    measured one, 1 - on FLOPs / off FLOPs of the same seed: equal within 0.5 points, per seed."""
    claimed = [a["flops_saved_frac"] for a in on]
    measured = [1.0 - a["flops"] / b["flops"] for a, b in zip(on, off)]
    gaps = [None if c is None else abs(c - m) for c, m in zip(claimed, measured)]
    worst = None if any(g is None for g in gaps) else max(gaps)
    return {
        "kind": "target",
        "figure": "flops_saving_claimed",
        "label": "claimed FLOPs saving = 1 - on/off FLOPs",
        "value": worst,
        "statistic": "largest per-seed |claimed - measured|",
        "claimed": claimed,
        "measured": measured,
        "per_seed": gaps,
        "op": "<=",
        "bound": HONEST_TOLERANCE,
        "met": _met(worst, "<=", HONEST_TOLERANCE),
    }


def drift_control(on: dict, off: dict) -> tuple[int, float | None]:
    """(n, on/off training-step seconds over the first n epochs): n the epochs the on arm
    trained before its first frozen head, where both arms do the same work, so the ratio
    measures the machine, not freezing (1.00 on a steady machine); None without timings."""
    a, b = on.get("steps_s") or [], off.get("steps_s") or []
    first = on.get("first_freeze_epoch")
    n = min(len(a), len(b)) if first is None else min(first, len(a), len(b))
    if n == 0 or any(v is None for v in a[:n] + b[:n]) or sum(b[:n]) <= 0:
        return n, None
    return n, sum(a[:n]) / sum(b[:n])


def summarize(config: str, epochs: int, seeds: list[int], runs: dict[tuple[int, str], dict]) -> list[dict]:
    """The target rows of one configuration from its runs, ``(seed, arm) -> record``."""
    on = [runs[s, "on"] for s in seeds]
    off = [runs[s, "off"] for s in seeds]
    rows = [figure_row(k, on, off, *bounds(config)[k]) for k in FIGURES]
    rows.append(honest_row(on, off))

    def total(arm: list[dict], key: str) -> float | None:
        v = [r.get(key) for r in arm]
        return None if any(x is None for x in v) else sum(v)

    time_row = next(r for r in rows if r["figure"] == "train_s")
    time_row["sum_s"] = {
        "on_train": total(on, "train_s"),
        "off_train": total(off, "train_s"),
        "on_wall": total(on, "wall_s"),
        "off_wall": total(off, "wall_s"),
    }
    time_row["drift_control"] = [drift_control(a, b) for a, b in zip(on, off)]
    common = {"config": config, "epochs": epochs, "seeds": len(seeds)}
    return [{**common, **r} for r in rows]


# --- the doc ---------------------------------------------------------------------------------

DOC_START, DOC_END = "<!-- bench-run:start -->", "<!-- bench-run:end -->"


def check_doc(path: str) -> str:
    """The doc's text; BenchError unless it has the two markers, in order, once each."""
    fix = f"add a line {DOC_START} and a line {DOC_END} where the table goes"
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BenchError(
            f"--doc {path}: {e.strerror or type(e).__name__}: pass an existing markdown file"
        ) from None
    starts, ends = text.count(DOC_START), text.count(DOC_END)
    if starts != 1 or ends != 1 or text.index(DOC_START) > text.index(DOC_END):
        raise BenchError(f"--doc {path} has no single {DOC_START} ... {DOC_END} pair: {fix}")
    return text


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block`` (markers kept)."""
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    return f"{head}{DOC_START}\n{block.strip()}\n{DOC_END}{tail}"


def doc_block(rows: list[dict], argv: Sequence[str]) -> str:
    m = machine_info(argv)
    gpu = f", {m['gpu']}" if m["gpu"] else ""
    return (
        f"`{m['command']}` on {m['cpu']} ({m['cores']} cores{gpu}), torch {m['torch']}, "
        f"Ray {m['ray']}, {m['date']}:\n\n```text\n{render(rows)}\n```"
    )


def write_doc(path: str, rows: list[dict], argv: Sequence[str]) -> None:
    text = replace_between_markers(check_doc(path), doc_block(rows, argv))
    filesystem.atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    progress(f"wrote the table into {path}")


# --- running the arms ------------------------------------------------------------------------


def check(cfg: Config, opts: SimpleNamespace) -> None:
    """BenchError for bad options, before the first run starts."""
    if opts.only is not None and opts.only not in CONFIGS:
        raise BenchError(f"unknown --only {opts.only!r}: choose long or short")
    argv = opts.config_argv
    for key in (argv[i + 1].split("=", 1)[0].strip() for i, x in enumerate(argv) if x == "--set"):
        if key in BENCH_KEYS:
            raise BenchError(
                f"--set {key}: the run suite sets it per run; use --long-epochs, --short-epochs, "
                "--seeds, --output"
            )
    out = opts.output
    if out and not opts.resume_existing and os.path.isdir(out) and os.listdir(out):
        raise BenchError(f"--output {out!r} is not empty: pass a new directory, or --resume-existing")
    if opts.doc:
        check_doc(opts.doc)


def configurations(opts: SimpleNamespace) -> list[tuple[str, int]]:
    epochs = {"long": opts.long_epochs, "short": opts.short_epochs}
    return [(c, epochs[c]) for c in CONFIGS if opts.only in (None, c)]


def train_command(opts: SimpleNamespace, arm: str, epochs: int, seed: int, run_dir: str) -> list[str]:
    """The arm's training command: what a user runs, plus the bench's own settings."""
    sets = [*RUN_SETS, *ARM_SETS[arm]]
    return [
        sys.executable,
        "-m",
        "vitcae_ray.train",
        *opts.config_argv,
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--output",
        run_dir,
        *(["--gpu"] if opts.device.type == "cuda" else []),
        *[x for s in sets for x in ("--set", s)],
    ]


def eval_command(opts: SimpleNamespace, seed: int, run_dir: str) -> list[str]:
    """The evaluation of the run's selected checkpoint; both arms of a seed use the same
    evaluation seed (folds, samples)."""
    return [
        sys.executable,
        "-m",
        "vitcae_ray.evaluate",
        "--model",
        run_dir,
        "--out",
        os.path.join(run_dir, EVAL_DIR),
        "--tasks",
        EVAL_TASKS,
        "--seed",
        str(seed),
        *(["--gpu"] if opts.device.type == "cuda" else []),
    ]


def stream(cmd: list[str], prefix: str, sink: Callable[[str], None] = progress) -> float:
    """Run ``cmd``, its output line by line to ``sink`` prefixed; the seconds it took, start
    to exit. RunFailed (with its last lines) when it exits non-zero."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line.strip():
                tail.append(line.strip())
                sink(f"[{prefix}] {line}")
        rc = proc.wait()
    except BaseException:
        if proc.poll() is None:  # interrupted: the child (and its Ray) stop too
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RunFailed(f"{prefix} exited with {rc}; its last lines: {' | '.join(tail) or '(none)'}")
    return wall


def _read_json(path: str) -> dict | None:
    text = filesystem.read_text(path)
    return json.loads(text) if text else None


def _complete(run_dir: str, epochs: int) -> list[dict] | None:
    """The run's history when it has every epoch 0..epochs-1, else None."""
    text = filesystem.read_text(os.path.join(run_dir, METRICS_FILE))
    history = read_history(text) if text else []
    return history if [int(m["epoch"]) for m in history] == list(range(epochs)) else None


def one_arm(opts: SimpleNamespace, config: str, epochs: int, seed: int, arm: str, root: str) -> dict:
    """Train (unless ``--resume-existing`` finds the run complete) and evaluate one arm; its
    record. ``RUN_DIR/bench_run.json`` keeps the command and the wall times."""
    run_dir = os.path.join(root, f"{config}-{epochs}ep", f"seed{seed}-{arm}")
    name = f"{config} seed {seed} {arm}"
    cmd = train_command(opts, arm, epochs, seed, run_dir)
    record_path = os.path.join(run_dir, RECORD_FILE)
    saved = (_read_json(record_path) or {}) if opts.resume_existing else {}
    if saved.get("command") not in (None, cmd[1:]):
        raise BenchError(
            f"{run_dir} holds a run of another command ({' '.join(saved['command'])}): "
            "pass another --output, or the same flags"
        )
    history = _complete(run_dir, epochs) if opts.resume_existing else None
    trained = history is None
    if trained:
        resumed = os.path.isfile(os.path.join(run_dir, METRICS_FILE))
        progress(f"{name}: training ({'resuming ' if resumed else ''}{epochs} epochs) in {run_dir}")
        os.makedirs(run_dir, exist_ok=True)
        wall = stream(cmd, name)
        saved = {"command": cmd[1:], "train_wall_s": wall, "resumed": resumed}
        filesystem.atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(saved) + "\n"))
        history = _complete(run_dir, epochs)
        if history is None:
            raise RunFailed(f"{name}: {run_dir}/{METRICS_FILE} does not have the {epochs} epochs asked for")
        progress(f"{name}: trained in {wall:.0f}s (the whole command)")
    else:
        progress(f"{name}: {run_dir} is complete, not trained again (--resume-existing)")
    eval_path = os.path.join(run_dir, EVAL_DIR, EVAL_FILE)
    metrics = None if trained else _read_json(eval_path)
    if metrics is None:
        saved["eval_wall_s"] = stream(eval_command(opts, seed, run_dir), f"{name} eval")
        filesystem.atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(saved) + "\n"))
        metrics = _read_json(eval_path)
        if metrics is None:
            raise RunFailed(f"{name}: the evaluation wrote no {eval_path}")
        progress(f"{name}: evaluated in {saved['eval_wall_s']:.0f}s")
    return {
        "kind": "run",
        "config": config,
        "epochs": epochs,
        "seed": seed,
        "arm": arm,
        **training_record(history, select_metric_of(run_dir)),
        **evaluation_record(metrics),
        "wall_s": saved.get("train_wall_s"),
        "eval_wall_s": saved.get("eval_wall_s"),
        "resumed": saved.get("resumed", False),
        "run_dir": run_dir,
    }


def run(cfg: Config, opts: SimpleNamespace) -> list[dict]:
    check(cfg, opts)
    root = opts.output or tempfile.mkdtemp(prefix="vitcae_bench_run_")
    os.makedirs(root, exist_ok=True)
    progress(f"the runs go to {root} (tensorboard --logdir {root})")
    seeds = list(range(opts.seeds))
    rows: list[dict] = []
    for config, epochs in configurations(opts):
        runs: dict[tuple[int, str], dict] = {}
        for r, order in round_orders(list(ARMS), len(seeds)):
            for arm in order:
                runs[seeds[r], arm] = one_arm(opts, config, epochs, seeds[r], arm, root)
        rows += [runs[s, a] for s in seeds for a in ARMS]
        rows += summarize(config, epochs, seeds, runs)
    progress(f"the runs are in {root}")
    return rows


# --- the table -------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _value(r: dict) -> str:
    if r["figure"] == "flops_saving_claimed":
        return _fmt(None if r["value"] is None else 100 * r["value"], ".2f") + " pt"
    if r["figure"] == "probe_acc":
        return _fmt(r["value"], "+.2f") + " pt"
    return _fmt(r["value"], ".3f")


def _statistic(r: dict) -> str:
    if r["figure"] == "train_s" and r["min"] is not None:
        return f"{r['statistic'].replace(' (min-max)', '')} ({r['min']:.3f}-{r['max']:.3f})"
    return r["statistic"]


def _spread(r: dict) -> str:
    s = r.get("off_spread")
    if s is None:
        return ""
    if s["value"] is None:  # one seed: no spread
        return "-"
    if s["kind"] == "cv":
        return f"CV {_fmt(None if s['value'] is None else 100 * s['value'], '.1f')}%"
    return f"std {_fmt(s['value'], '.2f')} pt"


def _target(r: dict) -> str:
    if r["figure"] == "flops_saving_claimed":
        return f"{r['op']} {100 * r['bound']:.1f} pt"
    if r["figure"] == "probe_acc":
        return f"{r['op']} {r['bound']:+.1f} pt"
    return f"{r['op']} {r['bound']:.2f}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "NOT met"


def render(rows: list[dict]) -> str:
    blocks = []
    runs = [r for r in rows if r["kind"] == "run"]
    for config in CONFIGS:
        targets = [r for r in rows if r["kind"] == "target" and r["config"] == config]
        if not targets:
            continue
        t = targets[0]
        seeds = sorted({r["seed"] for r in runs if r["config"] == config})
        head = (
            f"{config.upper()}: {_plural(t['epochs'], 'epoch')}, seeds {', '.join(map(str, seeds))}; "
            "on / off paired by seed; spread: the off arm's seed to seed"
        )
        shown = [
            {
                "label": r["label"],
                "value": _value(r),
                "statistic": _statistic(r),
                "spread": _spread(r),
                "target": _target(r),
                "verdict": _verdict(r["met"]),
            }
            for r in targets
        ]
        lines = [
            head,
            table(
                shown,
                [
                    ("label", "figure", str),
                    ("value", "value", str),
                    ("statistic", "statistic", str),
                    ("spread", "off spread", str),
                    ("target", "target", str),
                    ("verdict", "", str),
                ],
                left=("statistic", "spread", "target", "verdict"),
            ),
        ]
        honest = next(r for r in targets if r["figure"] == "flops_saving_claimed")
        pairs = ", ".join(
            f"seed {s} {_fmt(None if c is None else 100 * c, '.2f')}% vs {100 * m:.2f}%"
            for s, c, m in zip(seeds, honest["claimed"], honest["measured"])
        )
        lines.append(
            "FLOPs saving, claimed (the on arm's last flops/cumulative_saved_frac) vs measured "
            f"(1 - on/off FLOPs): {pairs}"
        )
        time_row = next(r for r in targets if r["figure"] == "train_s")
        s = time_row["sum_s"]
        lines.append(
            f"seconds summed over seeds, on / off: training (sum of time/epoch_s) "
            f"{_fmt(s['on_train'], '.1f')} / {_fmt(s['off_train'], '.1f')}; the whole command, "
            f"start-up included {_fmt(s['on_wall'], '.1f')} / {_fmt(s['off_wall'], '.1f')}"
        )
        control = ", ".join(
            f"seed {seed} -" if c is None else f"seed {seed} {c:.3f} (epochs 1-{n})"
            for seed, (n, c) in zip(seeds, time_row["drift_control"])
        )
        lines.append(
            "machine drift, on / off training-step time over the epochs before the on arm's "
            f"first frozen head (the same work in both arms; 1.000 on a steady machine): {control}"
        )
        met = sum(r["met"] is True for r in targets)
        lines.append(f"{config.upper()} targets met: {met}/{len(targets)}")
        blocks.append("\n".join(lines))
    per_run = [
        {
            **r,
            "selected": None if r["selected_epoch"] is None else r["selected_epoch"] + 1,
            "frozen": None
            if r["heads_frozen"] is None
            else f"{r['heads_frozen']}+{r['heads_newly_frozen'] or 0}/{r['heads_total']}",
        }
        for r in runs
    ]
    blocks.append(
        "every run (selected = the epoch, from 1, minimising its train.select_metric; "
        "heads frozen: trained frozen in the last epoch + frozen after it / total)\n"
        + table(
            per_run,
            [
                ("config", "config", str),
                ("seed", "seed", str),
                ("arm", "arm", str),
                ("epochs_run", "epochs", str),
                ("flops", "TFLOPs", lambda v: f"{v / 1e12:.3f}"),
                ("train_s", "train s", lambda v: f"{v:.1f}"),
                ("wall_s", "command s", lambda v: f"{v:.1f}"),
                ("selected", "selected", str),
                ("val_mse", "val/mse", lambda v: f"{v:.5f}"),
                ("probe_acc", "probe", lambda v: f"{v:.1%}"),
                ("fid", "FID", lambda v: f"{v:.2f}"),
                ("kid", "KID", lambda v: f"{v:.4f}"),
                ("fid_normal", "FID N(0, I)", lambda v: f"{v:.2f}"),
                ("flops_saved_frac", "saved", lambda v: f"{v:.1%}"),
                ("frozen", "heads frozen", str),
                ("blocks_frozen", "blocks frozen", str),
                ("cache_mb", "prefix cache MiB", lambda v: f"{v:.1f}"),
            ],
        )
    )
    return "\n\n".join(blocks)
