"""Cluster facts the runner needs: which nodes are alive, and whether the storage path is shared by all."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from spurious.errors import SpuriousError


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
