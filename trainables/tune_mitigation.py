"""`tune_mitigation`: one mitigation setting (L2, σ, optionally lr) scored over K data seeds in one trial.

The K models are trained in lock-step inside the trial, epoch by epoch (as one bundle, `spurious.bundle`,
when the model allows it), so the trial reports the seed-averaged spurious score and clean accuracy
every epoch. That makes the objective less noisy than one seed (the score of a single seed is very
noisy at small n), lets a Tune scheduler stop a hopeless setting early on the averaged curve, and keeps
one Optuna trial per setting, so the sampler sees exactly one (averaged) value per point it proposed.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from spurious import bundle, config as config_lib, train
from spurious.datasets import Dataset
from spurious.metrics import TEST_KEYS, TRAIN_KEYS
from trainables.common import (checkpoint_due, dataset_for, maybe_inject_fault, report_states,
                               restored_states, use_trial_threads)

AVERAGED = TRAIN_KEYS + TEST_KEYS


def seed_average(rows: list[dict]) -> dict:
    """Return the mean of each metric over seeds, with `<metric>_se` standard errors and per-seed scores."""
    out: dict = {"epoch": rows[0]["epoch"], "epoch_lr": rows[0]["epoch_lr"], "n_seeds": len(rows)}
    for key in AVERAGED:
        values = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(values.mean())
        out[f"{key}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    out["spurious_score_per_seed"] = [float(r["spurious_score"]) for r in rows]
    return out


def constrained_objective(metrics: dict, min_acc: float | None) -> dict:
    """Return the constraint value (≤ 0 is feasible) and a penalised objective for schedulers."""
    if min_acc is None:
        return {}
    violation = min_acc - metrics["test_acc"]
    penalty = max(0.0, violation)
    return {"constraint": violation, "objective": metrics["spurious_score"] + (1.0 + penalty if penalty else 0.0)}


def tune_mitigation(config: Mapping, datasets: Mapping[str, Dataset], seeds: int = 3, checkpoint_every: int = 5,
                    min_acc: float | None = None) -> None:
    """Train `seeds` models (data seeds data_seed … data_seed+seeds−1) of one setting; report seed means."""
    base = config_lib.from_tune(config)
    use_trial_threads()
    cfgs = [base.replace(data_seed=base.data_seed + k) for k in range(seeds)]
    engine = bundle.lockstep(cfgs, dataset_for(datasets, base.dataset))
    engine.drop_diverged = False  # one diverging seed fails the setting: its mean would be over fewer seeds
    states = restored_states(seeds)
    if states is not None:
        engine.restore(states)

    def on_epoch(rows: list[dict], snapshot) -> None:
        metrics = seed_average(rows)
        metrics.update(constrained_objective(metrics, min_acc))
        metrics.update(base.to_dict(), seeds=seeds)  # the setting's canonical config (data_seed: the first seed)
        maybe_inject_fault(metrics["epoch"])
        report_states(metrics, snapshot() if checkpoint_due(metrics["epoch"], base.epochs, checkpoint_every) else None)

    train.fit(engine, on_epoch)
