"""The run's head-convergence actor, as the driver creates it and the workers find it."""

import os
import signal
import time

import numpy as np
import pytest

from vitcae_ray import checkpoints
from vitcae_ray.config import FreezeConfig, TemperatureConfig
from vitcae_ray.convergence import HeadController, HeadDecision

ARGS = (
    2,
    2,
    3,
    TemperatureConfig(),
    FreezeConfig(drift_ratio=1e6, patience=1, kappa_window=1, bottom_up=False),
    1,
)


def _stats(rng):
    """(cls, patch, cls_halves, block_maps): every argument the trainer sends."""
    return (
        rng.random((2, 2, 9)),
        np.ones((2, 2, 9, 9)),
        rng.random((2, 2, 2, 9)) + 0.1,
        rng.random((3, 2, 10, 4)),
    )


def test_actor_by_name_serves_the_controllers_decisions_and_state(ray_session, tmp_path):
    import ray

    from vitcae_ray.convergence.actor import actor_name, create_actor, get_actor

    name = actor_name("/tmp/storage", "run")
    assert name == actor_name("/tmp/storage", "run") != actor_name("/tmp/storage", "other")
    create_actor(name, str(tmp_path), "run", *ARGS)
    actor = create_actor(name, str(tmp_path), "run", *ARGS)  # a stale actor is replaced
    local = HeadController(*ARGS)
    rng = np.random.default_rng(0)
    try:
        for epoch in range(3):
            stats = _stats(rng)
            remote = HeadDecision.from_dict(ray.get(actor.update.remote(epoch, *stats)))
            assert remote.to_dict() == local.update(epoch, *stats).to_dict()
        # a worker finds the same actor by name and reads the same decision
        found = get_actor(name)
        assert ray.get(found.decision.remote(2)) == local.decision(2).to_dict()
        assert HeadDecision.from_dict(ray.get(found.decision.remote(1))).num_frozen == 4
        state = ray.get(found.state_dict.remote())
        fresh = HeadController(*ARGS)
        fresh.load_state_dict(state)
        assert fresh.decision(2).to_dict() == local.decision(2).to_dict()
    finally:
        ray.kill(actor)


def test_a_killed_actor_comes_back_with_the_latest_checkpoints_state(ray_session, tmp_path):
    """SIGKILL of the actor's process: Ray restarts it, it reads the run's latest complete
    checkpoint, and the next epoch's decision is the one the old actor would have made."""
    import ray
    from ray.util.state import list_actors

    from vitcae_ray.convergence.actor import create_actor

    rng = np.random.default_rng(1)
    stats = [_stats(rng) for _ in range(4)]
    local = HeadController(*ARGS)
    actor = create_actor("heads-kill-test", str(tmp_path), "run", *ARGS)
    try:
        for epoch in range(3):
            ray.get(actor.update.remote(epoch, *stats[epoch]))
            local.update(epoch, *stats[epoch])
            if epoch < 2:  # the run's checkpoints: epoch 1 is the latest complete one...
                d = tmp_path / "run" / checkpoints.dir_name(epoch)
                d.mkdir(parents=True)
                checkpoints.write({"model": {}, "heads": local.state_dict()}, d)
        # ...and epoch 2's was cut off mid-upload: no digest, so it is not a checkpoint
        (tmp_path / "run" / checkpoints.dir_name(2)).mkdir()
        (tmp_path / "run" / checkpoints.dir_name(2) / checkpoints.CHECKPOINT_FILE).write_bytes(b"PK")

        pid = next(
            a.pid
            for a in list_actors(
                filters=[("class_name", "=", "HeadConvergenceActor"), ("state", "=", "ALIVE")]
            )
            if a.name == "heads-kill-test"
        )
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        # epoch 2 again (its checkpoint never completed), then epoch 3: the old actor's
        # decisions (a fresh controller would have no drift history and freeze nothing)
        assert ray.get(actor.update.remote(2, *stats[2])) == local.decision(2).to_dict()
        assert local.decision(2).num_frozen == 4
        assert ray.get(actor.update.remote(3, *stats[3])) == local.update(3, *stats[3]).to_dict()
        new_pid = next(
            a.pid
            for a in list_actors(
                filters=[("class_name", "=", "HeadConvergenceActor"), ("state", "=", "ALIVE")]
            )
            if a.name == "heads-kill-test"
        )
        assert new_pid != pid
    finally:
        ray.kill(actor)


def test_a_client_whose_actor_does_not_answer_stops_with_one_line(ray_session, monkeypatch):
    """An actor that never answers (its node lost, a restart stuck) stops rank 0 after
    ``CALL_TIMEOUT_S`` with one line, instead of hanging the run."""
    import ray

    from vitcae_ray.convergence import actor as heads_actor

    @ray.remote(num_cpus=0)
    class Stuck:
        def update(self, *args):
            time.sleep(60)

    name = "heads-stuck-test"
    stuck = Stuck.options(name=name, namespace=heads_actor.NAMESPACE).remote()
    monkeypatch.setattr(heads_actor, "CALL_TIMEOUT_S", 1.0)
    try:
        client = heads_actor.HeadsClient(name, ARGS)
        start = time.monotonic()
        with pytest.raises(
            RuntimeError, match=r"^the head-convergence actor did not answer update within 1s"
        ) as e:
            client.update(0, *_stats(np.random.default_rng(0)))
        assert time.monotonic() - start < 30 and "\n" not in str(e.value)
    finally:
        ray.kill(stuck)
