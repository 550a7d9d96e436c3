"""The tests' shared fixtures: one Ray instance, moto's S3 server, the tiny model the
end-to-end tests train, fault injection into a running training run, and a TensorBoard
event-file reader. Tests that request ``ray_session`` carry the ``ray`` marker."""

import os
import re
import signal
import struct
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
# The evaluation's feature classifiers are cached per test run, never in the user's cache
# (set before Ray starts, so its workers inherit it).
if "VITCAE_RAY_CACHE" not in os.environ:
    import tempfile

    os.environ["VITCAE_RAY_CACHE"] = tempfile.mkdtemp(prefix="vitcae-ray-cache-")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    """``ray`` on every test that uses the session's Ray instance, directly or through a fixture."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


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
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1&allow_delayed_open=true"
    yield lambda key: f"s3://vitcae-test/{key}?{query}"
    server.stop()


# --- the tiny model ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """Config overrides for the tiny model and image size the end-to-end tests train: a
    2-worker epoch takes seconds. Tests build on it (``{**tiny_config, ...}``), never change it."""
    return {
        "model.embed_dim": 32,
        "model.depth": 2,
        "model.num_heads": 2,
        "model.dec_dim": 32,
        "model.dec_depth": 1,
        "model.dec_heads": 2,
        "model.patch_size": 2,
        "model.prior_hidden": 64,
        "data.image_size": 16,
        "train.max_failures": 0,
    }


# --- fault injection -----------------------------------------------------------------------
# Kill a Ray process of a running training run (found through Ray's state API) once the
# run's ``metrics.jsonl`` has reached a line count.


def metrics_lines(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


# A line Ray forwards from an actor's log, "(Name pid=N) ..." with or without colour: it
# reaches this process's stderr whenever it arrives, from whichever test started the actor.
RAY_LOG = re.compile(r"^(\x1b\[[0-9;]*m)?\([\w.-]+ pid=\d+")


def own_stderr(err: str) -> list[str]:
    """The lines of captured stderr that the command printed, without Ray's forwarded logs."""
    return [line for line in err.splitlines() if not RAY_LOG.match(line)]


def alive_pids(class_name: str) -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])]


class Killer(threading.Thread):
    """``plan``: ``[(lines, actor class name), ...]`` in order; for each, wait until the run
    directory's ``metrics.jsonl`` has at least ``lines`` lines, then SIGKILL one alive actor
    of that class. ``killed`` records ``(lines, class, pid)`` for the test to check."""

    def __init__(self, run_dir: Path, plan: list[tuple[int, str]], timeout_s: float = 900) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.plan, self.timeout_s = run_dir, plan, timeout_s
        self.killed: list[tuple[int, str, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        for lines, class_name in self.plan:
            while not self.stop.is_set() and time.monotonic() < deadline:
                if metrics_lines(self.run_dir) >= lines:
                    pids = alive_pids(class_name)
                    if pids:
                        os.kill(pids[0], signal.SIGKILL)
                        self.killed.append((lines, class_name, pids[0]))
                        break
                time.sleep(0.2)

    def join_all(self) -> None:
        self.stop.set()
        self.join(timeout=30)


@pytest.fixture(name="metrics_lines", scope="session")
def metrics_lines_fixture():
    """``metrics_lines(run_dir)``: the number of lines of the run's ``metrics.jsonl`` (0 before
    it exists)."""
    return metrics_lines


@pytest.fixture(name="own_stderr", scope="session")
def own_stderr_fixture():
    """``own_stderr(err)``: the lines of captured stderr without Ray's forwarded actor logs."""
    return own_stderr


@pytest.fixture(name="alive_pids", scope="session")
def alive_pids_fixture():
    """``alive_pids(class_name)``: the pids of the alive Ray actors of that class."""
    return alive_pids


@pytest.fixture(scope="session")
def make_killer():
    """The :class:`Killer` thread class: ``make_killer(run_dir, plan)``, then ``start()``,
    ``join_all()`` and ``killed``."""
    return Killer


# --- TensorBoard ---------------------------------------------------------------------------
# Event files written by tensorboardX (TFRecord framing, Event protos).


def read_events(logdir: Path) -> list:
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            ev = event_pb2.Event()
            ev.ParseFromString(payload)
            events.append(ev)
    return events


def tags(logdir: Path) -> dict[str, list[int]]:
    """tag -> steps at which it was written (scalars and images), as TensorBoard shows them:
    a writer's session start at step S (``purge_step``) discards what was written before
    at steps >= S."""
    out: dict[str, list[int]] = {}
    for ev in read_events(logdir):
        if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
            out = {tag: [s for s in steps if s < ev.step] for tag, steps in out.items()}
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append(ev.step)
    return {tag: steps for tag, steps in out.items() if steps}


@pytest.fixture(scope="session")
def tb_tags():
    """``tb_tags(logdir)``: TensorBoard tag -> the steps it shows for it (see :func:`tags`)."""
    return tags
