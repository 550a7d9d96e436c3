"""The run's head-convergence actor and rank 0's client of it.

One actor per training run (or Tune trial), created by the driver so it outlives worker-group
restarts, found by the workers by name. It wraps the plain-Python :class:`HeadController`;
rank 0's :class:`HeadsClient` sends each epoch's all-reduced statistics, and
:func:`share_decision` broadcasts the decision it gets back to the other ranks.

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

from .controller import HeadController, HeadDecision

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

    def update(self, epoch: int, *stats: np.ndarray | None) -> dict:
        """``stats``: :meth:`HeadController.update`'s statistics, in its order."""
        return self._ready().update(epoch, *stats).to_dict()

    def decision(self, epoch: int) -> dict:
        return self._ready().decision(epoch).to_dict()

    def state_dict(self) -> dict:
        return self._ready().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._controller.load_state_dict(state)
        self._loaded = True


# The longest rank 0 waits for the actor: a restarted actor reloads the run's latest
# checkpoint before it answers, which takes seconds, not minutes.
CALL_TIMEOUT_S = 300.0


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
    return HeadConvergenceActor.options(
        name=name, namespace=NAMESPACE, scheduling_strategy=on_this_node()
    ).remote(storage, run_name, *controller_args)


def get_actor(name: str):
    return ray.get_actor(name, namespace=NAMESPACE)


class HeadsClient:
    """Rank 0's access to the run's head controller: the driver's Ray actor, or in local mode
    (``actor_name`` None) an in-process controller. Both hand back :class:`HeadDecision` objects.

    A restarted actor reloads the latest checkpoint and Ray retries the call in flight. A
    restart between an epoch's ``update`` and the ``state_dict`` that goes into its checkpoint
    would hand back the state before that epoch: ``state_dict`` checks the epoch and sends the
    epoch's statistics again when it is behind."""

    def __init__(self, actor_name: str | None, controller_args: tuple) -> None:
        self.actor = None if actor_name is None else get_actor(actor_name)
        self.local = HeadController(*controller_args) if actor_name is None else None
        self._last_update: tuple | None = None

    def _call(self, method: str, *args):
        if self.actor is None:
            return getattr(self.local, method)(*args)
        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"the head-convergence actor did not answer {method} within {CALL_TIMEOUT_S:.0f}s "
                "(its node busy, lost or still restarting); the run resumes from its last "
                "checkpoint when restarted"
            ) from None

    def update(self, epoch: int, *stats: np.ndarray | None) -> HeadDecision:
        """``stats``: :meth:`HeadController.update`'s statistics, in its order."""
        self._last_update = (epoch, *stats)
        d = self._call("update", epoch, *stats)
        return d if isinstance(d, HeadDecision) else HeadDecision.from_dict(d)

    def state_dict(self) -> dict:
        state = self._call("state_dict")
        epochs = [int(d["epoch"]) for d in state["decisions"]]
        if self._last_update is not None and max(epochs, default=-1) < self._last_update[0]:
            self._call("update", *self._last_update)
            state = self._call("state_dict")
        return state

    def load_state_dict(self, state: dict) -> None:
        self._last_update = None
        self._call("load_state_dict", state)


def share_decision(decision: HeadDecision | None, world: int) -> HeadDecision:
    """Rank 0's decision on every rank (every other rank passes None), so that all apply the
    same one at the same step."""
    if world == 1:
        return decision
    import torch.distributed as dist

    box = [None if decision is None else decision.to_dict()]
    dist.broadcast_object_list(box, src=0)
    return HeadDecision.from_dict(box[0])
