"""`train_cells`: the cells of one trial — several models trained in lock-step (`--bundle K`), each scored as
one or more cells (protocol §7.3) — and `train_bundle`, the trainable of studies bundled before cells existed.

Each cell keeps its own metrics (reported under `members/<j>/…`) and its own row in `analysis.frames.load`;
each model its own checkpoint file in the checkpoint directory (`spurious.checkpoint`'s layout and format),
so post-hoc studies and resume treat them like ordinary trials.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from spurious import bundle, cells, config as config_lib, train
from spurious.datasets import Dataset
from spurious.planted import plant_config_rows
from trainables.common import (checkpoint_due, dataset_for, maybe_inject_fault, report_states,
                               restored_states, use_trial_threads)


def summary(rows: list[dict | None], failed: dict[int, str]) -> dict:
    """Return the report: per-cell rows (or their error) and cell means for Tune's progress table."""
    alive = [r for r in rows if r]
    out = {"epoch": alive[0]["epoch"], "bundle_size": len(rows),
           "members": {str(k): (row if row else {"error": failed.get(k, "failed")}) for k, row in enumerate(rows)}}
    for key in ("spurious_score", "test_acc", "train_loss"):
        out[f"mean_{key}"] = float(np.mean([r[key] for r in alive]))
    return out


def train_cells(cell_configs: Sequence[Mapping], models: Sequence[int] | None, datasets: Mapping[str, Dataset],
                checkpoint_every: int = 5) -> None:
    """Train the trial's models together and report every cell every epoch.

    `models[j]` is the model that scores cell j (default: one model per cell); model m is trained with the
    config of its first cell, and a cell that does not train scores that model with its own pattern, class,
    data seed and τ (`spurious.cells.score`; such cells have the same `config.training_key`).
    """
    cfgs = [config_lib.from_tune(c) for c in cell_configs]
    models = list(range(len(cfgs))) if models is None else [int(m) for m in models]
    owners = [models.index(m) for m in range(max(models) + 1)]
    use_trial_threads()
    dataset = dataset_for(datasets, cfgs[0].dataset)
    engine = bundle.lockstep([cfgs[i] for i in owners], dataset)
    states = restored_states(len(owners))
    if states is not None:
        engine.restore(states)
    planted = [plant_config_rows(dataset, c) for c in cfgs]
    data = [cells.CellData.of(c, rows) for c, rows in zip(cfgs, planted)]
    fixed = [{"n_planted": len(rows.planted_idx), "pattern_l2": d.pattern_l2} for rows, d in zip(planted, data)]

    def on_epoch(rows: list[dict | None], snapshot) -> None:
        maybe_inject_fault(engine.epoch)
        last = engine.epoch == cfgs[0].epochs
        out: list[dict | None] = []
        built: dict[int, object] = {}  # model m as a module, built once this epoch (a copy in a bundle)
        for j, cfg in enumerate(cfgs):
            m = models[j]
            if rows[m] is None:
                out.append(None)
                continue
            if (last or j not in owners) and m not in built:
                built[m] = engine.member_model(m)
            model = built.get(m)
            row = dict(rows[m]) if j in owners else {**rows[m], **cells.score(model, data[j])}
            row.update(fixed[j], **(cells.final_record(model, data[j]) if last else {}), **cfg.to_dict())
            out.append(row)
        failed = {j: engine.failed[m] for j, m in enumerate(models) if m in engine.failed}
        due = checkpoint_due(engine.epoch, cfgs[0].epochs, checkpoint_every)
        report_states(summary(out, failed), snapshot() if due else None)

    train.fit(engine, on_epoch)


def train_bundle(config: Mapping, datasets: Mapping[str, Dataset], checkpoint_every: int = 5) -> None:
    """Train the member configs listed in `config["bundle"]` together, one model each (studies bundled with
    `--bundle K` before cells existed resume through this)."""
    train_cells(config["bundle"], config.get("models"), datasets, checkpoint_every)
