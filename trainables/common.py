"""The one thin layer that talks to Ray Tune's reporting API (it has changed across Ray versions)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import ray
import torch
from ray import tune

from spurious import train
from spurious.config import flatten as flatten_config  # re-exported: the trainables' name for it

CHECKPOINT_FILE = "checkpoint.pt"
FAULT_FILE_ENV = "SPURIOUS_FAULT_FILE"


def dataset_for(datasets: Mapping[str, Any], name: str) -> Any:
    """Return the dataset the driver shipped for `name` (a dataset name or alias)."""
    from spurious.datasets import DATASETS

    return datasets[DATASETS.canonical(name)]


def restored_state() -> dict | None:
    """Return the checkpoint Ray hands a restored trial, or None for a fresh trial."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return train.load_checkpoint(Path(directory) / CHECKPOINT_FILE)


def report_files(metrics: dict, files: Mapping[str, dict] | None = None) -> None:
    """Report one epoch's metrics to Tune (with this node's id), and a checkpoint of the given files
    ({file name: state}) when `files` is given."""
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    if not files:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        for name, state in files.items():
            train.save_checkpoint(state, Path(directory) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def report(metrics: dict, state: dict | None = None) -> None:
    """Report one epoch's metrics to Tune, with a checkpoint when `state` is given."""
    report_files(metrics, None if state is None else {CHECKPOINT_FILE: state})


def member_file(k: int) -> str:
    """Return the checkpoint file name of bundle member `k`."""
    return f"member_{k:03d}.pt"


def restored_states(count: int) -> list[dict] | None:
    """Return the member checkpoints Ray hands a restored bundle trial, or None for a fresh trial."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return [train.load_checkpoint(Path(directory) / member_file(k)) for k in range(count)]


def report_states(metrics: dict, states: list[dict] | None = None) -> None:
    """Report a bundle's metrics to Tune, with one checkpoint file per member when `states` is given."""
    report_files(metrics, None if states is None else {member_file(k): s for k, s in enumerate(states)})


def maybe_inject_fault(epoch: int) -> None:
    """Raise once if the fault file named by $SPURIOUS_FAULT_FILE exists (reliability tests, chaos drills).

    The file holds an epoch N; the trial fails when it finishes epoch N + 1, before reporting it, so Tune
    has had a whole epoch to register the checkpoint of epoch N. The file is deleted first, so the retried
    trial runs on.
    """
    path = os.environ.get(FAULT_FILE_ENV)
    if not path or not os.path.exists(path):
        return
    if epoch > int(Path(path).read_text().strip() or 0):
        os.unlink(path)
        raise RuntimeError(f"injected fault at epoch {epoch} ({FAULT_FILE_ENV}={path})")


def use_trial_threads() -> None:
    """Match torch's CPU threads to the CPUs Tune gave this trial."""
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
