"""``python -m vitcae_ray.export``: the best checkpoint(s) of a Tune experiment as standalone
model directories that ``vitcae_ray.load_pretrained`` reads without Ray or the experiment.

The best trial comes from the experiment's ``results.parquet`` (``best/<metric>``), or
``--trial``; within it, the surviving checkpoint whose epoch has the best metric in the run's
``metrics.jsonl`` (ties: the later epoch). The trial's checkpoints are those in Ray Train's
record of its run (``ray.train.Result.from_path``) that are complete; a run without a record
(Ray Train's local mode) has those found in its folder. A model directory holds ``config.yaml``,
``hparams.json``, ``metrics.json``, ``frozen_heads.json`` and ``model.pt``. Local directories
are written under a temporary name and renamed into place; on other filesystems ``model.pt``
is written last, so a directory without it is an interrupted export.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

from . import checkpoints, filesystem
from .checkpoints import DIR_PREFIX as CHECKPOINT_PREFIX
from .config import SELECT_METRIC, Config
from .errors import fail, first_line
from .filesystem import FileType, join
from .outputs import CONFIG_FILE, METRICS_FILE, RESULTS_CSV, RESULTS_FILE, TRIALS_DIR


class ExportError(ValueError):
    """A one-line reason the export cannot be made; nothing has been written."""


@dataclass(frozen=True)
class Choice:
    """One trial's checkpoint to export."""

    trial_id: str
    row: dict[str, Any]
    checkpoint: str  # checkpoint directory, local path or URI
    epoch: int
    value: float  # the metric at that epoch
    metrics: dict[str, Any] | None  # that epoch's line of metrics.jsonl
    metric: str = SELECT_METRIC  # the metric it was ranked by


def _uri_errors(fn):
    """A path that names no filesystem (:class:`~vitcae_ray.filesystem.FileSystemError`)
    becomes an :class:`ExportError`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except filesystem.FileSystemError as e:
            raise ExportError(str(e)) from None

    return wrapper


# --- choosing -------------------------------------------------------------------------------


def read_results(experiment: str) -> list[dict[str, Any]]:
    """The experiment's results table, one dict per trial (``results.csv`` if there is no
    Parquet file)."""
    import pyarrow as pa

    if filesystem.kind(experiment) != FileType.Directory:
        raise ExportError(
            f"experiment {experiment!r} not found (no {RESULTS_FILE} to read): pass "
            "the --output directory of python -m vitcae_ray.tune"
        )
    data = filesystem.read_bytes(join(experiment, RESULTS_FILE))
    try:
        if data is not None:
            import pyarrow.parquet as pq

            table = pq.read_table(pa.BufferReader(data))
        elif (csv := filesystem.read_bytes(join(experiment, RESULTS_CSV))) is not None:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(pa.BufferReader(csv))
        else:
            raise ExportError(
                f"experiment {experiment!r} has no {RESULTS_FILE}: the sweep has "
                "not finished (rerun python -m vitcae_ray.tune with --resume)"
            )
    except (pa.ArrowInvalid, OSError) as e:
        raise ExportError(f"cannot read the results table of {experiment!r}: {first_line(e)}") from None
    rows = table.to_pylist()
    missing = [c for c in ("trial_id", "run_dir") if c not in table.column_names]
    if missing:
        raise ExportError(f"results table of {experiment!r} lacks column(s) {', '.join(missing)}")
    for r in rows:
        r["trial_id"] = str(r["trial_id"])
    if not rows:
        raise ExportError(f"results table of {experiment!r} has no trials")
    return rows


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """Metrics the results table ranks by (its ``best/...`` columns)."""
    return sorted(k[len("best/") :] for k in rows[0] if k.startswith("best/"))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def rank_trials(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Trials with a finite ``best/<metric>``, best first (stable for ties)."""
    col = f"best/{metric}"
    if col not in rows[0]:
        raise ExportError(
            f"metric {metric!r} is not in the results table (no column {col!r}); "
            f"available: {', '.join(metric_names(rows)) or 'none'}"
        )
    sign = 1.0 if mode == "min" else -1.0
    return sorted((r for r in rows if _finite(r.get(col))), key=lambda r: sign * r[col])


def hparams(row: dict[str, Any]) -> dict[str, Any]:
    """``trial_id`` and the row's searched hyperparameters (its dotted config-key columns)."""
    keys = {f"{section}.{key}" for section, values in Config().to_dict().items() for key in values}
    return {"trial_id": row["trial_id"], **{k: _plain(v) for k, v in row.items() if k in keys}}


