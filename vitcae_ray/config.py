"""One config system: frozen dataclasses, YAML presets, CLI flags and ``--set`` overrides.

Precedence, lowest first: dataclass defaults < ``--config`` YAML < CLI flags < ``--set``.
Every key is a dotted path ``section.field``; an unknown key or a value of the wrong type
raises :class:`ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import yaml


# The fixed-weight selection metric (negative ELBO, nats per image): checkpoint ranking,
# ASHA and export compare it, since val/loss changes its weights along the curriculum.
SELECT_METRIC = "val/elbo"
# The 1-based count of finished epochs every epoch reports: ASHA's time attribute.
EPOCHS_DONE = "epochs_done"


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming the key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"  # size preset the fields below start from ("tiny", "small")
    patch_size: int = 4  # pixels per patch side; image_size must be a multiple
    embed_dim: int = 64  # encoder width D
    depth: int = 4  # encoder blocks
    num_heads: int = 4  # encoder heads per block (the scheduler's heads)
    mlp_ratio: float = 2.0  # MLP hidden width / D
    z_cls_dim: int = 8  # global latent z_cls
    z_patch_dim: int = 8  # per-patch latent z_patch
    prior_hidden: int = 256  # hidden width of the neural prior MLP z_cls -> p(z_patch | z_cls)
    dec_dim: int = 64  # decoder width
    dec_depth: int = 2  # decoder blocks (FiLM-conditioned on z_cls)
    dec_heads: int = 4  # decoder heads per block
    fused_attn: bool = True  # SDPA on the training path; False uses the manual softmax path
    conditional_prior: bool = True  # False: p(z_patch) = N(0, I) and Z~_patch = 0 (ablation)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # registry name: digits, mnist, fashion_mnist, cifar10, cifar100, celeba, imagefolder, parquet
    root: str | None = None  # dataset root directory, Parquet path or pyarrow URI (s3://...)
    download: bool = False  # let torchvision download into root
    image_size: int = 32  # images are resized to image_size x image_size
    channels: int = 0  # 1 or 3 to force grayscale/RGB; 0 keeps the dataset's own
    val_fraction: float = 0.1  # held-out fraction when the dataset has no validation split
    split_seed: int = 0  # seed of the deterministic train/val split
    loader_workers: int = 0  # DataLoader worker processes per training worker


@dataclass(frozen=True)
class LossConfig:
    recon_weight: float = 10.0  # weight of the per-image summed squared error (1 / 2 sigma^2)
    kl_cls_weight: float = 1.0  # weight of KL(q(z_cls|x) || N(0, I))
    kl_cls_free_bits: float = 1.0  # nats per z_cls dimension that KL(z_cls) does not charge
    kl_patch_weight: float = 1.0  # weight of KL(q(z_patch|x) || p(z_patch|z_cls))
    mmd_weight: float = 10.0  # weight of the patch IMQ-MMD once the curriculum has ramped in
    mmd_cls_weight: float = 10.0  # weight of the z_cls IMQ-MMD (aggregate q(z_cls) vs N(0, I))
    discrepancy_weight: float = 0.1  # weight of ||mu_patch - Z~_patch||^2 (posterior mean)
    prior_recon_weight: float = 1.0  # weight (x recon_weight) of the error of x decoded from p(z_patch | z_cls) alone
    warmup_epochs: int = 3  # T_w: KL-only epochs
    ramp_epochs: int = 3  # epochs of the linear ramp from KL to the KL/MMD mix
    kl_mix: float = 0.5  # fraction of the KL weight kept after the ramp
    mmd_scales: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # IMQ scales C = 2 d s
    mmd_max_samples: int = 512  # patch latents per batch compared by the patch MMD (random subset)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.05  # on weight matrices only (not norms, biases, tokens, tau)
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_epochs: float = 1.0  # linear LR warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32  # per worker
    num_workers: int = 1  # Ray Train workers; 0 runs Ray Train's local mode in this process
    cpus_per_worker: float = 0.0  # also the worker's torch threads; 0 = auto: a Ray started here shares its CPUs among the workers, a cluster (address) gives 1
    worker_resource: str | None = None  # custom resource each worker also requests 1 of (keeps workers on the node types that have it)
    gpu: bool = False  # one GPU per worker, bf16 autocast
    compile: bool = False  # torch.compile the model (recompiles when the frozen set changes)
    address: str | None = None  # Ray cluster address ("auto"); None starts a local Ray
    output: str = "runs/digits-tiny"  # run directory: config.yaml, metrics.jsonl, TensorBoard
    storage_path: str | None = None  # Ray Train checkpoint storage; None = the run directory
    shared_fs: bool = False  # a local output is a mount every node sees (NFS): skip the multi-node storage check
    run_name: str = "train"  # Ray Train run name (deterministic, so a rerun resumes)
    seed: int = 0
    max_failures: int = 2  # worker-group restarts from the last checkpoint; -1 = no limit
    max_nonfinite_steps: int = 0  # steps with a non-finite loss skipped (counted in metrics) before the run stops; 0 = stop at the first
    num_checkpoints: int = 2  # best checkpoints kept by val/elbo (the latest is also kept)
    log_images: bool = True  # reconstruction and sample grids in TensorBoard
    num_image_samples: int = 16  # images per grid
    eval_every: int = 5  # every N epochs and the last: val/probe_acc, val/sample_score, task grids; 0 = never


@dataclass(frozen=True)
class SchedulerConfig:
    enabled: bool = True  # False fixes every head's tau factor at 1 (ablation)
    alpha: float = 5.0  # tau factor^(t+1) = 1 / (1 + alpha * drift_w1^(t))


@dataclass(frozen=True)
class FreezeConfig:
    enabled: bool = True  # False never freezes a head (ablation)
    mode: str = "weights"  # "weights": exact gradients; "detach": cut frozen heads from autograd
    out_proj: bool = False  # also freeze the frozen heads' columns of the attention output projection
    drift_threshold: float = 0.002  # drift_w1 below this counts as converged (grid units in [0, 1])
    patience: int = 3  # epochs the drift must stay below the threshold
    kappa_window: int = 3  # epochs over which kappa must not change
    min_epoch: int = -1  # no freezing before this epoch; -1 = loss.warmup_epochs
    max_frozen_frac: float = 1.0  # cap on the fraction of a layer's heads that may freeze
    probe_size: int = 64  # fixed validation images for the patch->patch attention (kappa)
    kappa_top_k: int = 8  # eigenvalue magnitudes examined for the cluster-count gap


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# Model size presets: the starting values of ``model.*`` for ``model.preset``.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},  # the ModelConfig defaults: fast CPU runs on 32x32 images
    "small": dict(  # about ViT-S width, for 64x64 GPU runs
        patch_size=8, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, z_cls_dim=64,
        z_patch_dim=16, prior_hidden=1024, dec_dim=256, dec_depth=4, dec_heads=8,
    ),
}


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return tuple(_coerce(key, v, args[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - only the types above are used
        return value
    raise ConfigError(
        f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}"
    )


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def build_config(overrides: Mapping[str, Any] | None = None, base: Config | None = None) -> Config:
    """Return ``base`` (default: all defaults) with dotted-key ``overrides`` applied and validated.

    ``model.preset`` is applied first, so explicit ``model.*`` keys win over the preset.
    """
    base = base or Config()
    flat = _flatten(overrides or {})
    sections: dict[str, dict[str, Any]] = {}
    top_types = _section_types(Config)
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in top_types or not name:
            raise ConfigError(
                f"unknown config key '{key}': sections are {', '.join(top_types)}"
            )
        types = _section_types(top_types[section])
        if name not in types:
            raise ConfigError(
                f"unknown config key '{key}': valid keys in '{section}' are {', '.join(types)}"
            )
        sections.setdefault(section, {})[name] = _coerce(key, value, types[name])

    model_over = sections.get("model", {})
    if "preset" in model_over:
        preset = model_over["preset"]
        if preset not in MODEL_PRESETS:
            raise ConfigError(
                f"config key 'model.preset' must be one of {', '.join(MODEL_PRESETS)}, got {preset!r}"
            )
        preset_model = replace(ModelConfig(), preset=preset, **MODEL_PRESETS[preset])
        base = replace(base, model=preset_model)
    cfg = base
    for section, values in sections.items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values)})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks, each a one-line error naming the key."""
    m, d, t, lo = cfg.model, cfg.data, cfg.train, cfg.loss
    positive = {
        "model.patch_size": m.patch_size, "model.embed_dim": m.embed_dim, "model.depth": m.depth,
        "model.num_heads": m.num_heads, "model.z_cls_dim": m.z_cls_dim,
        "model.z_patch_dim": m.z_patch_dim, "model.prior_hidden": m.prior_hidden,
        "model.dec_dim": m.dec_dim, "model.dec_depth": m.dec_depth, "model.dec_heads": m.dec_heads,
        "data.image_size": d.image_size, "train.epochs": t.epochs,
        "train.batch_size": t.batch_size, "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    if m.embed_dim % m.num_heads:
        raise ConfigError(
            f"config key 'model.embed_dim' ({m.embed_dim}) must be divisible by model.num_heads ({m.num_heads})"
        )
    if m.dec_dim % m.dec_heads:
        raise ConfigError(
            f"config key 'model.dec_dim' ({m.dec_dim}) must be divisible by model.dec_heads ({m.dec_heads})"
        )
    if d.image_size % m.patch_size:
        raise ConfigError(
            f"config key 'data.image_size' ({d.image_size}) must be a multiple of model.patch_size ({m.patch_size})"
        )
    if d.channels not in (0, 1, 3):
        raise ConfigError(f"config key 'data.channels' must be 0, 1 or 3, got {d.channels}")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in (0, 1), got {d.val_fraction}")
    if t.num_workers < 0:
        raise ConfigError(f"config key 'train.num_workers' must be >= 0, got {t.num_workers}")
    for key in ("eval_every", "max_nonfinite_steps"):
        if getattr(t, key) < 0:
            raise ConfigError(f"config key 'train.{key}' must be >= 0, got {getattr(t, key)}")
    if t.max_failures < -1:
        raise ConfigError(f"config key 'train.max_failures' must be >= -1 (-1 = no limit), got {t.max_failures}")
    if t.cpus_per_worker < 0:
        raise ConfigError(f"config key 'train.cpus_per_worker' must be >= 0 (0 = auto), got {t.cpus_per_worker}")
    for key in ("warmup_epochs", "ramp_epochs"):
        if getattr(lo, key) < 0:
            raise ConfigError(f"config key 'loss.{key}' must be >= 0, got {getattr(lo, key)}")
    if lo.kl_cls_free_bits < 0:
        raise ConfigError(f"config key 'loss.kl_cls_free_bits' must be >= 0, got {lo.kl_cls_free_bits}")
    if not 0.0 <= lo.kl_mix <= 1.0:
        raise ConfigError(f"config key 'loss.kl_mix' must be in [0, 1], got {lo.kl_mix}")
    fz = cfg.freeze
    if fz.mode not in ("weights", "detach"):
        raise ConfigError(f"config key 'freeze.mode' must be 'weights' or 'detach', got {fz.mode!r}")
    for key in ("patience", "kappa_window", "probe_size", "kappa_top_k"):
        if getattr(fz, key) < 1:
            raise ConfigError(f"config key 'freeze.{key}' must be >= 1, got {getattr(fz, key)}")
    if not 0.0 <= fz.max_frozen_frac <= 1.0:
        raise ConfigError(f"config key 'freeze.max_frozen_frac' must be in [0, 1], got {fz.max_frozen_frac}")
    if fz.drift_threshold < 0 or cfg.scheduler.alpha < 0:
        raise ConfigError("config keys 'freeze.drift_threshold' and 'scheduler.alpha' must be >= 0")
    if lo.mmd_max_samples < 2:
        raise ConfigError(f"config key 'loss.mmd_max_samples' must be >= 2, got {lo.mmd_max_samples}")
    if not lo.mmd_scales or min(lo.mmd_scales) <= 0:
        raise ConfigError("config key 'loss.mmd_scales' must be a non-empty list of positive numbers")


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``--set dotted.key=value``; the value is read as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key.strip(), value


# The source tree holding the shipped presets (configs/, tune_spaces/): the package's parent.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def find_yaml(name: str | Path, folder: str, what: str,
              error: type[ConfigError] = ConfigError) -> Path:
    """A YAML file given as a path (from the current directory), as a path inside the project
    (``configs/digits_tiny.yaml``) or by name (``digits_tiny``, a file of ``folder``), so the
    shipped presets work from any directory."""
    given = Path(name).expanduser()
    shipped = PROJECT_ROOT / folder
    for candidate in (given, PROJECT_ROOT / given, shipped / f"{given}.yaml", shipped / given):
        if not given.is_absolute() or candidate == given:
            if candidate.is_file():
                return candidate
    names = sorted(p.stem for p in shipped.glob("*.yaml"))
    raise error(f"{what} {str(name)!r} not found: pass a YAML file or a name from {folder}/ "
                f"({', '.join(names) or 'none shipped'})")


