"""The run's head-convergence actor: one per training run (or Tune trial), created by the
driver so it outlives worker-group restarts, found by the workers by name. It wraps the
plain-Python :class:`HeadController`; rank 0 sends each epoch's all-reduced statistics and
every rank reads back the same decision for that epoch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import ray

from .controller import HeadController

NAMESPACE = "vitcae_ray"


@ray.remote(num_cpus=0, max_restarts=0)
class HeadConvergenceActor:
    def __init__(self, *controller_args: Any) -> None:
        self._controller = HeadController(*controller_args)

    def update(self, epoch: int, cls_attn: np.ndarray, patch_attn: np.ndarray | None) -> dict:
        return self._controller.update(epoch, cls_attn, patch_attn).to_dict()

    def decision(self, epoch: int) -> dict:
        return self._controller.decision(epoch).to_dict()

    def state_dict(self) -> dict:
        return self._controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._controller.load_state_dict(state)


def actor_name(storage: str, run_name: str) -> str:
    """Unique per run: the same storage and run name always map to the same actor."""
    return "heads-" + hashlib.sha1(f"{storage}/{run_name}".encode()).hexdigest()[:16]


def create_actor(name: str, *controller_args: Any):
    """Create the run's actor on the caller's node (the training driver's or the Tune trial
    driver's: never a GPU worker that spot reclaims) and outside any placement group (so a
    trial's bundles stay for its workers); a stale actor of the same name is replaced."""
    from ..cluster import on_this_node

    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass
    return HeadConvergenceActor.options(name=name, namespace=NAMESPACE,
                                        scheduling_strategy=on_this_node()).remote(*controller_args)


def get_actor(name: str):
    return ray.get_actor(name, namespace=NAMESPACE)
