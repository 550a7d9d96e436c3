"""A spot reclaim, simulated: ``ray drain-node`` with the preemption reason drains the node a
training worker runs on, as autoscaler v2 and the cloud's reclaim notice do. Ray Train counts
it against ``FailureConfig.max_preemption_failures`` (``train.max_preemption_failures``), not
``max_failures``, and restarts the worker group on another node from the latest checkpoint.

Runs on a Ray cluster of its own (``ray.cluster_utils.Cluster``: a head and worker nodes as
processes on this machine), with the other ``cluster`` tests: ``python -m pytest -m cluster``.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vitcae_ray.config import build_config
from vitcae_ray.train import run

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

RAY = str(Path(sys.executable).with_name("ray"))
SPOT = "spot_node"  # the custom resource the training worker asks for


def _epochs(run_dir: Path) -> list[int]:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["epoch"] for line in text.splitlines()]


@pytest.mark.timeout(600)
def test_a_drained_spot_node_is_a_preemption_retried_from_the_checkpoint(tmp_path, monkeypatch, tiny_config):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the drain-node CLI joins without a token
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    try:
        spot = cluster.add_node(num_cpus=1, resources={SPOT: 1})
        ray.init(address=cluster.address)
        out = tmp_path / "run"
        cfg = build_config(
            {
                **tiny_config,
                "train.num_workers": 1,
                "train.cpus_per_worker": 1,
                "train.worker_resource": SPOT,
                "train.epochs": 6,  # time for the drain to land mid-run
                "train.batch_size": 64,
                "train.log_images": False,
                "train.eval_every": 0,
                "train.max_failures": 0,  # a failure counted as such would end the run
                "train.output": str(out),
            }
        )
        drained: dict = {}

        def reclaim() -> None:
            try:
                drain_and_add()
            except Exception as e:  # noqa: BLE001 - shown by the test below
                drained["error"] = repr(e)

        def drain_and_add() -> None:  # once epoch 0 is checkpointed: drain the spot node, add another
            while len(_epochs(out)) < 1:
                if done.is_set():
                    return
                time.sleep(0.2)
            drained["cli"] = subprocess.run(
                [
                    RAY,
                    "drain-node",
                    f"--address={cluster.address}",
                    f"--node-id={spot.node_id}",
                    "--reason=DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message=spot instance reclaimed",
                    "--deadline-remaining-seconds=2",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env=os.environ,
            )
            # a new node joins as the autoscaler's would (Cluster.add_node needs the main thread)
            subprocess.run(
                [
                    RAY,
                    "start",
                    f"--address={cluster.address}",
                    "--num-cpus=1",
                    f'--resources={{"{SPOT}": 1}}',
                ],
                check=True,
                capture_output=True,
                timeout=120,
                env=os.environ,
            )
            fresh = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(SPOT)} - {
                spot.node_id
            }
            drained["fresh"] = fresh
            while not drained.get("moved") and not done.is_set():  # the worker group's restart
                try:
                    workers = list_actors(
                        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
                    )
                except Exception:  # noqa: BLE001 - the dashboard is busy; poll again
                    workers = []
                drained["moved"] = any(a.node_id in fresh for a in workers)
                time.sleep(0.5)

        done = threading.Event()
        thread = threading.Thread(target=reclaim, daemon=True)
        thread.start()
        try:
            result = run(cfg, verbose=False)
        finally:
            done.set()
            thread.join(timeout=60)
        assert "error" not in drained, drained["error"]
        cli = drained["cli"]
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert result.error is None, result.error  # with max_failures 0: not a failure
        assert _epochs(out) == list(range(6))
        # the worker group was restarted on the node added after the drain
        assert drained["moved"], "no training worker ever ran on the new node"
    finally:
        ray.shutdown()
        cluster.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)  # the joined node