def load_yaml(path: str | Path, what: str = "config file", folder: str = "configs",
              error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A YAML mapping from ``path`` (see :func:`find_yaml`); ``error`` with a one-line message
    naming the file."""
    p = find_yaml(path, folder, what, error)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise error(f"{what} {str(p)!r} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {str(p)!r} must hold a mapping")
    return data


def absolute_paths(cfg: "Config") -> "Config":
    """Local paths made absolute against the current directory, since Ray Train workers and
    Tune trials run in directories of their own (URIs are kept as they are)."""
    from .outputs import storage_root

    def absolute(path: str | None) -> str | None:
        return None if path is None else storage_root(path)

    t, d = cfg.train, cfg.data
    return replace(cfg, data=replace(d, root=absolute(d.root)),
                   train=replace(t, output=absolute(t.output), storage_path=absolute(t.storage_path)))


def resolve(config_path: str | None, flags: Mapping[str, Any], sets: list[str]) -> Config:
    """Defaults < YAML file < CLI flags (already dotted, None = not given) < ``--set`` items."""
    merged: dict[str, Any] = {}
    if config_path:
        merged.update(_flatten(load_yaml(config_path)))
    merged.update({k: v for k, v in flags.items() if v is not None})
    for item in sets:
        k, v = parse_set(item)
        merged[k] = v
    return absolute_paths(build_config(merged))


def from_dict(d: Mapping[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a checkpoint or config.yaml)."""
    return build_config(d)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = [
    "EPOCHS_DONE", "SELECT_METRIC", "Config", "ConfigError", "DataConfig", "FreezeConfig", "SchedulerConfig", "LossConfig", "ModelConfig", "OptimConfig",
    "TrainConfig", "MODEL_PRESETS", "PROJECT_ROOT", "absolute_paths", "build_config", "find_yaml", "dump_yaml", "from_dict", "load_yaml",
    "parse_set", "resolve", "to_dict", "validate",
]
