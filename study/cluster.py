"""Cluster facts the runner needs: which nodes are alive, and whether the storage path is shared by all."""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from spurious.errors import SpuriousError


def check_address(address: str | None) -> None:
    """Fail fast with one line if a `host:port` cluster address does not answer."""
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError) as err:
        raise SpuriousError(f"cannot reach Ray cluster at --address {address!r}: {err}") from None


def alive_nodes() -> list[dict]:
    """Return the alive nodes: id, address, CPUs and GPUs, head flag."""
    return [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0),
             "gpus": n["Resources"].get("GPU", 0), "head": "node:__internal_head__" in n["Resources"]}
            for n in ray.nodes() if n["Alive"]]


@ray.remote(num_cpus=0)
def _sees(marker: str) -> bool:
    """Return whether this node sees `marker` and can write beside it."""
    if not os.path.exists(marker):
        return False
    probe = f"{marker}.{os.getpid()}"
    try:
        Path(probe).write_text("ok")
        os.unlink(probe)
        return True
    except OSError:
        return False


def nodes_missing_storage(directory: str | Path, timeout_s: float = 60.0) -> list[str]:
    """Return the addresses of alive nodes that cannot see and write the local directory `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f".shared-storage-check-{uuid.uuid4().hex}"
    marker.write_text("shared storage check")
    try:
        nodes = alive_nodes()
        refs = [_sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["node_id"], soft=False))
                .remote(str(marker)) for n in nodes]
        seen = ray.get(refs, timeout=timeout_s)
        return [n["address"] for n, ok in zip(nodes, seen) if not ok]
    finally:
        marker.unlink(missing_ok=True)


def check_storage(storage_uri: str) -> None:
    """Refuse a node-local storage path on a multi-node cluster (trials elsewhere would lose their data)."""
    if "://" in storage_uri or len(alive_nodes()) <= 1:
        return
    missing = nodes_missing_storage(storage_uri)
    if missing:
        raise SpuriousError(f"--storage-path {storage_uri!r} is not shared with node(s) {', '.join(missing)}: "
                            f"checkpoints written there would be lost; use s3://, gs:// or a shared file system")


def node_types() -> list[dict] | None:
    """Return the node types the cluster's autoscaler may launch (name, resources, max_count; -1 = no limit),
    or None when the cluster publishes none (no autoscaler, or one that does not report its config).

    Read from the autoscaler's cluster config in Ray's GCS, as Ray Data does; a Ray without it gives None.
    """
    try:
        from ray._private import state

        config = state.state.get_cluster_config()
    except Exception:  # an older or newer Ray without this accessor: the node types are unknown
        return None
    if config is None or not config.node_group_configs:
        return None
    return [{"name": g.name, "resources": dict(g.resources), "max_count": int(g.max_count)}
            for g in config.node_group_configs]


def _fits(cpus: float, gpus: float, resources: dict) -> bool:
    return resources.get("CPU", 0) >= cpus and resources.get("GPU", 0) >= gpus


def _shortfall(cpus: float, gpus: float, nodes: list[dict]) -> str:
    if gpus > 0 and not any(n["gpus"] for n in nodes):
        return f"--gpus-per-trial {gpus:g} asked for GPUs but the cluster has none; use 0"
    most = max((n["cpus"] for n in nodes if n["gpus"] >= gpus), default=0)
    return (f"--cpus-per-trial {cpus:g} with --gpus-per-trial {gpus:g} fits no node: the largest such node has "
            f"{most:g} CPUs" if gpus > 0 else
            f"--cpus-per-trial {cpus:g} is more than any node's CPUs ({max((n['cpus'] for n in nodes), default=0):g})")


def local_node() -> dict:
    """Return this machine's CPUs and GPUs as embedded Ray will see them (checked before Ray starts)."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"cpus": cpus, "gpus": torch.cuda.device_count()}


def plan_resources(cpus: float, gpus: float | None, address: str | None, static: bool = False,
                   say: Callable[[str], None] = print, nodes: list[dict] | None = None) -> dict[str, float]:
    """Return per-trial resources {"cpu", "gpu"}; refuse (SpuriousError) only what can never be satisfied.

    GPUs default to a quarter GPU when a node, or a node type of the autoscaler, has GPUs, else none. When
    no alive node fits one trial: embedded Ray (no `address`) and `static` clusters are refused, with the
    shortfall; on a cluster whose autoscaler publishes its node types, a trial no node type fits is
    refused; otherwise `say` gets one line that trials wait for workers, and Ray's autoscaler acts
    (cluster.yaml's head advertises no CPUs and its GPU workers start at 0). `nodes` replaces the alive nodes
    (e.g. `[local_node()]`, to refuse before embedded Ray starts).
    """
    nodes = alive_nodes() if nodes is None else nodes
    types = node_types() if address else None
    if gpus is None:
        some_gpu = any(n["gpus"] for n in nodes) or any(t["resources"].get("GPU", 0) for t in types or [])
        gpus = 0.25 if some_gpu else 0.0
    if any(_fits(cpus, gpus, {"CPU": n["cpus"], "GPU": n["gpus"]}) for n in nodes):
        return {"cpu": cpus, "gpu": gpus}
    if not address or static:
        why = "" if not address else " (--static-cluster: no autoscaler adds workers)"
        raise SpuriousError(_shortfall(cpus, gpus, nodes) + why)
    if types is not None:
        if not any(t["max_count"] != 0 and _fits(cpus, gpus, t["resources"]) for t in types):
            offered = ", ".join(f"{t['name']} ({t['resources'].get('CPU', 0):g} CPU, "
                                f"{t['resources'].get('GPU', 0):g} GPU)" for t in types)
            raise SpuriousError(f"no node type of the cluster's autoscaler fits a trial of {cpus:g} CPU and "
                                f"{gpus:g} GPU; node types: {offered}")
    say(f"trials wait for workers: no node offers {cpus:g} CPU + {gpus:g} GPU yet; Ray's autoscaler adds them "
        f"(on a cluster without an autoscaler pass --static-cluster to refuse instead)")
    return {"cpu": cpus, "gpu": gpus}
