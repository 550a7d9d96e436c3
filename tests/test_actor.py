"""The run's head-convergence actor, as the driver creates it and the workers find it."""

import numpy as np

from vitcae_ray.config import FreezeConfig, SchedulerConfig
from vitcae_ray.convergence import HeadController, HeadDecision


def test_actor_by_name_serves_the_controllers_decisions_and_state(ray_session):
    import ray

    from vitcae_ray.convergence.actor import actor_name, create_actor, get_actor

    args = (2, 2, 3, SchedulerConfig(), FreezeConfig(drift_threshold=10.0, patience=1,
                                                      kappa_window=1), 1)
    name = actor_name("/tmp/storage", "run")
    assert name == actor_name("/tmp/storage", "run") != actor_name("/tmp/storage", "other")
    create_actor(name, *args)
    actor = create_actor(name, *args)  # a stale actor of the same name is replaced
    local = HeadController(*args)
    rng = np.random.default_rng(0)
    try:
        for epoch in range(3):
            cls, patch = rng.random((2, 2, 9)), np.ones((2, 2, 9, 9))
            remote = HeadDecision.from_dict(ray.get(actor.update.remote(epoch, cls, patch)))
            assert remote.to_dict() == local.update(epoch, cls, patch).to_dict()
        # a worker finds the same actor by name and reads the same decision
        found = get_actor(name)
        assert ray.get(found.decision.remote(2)) == local.decision(2).to_dict()
        assert HeadDecision.from_dict(ray.get(found.decision.remote(1))).num_frozen == 4
        state = ray.get(found.state_dict.remote())
        fresh = HeadController(*args)
        fresh.load_state_dict(state)
        assert fresh.decision(2).to_dict() == local.decision(2).to_dict()
    finally:
        ray.kill(actor)
