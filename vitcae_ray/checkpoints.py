"""The checkpoint format, and rebuilding a model from it.

A training checkpoint is one directory per epoch, ``checkpoint_epoch_NNNN/``, holding

- ``checkpoint.pt``: ``torch.save`` of :func:`training_state` (model, optimizer, LR schedule,
  history, the head controller's state, the config and the model's constructor arguments);
- ``checkpoint.sha256``: the digest and size of ``checkpoint.pt``, written after it.

A directory counts as a checkpoint only when both files are there, so one cut off mid-write
never becomes the latest; loading checks the digest, so a file damaged afterwards is refused
with its name instead of being resumed from. Loading always uses ``weights_only=True``.

An exported model is ``model.pt``: the model keys of the same state (:data:`MODEL_KEYS`), read
by :func:`load_model_file` and rebuilt by :func:`model_from_state` like a checkpoint.

torch and Ray are imported where they are used (export and the actor import this light).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import filesystem
from .config import SELECT_METRIC
from .errors import first_line

if TYPE_CHECKING:
    from .config import Config
    from .model import ViTCAE

CHECKPOINT_FILE = "checkpoint.pt"
DIGEST_FILE = "checkpoint.sha256"
DIR_PREFIX = "checkpoint_epoch_"
MODEL_FILE = "model.pt"
MODEL_KEYS = ("model", "model_args", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def dir_name(epoch: int) -> str:
    return f"{DIR_PREFIX}{epoch:04d}"


def _digest_line(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"


def training_state(
    model: ViTCAE,
    optimizer,
    lr_schedule,
    epoch: int,
    cfg: Config,
    history: list[dict[str, Any]],
    heads: dict[str, Any],
    head_rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything needed to rebuild the model alone (config + ``model_args``; the weights are
    the full per-head layout) or to resume, the head controller's whole state included."""
    from .cls_mixture import mixture_state
    from .freezing import frozen_heads
    from .optim import optimizer_state

    return {
        "heads": heads,
        "frozen_heads": frozen_heads(model),
        "frozen_blocks": model.frozen_blocks,
        "head_rows": head_rows,
        "model": model.state_dict(),
        "model_args": {"img_size": model.img_size, "in_chans": model.in_chans},
        "optimizer": optimizer_state(model, optimizer),
        "lr_scheduler": lr_schedule.state_dict(),
        "epoch": epoch,
        "config": cfg.to_dict(),
        "history": history,
        **mixture_state(model),
    }


