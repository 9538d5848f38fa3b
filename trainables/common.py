"""The one thin layer that talks to Ray Tune's reporting API (it has changed across Ray versions)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import ray
import torch
from ray import tune

from spurious import checkpoint

FAULT_FILE_ENV = "SPURIOUS_FAULT_FILE"


def dataset_for(datasets: Mapping[str, Any], name: str) -> Any:
    """Return the dataset the driver shipped for `name` (a dataset name or alias)."""
    from spurious.datasets import DATASETS

    return datasets[DATASETS.canonical(name)]


def restored_states(count: int = 1) -> list[dict] | None:
    """Return the `count` model states of the checkpoint Ray hands a restored trial, or None for a fresh
    trial (checkpoints of either layout, `spurious.checkpoint`)."""
    restored = tune.get_checkpoint()
    if restored is None:
        return None
    with restored.as_directory() as directory:
        return checkpoint.read_members(directory, count)


def restored_state() -> dict | None:
    """Return the model state Ray hands a restored one-model trial, or None for a fresh trial."""
    states = restored_states(1)
    return None if states is None else states[0]


def report_states(metrics: dict, states: list[dict] | None = None) -> None:
    """Report one epoch's metrics to Tune (with this node's id), and a checkpoint with one file per model
    state (`spurious.checkpoint`'s layout) when `states` is given."""
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    if not states:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        checkpoint.write_members(directory, states)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def report(metrics: dict, state: dict | None = None) -> None:
    """Report one epoch's metrics to Tune, with a one-model checkpoint when `state` is given."""
    report_states(metrics, None if state is None else [state])


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    """Return whether epoch `epoch` (1-based) of `epochs` is checkpointed: every `every` epochs and the last."""
    return epoch == epochs or (every > 0 and epoch % every == 0)


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
