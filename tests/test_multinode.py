"""The cluster sweep of cluster/README.md on a simulated autoscaling cluster.

Ray's ``fake_multinode`` provider launches worker "nodes" as Ray processes on this machine.
The node types come from cluster/aws.yaml (the head with ``trial_driver``; GPU workers from
zero), with each GPU replaced by a custom resource and a CPU. Data and the experiment live on
moto's S3 server. Not run here: the Docker image, the setup commands and the file mounts (the
fake provider starts Ray processes on this machine, with no SSH or container);
tests/test_cluster.py checks them offline. Run it on its own (it starts its own Ray cluster):

    python -m pytest -m cluster
"""

import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from vitcae_ray import filesystem
from vitcae_ray.data.to_parquet import main as to_parquet
from vitcae_ray.filesystem import join

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
GPU_STANDIN = "gpu_standin"  # what each simulated GPU node has instead of a GPU
# the `ray` of this interpreter's environment, whether or not its bin is on PATH
RAY = str(Path(sys.executable).with_name("ray"))
WORKER_NODES = 2
FAKE_KEYS = {"use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True}


def fake_cluster_config(aws: dict) -> dict:
    """cluster/aws.yaml's node types for the fake_multinode provider."""
    head_type = aws["head_node_type"]
    types = {}
    for name, node in aws["available_node_types"].items():
        if name == head_type:
            continue
        types[name] = {
            "resources": {"CPU": 2, GPU_STANDIN: 1},
            "min_workers": node["min_workers"],
            "max_workers": min(node["max_workers"], WORKER_NODES),
            "node_config": {},
        }
    types["ray.head.default"] = {"resources": {}, "max_workers": 0, "node_config": {}}
    empty = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return {
        "cluster_name": "fake-vitcae",
        "max_workers": WORKER_NODES,
        "upscaling_speed": aws["upscaling_speed"],
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", **FAKE_KEYS},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        **{k: [] for k in empty},
    }


# the shared-output check from a driver on the cluster: the fake nodes share this machine's
# disk, so a local path passes the probe on every node; with no time to answer, one line
SHARED_CHECK = """
import sys, ray
from vitcae_ray import cluster
from vitcae_ray.config import ConfigError
ray.init(address="auto", log_to_driver=False)
print("alive nodes", sum(n["Alive"] for n in ray.nodes()))
cluster.check_shared_output(sys.argv[1], shared_fs=False)
cluster.SHARED_CHECK_TIMEOUT_S = 0.0
try:
    cluster.check_shared_output(sys.argv[1], shared_fs=False)
except ConfigError as err:
    print("error:", err)
"""


def readme_sweep_command() -> list[str]:
    """The `ray job submit ... -- python -m vitcae_ray.tune ...` command of cluster/README.md."""
    text = (ROOT / "cluster" / "README.md").read_text()
    m = re.search(r"^ray job submit [^\n]*-- \\\n((?:.*\\\n)*.*vitcae_ray\.tune(?:.*\\\n)*.*)$", text, re.M)
    assert m, "cluster/README.md lost its sweep command"
    return shlex.split(m.group(0).replace("\\\n", " "))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Watcher(threading.Thread):
    """Polls Ray's state API: worker nodes up, and where trial workers, trial drivers and
    head-convergence actors run."""

    def __init__(self, dashboard: str) -> None:
        super().__init__(daemon=True)
        self.dashboard, self.samples, self.stop = dashboard, [], threading.Event()
        self.errors: list[str] = []  # what the state API raised (shown if no sample came)

    def run(self) -> None:
        from ray.util.state import list_actors, list_nodes

        start = time.monotonic()
        while not self.stop.is_set():
            try:
                nodes = list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")])
                actors = list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
            except Exception as e:  # noqa: BLE001 - the dashboard is busy; poll again
                self.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                time.sleep(1)
                continue
            head = next(n.node_id for n in nodes if n.is_head_node)
            by_class: dict[str, list[str]] = {}
            for a in actors:
                by_class.setdefault(a.class_name, []).append(a.node_id)
            self.samples.append(
                {
                    "t": time.monotonic() - start,
                    "head": head,
                    "workers": sorted(n.node_id for n in nodes if not n.is_head_node),
                    "actors": by_class,
                }
            )
            time.sleep(4)


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    """The simulated cluster, with autoscaler v1. Autoscaler v2 (``RAY_enable_autoscaler_v2=1``)
    cannot run this recipe from the pip wheel: its monitor stops at start with
    ``FileNotFoundError: .../ray/autoscaler/_private/fake_multi_node/example.yaml`` (the wheel
    lacks the fake provider's defaults file), and with the provider given as ``external`` to get
    past that, it logs "Adding 2 node(s) of type gpu_worker" every second but never launches
    one (docs/clusters.md)."""
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    config = tmp_path / "fake.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(aws)))
    head = aws["available_node_types"][aws["head_node_type"]]["resources"]
    dashboard = _free_port()
    # no token authentication on this loopback-only cluster: the job CLI, the state API of
    # this process (whose Ray was imported before any variable could be set) and the nodes
    # the fake provider launches all talk to it without one
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "disabled",
    }
    subprocess.run([RAY, "stop", "--force"], capture_output=True)
    # the fake provider's nodes join the head at Ray's default GCS port, 6379
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--port=6379",
            f"--autoscaling-config={config}",
            "--num-cpus=2",
            f'--resources={{"trial_driver": {head["trial_driver"]}}}',
            "--include-dashboard=true",
            f"--dashboard-port={dashboard}",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    yield f"http://127.0.0.1:{dashboard}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.mark.timeout(2400)
