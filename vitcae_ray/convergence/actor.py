"""The run's head-convergence actor: one per training run (or Tune trial), created by the
driver so it outlives worker-group restarts, found by the workers by name. It wraps the
plain-Python :class:`HeadController`; rank 0 sends each epoch's all-reduced statistics and
broadcasts the decision it gets back to the other ranks.

If the actor's process dies, Ray restarts it (``max_restarts=-1``): it comes back with the
head state of the run's latest checkpoint, which is the state before the epoch in progress,
and Ray retries the call in flight (``max_task_retries=-1``), so the epoch's decision is the
one the old actor would have made. (A whole worker-group restart instead pushes the state of
the checkpoint it resumes from.)
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import ray

from .controller import HeadController

NAMESPACE = "vitcae_ray"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class HeadConvergenceActor:
    """Created with the run's checkpoint location. A restarted actor loads the latest
    checkpoint's head state at its first call, not in ``__init__``: by the time rank 0 sends
    epoch ``e``, epoch ``e - 1``'s checkpoint is complete (``ray.train.report`` returns after
    the upload), while at the moment of the restart it may still be uploading."""

    def __init__(self, storage: str, run_name: str, *controller_args: Any) -> None:
        self._where = (storage, run_name)
        self._controller = HeadController(*controller_args)
        self._loaded = False

    def _ready(self) -> HeadController:
        if not self._loaded:
            from ..checkpoints import latest_heads_state

            state = latest_heads_state(*self._where)
            if state:
                self._controller.load_state_dict(state)
            self._loaded = True
        return self._controller

    def update(self, epoch: int, cls_attn: np.ndarray, patch_attn: np.ndarray | None) -> dict:
        return self._ready().update(epoch, cls_attn, patch_attn).to_dict()

    def decision(self, epoch: int) -> dict:
        return self._ready().decision(epoch).to_dict()

    def state_dict(self) -> dict:
        return self._ready().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._controller.load_state_dict(state)
        self._loaded = True


def actor_name(storage: str, run_name: str) -> str:
    """Unique per run: the same storage and run name always map to the same actor."""
    return "heads-" + hashlib.sha1(f"{storage}/{run_name}".encode()).hexdigest()[:16]


def create_actor(name: str, storage: str, run_name: str, *controller_args: Any):
    """Create the run's actor on the caller's node (the training driver's or the Tune trial
    driver's: never a GPU worker that spot reclaims) and outside any placement group (so a
    trial's bundles stay for its workers); a stale actor of the same name is replaced.
    ``storage``/``run_name`` locate the run's checkpoints, which a restarted actor reads."""
    from ..cluster import on_this_node

    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass
    return HeadConvergenceActor.options(name=name, namespace=NAMESPACE,
                                        scheduling_strategy=on_this_node()).remote(
        storage, run_name, *controller_args)


def get_actor(name: str):
    return ray.get_actor(name, namespace=NAMESPACE)
