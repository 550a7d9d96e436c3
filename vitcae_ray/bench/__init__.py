"""``python -m vitcae_ray.bench SUITE``: the project's benchmarks.

Each suite measures its variants side by side, interleaved (rounds in one process, medians
and their spread; run: seed by seed, each run a subprocess). Suites:
  freeze     training-step time and FLOPs with 25-100% of the encoder's heads frozen, per mode
  overhead   what the convergence machinery (CLS readout, probe, controller, actor) costs an epoch
  attention  encoder forward+backward throughput against timm's VisionTransformer
  ray        a one-worker TorchTrainer epoch against the same epoch in-process, and where the gap goes
  run        the freezing benchmark: the quickstart trained through python -m vitcae_ray.train
             with freezing on and off, paired by seed (LONG 60 and SHORT 30 epochs), its
             selected checkpoint evaluated (probe, FID, KID); the targets, met or not (over an
             hour on 2 cores: --resume-existing continues an interrupted one)
  all        every suite above, one after the other

The table goes to stdout, progress to stderr; ``--json OUT`` also writes
``{"suite", "machine", "rows"}``. ``--quick`` shrinks every suite to seconds, run to minutes (CI).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from types import SimpleNamespace
from typing import Any

import torch

from ..config import ConfigError, resolve
from ..data import DataError
from ..errors import fail
from .common import BenchError, progress, write_json

# suite name -> module (imported on use: the attention suite needs timm, the ray suite Ray)
SUITES = {
    "freeze": "freeze",
    "overhead": "overhead",
    "attention": "attention",
    "ray": "ray_epoch",
    "run": "run",
}

# The model and images every suite uses in --quick mode (explicit --set items still win), on
# one torch thread: tensors this small gain nothing from more, and on a busy CI machine a
# multi-threaded op waits for every one of its threads to get a core.
QUICK_SETS = {
    "model.embed_dim": 32,
    "model.depth": 2,
    "model.num_heads": 4,
    "model.dec_dim": 32,
    "model.dec_depth": 1,
    "model.dec_heads": 2,
    "model.prior_hidden": 64,
    "model.patch_size": 4,
    "data.image_size": 16,
    "train.cpus_per_worker": 1.0,
}
QUICK_THREADS = 1

# the suite options a flag may set (a suite's DEFAULTS name those it takes), and the counts
OPTIONS = (
    "rounds",
    "steps",
    "batch_size",
    "epochs",
    "seeds",
    "long_epochs",
    "short_epochs",
    "only",
    "output",
    "resume_existing",
    "doc",
)
COUNTS = ("rounds", "steps", "batch_size", "epochs", "seeds", "long_epochs", "short_epochs")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (from main)
        raise BenchError(message)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = _Parser(
        prog="python -m vitcae_ray.bench",
        description=doc[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(doc[1:]).replace("``", ""),
    )
    p.add_argument("suite", help=f"one of {', '.join(SUITES)}, all")
    p.add_argument(
        "--config",
        help="YAML preset (default: the suite's; the quickstart "
        "configs/digits_tiny.yaml for overhead, ray; the built-in defaults, which are the "
        "quickstart, for run)",
    )
    p.add_argument("--preset", help="model.preset: tiny, small")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: seconds (CI)")
    p.add_argument("--gpu", action="store_true", help="run on the GPU (bf16 autocast)")
    p.add_argument("--json", metavar="OUT", help="also write the results to this file")
    p.add_argument("--rounds", type=int, help="interleaved rounds (medians over rounds)")
    p.add_argument(
        "--steps",
        type=int,
        help="steps per variant per round (freeze, attention); "
        "training steps per epoch (overhead; default the whole epoch)",
    )
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--epochs", type=int, help="epochs per run (ray)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1, each arm per seed (run; default 3)")
    p.add_argument("--long-epochs", type=int, help="epochs of the LONG configuration (run; default 60)")
    p.add_argument("--short-epochs", type=int, help="epochs of the SHORT configuration (run; default 30)")
    p.add_argument("--only", help="run one configuration: long or short (run; default both)")
    p.add_argument(
        "--output",
        help="directory for the runs (ray: default a temporary directory, removed afterwards; "
        "run: default a new temporary directory, kept and printed)",
    )
    p.add_argument(
        "--resume-existing",
        action="store_true",
        default=None,
        help="skip the runs of --output that are complete and evaluated, continue the rest (run)",
    )
    p.add_argument(
        "--doc",
        metavar="PATH",
        help="also write the table into PATH between its <!-- bench-run:start --> and "
        "<!-- bench-run:end --> lines (run)",
    )
    return p


def suite_module(name: str):
    return importlib.import_module(f"{__name__}.{SUITES[name]}")


def options(args: argparse.Namespace, mod, strict: bool = True) -> SimpleNamespace:
    """The suite's defaults (``QUICK`` with --quick), overridden by the flags given; with
    ``strict`` a flag the suite does not take is an error (``all`` passes each suite its own)."""
    opts = dict(mod.DEFAULTS)
    if args.quick:
        opts.update(mod.QUICK)
    for key in OPTIONS:
        value = getattr(args, key)
        flag = f"--{key.replace('_', '-')}"
        if value is None:
            continue
        if key not in mod.DEFAULTS:
            if strict:
                raise BenchError(f"{flag} does not apply to the {mod.NAME} suite")
            continue
        if key == "output" and not strict:  # all: a directory of its own for each suite
            value = os.path.join(value, mod.NAME)
        elif key in COUNTS and value < 1:
            raise BenchError(f"{flag} must be >= 1, got {value}")
        opts[key] = value
    device = torch.device("cuda" if args.gpu else "cpu")
    return SimpleNamespace(**opts, quick=args.quick, device=device, config_argv=config_argv(args, mod))


def config_flags(args: argparse.Namespace, mod) -> dict[str, Any]:
    """The config keys the bench sets: the --quick sizes, the suite's --quick settings, --preset."""
    flags: dict[str, Any] = dict(QUICK_SETS) if args.quick else {}
    flags.update(getattr(mod, "QUICK_SETS", {}) if args.quick else {})
    if args.preset is not None:
        flags["model.preset"] = args.preset
    return flags