def _plain(v: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _run_dir(row: dict[str, Any], experiment: str) -> str:
    """The trial's run directory: the table's ``run_dir``, else ``EXP/trials/<id>`` (an
    experiment copied elsewhere after the sweep)."""
    given = row.get("run_dir")
    if isinstance(given, str) and given and filesystem.kind(given) == FileType.Directory:
        return given
    fallback = join(experiment, TRIALS_DIR, row["trial_id"])
    if filesystem.kind(fallback) == FileType.Directory:
        return fallback
    raise ExportError(f"trial {row['trial_id']!r}: run directory {given!r} not found")


def train_folder(run_dir: str) -> str:
    """Ray Train's folder of the run (its checkpoints and Ray's record of them):
    ``<storage>/<run name>`` from the run's ``config.yaml``, the storage being
    ``train.storage_path`` or the run directory itself."""
    import yaml

    text = filesystem.read_text(join(run_dir, CONFIG_FILE))
    try:
        train = ((yaml.safe_load(text) or {}).get("train") or {}) if text else {}
    except (yaml.YAMLError, AttributeError) as e:
        raise ExportError(f"cannot read {join(run_dir, CONFIG_FILE)!r}: {first_line(e)}") from None
    return join(train.get("storage_path") or run_dir, train.get("run_name") or "train")


def recorded_checkpoints(folder: str) -> list[str] | None:
    """Names of the checkpoint directories in Ray Train's record of the run in ``folder``
    (``ray.train.Result.from_path``): those whose upload finished. None without a readable
    record: a local-mode run (its checkpoints are never registered with Ray), no run there,
    or a record naming a checkpoint directory since deleted (Ray refuses the whole record)."""
    import ray.train

    fs, inner = filesystem.resolve(folder)
    log = logging.getLogger("ray.train")  # Ray logs the snapshot's use for resuming at INFO
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        result = ray.train.Result.from_path(inner, storage_filesystem=fs)
    except Exception:  # RuntimeError without a record; Ray Train's own error for a broken one
        return None
    finally:
        log.setLevel(level)
    return [c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in result.best_checkpoints or []]


def surviving_checkpoints(folder: str) -> dict[int, str]:
    """{epoch: checkpoint directory} of the complete checkpoints (both files, see
    :func:`~vitcae_ray.checkpoints.complete_dirs`) in Ray Train's record of the run in
    ``folder``, or without one, in the folder. The record checks only that a directory
    exists, so a damaged checkpoint it names is left out here."""
    complete = set(checkpoints.complete_dirs(folder))
    names = recorded_checkpoints(folder)
    if names is None:
        names = filesystem.list_dirs(folder, CHECKPOINT_PREFIX)
    found = {}
    for name in names:
        suffix = name[len(CHECKPOINT_PREFIX) :]
        if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and join(folder, name) in complete:
            found[int(suffix)] = join(folder, name)
    return found


def run_metrics(run_dir: str) -> dict[int, dict[str, Any]]:
    """{epoch: metrics} from the run's ``metrics.jsonl``."""
    data = filesystem.read_bytes(join(run_dir, METRICS_FILE)) or b""
    out = {}
    for line in data.decode().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption
        if isinstance(m, dict) and "epoch" in m:
            out[int(m["epoch"])] = m
    return out


def choose_checkpoint(row: dict[str, Any], experiment: str, metric: str, mode: str) -> Choice:
    """The trial's surviving checkpoint with the best ``metric`` (ties: the later epoch)."""
    trial = row["trial_id"]
    run_dir = _run_dir(row, experiment)
    folder = train_folder(run_dir)
    ckpts = surviving_checkpoints(folder)
    if not ckpts:
        raise ExportError(f"trial {trial!r} has no checkpoint under {folder!r}")
    history = run_metrics(run_dir)
    scored = []
    for epoch, path in ckpts.items():
        m = history.get(epoch)
        if m is None:  # metrics.jsonl behind the checkpoints: the checkpoint's own history
            m = next((h for h in _load_state(path).get("history", []) if h.get("epoch") == epoch), None)
        if m is not None and _finite(m.get(metric)):
            scored.append((epoch, path, float(m[metric]), m))
    if not scored:
        raise ExportError(
            f"trial {trial!r}: no surviving checkpoint (epochs "
            f"{', '.join(map(str, sorted(ckpts)))}) has a finite {metric!r}"
        )
    sign = 1.0 if mode == "min" else -1.0
    epoch, path, value, m = min(scored, key=lambda s: (sign * s[2], -s[0]))
    return Choice(trial, row, path, epoch, value, m, metric)


@_uri_errors
def sweep_metric(rows: list[dict[str, Any]]) -> str:
    """The metric the sweep ranked by, as its results table records it (older tables: the
    default selection metric)."""
    recorded = {r.get("select_metric") for r in rows} - {None}
    return recorded.pop() if len(recorded) == 1 else SELECT_METRIC


def choose(
    experiment: str,
    metric: str | None = None,
    mode: str = "min",
    trial: str | None = None,
    top_k: int | None = None,
) -> list[Choice]:
    """The checkpoints to export, best first, all checked before anything is written;
    ``metric`` defaults to the sweep's (its ``train.select_metric`` or ``tune --metric``)."""
    if mode not in ("min", "max"):
        raise ExportError(f"--mode must be min or max, got {mode!r}")
    if top_k is not None and top_k < 1:
        raise ExportError(f"--top-k must be >= 1, got {top_k}")
    if trial is not None and top_k is not None:
        raise ExportError("--trial and --top-k exclude each other")
    rows = read_results(experiment)
    metric = metric or sweep_metric(rows)
    ranked = rank_trials(rows, metric, mode)  # also checks the metric exists
    if trial is not None:
        chosen = [r for r in rows if r["trial_id"] == str(trial)]
        if not chosen:
            raise ExportError(
                f"trial {trial!r} is not in the results table of {experiment!r}; "
                f"trials: {', '.join(sorted(r['trial_id'] for r in rows))}"
            )
    else:
        chosen = ranked[: top_k or 1]
        if not chosen:
            raise ExportError(f"no trial of {experiment!r} has a finite best/{metric}")
    return [choose_checkpoint(r, experiment, metric, mode) for r in chosen]


# --- writing --------------------------------------------------------------------------------


def _load_state(checkpoint: str) -> dict[str, Any]:
    """The checkpoint's state, checked against its digest (``weights_only`` loading)."""
    try:
        return checkpoints.read(checkpoint)
    except checkpoints.CheckpointError as e:
        raise ExportError(str(e)) from None


def frozen_info(state: dict[str, Any], frozen: list[list[int]], epoch: int) -> dict[str, Any]:
    """Per layer, the frozen heads and (from the head controller's decisions) the epoch each
    froze at; ``frozen_epochs`` is None when the checkpoint has no decisions."""
    decisions = [
        d
        for d in ((state.get("heads") or {}).get("decisions") or [])
        if isinstance(d, dict) and int(d.get("epoch", -1)) <= epoch
    ]
    epochs = None
    if decisions:
        last = max(decisions, key=lambda d: int(d["epoch"]))
        try:
            epochs = [[last["frozen_epoch"][layer][h] for h in heads] for layer, heads in enumerate(frozen)]
        except (KeyError, IndexError, TypeError):
            epochs = None
    return {
        "epoch": epoch,
        "frozen_heads": frozen,
        "frozen_epochs": epochs,
        "num_frozen": sum(len(h) for h in frozen),
    }


def model_files(choice: Choice) -> dict[str, bytes]:
    """The model directory's files, ``model.pt`` last."""
    import torch

    from .cls_mixture import mixture_state
    from .config import dump_yaml, from_dict
    from .freezing import frozen_heads

    state = _load_state(choice.checkpoint)
    try:
        model = checkpoints.model_from_state(state)  # it must rebuild before it is exported
    except Exception as e:
        raise ExportError(
            f"checkpoint {choice.checkpoint!r} does not rebuild a model: {first_line(e)}"
        ) from None
    frozen = frozen_heads(model)
    history = {int(h["epoch"]): h for h in state.get("history", []) if "epoch" in h}
    metrics = history.get(choice.epoch, choice.metrics)
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "model_args": dict(state["model_args"]),
            "config": state["config"],
            "frozen_heads": frozen,
            "frozen_blocks": model.frozen_blocks,
            "epoch": choice.epoch,
            **mixture_state(model),
        },
        buf,
    )

    def js(obj: Any) -> bytes:
        return (json.dumps(_plain(obj), indent=2) + "\n").encode()

    return {
        "config.yaml": dump_yaml(from_dict(state["config"])).encode(),
        "hparams.json": js(hparams(choice.row)),
        "metrics.json": js(metrics),
        "frozen_heads.json": js(
            {**frozen_info(state, frozen, choice.epoch), "frozen_blocks": model.frozen_blocks}
        ),
        checkpoints.MODEL_FILE: buf.getvalue(),
    }


