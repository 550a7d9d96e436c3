"""Loading what ``evaluate`` measures: the model behind a path (exported model, run directory,
checkpoint) and the dataset it was trained on, as whole tensors."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from .. import filesystem
from ..checkpoints import (
    CHECKPOINT_FILE,
    DIGEST_FILE,
    MODEL_FILE,
    CheckpointError,
    check_digest,
    load_model_file,
    model_from_state,
)
from ..config import SELECT_METRIC, Config, ConfigError, from_dict
from ..data import DataError, build_datasets
from ..errors import first_line


class EvalError(ValueError):
    """A one-line reason the evaluation cannot run (exit code 2)."""


def _state_bytes(path: str) -> tuple[bytes, str, str | None]:
    """(bytes, where, the digest of a training checkpoint) of the model/checkpoint file behind
    ``path``: an exported model directory (``model.pt``), a run directory (its best checkpoint
    by the run's ``train.select_metric``), a checkpoint directory, or a file."""
    from ..export import ExportError, choose_checkpoint, surviving_checkpoints, train_folder

    try:
        kind = filesystem.kind(path)
    except filesystem.FileSystemError as e:
        raise EvalError(str(e)) from None
    if kind == filesystem.FileType.NotFound:
        raise EvalError(
            f"model {path!r} not found: pass an exported model directory, a run directory or a checkpoint"
        )
    if kind == filesystem.FileType.File:
        return filesystem.read_bytes(path), path, None
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        data = filesystem.read_bytes(filesystem.join(path, name))
        if data is not None:
            return data, filesystem.join(path, name), _digest(path, name)
    try:
        ckpts = surviving_checkpoints(train_folder(path))
        if ckpts:
            try:
                ckpt = choose_checkpoint(
                    {"trial_id": path, "run_dir": path}, path, _select_metric(path), "min"
                ).checkpoint
            except ExportError:  # no metrics for the surviving checkpoints: the latest
                ckpt = ckpts[max(ckpts)]
            data = filesystem.read_bytes(filesystem.join(ckpt, CHECKPOINT_FILE))
            if data is not None:
                return data, filesystem.join(ckpt, CHECKPOINT_FILE), _digest(ckpt, CHECKPOINT_FILE)
    except ExportError as e:
        raise EvalError(str(e)) from None
    raise EvalError(
        f"{path!r} holds no model.pt, checkpoint.pt or checkpoints: pass an exported "
        "model directory, a run directory or a checkpoint"
    )


def _select_metric(run_dir: str) -> str:
    """The run's ``train.select_metric`` (from its config.yaml), or the default."""
    import yaml

    from ..outputs import select_metric_of

    try:
        return select_metric_of(run_dir)
    except (ConfigError, yaml.YAMLError):  # a damaged config.yaml: rank by the default
        return SELECT_METRIC


def _digest(folder: str, name: str) -> str | None:
    """A training checkpoint's digest text (None for a model file or a checkpoint without one)."""
    return filesystem.read_text(filesystem.join(folder, DIGEST_FILE)) if name == CHECKPOINT_FILE else None


def load_model(path: str, device: torch.device):
    """(model in eval mode, its Config, where it was read from)."""
    data, where, digest = _state_bytes(os.fspath(path))
    try:
        check_digest(data, digest, where)  # a training checkpoint against its digest
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    try:
        state = load_model_file(data, where, device)
        model = model_from_state(state)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise EvalError(first_line(e) if str(e) else f"{where}: not a model") from None
    return model.to(device).eval(), from_dict(state["config"]), where


def load_data(cfg: Config, model, dataset: str | None, root: str | None, download: bool = False):
    """(train images, train labels, val images, val labels) of ``dataset`` at the model's image
    size and channels; a one-line error if the dataset does not fit the model."""
    data = replace(cfg.data, download=download)
    if dataset is not None:
        data = replace(data, dataset=dataset, root=root)
    elif root is not None:
        data = replace(data, root=root)
    try:
        train_set, val_set, channels = build_datasets(data)
    except DataError as e:
        raise EvalError(str(e)) from None
    x0 = val_set[0][0]
    if channels != model.in_chans or x0.shape[-1] != model.img_size:
        raise EvalError(
            f"dataset {data.dataset!r} gives {channels}-channel {x0.shape[-1]}x{x0.shape[-1]} images "
            f"but the model takes {model.in_chans}-channel {model.img_size}x{model.img_size}: "
            f"pass the dataset the model was trained on ({cfg.data.dataset!r})"
        )

    return (*stack_split(train_set), *stack_split(val_set))


def stack_split(ds, limit: int | None = None, rng: np.random.Generator | None = None):
    """(images (n, C, S, S), labels (n,)) of a dataset split; with ``limit`` a random subset
    of at most that many items, in index order."""
    idx = range(len(ds))
    if limit is not None and len(ds) > limit:
        idx = np.sort((rng or np.random.default_rng(0)).choice(len(ds), limit, replace=False))
    items = [ds[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), np.array([int(y) for _, y in items])
