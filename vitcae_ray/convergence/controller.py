"""The head-convergence controller: per-head temperature factors and freeze decisions, keyed
by epoch. Plain Python (numpy); the Ray actor in ``actor.py`` wraps it.

At epoch t, for head (l, h), with d the W1 drift of its CLS->patch distribution and kappa its
cluster count:
- tau factor from t+1 on: f = 1 / (1 + alpha * d^(t)) (1 at the first epoch; a frozen head
  keeps the factor it froze with; 1 everywhere with the scheduler off);
- the head freezes at t when t >= min_epoch, d stayed below ``drift_threshold`` over the last
  ``patience`` epochs and kappa took a single value over the last ``kappa_window`` epochs;
  at most floor(max_frozen_frac * H) heads of a layer are frozen (lowest recent drift first).
  Frozen heads stay frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import FreezeConfig, SchedulerConfig
from .diagnostics import drift_w1_heads, kappa_heads


@dataclass(frozen=True)
class HeadDecision:
    """The decision for one epoch; lists are indexed [layer][head]."""

    epoch: int
    tau_factor: list[list[float]]  # to apply from epoch + 1 on
    frozen: list[list[bool]]
    frozen_epoch: list[list[int | None]]
    drift: list[list[float]]  # NaN where undefined (the first epoch)
    kappa: list[list[int]]  # -1 where unavailable
    newly_frozen: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_frozen(self) -> int:
        return sum(map(sum, self.frozen))

    @property
    def num_heads_total(self) -> int:
        return sum(map(len, self.frozen))

    @property
    def mean_drift(self) -> float | None:
        d = np.array(self.drift, dtype=np.float64)
        return None if np.isnan(d).all() else float(np.nanmean(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe types (NaN drift -> None)."""
        return {
            "epoch": self.epoch, "tau_factor": self.tau_factor, "frozen": self.frozen,
            "frozen_epoch": self.frozen_epoch,
            "drift": [[None if math.isnan(v) else v for v in row] for row in self.drift],
            "kappa": self.kappa, "newly_frozen": [list(x) for x in self.newly_frozen],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadDecision:
        return cls(
            epoch=int(d["epoch"]), tau_factor=d["tau_factor"], frozen=d["frozen"],
            frozen_epoch=d["frozen_epoch"],
            drift=[[math.nan if v is None else float(v) for v in row] for row in d["drift"]],
            kappa=d["kappa"], newly_frozen=[tuple(x) for x in d["newly_frozen"]],
        )


class HeadController:
    """Args:
        num_layers, num_heads: the encoder's heads.
        grid: patch grid side (image_size // patch_size).
        scheduler, freeze: the config sections.
        min_epoch: first epoch at which a head may freeze.
    """

    def __init__(self, num_layers: int, num_heads: int, grid: int, scheduler: SchedulerConfig,
                 freeze: FreezeConfig, min_epoch: int) -> None:
        self.L, self.H, self.grid = num_layers, num_heads, grid
        self.scheduler, self.freeze, self.min_epoch = scheduler, freeze, min_epoch
        self._decisions: dict[int, HeadDecision] = {}
        # the last two epochs' CLS->patch distributions (L, H, N): enough for the next drift
        # and for replaying the latest epoch
        self._cls: dict[int, np.ndarray] = {}

    @property
    def last_epoch(self) -> int | None:
        return max(self._decisions) if self._decisions else None

    def decision(self, epoch: int) -> HeadDecision:
        return self._decisions[epoch]

    def update(self, epoch: int, cls_attn: np.ndarray, patch_attn: np.ndarray | None) -> HeadDecision:
        """Record epoch ``epoch``'s statistics and decide. Replaying an epoch discards it and
        every later epoch first, so a replay gives the same decision as the first time.
        Without ``patch_attn`` kappa is unavailable (-1) and no head can freeze."""
        for e in [e for e in self._decisions if e >= epoch]:
            del self._decisions[e]
            self._cls.pop(e, None)
        last = self.last_epoch
        if last is not None and last != epoch - 1:
            raise ValueError(f"epoch {epoch} does not follow the last recorded epoch {last}")
        if last is not None and last not in self._cls:
            raise ValueError(f"cannot decide epoch {epoch}: epoch {last}'s attention is not kept; "
                             "load the state saved after that epoch first")
        cls = np.asarray(cls_attn, dtype=np.float64)
        if cls.shape[:2] != (self.L, self.H):
            raise ValueError(f"cls_attn has shape {cls.shape}, expected ({self.L}, {self.H}, N)")
        cls = cls / cls.sum(-1, keepdims=True)
        kap = (kappa_heads(np.asarray(patch_attn), self.freeze.kappa_top_k)
               if patch_attn is not None else np.full((self.L, self.H), -1, dtype=np.int64))
        prev = self._decisions.get(epoch - 1)
        drift = (drift_w1_heads(self._cls[epoch - 1], cls, self.grid) if prev is not None
                 else np.full((self.L, self.H), np.nan))
        self._cls = {e: v for e, v in self._cls.items() if e == epoch - 1}
        self._cls[epoch] = cls

        frozen = [list(r) for r in prev.frozen] if prev else [[False] * self.H for _ in range(self.L)]
        frozen_epoch = ([list(r) for r in prev.frozen_epoch] if prev
                        else [[None] * self.H for _ in range(self.L)])
        newly = self._to_freeze(epoch, frozen, drift, kap) if self.freeze.enabled else []
        for l, h in newly:
            frozen[l][h], frozen_epoch[l][h] = True, epoch

        old = prev.tau_factor if prev else [[1.0] * self.H for _ in range(self.L)]
        tau = [[1.0] * self.H for _ in range(self.L)]
        if self.scheduler.enabled:
            for l in range(self.L):
                for h in range(self.H):
                    if frozen[l][h] and (l, h) not in newly:
                        tau[l][h] = old[l][h]  # frozen heads keep their factor
                    elif not math.isnan(drift[l, h]):
                        tau[l][h] = 1.0 / (1.0 + self.scheduler.alpha * float(drift[l, h]))
        dec = HeadDecision(epoch=epoch, tau_factor=tau, frozen=frozen, frozen_epoch=frozen_epoch,
                           drift=drift.tolist(), kappa=kap.tolist(), newly_frozen=newly)
        self._decisions[epoch] = dec
        return dec

    def _to_freeze(self, epoch: int, frozen: list[list[bool]], drift: np.ndarray,
                   kap: np.ndarray) -> list[tuple[int, int]]:
        """Heads that satisfy the freeze rule at ``epoch``, within the per-layer cap."""
        fz = self.freeze
        if epoch < self.min_epoch:
            return []

        def history(epochs: range, now: np.ndarray, key: str) -> np.ndarray | None:
            rows = []
            for e in epochs:
                if e == epoch:
                    rows.append(np.asarray(now, dtype=np.float64))
                elif e in self._decisions:
                    d = getattr(self._decisions[e], key)
                    rows.append(np.array([[math.nan if v is None else v for v in r] for r in d],
                                         dtype=np.float64))
                else:
                    return None  # not enough epochs yet
            return np.stack(rows)  # (W, L, H)

        drifts = history(range(epoch - fz.patience + 1, epoch + 1), drift, "drift")
        kappas = history(range(epoch - fz.kappa_window + 1, epoch + 1), kap, "kappa")
        if drifts is None or kappas is None:
            return []
        converged = (drifts < fz.drift_threshold).all(0)  # NaN compares False
        stable = (kappas == kappas[0]).all(0) & (kappas >= 0).all(0)
        cap = math.floor(fz.max_frozen_frac * self.H)
        newly = []
        for l in range(self.L):
            candidates = sorted((float(drifts[:, l, h].mean()), h) for h in range(self.H)
                                if not frozen[l][h] and converged[l, h] and stable[l, h])
            room = max(cap - sum(frozen[l]), 0)
            newly += [(l, h) for _, h in candidates[:room]]
        return newly

    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only: checkpoints load it with ``weights_only=True``."""
        return {
            "decisions": [self._decisions[e].to_dict() for e in sorted(self._decisions)],
            "cls": {str(e): v.tolist() for e, v in self._cls.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._decisions = {int(d["epoch"]): HeadDecision.from_dict(d) for d in state["decisions"]}
        self._cls = {int(e): np.array(v, dtype=np.float64) for e, v in state["cls"].items()}
