"""`tune_mitigation`: one mitigation setting (L2, input-noise σ, DP-SGD, optionally lr) scored over K replicate seeds in one trial.

The K models are trained in lock-step inside the trial, epoch by epoch (as one bundle, `spurious.bundle`,
when the model allows it), so the trial reports the seed-averaged metrics every epoch. That makes the
objective less noisy than one seed (the score of a single seed is very noisy at small n), lets a Tune
scheduler stop a hopeless setting early on the averaged curve, and keeps one Optuna trial per setting, so
the sampler sees exactly one (averaged) value per point it proposed.

Replicates (protocol §10.3): model k has data seed `data_seed + k` and training seed equal to its data seed,
so replicates differ in their planted examples, validation split and initialisation. The tuning study sets
`val_size` ≥ 1, so every row also has the validation metrics (`metrics.VAL_KEYS`); selection reads only
those (`constrained_objective`), the test metrics are reported but never selected on.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from spurious import bundle, config as config_lib, train
from spurious.datasets import Dataset
from spurious.metrics import PRIVACY_KEYS, TEST_KEYS, TRAIN_KEYS, VAL_KEYS
from trainables.common import (checkpoint_due, dataset_for, maybe_inject_fault, report_states,
                               restored_states, use_trial_threads)

AVERAGED = TRAIN_KEYS + TEST_KEYS + VAL_KEYS
# What selection reads (Optuna's objectives and constraint, ASHA, the Pareto set, the recommendation).
SELECTION_SCORE, SELECTION_ACC = "val_spurious_score", "val_acc"
# A DP setting's privacy guarantee (`spurious.train.Engine.privacy`): the same for every replicate (it depends on
# the noise multiplier, sample rate, steps, δ and the planted count, not on the seed), so reported once. ε is a
# property of the training recipe, not of any split: selection may read it.
EPSILON = PRIVACY_KEYS[0]


def seed_average(rows: list[dict]) -> dict:
    """Return the mean of each metric over seeds (those of AVERAGED the rows have: VAL_KEYS only with a
    validation split), with `<metric>_se` standard errors (sample s.d. / √K; NaN for one seed) and the per-seed
    test and validation scores (`spurious_score_per_seed`, `val_spurious_score_per_seed`); a DP setting's
    PRIVACY_KEYS are the first replicate's (all replicates share them)."""
    out: dict = {"epoch": rows[0]["epoch"], "epoch_lr": rows[0]["epoch_lr"], "n_seeds": len(rows)}
    for key in [k for k in AVERAGED if k in rows[0]]:
        values = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(values.mean())
        out[f"{key}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    for key in ("spurious_score", SELECTION_SCORE):
        if key in rows[0]:
            out[f"{key}_per_seed"] = [float(r[key]) for r in rows]
    out.update({key: float(rows[0][key]) for key in PRIVACY_KEYS if key in rows[0]})
    return out


def constrained_objective(metrics: dict, min_acc: float | None) -> dict:
    """Return the constraint value (≤ 0 is feasible) and a penalised objective for schedulers, both from the
    validation metrics: constraint = min_acc − val_acc; objective = val_spurious_score, plus 1 plus the
    shortfall when the constraint is violated. {} when there is no constraint (`min_acc` None)."""
    if min_acc is None:
        return {}
    violation = min_acc - metrics[SELECTION_ACC]
    penalty = max(0.0, violation)
    return {"constraint": violation, "objective": metrics[SELECTION_SCORE] + (1.0 + penalty if penalty else 0.0)}


def replicate_configs(base: config_lib.TrainConfig, seeds: int) -> list[config_lib.TrainConfig]:
    """Return the `seeds` replicates of a setting: data seed and training seed both `base.data_seed + k`."""
    return [base.replace(data_seed=base.data_seed + k, seed=base.data_seed + k) for k in range(seeds)]


def tune_mitigation(config: Mapping, datasets: Mapping[str, Dataset], seeds: int = 3, checkpoint_every: int = 5,
                    min_acc: float | None = None) -> None:
    """Train `seeds` replicates (data and training seeds data_seed … data_seed+seeds−1) of one setting and report
    their seed means every epoch; `min_acc` (the constrained objective's validation-accuracy floor) adds
    `constraint` and `objective` (see `constrained_objective`)."""
    base = config_lib.from_tune(config)
    use_trial_threads()
    cfgs = replicate_configs(base, seeds)
    engine = bundle.lockstep(cfgs, dataset_for(datasets, base.dataset))
    engine.drop_diverged = False  # one diverging seed fails the setting: its mean would be over fewer seeds
    states = restored_states(seeds)
    if states is not None:
        engine.restore(states)

    def on_epoch(rows: list[dict], snapshot) -> None:
        metrics = seed_average(rows)
        metrics.update(constrained_objective(metrics, min_acc))
        metrics.update(cfgs[0].to_dict(), seeds=seeds)  # the setting's canonical config (seeds: the first's)
        maybe_inject_fault(metrics["epoch"])
        report_states(metrics, snapshot() if checkpoint_due(metrics["epoch"], base.epochs, checkpoint_every) else None)

    train.fit(engine, on_epoch)
