"""Loading an exported model directory (``python -m vitcae_ray.export``) for inference.

No Ray here: ``model.pt`` alone (config, constructor arguments, frozen-head map and weights)
rebuilds the model, from a local directory or any pyarrow filesystem URI.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from .config import build_config
from .freezing import apply_frozen
from .model import ViTCAE, build_model

MODEL_FILE = "model.pt"
MODEL_KEYS = ("model", "model_args", "config")


def filesystem(path: str | os.PathLike):
    """``(pyarrow FileSystem, path inside it)`` for a local path or a URI (``s3://b/p``)."""
    import pyarrow.fs as pafs

    path = os.fspath(path)
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (ValueError, OSError) as e:  # ArrowInvalid, ArrowIOError
            raise ValueError(f"cannot open {path!r}: {_line(e)}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)).replace(os.sep, "/")


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_bytes(path: str | os.PathLike, name: str) -> bytes | None:
    """``path/name`` (local or URI) as bytes; None if it is not a file."""
    import pyarrow.fs as pafs

    fs, base = filesystem(path)
    full = f"{base.rstrip('/')}/{name}"
    if fs.get_file_info(full).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(full) as f:
        return f.read()


def model_from_state(state: dict[str, Any]) -> ViTCAE:
    """Rebuild the model from a checkpoint's (or ``model.pt``'s) own config, constructor
    arguments, frozen-head map and weights."""
    cfg = build_config(state["config"])
    model = build_model(cfg.model, **state["model_args"])
    apply_frozen(model, state.get("frozen_heads") or [[] for _ in range(cfg.model.depth)],
                 cfg.freeze.mode,
                 out_proj=cfg.freeze.out_proj)
    model.load_state_dict(state["model"])
    return model


def load_model_file(data: bytes, where: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Unpickle ``model.pt`` bytes safely (``weights_only``) and check its keys."""
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise ValueError(f"{where} is not a readable model file: {_line(e)}") from None
    if not isinstance(state, dict) or any(k not in state for k in MODEL_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where} lacks {', '.join(MODEL_KEYS)} (has {have}): "
                         "export a model with python -m vitcae_ray.export")
    return state


def load_pretrained(model_dir: str | os.PathLike, device: torch.device | str = "cpu") -> ViTCAE:
    """The exported model in ``model_dir`` (local path or URI), on ``device``, in eval mode.

    Raises ``FileNotFoundError`` for a missing directory or ``model.pt`` and ``ValueError``
    for one that does not hold a loadable model; messages are one line.
    """
    import pyarrow.fs as pafs

    model_dir = os.fspath(model_dir)
    fs, base = filesystem(model_dir)
    kind = fs.get_file_info(base).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"model directory {model_dir!r} not found")
    if kind != pafs.FileType.Directory:
        raise ValueError(f"{model_dir!r} is not a directory: pass the directory that "
                         "python -m vitcae_ray.export wrote")
    data = read_bytes(model_dir, MODEL_FILE)
    if data is None:
        raise FileNotFoundError(f"model directory {model_dir!r} has no {MODEL_FILE} (an "
                                "unfinished export?): rerun python -m vitcae_ray.export")
    where = f"{model_dir.rstrip('/')}/{MODEL_FILE}"
    state = load_model_file(data, where, device)
    try:
        model = model_from_state(state)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # ConfigError is a ValueError
        raise ValueError(f"{where} does not rebuild a model: {_line(e)}") from None
    return model.to(device).eval()
