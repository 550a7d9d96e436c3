"""Loading an exported model directory (``python -m vitcae_ray.export``) for inference.

No Ray here: ``model.pt`` alone (config, constructor arguments, frozen-head map and weights)
rebuilds the model, from a local directory or any pyarrow filesystem URI.
"""

from __future__ import annotations

import os

import torch

from . import filesystem
from .checkpoints import MODEL_FILE, load_model_file, model_from_state
from .errors import first_line
from .model import ViTCAE


def load_pretrained(model_dir: str | os.PathLike, device: torch.device | str = "cpu") -> ViTCAE:
    """The exported model in ``model_dir`` (local path or URI), on ``device``, in eval mode.

    Raises ``FileNotFoundError`` for a missing directory or ``model.pt`` and ``ValueError``
    for one that does not hold a loadable model; messages are one line.
    """
    model_dir = os.fspath(model_dir)
    kind = filesystem.kind(model_dir)
    if kind == filesystem.FileType.NotFound:
        raise FileNotFoundError(f"model directory {model_dir!r} not found")
    if kind != filesystem.FileType.Directory:
        raise ValueError(
            f"{model_dir!r} is not a directory: pass the directory that python -m vitcae_ray.export wrote"
        )
    where = filesystem.join(model_dir, MODEL_FILE)
    data = filesystem.read_bytes(where)
    if data is None:
        raise FileNotFoundError(
            f"model directory {model_dir!r} has no {MODEL_FILE} (an "
            "unfinished export?): rerun python -m vitcae_ray.export"
        )
    state = load_model_file(data, where, device)
    try:
        model = model_from_state(state)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # ConfigError is a ValueError
        raise ValueError(f"{where} does not rebuild a model: {first_line(e)}") from None
    return model.to(device).eval()