def config_for(args: argparse.Namespace, mod):
    return resolve(args.config or mod.DEFAULT_CONFIG, config_flags(args, mod), args.set)


def config_argv(args: argparse.Namespace, mod) -> list[str]:
    """The same config as arguments of ``python -m vitcae_ray.train`` (the run suite trains
    through it): ``--config`` when one was given, then ``--set`` items in precedence order."""
    argv = ["--config", args.config] if args.config else []
    items = [f"{k}={json.dumps(v)}" for k, v in config_flags(args, mod).items()] + list(args.set)
    return argv + [x for item in items for x in ("--set", item)]


def run_suite(name: str, args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    mod = suite_module(name)
    opts = options(args, mod, strict=args.suite != "all")
    cfg = config_for(args, mod)
    progress(mod.__doc__.splitlines()[0])
    threads = torch.get_num_threads()
    if args.quick:
        torch.set_num_threads(QUICK_THREADS)
    try:
        rows = mod.run(cfg, opts)
    finally:
        torch.set_num_threads(threads)
    print(f"{name}: {mod.SUMMARY}")
    print(mod.render(rows) + "\n", flush=True)
    if getattr(opts, "doc", None):
        mod.write_doc(opts.doc, rows, argv)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.suite not in (*SUITES, "all"):
            raise BenchError(f"unknown suite {args.suite!r}: choose one of {', '.join(SUITES)}, all")
        if args.gpu and not torch.cuda.is_available():
            raise BenchError("--gpu given but no CUDA device is visible: drop --gpu")
        names = list(SUITES) if args.suite == "all" else [args.suite]
        for name in names:  # check every suite's input before the first (long) one starts
            mod = suite_module(name)
            cfg, opts = config_for(args, mod), options(args, mod, strict=args.suite != "all")
            if hasattr(mod, "check"):
                mod.check(cfg, opts)
        rows: list[dict[str, Any]] = []
        for name in names:
            suite_rows = run_suite(name, args, argv)
            rows += [{"suite": name, **r} for r in suite_rows] if args.suite == "all" else suite_rows
    except (BenchError, ConfigError, DataError) as e:
        return fail(e, getattr(e, "code", 2))
    if args.json:
        write_json(args.json, args.suite, rows, argv)
    return 0
