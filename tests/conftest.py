import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test run (starting Ray costs seconds on 2 cores)."""
    import ray

    # trial_driver: the custom resource cluster/aws.yaml gives the head node for trial drivers
    ray.init(num_cpus=2, resources={"trial_driver": 4}, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()
