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
# S3 for tests: moto's server, reached with dummy credentials (set before Ray starts, so
# Ray's workers inherit them).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3():
    """A function ``uri(key) -> "s3://vitcae-test/key?..."`` on moto's S3 server.

    ``allow_delayed_open`` makes pyarrow upload small files with one PutObject: moto's server
    answers pyarrow's CompleteMultipartUpload with a body the AWS SDK rejects. Real S3 needs
    neither query option but the region."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="vitcae-test")
    query = (f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
             "&allow_delayed_open=true")
    yield lambda key: f"s3://vitcae-test/{key}?{query}"
    server.stop()