def _write_dir(fs, base: str, files: dict[str, bytes]) -> None:
    fs.create_dir(base, recursive=True)
    for name, data in files.items():  # in order: model.pt last
        with fs.open_output_stream(f"{base}/{name}") as f:
            f.write(data)


@_uri_errors
def export(
    experiment: str,
    out: str,
    metric: str | None = None,
    mode: str = "min",
    trial: str | None = None,
    top_k: int | None = None,
    overwrite: bool = False,
) -> list[tuple[Choice, str]]:
    """Export the chosen checkpoint(s) to ``out`` (``out/1 ... out/K`` with ``top_k``);
    returns ``(choice, model directory)`` pairs. Raises :class:`ExportError` before writing
    anything when the experiment, trial, metric or checkpoint is missing or ``out`` is taken."""
    import pyarrow.fs as pafs

    choices = choose(experiment, metric, mode, trial, top_k)
    fs, base = filesystem.resolve(out)
    info = fs.get_file_info(base)
    if info.type == FileType.File:
        raise ExportError(f"--out {out!r} is a file: pass a directory")
    if (
        info.type == FileType.Directory
        and not overwrite
        and fs.get_file_info(pafs.FileSelector(base, recursive=False))
    ):
        raise ExportError(f"--out {out!r} is not empty: pass another --out or --overwrite")
    subdirs = [str(i) for i in range(1, len(choices) + 1)] if top_k is not None else [""]
    targets = [join(out, s) if s else out for s in subdirs]

    if isinstance(fs, pafs.LocalFileSystem):  # build the whole tree aside, then rename it into place
        staging = f"{base}.partial"
        if fs.get_file_info(staging).type != FileType.NotFound:
            fs.delete_dir(staging)
        try:
            for c, s in zip(choices, subdirs):
                _write_dir(fs, join(staging, s) if s else staging, model_files(c))
            if fs.get_file_info(base).type == FileType.Directory:
                fs.delete_dir(base)
            fs.move(staging, base)
        except BaseException:
            if fs.get_file_info(staging).type != FileType.NotFound:
                fs.delete_dir(staging)
            raise
    else:  # object stores cannot rename directories: model.pt goes last in each
        for i, (c, s) in enumerate(zip(choices, subdirs)):
            files = model_files(c)
            if i == 0 and info.type == FileType.Directory:
                fs.delete_dir_contents(base)  # only once the first model is known to be good
            _write_dir(fs, join(base, s) if s else base, files)
    return list(zip(choices, targets))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitcae_ray.export",
        description="Export the best checkpoint(s) of a Tune experiment as standalone model directories.",
    )
    p.add_argument(
        "--experiment",
        required=True,
        help="experiment directory of python -m vitcae_ray.tune (local path or URI)",
    )
    p.add_argument("--out", required=True, help="model directory to write (local path or URI)")
    p.add_argument(
        "--metric",
        help="rank by best/METRIC (default: the sweep's metric, its train.select_metric unless "
        f"tune was given --metric; {SELECT_METRIC} for tables that do not record it)",
    )
    p.add_argument("--mode", choices=("min", "max"), default="min", help="lower or higher is better")
    p.add_argument("--trial", help="export this trial id instead of the best")
    p.add_argument("--top-k", type=int, help="export the K best trials into OUT/1 ... OUT/K")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        done = export(
            args.experiment, args.out, args.metric, args.mode, args.trial, args.top_k, args.overwrite
        )
    except ExportError as e:
        return fail(e)
    except OSError as e:
        return fail(f"export to {args.out!r} failed: {first_line(e)}", 1)
    for c, path in done:
        epochs = c.row.get("epochs")
        of = f"/{epochs}" if isinstance(epochs, int) else ""
        print(
            f"trial {c.trial_id}: epoch {c.epoch + 1}{of} ({CHECKPOINT_PREFIX}{c.epoch:04d}), "
            f"{c.metric} {c.value:.6g} -> {path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
