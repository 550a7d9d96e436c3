import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test run (starting Ray costs seconds on 2 cores)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()
