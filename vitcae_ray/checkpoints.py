"""Training checkpoints on disk: one directory per epoch, ``checkpoint_epoch_NNNN/``, holding

- ``checkpoint.pt``: ``torch.save`` of the state (model, optimizer, LR schedule, history, the
  head controller's state);
- ``checkpoint.sha256``: the digest and size of ``checkpoint.pt``, written after it.

A directory counts as a checkpoint only when both files are there, so one cut off mid-write
never becomes the latest; loading checks the digest, so a file damaged afterwards is refused
with its name instead of being resumed from. Loading always uses ``weights_only=True``.

No Ray here, and torch is imported where it is used (export and the actor import this).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

CHECKPOINT_FILE = "checkpoint.pt"
DIGEST_FILE = "checkpoint.sha256"
DIR_PREFIX = "checkpoint_epoch_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def dir_name(epoch: int) -> str:
    return f"{DIR_PREFIX}{epoch:04d}"


def _digest_line(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"


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
        raise CheckpointError(f"checkpoint {where} is damaged (it does not match its "
                              f"{DIGEST_FILE}): {FIX}")


def parse(data: bytes, digest: str | None, where: str,
          device: Any = "cpu") -> dict[str, Any]:
    """The state in ``data`` (the bytes of ``where``), checked against ``digest`` (the text of
    its ``checkpoint.sha256``; None for a checkpoint written without one)."""
    import torch

    check_digest(data, digest, where)
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(f"checkpoint {where} is unreadable ({reason}): {FIX}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{where} is not a vitcae_ray training checkpoint: {FIX}")
    return state


def load(checkpoint_dir: str | os.PathLike, device: Any = "cpu") -> dict[str, Any]:
    """The state in a local checkpoint directory (what ``Checkpoint.as_directory`` gives)."""
    path = Path(checkpoint_dir, CHECKPOINT_FILE)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing: {checkpoint_dir} is not a "
                              "complete checkpoint directory")
    digest_path = Path(checkpoint_dir, DIGEST_FILE)
    digest = digest_path.read_text() if digest_path.is_file() else None
    return parse(path.read_bytes(), digest, str(path), device)


def complete_dirs(fs, root: str) -> list[str]:
    """The checkpoint directories under ``root`` of the pyarrow filesystem ``fs`` that hold
    both files (oldest epoch first); partial uploads and copies are left out."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    dirs = sorted(i.path for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith(DIR_PREFIX))
    return [d for d in dirs
            if all(t.type == pafs.FileType.File
                   for t in fs.get_file_info([f"{d}/{CHECKPOINT_FILE}", f"{d}/{DIGEST_FILE}"]))]


def read(fs, directory: str, device: Any = "cpu") -> dict[str, Any]:
    """The state in ``directory`` of the pyarrow filesystem ``fs``, digest checked."""
    with fs.open_input_stream(f"{directory}/{CHECKPOINT_FILE}") as f:
        data = f.read()
    with fs.open_input_stream(f"{directory}/{DIGEST_FILE}") as f:
        digest = f.read().decode()
    return parse(data, digest, f"{directory}/{CHECKPOINT_FILE}", device)


def latest_heads_state(storage: str, run_name: str) -> dict[str, Any] | None:
    """The head controller's state in the run's latest complete checkpoint (``storage`` is a
    local path or a URI, as Ray Train's storage_path), or None before the first one."""
    from .pretrained import filesystem

    fs, root = filesystem(storage)
    dirs = complete_dirs(fs, f"{root.rstrip('/')}/{run_name}")
    return read(fs, dirs[-1]).get("heads") if dirs else None
