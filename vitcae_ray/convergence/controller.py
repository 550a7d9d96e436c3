"""The head-convergence controller: per-head temperature factors and freeze decisions, keyed by
epoch. Plain Python and numpy; ``actor.py`` wraps it in a Ray actor.

At epoch t, for head (l, h) with p^(t)_{l,h} its mean CLS->patch attention (normalised over the
N patches) and A^(t)_{l,h} its mean patch->patch attention on the probe batch, both measured
with the head's learned temperature alone (the factor f below left out, so a change of f between
epochs never shows up as drift; see ``Attention.diagnostic_attention``):

- drift    d^(t) = W1(p^(t-1), p^(t))   (NaN at the first epoch the controller sees);
- clusters kappa^(t) = kappa(A^(t))      (-1 when no patch attention is given);
- factor   f^(t+1) = 1 / (1 + alpha * d^(t)) for heads not frozen at t (1 when d^(t) is NaN);
  a frozen head keeps f^(t_freeze), the factor it used in its freeze epoch; with the temperature schedule
  disabled f = 1 everywhere. The decision for epoch t carries f^(t+1), applied from t + 1 on.
- floor    n^(t) = W1(p_even^(t), p_odd^(t)): the same readout over the even- and the odd-indexed
  samples of every batch, two readouts of the same weights on different images: the size of a
  drift that measurement noise alone produces (NaN when the halves are not given);
- freeze   (freezing enabled) head (l, h) freezes at t when t >= min_epoch,
  d^(s) < drift_ratio * n^(s) for every s in t-patience+1..t (all defined), and kappa^(s) takes
  a single value (all available) over s in t-kappa_window+1..t. Frozen heads stay frozen. At
  most floor(max_frozen_frac * H) heads of a layer are frozen; when more qualify, those with the
  smallest mean drift over the patience window freeze first (ties: lower head index). With
  ``bottom_up`` (and ``blocks``, and no cap below H) only heads of layers 0..k freeze, k the
  frozen prefix below: the heads of the lowest block still trained, and none above it.
- blocks   (freeze.blocks) with M_l^(t) block l's output on the probe images averaged over
  the images ((T, D) per block) and M_l,a / M_l,b the same over the probe's two halves:
  change over the patience window c_l^(t) = ||M_l^(t) - M_l^(t-patience)|| / ||M_l^(t)|| (a
  slow, steady drift adds up over the window where a per-epoch change would hide it), floor
  m_l^(t) = ||M_l,a - M_l,b|| / ||M_l^(t)||. The frozen prefix k (blocks 0..k-1, with the
  patch embedding) grows by block k at t when at least ceil(block_min_heads * H) heads of
  block k are frozen (counting those frozen at t) and c_k^(t) < block_ratio * m_k^(t); the
  block's other heads freeze with it at t (a head's attention may still wander while the
  block's output, what the blocks above and the latents read, has stopped moving). No block
  freezes when max_frozen_frac caps a layer below H heads. The prefix never shrinks. The
  trainer runs the prefix under no_grad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Config, FreezeConfig, TemperatureConfig
from .diagnostics import drift_w1_heads, kappa_heads, relative_change

__all__ = ["HeadController", "HeadDecision", "controller_args"]

STATE_VERSION = 2


def _json(v: float) -> float | None:
    return None if math.isnan(v) else v


def _defined_mean(grid: list[list[float]]) -> float | None:
    """Mean of a per-head grid's non-NaN values; None when there are none."""
    d = np.array(grid, dtype=np.float64)
    return None if d.size == 0 or np.isnan(d).all() else float(np.nanmean(d))


def _float(v: float | None) -> float:
    return math.nan if v is None else float(v)