def test_readme_sweep_scales_from_zero_across_nodes_and_exports(fake_cluster, s3, tmp_path):
    exp, best = s3("cluster-exp"), s3("cluster-best")
    cmd = readme_sweep_command()
    tune = cmd[cmd.index("--") + 1 :]
    assert tune[:3] == ["python", "-m", "vitcae_ray.tune"] and "--address" in tune
    # the README's Parquet on S3, streamed to the workers by Ray Data: the digits at 16x16
    data = s3("cluster-digits-16")
    assert to_parquet(["--dataset", "digits", "--image-size", "16", "--out", data]) == 0
    # this machine's stand-ins: a resource for the GPU, a tiny model, few epochs
    swap = {
        "--num-samples": "3",
        "--max-epochs": "2",
        "--config": "digits_tiny",
        "--space": "small",
        "--data-root": data,
        "--output": exp,
        "--wait-for-workers": str(WORKER_NODES),  # aws.yaml's max_workers, capped here
        "--wait-timeout": "600",
    }
    args = [swap.get(tune[i - 1], a) for i, a in enumerate(tune)]
    args[args.index("--gpu")] = f"--set=train.worker_resource={GPU_STANDIN}"
    assert args[args.index("--dataset") + 1] == "parquet"
    args += [
        "--set=data.image_size=16",
        "--set=train.batch_size=32",
        "--set=train.log_images=false",
        "--set=train.eval_every=0",
    ]
    submit = cmd[: cmd.index("--")]
    submit[0] = RAY
    submit[submit.index("--address") + 1] = fake_cluster

    # a local --output is refused up front: the nodes the autoscaler adds could not see it
    local = subprocess.run(
        [
            sys.executable,
            *args[1 : args.index("--output")],
            "--output",
            str(tmp_path / "exp"),
            *args[args.index("--output") + 2 :],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    errors = [line for line in local.stderr.splitlines() if line.startswith("error:")]
    assert local.returncode == 2 and len(errors) == 1, local.stderr[-2000:]
    assert local.stderr.rstrip().endswith(errors[0])  # after Ray's own connection lines
    assert "s3://" in errors[0] and not (tmp_path / "exp").exists()

    watcher = Watcher(fake_cluster)
    watcher.start()
    start = time.monotonic()
    proc = subprocess.run(
        [*submit, "--", sys.executable, *args[1:]], capture_output=True, text=True, timeout=1500, cwd=tmp_path
    )
    wall = time.monotonic() - start
    watcher.stop.set()
    watcher.join()
    print(f"sweep wall time {wall:.0f}s")
    for s in watcher.samples[::5]:
        print(
            f"t={s['t']:.0f}s worker nodes={len(s['workers'])} "
            f"trials running={len(s['actors'].get('RayTrainWorker', []))}"
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    samples = watcher.samples
    assert samples, f"the state API never answered: {watcher.errors[-3:]}"
    assert not samples[0]["workers"], "the cluster must start with no worker nodes"
    assert max(len(s["workers"]) for s in samples) >= 2, "the autoscaler never added nodes"
    together = [s for s in samples if len(set(s["actors"].get("RayTrainWorker", []))) >= 2]
    assert together, "no two trials ever ran at the same time on different nodes"
    for s in samples:
        assert all(n in s["workers"] for n in s["actors"].get("RayTrainWorker", []))
        assert all(n == s["head"] for n in s["actors"].get("HeadConvergenceActor", []))
        assert all(n == s["head"] for n in s["actors"].get("ImplicitFunc", []))
    # each placement rule above was exercised, not satisfied by absence
    for name in ("RayTrainWorker", "HeadConvergenceActor", "ImplicitFunc"):
        assert any(s["actors"].get(name) for s in samples), f"no {name} actor was ever seen"

    fs, path = filesystem.resolve(join(exp, "results.parquet"))
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    assert len(rows) == 3 and all(r["status"] in ("completed", "stopped") for r in rows)
    assert all(r["epochs"] >= 1 for r in rows)
    # every trial trained on the S3 Parquet (a to_parquet output: Ray Data streams its train split)
    for r in rows:
        trial = yaml.safe_load(filesystem.read_text(join(r["run_dir"], "config.yaml")))
        assert trial["data"]["dataset"] == "parquet" and trial["data"]["root"] == data
    export = subprocess.run(
        [sys.executable, "-m", "vitcae_ray.export", "--experiment", exp, "--out", best],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert export.returncode == 0, export.stderr
    assert filesystem.read_text(join(best, "metrics.json")) is not None

    # the worker nodes are still up (idle_timeout_minutes 5): the check probes each of them
    check = subprocess.run(
        [sys.executable, "-c", SHARED_CHECK, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stderr[-2000:]
    alive = int(re.search(r"^alive nodes (\d+)$", check.stdout, re.M).group(1))
    assert alive >= 2, check.stdout  # the head and at least one worker node to probe
    (error,) = [line for line in check.stdout.splitlines() if line.startswith("error:")]
    assert "could not check within 0s" in error and str(tmp_path) in error
