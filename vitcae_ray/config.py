"""One config system: frozen dataclasses, YAML presets, CLI flags and ``--set`` overrides.

Precedence, lowest first: dataclass defaults < ``--config`` YAML < CLI flags < ``--set``.
Every key is a dotted path ``section.field``. A field declares its default, its one-line
description and its constraints (``depth: int = key(4, "encoder blocks", gt=0)``):
:func:`build_config` reads each value as its field's type and :func:`validate` checks the
constraints and the rules across keys; :func:`reference_markdown` writes the reference from
the same fields (``python -m vitcae_ray.config > docs/config.md``). An unknown, renamed or bad
key raises :class:`ConfigError` with a one-line message naming it.
"""

from __future__ import annotations

import operator
import types
import typing
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

# The default of ``train.select_metric``: the fixed-weight negative ELBO (nats per image),
# compared by checkpoint ranking, ASHA and export, since val/loss changes its weights along
# the curriculum.
SELECT_METRIC = "val/elbo"
# The 1-based count of finished epochs every epoch reports: ASHA's time attribute.
EPOCHS_DONE = "epochs_done"


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming the key and the fix."""


def key(default: Any, text: str, **constraints: Any) -> Any:
    """A field with its default, its one-line description and its constraints: ``gt``, ``ge``,
    ``lt``, ``le`` (on a list field, of each element), ``choices``, ``min_length``."""
    return field(default=default, metadata={"doc": text, **constraints})


@dataclass(frozen=True)
class ModelConfig:
    preset: str = key("tiny", "size preset the other model keys start from (see Model presets)")
    variant: str = key(
        "vitcae",
        "vitcae: CLS -> z_cls, prior p(z_patch | z_cls), FiLM decoder; "
        "vitvae: the ViT-VAE baseline (patch latents, N(0, I) prior, no z_cls)",
        choices=("vitcae", "vitvae"),
    )
    patch_size: int = key(4, "pixels per patch side; data.image_size must be a multiple", gt=0)
    embed_dim: int = key(64, "encoder width D; a multiple of model.num_heads", gt=0)
    depth: int = key(4, "encoder blocks", gt=0)
    num_heads: int = key(
        4, "encoder heads per block (the heads the temperature schedule and freezing act on)", gt=0
    )
    mlp_ratio: float = key(2.0, "MLP hidden width / D")
    z_cls_dim: int = key(8, "size of the global latent z_cls (none in vitvae)", gt=0)
    z_patch_dim: int = key(8, "size of the per-patch latent z_patch", gt=0)
    prior_hidden: int = key(256, "hidden width of the neural prior MLP z_cls -> p(z_patch | z_cls)", gt=0)
    dec_dim: int = key(64, "decoder width; a multiple of model.dec_heads", gt=0)
    dec_depth: int = key(2, "decoder blocks (FiLM-conditioned on z_cls)", gt=0)
    dec_heads: int = key(4, "decoder heads per block", gt=0)
    dec_conv: int = key(
        16,
        "feature maps of the decoder's convolutional output head: each token predicts its patch's "
        "pixels as that many maps, then two 3x3 convolutions that see across patch borders; "
        "0: a linear head predicts the pixels of each patch alone (draws the patch grid)",
        ge=0,
    )
    fused_attn: bool = key(True, "SDPA on the training path; false uses the manual softmax path")
    conditional_prior: bool = key(
        True, "false: p(z_patch) = N(0, I) and Z~_patch = 0 (ablation; always so in vitvae)"
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = key(
        "digits",
        "registry name: digits, mnist, fashion_mnist, cifar10, cifar100, celeba, imagefolder, parquet",
    )
    root: str | None = key(None, "dataset root directory, Parquet path or pyarrow URI (s3://...)")
    download: bool = key(False, "let torchvision download into data.root")
    image_size: int = key(32, "images are resized to image_size x image_size", gt=0)
    channels: int = key(0, "1 or 3 forces grayscale/RGB; 0 keeps the dataset's own", choices=(0, 1, 3))
    val_fraction: float = key(0.1, "held-out fraction when the dataset has no validation split", gt=0, lt=1)
    split_seed: int = key(0, "seed of the deterministic train/val split")
    loader_workers: int = key(0, "DataLoader worker processes per training worker")


@dataclass(frozen=True)
class LossConfig:
    recon_weight: float = key(10.0, "weight of the per-image summed squared error (1 / 2 sigma^2)")
    elbo_samples: int = key(
        1, "K: posterior samples of the sampled val/elbo estimate (fixed-seed, analytic KL)", ge=1
    )
    kl_cls_weight: float = key(1.0, "weight of KL(q(z_cls|x) || N(0, I))")
    kl_cls_free_bits: float = key(1.0, "nats per z_cls dimension that KL(z_cls) does not charge", ge=0)
    kl_patch_weight: float = key(1.0, "weight of KL(q(z_patch|x) || p(z_patch|z_cls))")
    mmd_weight: float = key(10.0, "weight of the patch IMQ-MMD once the curriculum has ramped in")
    mmd_cls_weight: float = key(10.0, "weight of the z_cls IMQ-MMD (aggregate q(z_cls) vs N(0, I))")
    discrepancy_weight: float = key(0.1, "weight of ||mu_patch - Z~_patch||^2 (posterior mean)")
    prior_recon_weight: float = key(
        1.0,
        "weight (x recon_weight) of the error of x decoded from p(z_patch | z_cls) alone; 0 skips that pass",
    )
    mask_prob: float = key(
        0.0,
        "share of training batches whose encoder sees only some patches (masked training: the "
        "hidden patches are reconstructed from z_cls and the prior; see docs/freezing.md for "
        "what it cost on the digits)",
        ge=0,
        le=1,
    )
    mask_ratio_min: float = key(0.25, "smallest hidden share of patches in a masked batch", gt=0, lt=1)
    mask_ratio_max: float = key(0.75, "largest hidden share of patches in a masked batch", gt=0, lt=1)
    kl_warmup_epochs: int = key(3, "T_w: KL-only epochs", ge=0)
    ramp_epochs: int = key(3, "epochs of the linear ramp from KL to the KL/MMD mix", ge=0)
    kl_mix: float = key(0.5, "fraction of the KL weight kept after the ramp", ge=0, le=1)
    mmd_scales: tuple[float, ...] = key(
        (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0), "IMQ kernel scales s (C = 2 d s)", min_length=1, gt=0
    )
    mmd_max_samples: int = key(512, "patch latents per batch compared by the patch MMD (random subset)", ge=2)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = key(0.002, "peak AdamW learning rate", gt=0)
    weight_decay: float = key(0.05, "AdamW decay on weight matrices only (not norms, biases, tokens, tau)")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.95, "AdamW beta2")
    warmup_epochs: float = key(1.0, "epochs of linear LR warm-up, then cosine decay to min_lr_ratio * lr")
    min_lr_ratio: float = key(0.05, "final LR / peak LR")
    grad_clip: float = key(1.0, "max global gradient norm; 0 disables clipping")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = key(30, "epochs to train", gt=0)
    batch_size: int = key(32, "batch size per worker", gt=0)
    num_workers: int = key(1, "Ray Train workers; 0 runs Ray Train's local mode in this process", ge=0)
    cpus_per_worker: float = key(
        0.0,
        "CPUs per worker, also its torch threads; 0 = auto: a Ray started "
        "here shares its CPUs among the workers, a cluster (train.address) "
        "gives 1",
        ge=0,
    )
    worker_resource: str | None = key(
        None, "custom resource each worker also requests 1 of (keeps workers on the node types that have it)"
    )
    gpu: bool = key(False, "one GPU per worker, bf16 autocast")
    compile: bool = key(False, "torch.compile the model (recompiles when the frozen set changes)")
    address: str | None = key(None, 'Ray cluster address ("auto"); null starts a local Ray')
    wait_for_workers: int = key(
        0,
        "before starting, wait until the cluster holds this many Ray Train workers (whole runs; "
        "a sweep's trial drivers included), asking the autoscaler for them; a sweep then runs "
        "as many trials at once as those hold; 0 = no wait",
        ge=0,
    )
    wait_timeout_s: float = key(
        600.0,
        "the most train.wait_for_workers waits; then the run goes on with the workers the "
        "cluster holds, or stops with one line (exit 2) if one run does not fit",
        gt=0,
    )
    output: str = key(
        "runs/digits-tiny", "run directory, local or URI: config.yaml, metrics.jsonl, TensorBoard"
    )
    storage_path: str | None = key(None, "Ray Train checkpoint storage; null = the run directory")
    shared_fs: bool = key(
        False, "a local output is a mount every node sees (NFS): skip the multi-node storage check"
    )
    run_name: str = key("train", "Ray Train run name (deterministic, so a rerun resumes)")
    seed: int = key(0, "seed of all randomness")
    max_failures: int = key(
        2, "worker-group restarts from the last checkpoint after a failure; -1 = no limit", ge=-1
    )
    max_preemption_failures: int = key(
        -1,
        "restarts after a node is preempted (a spot node reclaimed), counted apart from "
        "train.max_failures; -1 = no limit",
        ge=-1,
    )
    max_nonfinite_steps: int = key(
        0,
        "steps with a non-finite loss skipped (counted in metrics) before the "
        "run stops; 0 = stop at the first",
        ge=0,
    )
    select_metric: str = key(
        "val/elbo",
        "metric (minimised) that ranks checkpoints, the run's best and the default of tune/export --metric",
        choices=("val/elbo", "val/mse"),
    )
    num_checkpoints: int = key(2, "best checkpoints kept by train.select_metric (the latest is also kept)")
    log_images: bool = key(True, "reconstruction and sample grids in TensorBoard")
    num_image_samples: int = key(16, "images per grid")
    eval_every: int = key(
        5,
        "every N epochs and the last: val/probe_acc, val/fid, val/kid, the inpainting "
        "and interpolation grids; 0 = never",
        ge=0,
    )


@dataclass(frozen=True)
class TemperatureConfig:
    enabled: bool = key(True, "false fixes every head's tau factor at 1 (ablation)")
    alpha: float = key(5.0, "tau factor^(t+1) = 1 / (1 + alpha * drift_w1^(t))", ge=0)


@dataclass(frozen=True)
class FreezeConfig:
    enabled: bool = key(True, "false never freezes a head (ablation)")
    drift_ratio: float = key(
        2.0,
        "a head has converged while its drift_w1 stays below drift_ratio x its noise floor "
        "(the W1 between the epoch's even- and odd-sample readouts, same weights)",
        ge=0,
    )
    patience: int = key(3, "epochs the drift must stay below the threshold", ge=1)
    kappa_window: int = key(3, "epochs over which kappa must not change", ge=1)
    min_epoch: int = key(-1, "no freezing before this epoch; -1 = loss.kl_warmup_epochs")
    max_frozen_frac: float = key(1.0, "cap on the fraction of a layer's heads that may freeze", ge=0, le=1)
    blocks: bool = key(
        True,
        "freeze whole encoder blocks from the bottom (run under no_grad) once "
        "freeze.block_min_heads of the block's heads are frozen and its output has converged "
        "by freeze.block_ratio; its other heads freeze with it",
    )
    bottom_up: bool = key(
        True,
        "with freeze.blocks, a head may freeze only in the lowest block not yet frozen whole: "
        "the network freezes from the bottom up, and the blocks above keep adapting",
    )
    block_min_heads: float = key(
        0.5,
        "fraction of a block's heads that must be frozen before the block may freeze whole (1.0: every head)",
        ge=0,
        le=1,
    )
    block_ratio: float = key(
        0.6,
        "a block's output has converged when its change over the last freeze.patience epochs "
        "on the probe images is below block_ratio x its noise floor (the difference between "
        "the probe's halves)",
        ge=0,
    )
    cache_mb: float = key(
        1024.0,
        "MiB per worker (on its device) for keeping the frozen block prefix's output per "
        "training image, so the prefix's forward runs once per image, not every epoch; a "
        "train split that needs more, or a streamed one, runs the prefix every step; the "
        "same bound applies, separately, to the validation images' cache; 0 = off",
        ge=0,
    )
    probe_size: int = key(64, "fixed validation images for the patch->patch attention (kappa)", ge=1)
    kappa_top_k: int = key(8, "eigenvalue magnitudes examined for the cluster-count gap", ge=1)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# Model size presets: the starting values of ``model.*`` for ``model.preset``.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},  # the ModelConfig defaults
    "small": dict(
        patch_size=8,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        z_cls_dim=64,
        z_patch_dim=16,
        prior_hidden=1024,
        dec_dim=256,
        dec_depth=4,
        dec_heads=8,
    ),
}
_PRESET_USES = {"tiny": "fast CPU runs on 32x32 images", "small": "about ViT-S width, for 64x64 GPU runs"}

# Keys that were renamed: an old one is an error naming the new one.
RENAMED_SECTIONS = {"scheduler": "temperature"}
RENAMED_KEYS = {
    "loss.warmup_epochs": "loss.kl_warmup_epochs",
    "freeze.drift_threshold": "freeze.drift_ratio",
}
# Keys that were removed: an old one is an error saying why and what to do.
REMOVED_KEYS = {
    "freeze.mode": "a frozen head always runs its forward without autograd; see docs/freezing.md",
    "freeze.out_proj": "the attention output projection always trains",
}


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _sections() -> dict[str, type]:
    """Section name -> section class, in ``Config``'s order."""
    return {f.name: f.default_factory for f in fields(Config)}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, dotted + "."))
        else:
            out[dotted] = v
    return out