def write(state: dict[str, Any], directory: str | os.PathLike) -> None:
    """Write ``state`` into the local ``directory``: the checkpoint, then its digest."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    Path(directory, CHECKPOINT_FILE).write_bytes(data)
    Path(directory, DIGEST_FILE).write_text(_digest_line(data))


FIX = "delete its checkpoint directory to resume from the one before"


def check_digest(data: bytes, digest: str | None, where: str) -> None:
    """Raise :class:`CheckpointError` when ``data`` does not match ``digest`` (the text of
    its ``checkpoint.sha256``; None: written without one, nothing to check)."""
    if digest is not None and digest.split() != _digest_line(data).split():
        raise CheckpointError(f"checkpoint {where} is damaged (it does not match its {DIGEST_FILE}): {FIX}")


def parse(data: bytes, digest: str | None, where: str, device: Any = "cpu") -> dict[str, Any]:
    """The state in ``data`` (the bytes of ``where``), checked against ``digest`` (the text of
    its ``checkpoint.sha256``; None for a checkpoint written without one)."""
    import torch

    check_digest(data, digest, where)
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise CheckpointError(f"checkpoint {where} is unreadable ({first_line(e)}): {FIX}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{where} is not a vitcae_ray training checkpoint: {FIX}")
    return state


def load(checkpoint_dir: str | os.PathLike, device: Any = "cpu") -> dict[str, Any]:
    """The state in a local checkpoint directory (what ``Checkpoint.as_directory`` gives)."""
    path = Path(checkpoint_dir, CHECKPOINT_FILE)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is missing: {checkpoint_dir} is not a complete checkpoint directory"
        )
    digest_path = Path(checkpoint_dir, DIGEST_FILE)
    digest = digest_path.read_text() if digest_path.is_file() else None
    return parse(path.read_bytes(), digest, str(path), device)


def complete_dirs(root: str) -> list[str]:
    """The checkpoint directories under ``root`` (local path or URI) that hold both files,
    oldest epoch first; partial uploads and copies are left out."""
    dirs = [filesystem.join(root, name) for name in filesystem.list_dirs(root, DIR_PREFIX)]
    return [
        d
        for d in dirs
        if all(
            filesystem.kind(filesystem.join(d, f)) == filesystem.FileType.File
            for f in (CHECKPOINT_FILE, DIGEST_FILE)
        )
    ]


def read(directory: str, device: Any = "cpu") -> dict[str, Any]:
    """The state in the checkpoint ``directory`` (local path or URI), digest checked."""
    where = filesystem.join(directory, CHECKPOINT_FILE)
    data = filesystem.read_bytes(where)
    if data is None:
        raise CheckpointError(
            f"checkpoint {where} is missing: {directory} is not a complete checkpoint directory"
        )
    return parse(data, filesystem.read_text(filesystem.join(directory, DIGEST_FILE)), where, device)


def latest_heads_state(storage: str, run_name: str) -> dict[str, Any] | None:
    """The head controller's state in the run's latest complete checkpoint (``storage`` is a
    local path or a URI, as Ray Train's storage_path), or None before the first one."""
    dirs = complete_dirs(filesystem.join(storage, run_name))
    return read(dirs[-1]).get("heads") if dirs else None


def load_model_file(data: bytes, where: str, device: Any = "cpu") -> dict[str, Any]:
    """Unpickle ``model.pt`` bytes safely (``weights_only``) and check its keys; raises
    ``ValueError`` with a one-line message."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise ValueError(f"{where} is not a readable model file: {first_line(e)}") from None
    if not isinstance(state, dict) or any(k not in state for k in MODEL_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{where} lacks {', '.join(MODEL_KEYS)} (has {have}): "
            "export a model with python -m vitcae_ray.export"
        )
    return state


def model_from_state(state: dict[str, Any]) -> ViTCAE:
    """Rebuild the model from a checkpoint's (or ``model.pt``'s) own config, constructor
    arguments, frozen-head map and weights."""
    from .cls_mixture import restore_mixture
    from .config import from_dict
    from .freezing import apply_frozen
    from .model import build_model

    cfg = from_dict(state["config"])
    model = build_model(cfg.model, **state["model_args"])
    apply_frozen(
        model,
        state.get("frozen_heads") or [[] for _ in range(cfg.model.depth)],
        state.get("frozen_blocks", 0),
    )
    model.load_state_dict(state["model"])
    restore_mixture(model, state)
    return model


class LocalCheckpoints:
    """Ray Train's local mode (``--num-workers 0``) keeps reported checkpoints in memory only;
    this persists them under the same storage layout, so a rerun resumes there too."""

    def __init__(self, storage: str, run_name: str, keep: int, select_metric: str = SELECT_METRIC) -> None:
        self.root = filesystem.join(storage, run_name)
        self.keep, self.select_metric = keep, select_metric
        filesystem.makedirs(self.root)

    def latest(self):
        """The latest complete checkpoint as a ``ray.train.Checkpoint``, or None."""
        dirs = complete_dirs(self.root)
        return _ray_checkpoint(dirs[-1]) if dirs else None

    def save(self, local_dir: str, epoch: int, history: list[dict[str, Any]]):
        """Copy the checkpoint written in ``local_dir`` in place (it appears only when
        complete; a replayed epoch overwrites) and keep the latest and the best ``keep``."""
        dest = filesystem.join(self.root, dir_name(epoch))
        partial = filesystem.join(self.root, f".partial_{dir_name(epoch)}")
        filesystem.makedirs(partial)
        filesystem.upload_dir(local_dir, partial)
        if filesystem.exists(dest):
            filesystem.delete_dir(dest)
        filesystem.move(partial, dest)
        score = {
            filesystem.join(self.root, dir_name(int(m["epoch"]))): m[self.select_metric] for m in history
        }
        dirs = complete_dirs(self.root)
        best = sorted((d for d in dirs if d in score), key=score.get)[: self.keep]
        for d in dirs:
            if d != dest and d not in best:
                filesystem.delete_dir(d)
        return _ray_checkpoint(dest)


def _ray_checkpoint(directory: str):
    import ray.train

    fs, path = filesystem.resolve(directory)
    return ray.train.Checkpoint(path, filesystem=fs)