@dataclass(frozen=True)
class HeadDecision:
    """The controller's decision after epoch ``epoch``; every grid is indexed [layer][head]."""

    epoch: int
    tau_factor: list[list[float]]  # f^(epoch+1): the factor to apply from epoch + 1 on
    frozen: list[list[bool]]
    frozen_epoch: list[list[int | None]]  # the epoch a head froze at; None while it is not frozen
    drift: list[list[float]]  # d^(epoch); NaN where undefined (the first epoch)
    kappa: list[list[int]]  # kappa^(epoch); -1 where unavailable
    newly_frozen: list[tuple[int, int]] = field(default_factory=list)  # (layer, head), sorted
    # n^(epoch), the drift's noise floor; NaN if unknown
    floor: list[list[float]] = field(default_factory=list)
    block_change: list[float] = field(default_factory=list)  # c_l^(epoch) over patience; NaN: undefined
    block_floor: list[float] = field(default_factory=list)  # m_l^(epoch); NaN where unknown
    frozen_blocks: int = 0  # the frozen prefix: encoder blocks 0..frozen_blocks-1
    block_frozen_epoch: list[int | None] = field(default_factory=list)  # per block; None while trained

    @property
    def num_frozen(self) -> int:
        return sum(sum(row) for row in self.frozen)

    @property
    def num_heads_total(self) -> int:
        return sum(len(row) for row in self.frozen)

    @property
    def frozen_heads(self) -> list[list[int]]:
        """Per layer, the indices of the heads this decision has frozen."""
        return [[h for h, f in enumerate(row) if f] for row in self.frozen]

    @property
    def mean_drift(self) -> float | None:
        """Mean of the defined drifts over all heads; None when none is defined."""
        return _defined_mean(self.drift)

    @property
    def mean_floor(self) -> float | None:
        """Mean of the known noise floors over all heads; None when none is known."""
        return _defined_mean(self.floor)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe types: NaN drifts become None, (layer, head) tuples become lists."""
        return {
            "epoch": self.epoch,
            "tau_factor": [list(row) for row in self.tau_factor],
            "frozen": [list(row) for row in self.frozen],
            "frozen_epoch": [list(row) for row in self.frozen_epoch],
            "drift": [[None if math.isnan(v) else v for v in row] for row in self.drift],
            "kappa": [list(row) for row in self.kappa],
            "newly_frozen": [[l, h] for l, h in self.newly_frozen],
            "floor": [[_json(v) for v in row] for row in self.floor],
            "block_change": [_json(v) for v in self.block_change],
            "block_floor": [_json(v) for v in self.block_floor],
            "frozen_blocks": self.frozen_blocks,
            "block_frozen_epoch": list(self.block_frozen_epoch),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadDecision:
        """Inverse of :meth:`to_dict`."""
        return cls(
            epoch=int(d["epoch"]),
            tau_factor=[[float(v) for v in row] for row in d["tau_factor"]],
            frozen=[[bool(v) for v in row] for row in d["frozen"]],
            frozen_epoch=[[None if v is None else int(v) for v in row] for row in d["frozen_epoch"]],
            drift=[[math.nan if v is None else float(v) for v in row] for row in d["drift"]],
            kappa=[[int(v) for v in row] for row in d["kappa"]],
            newly_frozen=[(int(l), int(h)) for l, h in d["newly_frozen"]],
            floor=[[_float(v) for v in row] for row in d["floor"]],
            block_change=[_float(v) for v in d["block_change"]],
            block_floor=[_float(v) for v in d["block_floor"]],
            frozen_blocks=int(d["frozen_blocks"]),
            block_frozen_epoch=[None if v is None else int(v) for v in d["block_frozen_epoch"]],
        )


class HeadController:
    """Per-head temperature schedule and freeze state machine (equations in the module doc).

    Args:
        num_layers, num_heads: the encoder's attention heads (L x H).
        grid: the patch grid side (image_size // patch_size); N = grid**2 patches.
        temperature, freeze: the config sections.
        min_epoch: the first epoch at which a head may freeze (already resolved by the caller).
        replay_window: how many of the latest recorded epochs can be replayed; the controller
            keeps the CLS distributions of the last ``replay_window + 1`` epochs.

    Decisions are keyed by epoch: ``update(t)`` first discards any recorded epochs >= t, so a
    replayed epoch overwrites and gives the same decision as the first time. Otherwise epochs are
    contiguous: ``update(t)`` needs epoch t - 1 recorded, unless the history is empty.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        grid: int,
        temperature: TemperatureConfig,
        freeze: FreezeConfig,
        min_epoch: int,
        replay_window: int = 8,
    ) -> None:
        if replay_window < 1:
            raise ValueError(f"replay_window must be >= 1, got {replay_window}")
        self.num_layers, self.num_heads, self.grid = num_layers, num_heads, grid
        self.temperature, self.freeze, self.min_epoch = temperature, freeze, min_epoch
        self.replay_window = replay_window
        self._decisions: dict[int, HeadDecision] = {}
        self._cls: dict[int, np.ndarray] = {}  # epoch -> normalised (L, H, N) CLS->patch attention
        self._blocks: dict[int, np.ndarray] = {}  # epoch -> (L, F) block outputs on the probe

    @property
    def last_epoch(self) -> int | None:
        return max(self._decisions) if self._decisions else None

    def decision(self, epoch: int) -> HeadDecision:
        """The stored decision for ``epoch``; KeyError if there is none."""
        if epoch not in self._decisions:
            raise KeyError(f"no head decision recorded for epoch {epoch}")
        return self._decisions[epoch]

    def update(
        self,
        epoch: int,
        cls_attn: np.ndarray,
        patch_attn: np.ndarray | None,
        cls_halves: np.ndarray | None = None,
        block_maps: np.ndarray | None = None,
    ) -> HeadDecision:
        """Record epoch ``epoch``'s statistics and return its decision.

        ``cls_attn`` (L, H, N): the epoch's mean CLS->patch attention per head (renormalised over
        N here). ``patch_attn`` (L, H, N, N): the probe batch's mean patch->patch attention, or
        None: kappa is then unavailable (-1) and, as the kappa condition cannot hold, no head
        freezes for the next ``kappa_window`` epochs. ``cls_halves`` (2, L, H, N): the readout
        over the even- and the odd-indexed samples (the drift's noise floor; without it, or
        with an empty half, no head freezes). ``block_maps`` (3, L, ...): each encoder
        block's output on the probe images averaged over the images, then over the probe's
        two halves (without it no block freezes). A failed update changes nothing.
        """
        epoch = int(epoch)
        cls = self._check_cls(cls_attn)
        kap = self._check_kappa(patch_attn)
        floor = self._check_floor(cls_halves)
        blocks, block_floor = self._check_blocks(block_maps)
        history = {e: d for e, d in self._decisions.items() if e < epoch}
        prev = history.get(epoch - 1)
        if history and prev is None:
            raise ValueError(f"epoch {epoch} does not follow the last recorded epoch {max(history)}")
        if prev is not None and epoch - 1 not in self._cls:
            raise ValueError(
                f"cannot replay epoch {epoch}: it lies outside the replay window of "
                f"{self.replay_window} epochs; load the state saved after epoch "
                f"{epoch - 1} first"
            )
        L, H = self.num_layers, self.num_heads
        drift = (
            drift_w1_heads(self._cls[epoch - 1], cls, self.grid)
            if prev is not None
            else np.full((L, H), np.nan)
        )
        before = self._blocks.get(epoch - self.freeze.patience) if prev is not None else None
        change = (
            relative_change(before, blocks)
            if before is not None and blocks is not None
            else np.full(L, np.nan)
        )

        frozen = [list(r) for r in prev.frozen] if prev else [[False] * H for _ in range(L)]
        frozen_epoch = [list(r) for r in prev.frozen_epoch] if prev else [[None] * H for _ in range(L)]
        prefix = prev.frozen_blocks if prev else 0
        newly = (
            self._to_freeze(epoch, history, frozen, drift, floor, kap, prefix) if self.freeze.enabled else []
        )
        for l, h in newly:
            frozen[l][h], frozen_epoch[l][h] = True, epoch
        block_epoch = list(prev.block_frozen_epoch) if prev else [None] * L
        if self.freeze.enabled and self.freeze.blocks:
            for l in range(prefix, L):
                if not self._block_converged(epoch, l, frozen, change, block_floor):
                    break
                prefix, block_epoch[l] = l + 1, epoch
                for h in range(H):
                    if not frozen[l][h]:
                        frozen[l][h], frozen_epoch[l][h] = True, epoch
                        newly.append((l, h))
        newly.sort()

        in_use = prev.tau_factor if prev else [[1.0] * H for _ in range(L)]
        tau = [[1.0] * H for _ in range(L)]
        if self.temperature.enabled:
            for l in range(L):
                for h in range(H):
                    if frozen[l][h]:
                        tau[l][h] = in_use[l][h]  # the factor it used when it froze
                    elif not math.isnan(drift[l, h]):
                        tau[l][h] = 1.0 / (1.0 + self.temperature.alpha * float(drift[l, h]))
        decision = HeadDecision(
            epoch=epoch,
            tau_factor=tau,
            frozen=frozen,
            frozen_epoch=frozen_epoch,
            drift=drift.tolist(),
            kappa=kap.tolist(),
            newly_frozen=newly,
            floor=floor.tolist(),
            block_change=change.tolist(),
            block_floor=block_floor.tolist(),
            frozen_blocks=prefix,
            block_frozen_epoch=block_epoch,
        )

        self._decisions = {**history, epoch: decision}
        keep = range(epoch - self.replay_window, epoch)
        self._cls = {e: v for e, v in self._cls.items() if e in keep}
        self._cls[epoch] = cls
        keep = range(epoch - self.replay_window - self.freeze.patience, epoch)
        self._blocks = {e: v for e, v in self._blocks.items() if e in keep}
        if blocks is not None:
            self._blocks[epoch] = blocks
        return decision

    def _check_floor(self, cls_halves: np.ndarray | None) -> np.ndarray:
        """(2, L, H, N) half readouts -> (L, H) noise floor W1(even, odd); NaN without them."""
        L, H = self.num_layers, self.num_heads
        if cls_halves is None:
            return np.full((L, H), np.nan)
        halves = np.asarray(cls_halves, dtype=np.float64)
        if halves.shape != (2, L, H, self.grid**2):
            raise ValueError(f"cls_halves has shape {halves.shape}, expected {(2, L, H, self.grid**2)}")
        if not (halves.sum(-1) > 0).all():  # a half with no samples (batches of one): no floor
            return np.full((L, H), np.nan)
        return drift_w1_heads(self._check_cls(halves[0]), self._check_cls(halves[1]), self.grid)

    def _check_blocks(self, block_maps: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
        """(3, L, ...) probe block outputs -> ((L, F) the whole probe's, (L,) floor m_l)."""
        L = self.num_layers
        if block_maps is None:
            return None, np.full(L, np.nan)
        maps = np.asarray(block_maps, dtype=np.float64)
        if maps.ndim < 3 or maps.shape[:2] != (3, L) or not np.isfinite(maps).all():
            raise ValueError(f"block_maps must be a finite (3, {L}, ...) array, got shape {maps.shape}")
        # float32, as the state stores them, so a restored controller decides exactly alike
        whole, a, b = (m.reshape(L, -1).astype(np.float32).astype(np.float64) for m in maps)
        with np.errstate(divide="ignore", invalid="ignore"):
            return whole, np.linalg.norm(a - b, axis=1) / np.linalg.norm(whole, axis=1)

    def _block_converged(
        self,
        epoch: int,
        layer: int,
        frozen: list[list[bool]],
        change: np.ndarray,
        block_floor: np.ndarray,
    ) -> bool:
        """Whether block ``layer`` may join the frozen prefix at ``epoch`` (module doc)."""
        H = self.num_heads
        if epoch < self.min_epoch or math.floor(self.freeze.max_frozen_frac * H) < H:
            return False
        if sum(frozen[layer]) < math.ceil(self.freeze.block_min_heads * H - 1e-9):
            return False
        return bool(change[layer] < self.freeze.block_ratio * block_floor[layer])  # NaN: False

    def _check_cls(self, cls_attn: np.ndarray) -> np.ndarray:
        """(L, H, N) attention -> per-head distributions over the N patches."""
        shape = (self.num_layers, self.num_heads, self.grid**2)
        cls = np.clip(np.asarray(cls_attn, dtype=np.float64), 0.0, None)
        if cls.shape != shape:
            raise ValueError(f"cls_attn has shape {cls.shape}, expected {shape}")
        total = cls.sum(-1, keepdims=True)
        if not (np.isfinite(total).all() and (total > 0).all()):
            raise ValueError("cls_attn needs a positive, finite mass for every head")
        return cls / total

    def _check_kappa(self, patch_attn: np.ndarray | None) -> np.ndarray:
        """(L, H, N, N) attention -> (L, H) kappa, or -1 everywhere without it."""
        if patch_attn is None:
            return np.full((self.num_layers, self.num_heads), -1, dtype=np.int64)
        n = self.grid**2
        shape = (self.num_layers, self.num_heads, n, n)
        patch = np.asarray(patch_attn, dtype=np.float64)
        if patch.shape != shape:
            raise ValueError(f"patch_attn has shape {patch.shape}, expected {shape}")
        return kappa_heads(patch, self.freeze.kappa_top_k)

    def _to_freeze(
        self,
        epoch: int,
        history: dict[int, HeadDecision],
        frozen: list[list[bool]],
        drift: np.ndarray,
        floor: np.ndarray,
        kap: np.ndarray,
        prefix: int,
    ) -> list[tuple[int, int]]:
        """Heads that newly satisfy the freeze rule at ``epoch``, within the per-layer cap (and
        with ``bottom_up`` in the layers up to the block above the frozen ``prefix``)."""
        fz = self.freeze
        if epoch < self.min_epoch:
            return []

        def window(length: int, now: np.ndarray, key: str) -> np.ndarray | None:
            """(length, L, H) values of epochs epoch-length+1..epoch; None if any is missing."""
            past = range(epoch - length + 1, epoch)
            if any(e not in history for e in past):
                return None
            return np.array([getattr(history[e], key) for e in past] + [now.tolist()], dtype=np.float64)

        drifts = window(fz.patience, drift, "drift")
        floors = window(fz.patience, floor, "floor")
        kappas = window(fz.kappa_window, kap, "kappa")
        if drifts is None or floors is None or kappas is None:
            return []
        converged = (drifts < fz.drift_ratio * floors).all(0)  # NaN compares False
        stable = (kappas == kappas[0]).all(0) & (kappas[0] >= 0)
        mean_drift = drifts.mean(0)
        newly: list[tuple[int, int]] = []
        cap = math.floor(fz.max_frozen_frac * self.num_heads)
        # bottom-up only where blocks can freeze: a cap below H keeps every block training
        upward = fz.bottom_up and fz.blocks and cap == self.num_heads
        top = min(prefix, self.num_layers - 1) if upward else self.num_layers - 1
        for l in range(top + 1):
            candidates = sorted(
                (float(mean_drift[l, h]), h)
                for h in range(self.num_heads)
                if not frozen[l][h] and converged[l, h] and stable[l, h]
            )
            room = max(cap - sum(frozen[l]), 0)
            newly += [(l, h) for h in sorted(h for _, h in candidates[:room])]
        return newly

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, in plain Python types (JSON-safe; loads with
        ``torch.load(weights_only=True)``): every epoch's decision (drift, kappa, tau factors,
        frozen set, freeze epochs) and the CLS distributions of the replay window."""
        return {
            "version": STATE_VERSION,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "grid": self.grid,
            "decisions": [self._decisions[e].to_dict() for e in sorted(self._decisions)],
            "cls": {str(e): self._cls[e].tolist() for e in sorted(self._cls)},
            "blocks": {str(e): self._blocks[e].astype(np.float32).tolist() for e in sorted(self._blocks)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the whole state with ``state`` (from :meth:`state_dict`)."""
        shape = (self.num_layers, self.num_heads, self.grid)
        saved = tuple(state.get(k, v) for k, v in zip(("num_layers", "num_heads", "grid"), shape))
        if saved != shape:
            raise ValueError(
                f"head state for (layers, heads, grid) = {saved} cannot load into a controller for {shape}"
            )
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"head state version {state.get('version')} is not {STATE_VERSION}: it was written "
                "by an older vitcae_ray; start the run afresh"
            )
        decisions = {int(d["epoch"]): HeadDecision.from_dict(d) for d in state["decisions"]}
        if decisions and sorted(decisions) != list(range(min(decisions), max(decisions) + 1)):
            raise ValueError("head state has non-contiguous epochs")
        cls = {int(e): np.array(v, dtype=np.float64) for e, v in state["cls"].items()}
        n = self.grid**2
        if any(v.shape != (self.num_layers, self.num_heads, n) for v in cls.values()):
            raise ValueError("head state holds CLS attention of the wrong shape")
        blocks = {int(e): np.array(v, dtype=np.float64) for e, v in state["blocks"].items()}
        last = max(decisions) if decisions else None

        def window(d: dict[int, np.ndarray], span: int) -> dict[int, np.ndarray]:
            return {e: v for e, v in d.items() if last is not None and last - span <= e <= last}

        self._decisions = decisions
        self._cls = window(cls, self.replay_window)
        self._blocks = window(blocks, self.replay_window + self.freeze.patience)


def controller_args(cfg: Config) -> tuple:
    """``HeadController(*controller_args(cfg))``: (layers, heads, patch grid, temperature,
    freeze, min_epoch), with ``freeze.min_epoch`` -1 resolved to the end of the KL warm-up."""
    min_epoch = cfg.freeze.min_epoch if cfg.freeze.min_epoch >= 0 else cfg.loss.kl_warmup_epochs
    return (
        cfg.model.depth,
        cfg.model.num_heads,
        cfg.data.image_size // cfg.model.patch_size,
        cfg.temperature,
        cfg.freeze,
        min_epoch,
    )
