"""What the Ray cluster can hold, checked before anything starts.

- :func:`settle_resources`: worker CPUs default to what is there; a request that no node can
  hold is a one-line error on a fixed cluster and a wait message on an autoscaling one.
- :class:`TrialCapacity`: how many Tune trials may run at once, recomputed as nodes join.
- :func:`check_shared_output`: a local output on a multi-node cluster must be one every node
  sees (an ``s3://`` URI or a shared mount).
- :func:`on_this_node`: pin an actor to the driver's node (never a spot GPU worker).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import replace
from typing import Any

from .config import Config, ConfigError

# Ray's autoscaler monitor publishes its report under this internal-KV key (what `ray status`
# reads). Node types named ``node_<id>`` come from Ray's read-only provider: a Ray started by
# `ray start`/`ray.init` without an autoscaling config, which never adds nodes.
AUTOSCALER_STATUS_KEY = "__autoscaling_status"
READONLY_NODE_TYPE_PREFIX = "node_"
# Resources Ray gives every node that are not requests.
_BOOKKEEPING = ("memory", "object_store_memory")


def local_cpus() -> int:
    """CPUs this process may use (the affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def torch_threads(cpus: float) -> int:
    """The torch thread count for a worker holding ``cpus`` CPUs."""
    return max(1, math.floor(cpus + 0.5))


def fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


# --- the cluster as Ray sees it ----------------------------------------------------------


def node_resources() -> list[dict[str, float]]:
    """Total resources of each alive node (not what is free: other runs come and go)."""
    import ray

    return [
        {k: v for k, v in n["Resources"].items() if k not in _BOOKKEEPING and not k.startswith("node:")}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def autoscaler_report() -> dict[str, Any] | None:
    """The autoscaler monitor's last report, or None when there is none."""
    try:  # the only place the project reads Ray's internal KV
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(AUTOSCALER_STATUS_KEY)
    except Exception:  # noqa: BLE001 - a Ray without it: treat the cluster as fixed
        return None
    if not raw:
        return None
    try:
        return json.loads(raw).get("autoscaler_report") or None
    except (ValueError, AttributeError):
        return None


def is_autoscaling(report: dict[str, Any] | None = None) -> bool:
    """Whether an autoscaler with node types of its own can add nodes to this cluster."""
    report = autoscaler_report() if report is None else report
    if not report:
        return False
    types = set((report.get("node_type_mapping") or {}).values())
    types |= set(report.get("active_nodes") or {})
    pending = bool(report.get("pending_launches") or report.get("pending_nodes"))
    return pending or any(not t.startswith(READONLY_NODE_TYPE_PREFIX) for t in types)


def pack(nodes: list[dict[str, float]], bundles: list[dict[str, float]]) -> bool:
    """Whether ``bundles`` fit the nodes (first fit, largest bundles first); consumes ``nodes``."""
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        for node in nodes:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def trials_that_fit(
    nodes: list[dict[str, float]],
    driver: dict[str, float] | None,
    worker: dict[str, float],
    num_workers: int,
    limit: int = 10_000,
) -> int:
    """How many copies of (one driver + ``num_workers`` workers) the nodes hold at once."""
    free = [dict(n) for n in nodes]
    count = 0
    while count < limit and pack(free, ([driver] if driver else []) + [worker] * num_workers):
        count += 1
    return count


# --- what a run requests -----------------------------------------------------------------


def worker_request(cfg: Config) -> dict[str, float]:
    t = cfg.train
    return {
        "CPU": t.cpus_per_worker,
        **({"GPU": 1.0} if t.gpu else {}),
        **({t.worker_resource: 1.0} if t.worker_resource else {}),
    }


def driver_request(cpus: float, resource: str | None) -> dict[str, float]:
    return {"CPU": cpus, **({resource: 1.0} if resource else {})}


def settle_resources(cfg: Config, driver: dict[str, float] | None = None, log=print) -> Config:
    """``cfg`` with ``train.cpus_per_worker`` resolved, after checking that one run (a Tune
    trial: ``driver`` plus its workers) fits the cluster.

    Auto (0) CPUs: in local mode the process's CPUs; on a Ray started here (no address), its
    CPUs shared by the workers, or for a sweep's trial (``driver`` given) one CPU per worker
    with its share of the driver, so trials run side by side; on a cluster, 1 per worker. A
    request that does not fit raises :class:`ConfigError` on a fixed cluster; on an autoscaling cluster it
    is logged as a wait (Ray Train starts the workers when nodes join).
    """
    t = cfg.train
    if t.num_workers == 0:  # local mode: this process trains
        cpus = t.cpus_per_worker or float(local_cpus())
        return replace(cfg, train=replace(t, cpus_per_worker=cpus))
    nodes = node_resources()
    if t.cpus_per_worker == 0:
        if t.address is None:
            total = sum(n.get("CPU", 0.0) for n in nodes)
            spare = (total - (driver or {}).get("CPU", 0.0)) / t.num_workers
            if driver is not None:
                # a sweep: one CPU per worker, its share of the trial driver included, so
                # trials run side by side (a small model gains little from more threads)
                spare = min(spare, 1.0 - driver.get("CPU", 0.0) / t.num_workers)
            cpus = math.floor(100 * spare) / 100 if spare > 0 else 0.0
            if cpus <= 0:
                raise ConfigError(
                    f"Ray here has {fmt(_total(nodes))}: no CPUs left for "
                    f"{t.num_workers} workers; lower --num-workers"
                )
        else:
            cpus = 1.0
        cfg = replace(cfg, train=replace(t, cpus_per_worker=cpus))
    worker = worker_request(cfg)
    if trials_that_fit(nodes, driver, worker, t.num_workers, limit=1):
        return cfg
    what = f"{t.num_workers} Ray Train workers x {{{fmt(worker)}}}" + (
        f" plus a trial driver {{{fmt(driver)}}}" if driver else ""
    )
    have = f"{fmt(_total(nodes))} on {len(nodes)} node(s)"
    if is_autoscaling():
        log(
            f"waiting for the autoscaler: {what} do not fit the nodes up now ({have}); "
            "training starts when nodes join",
            flush=True,
        )
        return cfg
    raise ConfigError(
        f"{what} do not fit this cluster ({have}); lower --num-workers or "
        "train.cpus_per_worker (0 = fit the machine), or use a larger cluster"
    )


def _total(nodes: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            out[k] = out.get(k, 0.0) + v
    return out


class TrialCapacity:
    """How many trials may run at once, recomputed (at most every ``every_s``) from the nodes up
    now: on a fixed cluster the trials that fit it; on an autoscaling cluster also as many again
    waiting for nodes (at least one), so the autoscaler sees their demand and the sweep grows
    as nodes join. ``cap`` (> 0) is an upper bound given by the user."""

    def __init__(
        self,
        driver: dict[str, float] | None,
        worker: dict[str, float],
        num_workers: int,
        cap: int = 0,
        every_s: float = 2.0,
    ) -> None:
        self.driver, self.worker, self.num_workers = driver, worker, num_workers
        self.cap, self.every_s = cap, every_s
        self._value, self._at = 1, -math.inf

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._at >= self.every_s:
            fit = trials_that_fit(node_resources(), self.driver, self.worker, self.num_workers)
            if is_autoscaling():
                fit += max(1, fit)
            value = max(1, fit)
            self._value, self._at = (min(value, self.cap) if self.cap > 0 else value), now
        return self._value


# --- storage and placement ----------------------------------------------------------------


def check_shared_output(output: str, shared_fs: bool, what: str = "--output") -> None:
    """Refuse a local ``output`` that other nodes of the cluster cannot see.

    On one node anything works. Otherwise a probe file written here is looked for from every
    other node; on an autoscaling cluster with no other node up yet nothing can be checked, so
    only a URI or ``train.shared_fs=true`` (the user's word that it is a shared mount) pass.
    """
    if "://" in output or shared_fs:
        return
    import ray

    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    fix = (
        f"pass an s3:// URI (or another pyarrow filesystem) as {what}, or a mount every "
        "node sees with --set train.shared_fs=true"
    )
    if not others:
        if is_autoscaling():
            raise ConfigError(
                f"{what} {output!r} is a local path and nodes this cluster adds later cannot see it: {fix}"
            )
        return
    probe_dir = _first_existing_parent(output)
    probe = os.path.join(probe_dir, f".vitcae_probe_{uuid.uuid4().hex}")
    try:
        with open(probe, "w"):
            pass
        exists = ray.remote(num_cpus=0)(os.path.exists)
        seen = ray.get(
            [exists.options(scheduling_strategy=_pinned(n, soft=False)).remote(probe) for n in others]
        )
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    if not all(seen):
        raise ConfigError(
            f"{what} {output!r} is local to this node: {seen.count(False)} of "
            f"{len(others)} other node(s) cannot see it; {fix}"
        )


def _first_existing_parent(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    return p


def _pinned(node_id: str, soft: bool):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)


def on_this_node():
    """A scheduling strategy that places an actor on the caller's node (a Tune trial driver
    or the training driver), so it lives and dies with its run and never takes a GPU node."""
    import ray

    return _pinned(ray.get_runtime_context().get_node_id(), soft=False)


def connect(address: str | None) -> None:
    """``ray.init``: a new local Ray when ``address`` is None, else the cluster at ``address``
    (``auto``, ``host:port`` or ``ray://host:port``). An address with no cluster behind it is
    a :class:`ConfigError` within seconds, not Ray's retries and traceback."""
    import socket

    import ray

    fix = (
        "start one (`ray start --head`, or `ray up cluster/aws.yaml` and run on its head "
        "node) or leave --address out to run on this machine"
    )
    host, _, port = (address or "").split("://", 1)[-1].rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise ConfigError(f"no Ray cluster answers at --address {address} ({reason}): {fix}") from None
    try:
        ray.init(address=address)
    except ConnectionError as e:
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        raise ConfigError(f"no Ray cluster at --address {address} ({reason}): {fix}") from None
