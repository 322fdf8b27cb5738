"""Does the Ray cluster have what a run asks for? An error naming what is missing, not a hang.

Ray queues an actor it cannot place and waits, silently, for resources that may never come (a
2-CPU machine asked for 8 engines waited until killed). ``wait_for_resources`` compares the run's
request (the algorithm's resource bundles: driver, remote learners, one bundle per engine) with the
cluster's totals, waits up to ``resource_wait_timeout_s`` for an autoscaling cluster to grow, and
then raises ``InsufficientResources`` with the arithmetic:

    8 engines x 0.5 CPU + 1 driver/learner CPU = 5 CPUs; the cluster has 2

With ``engine_node_labels`` (and no ``engine_node_fallback``) the engines must also fit on the
nodes that carry those labels:

    2 engines x 0.5 CPU = 1 CPUs on nodes labelled {'opefo-role': 'engines'}; those nodes have 0
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["InsufficientResources", "requested_resources", "shortfall", "labelled_shortfall", "wait_for_resources"]


class InsufficientResources(RuntimeError):
    """The cluster cannot meet the run's resource request; the message says by how much."""


def _fmt(x: float) -> str:
    return f"{x:g}"


def requested_resources(config: Any) -> dict[str, dict[str, float]]:
    """Per resource ("CPU", "GPU"): the driver's (with the local learner when num_learners is 0),
    the remote learners' and the engines' parts of the request."""
    bundles = config.algo_class.default_resource_request(config).bundles  # the config's own Algorithm
    n_engines, n_learners = config.num_engines, config.num_learners
    parts = {"driver": bundles[:len(bundles) - n_engines - n_learners],
             "learners": bundles[len(bundles) - n_engines - n_learners:len(bundles) - n_engines],
             "engines": bundles[len(bundles) - n_engines:]}
    return {kind: {part: sum(b.get(kind, 0.0) for b in bs) for part, bs in parts.items()} for kind in ("CPU", "GPU")}


def shortfall(config: Any, cluster: dict[str, float]) -> str | None:
    """None if ``cluster`` (Ray's cluster_resources) covers the request, else the explanation."""
    request = requested_resources(config)
    lines = []
    for kind in ("CPU", "GPU"):
        need = sum(request[kind].values())
        have = float(cluster.get(kind, 0.0))
        if need > have + 1e-9:
            per_engine = config.num_cpus_per_engine if kind == "CPU" else config.num_gpus_per_engine
            terms = [f"{config.num_engines} engines x {_fmt(per_engine)} {kind}"]
            if config.num_learners:
                per_learner = request[kind]["learners"] / config.num_learners
                terms.append(f"{config.num_learners} learners x {_fmt(per_learner)} {kind}")
                terms.append(f"{_fmt(request[kind]['driver'])} driver {kind}")
            else:
                terms.append(f"{_fmt(request[kind]['driver'])} driver/learner {kind}")
            lines.append(f"{' + '.join(terms)} = {_fmt(need)} {kind}s; the cluster has {_fmt(have)}")
    return "; ".join(lines) or None


def labelled_shortfall(config: Any, nodes: list[dict]) -> str | None:
    """None if the alive ``nodes`` (``ray.nodes()``) carrying ``engine_node_labels`` hold the
    engines' CPUs and GPUs (or engines may run anywhere), else the explanation."""
    labels = config.engine_node_labels
    if not labels or config.engine_node_fallback:
        return None
    ours = [n for n in nodes if n.get("Alive") and all((n.get("Labels") or {}).get(k) == v for k, v in labels.items())]
    lines = []
    for kind, per_engine in (("CPU", config.num_cpus_per_engine), ("GPU", config.num_gpus_per_engine)):
        need, have = config.num_engines * per_engine, sum(float(n["Resources"].get(kind, 0.0)) for n in ours)
        if need > have + 1e-9:
            lines.append(f"{config.num_engines} engines x {_fmt(per_engine)} {kind} = {_fmt(need)} {kind}s on nodes "
                         f"labelled {labels} (engine_node_labels); those nodes have {_fmt(have)}")
    return "; ".join(lines) or None


def wait_for_resources(config: Any, timeout_s: float, cluster_resources: Callable[[], dict] | None = None,
                       poll_s: float = 2.0, nodes: Callable[[], list[dict]] | None = None) -> None:
    """Return once the cluster covers the request (and its labelled nodes the engines'); raise
    InsufficientResources after ``timeout_s``."""
    import ray

    cluster_resources = cluster_resources or ray.cluster_resources
    nodes = nodes or (ray.nodes if config.engine_node_labels else list)
    deadline = time.monotonic() + timeout_s
    while True:
        missing = shortfall(config, cluster_resources()) or labelled_shortfall(config, nodes())
        if missing is None:
            return
        if time.monotonic() >= deadline:
            raise InsufficientResources(
                f"the run asks for more than the Ray cluster has: {missing} (waited {_fmt(timeout_s)} s; lower "
                "num_engines / num_learners / num_cpus_per_engine / num_cpus_per_learner / num_gpus_per_*, add nodes, "
                "or raise "
                "resource_wait_timeout_s for an autoscaling cluster)")
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
