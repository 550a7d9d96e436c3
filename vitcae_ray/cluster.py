"""What the Ray cluster can hold, checked before anything starts. Nothing here guesses
whether the cluster autoscales: waiting for nodes is the user's explicit choice.

- :func:`settle_resources`: worker CPUs default to what is there; with
  ``train.wait_for_workers`` it first waits (up to ``train.wait_timeout_s``) for the cluster
  to hold that many Ray Train workers, asking the autoscaler for them; a run that does not fit
  is then a one-line error.
- :func:`trials_that_fit`: how many trials the nodes hold at once (a sweep's default
  ``max_concurrent_trials``).
- :func:`check_shared_output`: a local output on a multi-node cluster must be one every node
  sees (an ``s3://`` URI or a shared mount).
- :func:`on_this_node`: pin an actor to the driver's node (never a spot GPU worker).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import replace

from .config import Config, ConfigError

# How long the shared-output check waits for the other nodes' answers.
SHARED_CHECK_TIMEOUT_S = 60.0
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
    with its share of the driver, so trials run side by side; on a cluster, 1 per worker.
    With ``train.wait_for_workers`` N it then waits for the cluster to hold N workers
    (:func:`wait_for_workers`). A run that does not fit is a :class:`ConfigError`.
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
    if t.wait_for_workers:
        wait_for_workers(t.wait_for_workers, driver, worker, t.num_workers, t.wait_timeout_s, log)
        nodes = node_resources()
    if trials_that_fit(nodes, driver, worker, t.num_workers, limit=1):
        return cfg
    what = f"{t.num_workers} Ray Train workers x {{{fmt(worker)}}}" + (
        f" plus a trial driver {{{fmt(driver)}}}" if driver else ""
    )
    have = f"{fmt(_total(nodes))} on {len(nodes)} node(s)"
    if t.wait_for_workers:
        raise ConfigError(
            f"{what} still do not fit the cluster ({have}) after waiting "
            f"train.wait_timeout_s={t.wait_timeout_s:g}s for train.wait_for_workers="
            f"{t.wait_for_workers} workers; raise the timeout, or check the cluster's node types"
        )
    raise ConfigError(
        f"{what} do not fit this cluster ({have}); lower --num-workers or "
        "train.cpus_per_worker (0 = fit the machine), use a larger cluster, or on an "
        "autoscaling cluster wait for its nodes with --set train.wait_for_workers=N"
    )


def wait_for_workers(
    want: int,
    driver: dict[str, float] | None,
    worker: dict[str, float],
    num_workers: int,
    timeout_s: float,
    log=print,
    poll_s: float = 2.0,
) -> int:
    """Wait until the cluster holds ``want`` Ray Train workers, as whole runs (``driver`` and
    ``num_workers`` workers each), asking the autoscaler for them
    (``ray.autoscaler.sdk.request_resources``; a cluster without one ignores the request).
    At ``timeout_s`` it goes on with what the nodes up then hold. Returns the runs that fit;
    the request is withdrawn on return (the runs that start then hold their nodes)."""
    from ray.autoscaler.sdk import request_resources

    runs = math.ceil(want / num_workers)
    bundles = ([driver] if driver else []) + [worker] * num_workers
    request_resources(bundles=bundles * runs)
    start = time.monotonic()
    said = start
    try:
        while True:
            fit = trials_that_fit(node_resources(), driver, worker, num_workers, limit=runs)
            waited = time.monotonic() - start
            if fit >= runs:
                if waited > poll_s:
                    log(f"the cluster holds {fit * num_workers} workers after {waited:.0f}s", flush=True)
                return fit
            if waited >= timeout_s:
                log(
                    f"waited {waited:.0f}s (train.wait_timeout_s) for {want} workers: going on "
                    f"with the {fit * num_workers} the cluster holds",
                    flush=True,
                )
                return fit
            if time.monotonic() - said >= 30 or said == start:
                log(
                    f"waiting for {want} workers x {{{fmt(worker)}}}: the cluster holds "
                    f"{fit * num_workers} ({waited:.0f}s of {timeout_s:g}s)",
                    flush=True,
                )
                said = time.monotonic()
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])


def _total(nodes: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            out[k] = out.get(k, 0.0) + v
    return out


# --- storage and placement ----------------------------------------------------------------


def check_shared_output(
    output: str, shared_fs: bool, what: str = "--output", more_nodes: bool = False
) -> None:
    """Refuse a local ``output`` that other nodes of the cluster cannot see.

    On one node anything works, unless ``more_nodes`` (the run expects nodes not up yet: it
    waited for workers, or asks for more trials than fit): nothing can be checked on those,
    so only a URI or ``train.shared_fs=true`` (the user's word that it is a shared mount)
    pass. Otherwise a probe file written here is looked for from every other node.
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
        if more_nodes:
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
        refs = [exists.options(scheduling_strategy=_pinned(n, soft=False)).remote(probe) for n in others]
        try:
            seen = ray.get(refs, timeout=SHARED_CHECK_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise ConfigError(
                f"could not check within {SHARED_CHECK_TIMEOUT_S:.0f}s that the other "
                f"{len(others)} node(s) see {what} {output!r} (a node busy or unreachable); {fix}"
            ) from None
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
