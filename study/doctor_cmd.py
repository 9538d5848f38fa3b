"""`study doctor`: check what a launch needs and print a short verdict per item."""
from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from spurious.errors import SpuriousError
from study.options import WANDB_MODES, RunOptions, expand_path

OK, WARN, FAIL = "ok", "warn", "FAIL"


def arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of `study doctor`."""
    p.add_argument("--address", help="Ray cluster address (host:port or auto); default: embedded Ray here")
    p.add_argument("--storage-path", default="./results", type=expand_path,
                   help="results root to check (path or URI)")
    p.add_argument("--data-dir", type=expand_path, help="dataset directory to check")
    p.add_argument("--datasets", default="mnist,fashion,cifar10", help="comma-separated datasets to check")
    p.add_argument("--wandb", default="auto", choices=WANDB_MODES)


def check_cluster(address: str | None) -> list[tuple[str, str, str]]:
    """Return verdicts for reaching the cluster and for each node's CPUs/GPUs."""
    from study import cluster, runner

    try:
        runner.start_ray(RunOptions(address=address, verbose=0))
    except SpuriousError as err:
        return [(FAIL, "cluster", str(err))]
    nodes = cluster.alive_nodes()
    out = [(OK, "cluster", f"{'joined ' + address if address else 'embedded Ray on this machine'}: "
                           f"{len(nodes)} node(s)")]
    for n in nodes:
        role = "head" if n["head"] else "worker"
        out.append((OK if n["cpus"] or n["gpus"] else WARN, f"  node {n['address']} ({role})",
                    f"{n['cpus']:g} CPU, {n['gpus']:g} GPU"))
    types = cluster.node_types() if address else None
    for t in types or []:
        res = t["resources"]
        limit = "no limit" if t["max_count"] < 0 else f"up to {t['max_count']}"
        out.append((OK, f"  node type {t['name']}", f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU, {limit}"))
    if any(t["resources"].get("GPU", 0) for t in types or []) and not any(n["gpus"] for n in nodes):
        out.append((OK, "gpus", "no GPU node yet: the autoscaler adds GPU workers when trials ask for GPUs"))
    elif not any(n["gpus"] for n in nodes):
        out.append((WARN, "gpus", "no GPU in the cluster: trials run on CPUs (--gpus-per-trial 0)"))
    return out


def check_storage(storage: str) -> list[tuple[str, str, str]]:
    """Return verdicts for writing to the storage path from the driver and sharing it with all nodes."""
    from study import cluster

    try:
        _write_probe(storage)
    except Exception as err:  # any filesystem or cloud error is a verdict, not a crash
        return [(FAIL, "storage", f"cannot write to {storage}: {type(err).__name__}: {err}")]
    verdicts = [(OK, "storage", f"{storage} is writable from the driver")]
    if "://" not in storage and len(cluster.alive_nodes()) > 1:
        missing = cluster.nodes_missing_storage(Path(storage).resolve())
        verdicts.append((FAIL, "storage sharing", f"not visible from node(s) {', '.join(missing)}") if missing
                        else (OK, "storage sharing", "every node sees the storage path"))
    return verdicts


def _write_probe(storage: str) -> None:
    name = f".doctor-{uuid.uuid4().hex}"
    if "://" in storage:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{name}") as stream:
            stream.write(b"ok")
        fs.delete_file(f"{path}/{name}")
        return
    directory = Path(storage).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("ok")
    (directory / name).unlink()


def check_datasets(names: list[str], data_dir: str | None) -> list[tuple[str, str, str]]:
    """Return a verdict per dataset: found on the driver (with sizes) or where it was looked for."""
    from spurious import datasets

    out = []
    for name in names:
        try:
            data = datasets.load(name, data_dir, download=False)
            out.append((OK, f"dataset {name}", f"{len(data.y_train)} train / {len(data.y_test)} test images"))
        except SpuriousError as err:
            out.append((WARN, f"dataset {name}", str(err)))
    return out


def check_wandb(flag: str) -> list[tuple[str, str, str]]:
    """Return the W&B mode a run would use (never the key)."""
    from study import wandb_setup

    mode = wandb_setup.resolve_mode(flag)
    detail = {"off": "W&B logging off", "offline": "offline runs inside the experiment directory "
                                                  "(`wandb sync` them later)",
              "online": "online (an API key is configured)"}[mode]
    return [(OK, "wandb", f"{mode}: {detail}")]


def handle(args: argparse.Namespace) -> int:
    from study import cluster

    cluster.check_address(args.address)
    verdicts = check_cluster(args.address)
    if verdicts[0][0] != FAIL:
        verdicts += check_storage(args.storage_path)
    verdicts += check_datasets([d.strip() for d in args.datasets.split(",") if d.strip()], args.data_dir)
    verdicts += check_wandb(args.wandb)
    for status, item, detail in verdicts:
        print(f"{status:4s}  {item}: {detail}")
    failed = [v for v in verdicts if v[0] == FAIL]
    print(f"\nverdict: {'not ready — fix the FAIL lines' if failed else 'ready to launch'}")
    return 1 if failed else 0