def _by_section(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Dotted keys grouped as {section: {field: value}}, each value read as its field's type;
    unknown and renamed keys raise."""
    sections = _sections()
    out: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        name, _, field_name = dotted.partition(".")
        if name in RENAMED_SECTIONS:
            new = f"{RENAMED_SECTIONS[name]}.{field_name or '<key>'}"
            raise ConfigError(f"config key '{dotted}' was renamed: use '{new}'")
        if dotted in RENAMED_KEYS:
            raise ConfigError(f"config key '{dotted}' was renamed: use '{RENAMED_KEYS[dotted]}'")
        if dotted in REMOVED_KEYS:
            raise ConfigError(f"config key '{dotted}' was removed ({REMOVED_KEYS[dotted]}): drop it")
        if name not in sections or not field_name:
            raise ConfigError(f"unknown config key '{dotted}': sections are {', '.join(sections)}")
        hints = typing.get_type_hints(sections[name])
        if field_name not in hints:
            raise ConfigError(f"unknown config key '{dotted}': valid keys in '{name}' are {', '.join(hints)}")
        out.setdefault(name, {})[field_name] = _coerce(dotted, value, hints[field_name])
    return out


def build_config(overrides: Mapping[str, Any] | None = None, base: Config | None = None) -> Config:
    """Return ``base`` (default: all defaults) with dotted-key ``overrides`` applied and validated.

    ``model.preset`` is applied first, so explicit ``model.*`` keys win over the preset.
    """
    cfg = base or Config()
    sections = _by_section(_flatten(overrides or {}))
    if "preset" in sections.get("model", {}):
        preset = sections["model"]["preset"]
        if preset not in MODEL_PRESETS:
            raise ConfigError(
                f"config key 'model.preset' must be one of {', '.join(MODEL_PRESETS)}, got {preset!r}"
            )
        cfg = replace(cfg, model=ModelConfig(preset=preset, **MODEL_PRESETS[preset]))
    for name, values in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
    validate(cfg)
    return cfg


_BAD = object()


def _read(value: Any, tp: type) -> Any:
    """``value`` as a ``tp`` (bool, int, float or str), or ``_BAD``: a bool is only a bool, an
    int only an int (not 3.0 or "3"), a float also an int or a numeric string (YAML 1.1 reads
    1e-3 as a string), a str also a number."""
    if isinstance(value, bool) or tp is bool:  # true/false only where a bool belongs
        return value if isinstance(value, bool) and tp is bool else _BAD
    if tp is float and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            return _BAD
    if tp is str and isinstance(value, (int, float)):
        return str(value)
    return value if isinstance(value, tp) else _BAD


def _coerce(dotted: str, value: Any, tp: Any) -> Any:
    """``value`` read as the annotation ``tp`` (``X | None`` takes None, a tuple a list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return None if value is None else _coerce(dotted, value, args[0])
    if origin is tuple:
        items = [_read(v, args[0]) for v in value] if isinstance(value, (list, tuple)) else [_BAD]
        out = _BAD if any(v is _BAD for v in items) else tuple(items)
    else:
        out = _read(value, tp)
    if out is _BAD:
        raise ConfigError(f"config key '{dotted}' expects {_type_name(tp)}, got {value!r}")
    return out


def validate(cfg: Config) -> None:
    """Every field's constraints, then the checks across keys; each a one-line error naming the key."""
    for name in _sections():
        section = getattr(cfg, name)
        for f in fields(section):
            value = getattr(section, f.name)
            if not _satisfies(value, f.metadata):
                raise ConfigError(
                    f"config key '{name}.{f.name}' must be {_constraint(f)}, got {to_dict(value)!r}"
                )
    m, d = cfg.model, cfg.data
    if m.embed_dim % m.num_heads:
        raise ConfigError(
            f"config key 'model.embed_dim' ({m.embed_dim}) must be divisible by "
            f"model.num_heads ({m.num_heads})"
        )
    if m.dec_dim % m.dec_heads:
        raise ConfigError(
            f"config key 'model.dec_dim' ({m.dec_dim}) must be divisible by model.dec_heads ({m.dec_heads})"
        )
    if cfg.loss.mask_ratio_min > cfg.loss.mask_ratio_max:
        raise ConfigError(
            f"config key 'loss.mask_ratio_min' ({cfg.loss.mask_ratio_min}) must be at most "
            f"loss.mask_ratio_max ({cfg.loss.mask_ratio_max})"
        )
    if d.image_size % m.patch_size:
        raise ConfigError(
            f"config key 'data.image_size' ({d.image_size}) must be a multiple of "
            f"model.patch_size ({m.patch_size})"
        )


_BOUNDS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}
_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _satisfies(value: Any, constraints: Mapping[str, Any]) -> bool:
    """Whether ``value`` meets a field's constraints (NaN meets no bound)."""
    if "choices" in constraints and value not in constraints["choices"]:
        return False
    items = value if isinstance(value, tuple) else (value,)
    if len(items) < constraints.get("min_length", 0):
        return False
    return all(op(v, constraints[k]) for k, op in _BOUNDS.items() if k in constraints for v in items)


def _constraint(f: Field) -> str:
    """A field's constraints in words (``> 0``, ``in (0, 1)``, ``weights or detach``); "" if none."""
    c = f.metadata
    if "choices" in c:
        *first, last = map(str, c["choices"])
        return f"{', '.join(first)} or {last}"
    low = next((k for k in ("gt", "ge") if k in c), None)
    high = next((k for k in ("lt", "le") if k in c), None)
    if low and high:
        bounds = f"in {'(' if low == 'gt' else '['}{c[low]}, {c[high]}{')' if high == 'lt' else ']'}"
    else:
        bounds = " ".join(f"{_SYMBOLS[k]} {c[k]}" for k in (low, high) if k)
    if not isinstance(f.default, tuple):
        return bounds
    # a list field (its default a tuple): the bounds are each element's
    return ", ".join(filter(None, ["non-empty" if c.get("min_length") else "", bounds and f"each {bounds}"]))


def _type_name(tp: Any) -> str:
    """A type in YAML words: ``int``, ``float``, ``str or null``, ``list of float``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return f"list of {_type_name(args[0])}" if origin is tuple else tp.__name__


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``--set dotted.key=value``; the value is read as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    dotted, sep, raw = item.partition("=")
    if not sep or not dotted.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return dotted.strip(), value


# The source tree holding the shipped presets (configs/, tune_spaces/): the package's parent.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def find_yaml(name: str | Path, folder: str, what: str, error: type[ConfigError] = ConfigError) -> Path:
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
    raise error(
        f"{what} {str(name)!r} not found: pass a YAML file or a name from {folder}/ "
        f"({', '.join(names) or 'none shipped'})"
    )


def load_yaml(
    path: str | Path,
    what: str = "config file",
    folder: str = "configs",
    error: type[ConfigError] = ConfigError,
) -> dict[str, Any]:
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


def absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute against the current directory, since Ray Train workers and
    Tune trials run in directories of their own (URIs are kept as they are)."""
    from . import filesystem

    def absolute(path: str | None) -> str | None:
        return None if path is None else filesystem.absolute(path)

    t, d = cfg.train, cfg.data
    return replace(
        cfg,
        data=replace(d, root=absolute(d.root)),
        train=replace(t, output=absolute(t.output), storage_path=absolute(t.storage_path)),
    )


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


# Keys added after runs were saved without them, with the value that rebuilds what those
# runs trained: a saved config that lacks one gets this, not today's default.
SAVED_WITHOUT = {"model.dec_conv": 0}


def from_dict(d: Mapping[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a checkpoint or config.yaml); a key the
    saved config predates takes its :data:`SAVED_WITHOUT` value."""
    flat = _flatten(d)
    return build_config({**{k: v for k, v in SAVED_WITHOUT.items() if k not in flat}, **flat})


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _yaml(value: Any) -> str:
    """A value as YAML writes it inline: ``true``, ``null``, ``[0.1, 0.2]``."""
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def reference_markdown() -> str:
    """The config reference (``docs/config.md``): every key with its default, its accepted
    values and its meaning, section by section, then the model presets."""
    renamed = [f"`{old}.*` is now `{new}.*`" for old, new in RENAMED_SECTIONS.items()]
    renamed += [f"`{old}` is now `{new}`" for old, new in RENAMED_KEYS.items()]
    lines = [
        "# Config reference",
        "",
        "Generated from `vitcae_ray/config.py` by `python -m vitcae_ray.config > docs/config.md`.",
        "",
        "Precedence, lowest first: the defaults below < `--config FILE.yaml` < CLI flags <",
        "`--set section.key=value` (repeatable; the value is read as YAML:",
        "`--set loss.mmd_scales=[0.5,1,2]`).",
        "An unknown key or a bad value stops with a one-line error naming the key (exit code 2).",
        f"Renamed keys (an old key is an error naming the new one): {', '.join(renamed)}.",
        "Removed keys (an error saying why): "
        + ", ".join(f"`{old}` ({why})" for old, why in REMOVED_KEYS.items())
        + ".",
    ]
    for name, cls in _sections().items():
        lines += ["", f"## `{name}`", "", "| key | default | accepts | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            accepts = "" if "choices" in f.metadata else _type_name(hints[f.name])  # choices say it all
            accepts = f"{accepts} {_constraint(f)}".strip()
            meaning = f.metadata["doc"].replace("|", "\\|")
            lines.append(f"| `{name}.{f.name}` | `{_yaml(f.default)}` | {accepts} | {meaning} |")
    lines += [
        "",
        "## Model presets",
        "",
        "`model.preset` sets these `model.*` keys first; explicit `model.*` keys win.",
        "",
        "| preset | use | keys |",
        "|---|---|---|",
    ]
    for preset, values in MODEL_PRESETS.items():
        keys = ", ".join(f"`{k}={_yaml(v)}`" for k, v in values.items()) or "the defaults above"
        lines.append(f"| `{preset}` | {_PRESET_USES.get(preset, '')} | {keys} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "EPOCHS_DONE",
    "SELECT_METRIC",
    "Config",
    "ConfigError",
    "DataConfig",
    "FreezeConfig",
    "TemperatureConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "MODEL_PRESETS",
    "PROJECT_ROOT",
    "RENAMED_KEYS",
    "RENAMED_SECTIONS",
    "absolute_paths",
    "build_config",
    "find_yaml",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "parse_set",
    "reference_markdown",
    "resolve",
    "to_dict",
    "validate",
]


if __name__ == "__main__":
    print(reference_markdown(), end="")
