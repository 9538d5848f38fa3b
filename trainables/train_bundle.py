"""`train_bundle`: K compatible training configs trained in lock-step in one Tune trial (`--bundle K`).

Each member keeps its own metrics (reported under `members/<k>/…`), its own checkpoint file in the
checkpoint directory (`spurious.checkpoint`'s layout and format) and its own row in
`analysis.frames.load`, so post-hoc studies and resume treat members like ordinary trials.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from spurious import bundle, config as config_lib, train
from spurious.datasets import Dataset
from trainables.common import (checkpoint_due, dataset_for, maybe_inject_fault, report_states,
                               restored_states, use_trial_threads)


def summary(rows: list[dict | None], failed: dict[int, str]) -> dict:
    """Return the report: per-member rows (or their error) and member means for Tune's progress table."""
    alive = [r for r in rows if r]
    out = {"epoch": alive[0]["epoch"], "bundle_size": len(rows),
           "members": {str(k): (row if row else {"error": failed.get(k, "failed")}) for k, row in enumerate(rows)}}
    for key in ("spurious_score", "test_acc", "train_loss"):
        out[f"mean_{key}"] = float(np.mean([r[key] for r in alive]))
    return out


def train_bundle(config: Mapping, datasets: Mapping[str, Dataset], checkpoint_every: int = 5) -> None:
    """Train the member configs listed in `config["bundle"]` together; report and checkpoint per member."""
    cfgs = [config_lib.from_tune(member) for member in config["bundle"]]
    use_trial_threads()
    engine = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, dataset_for(datasets, cfgs[0].dataset)))
    states = restored_states(len(cfgs))
    if states is not None:
        engine.restore(states)

    def on_epoch(rows: list[dict | None], snapshot) -> None:
        maybe_inject_fault(engine.epoch)
        due = checkpoint_due(engine.epoch, cfgs[0].epochs, checkpoint_every)
        for k, row in enumerate(rows):
            if row is not None:  # each member's row carries its full canonical config
                row.update(n_planted=len(engine.members[k].planted_idx), **cfgs[k].to_dict())
        report_states(summary(rows, engine.failed), snapshot() if due else None)

    train.fit(engine, on_epoch)
