"""Data deletion from a trained checkpoint: incremental retraining, the retrain-from-scratch oracle, and
the report that puts every deletion method next to that oracle (protocol §8).

    from spurious import deletion, train
    data = train.prepare(cfg)                       # the planted data the checkpoint was trained on
    start = time.perf_counter()
    after = deletion.incremental_retrain(state, data, epochs=70, lr_policy="reset")
    oracle = deletion.retrain_oracle(cfg, data)
    report = deletion.deletion_report(before_model, after.model, oracle.model, data,
                                      wall_time_s=time.perf_counter() - start)

Both retraining functions take the planted data and delete its spurious examples themselves, so a
checkpoint cannot be paired with the wrong data: `incremental_retrain` checks that the checkpoint's
planted indices are the data's.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from spurious import metrics
from spurious.config import TrainConfig, from_dict
from spurious.errors import SpuriousError
from spurious.planted import PlantedData
from spurious.train import EpochCallback, Engine, ModelFactory, TrainResult, lr_at, train

LR_POLICIES = ("inherit", "reset")


def _schedule(state: dict, epochs: int, lr_policy: str) -> Callable[[int], float]:
    """Return the retraining schedule, epoch -> lr: the checkpoint's (decayed) rate held constant, or the
    config's base rate restarted at the checkpoint's epoch with the usual milestones for `epochs` epochs
    (protocol §6.2, §8.4)."""
    if lr_policy == "inherit":
        inherited = float(state["optimizer"]["param_groups"][0]["lr"])
        return lambda epoch: inherited
    start, restart = int(state["epoch"]), from_dict(state["config"]).replace(epochs=epochs)
    return lambda epoch: lr_at(restart, epoch - start)


def _check_same_planting(state: dict, data: PlantedData) -> None:
    """Raise unless the checkpoint was trained on `data` (same planted training indices)."""
    saved = np.asarray(state["spurious_idx"]).astype(np.int64)
    if not np.array_equal(np.sort(saved), np.sort(np.asarray(data.spurious_idx, np.int64))):
        raise SpuriousError(f"the data's {len(data.spurious_idx)} planted examples are not the checkpoint's "
                            f"{len(saved)}; pass the planted data the checkpoint was trained on "
                            "(not data.without_spurious())")


def incremental_retrain(state: dict, data: PlantedData, epochs: int, lr_policy: str = "inherit",
                        model_factory: Optional[ModelFactory] = None,
                        on_epoch: Optional[EpochCallback] = None) -> TrainResult:
    """Return the checkpoint's model trained `epochs` more epochs with the spurious examples deleted (protocol §8.4).

    `state` is a checkpoint made by `Engine.snapshot`; `data` is the planted data it was trained on.
    lr_policy `inherit` keeps the optimiser state and its decayed learning rate, with no scheduler, as the
    reference does (0.01 → 1e-5 after 70 epochs), but runs exactly `epochs` epochs where the reference
    repeats the checkpoint's last epoch number (71 epochs for "70 → 140"). `reset` keeps the optimiser
    state (momentum, Adam moments) but restarts the rate at the config's base `lr` and runs the usual
    milestone schedule for `epochs` epochs. Epochs are numbered on from the checkpoint's, and shuffling
    continues the checkpoint's random stream.
    """
    if lr_policy not in LR_POLICIES:
        raise SpuriousError(f"lr_policy {lr_policy!r} is not one of {', '.join(LR_POLICIES)}")
    if epochs < 1:
        raise SpuriousError(f"epochs must be >= 1, got {epochs!r}")
    _check_same_planting(state, data)
    cfg = from_dict(state["config"])
    engine = Engine(cfg.replace(epochs=int(state["epoch"]) + epochs), data.without_spurious(), model_factory)
    engine.restore(state)
    engine.schedule = _schedule(state, epochs, lr_policy)
    engine.history = []
    return engine.fit(on_epoch)


def retrain_oracle(cfg: TrainConfig, data: PlantedData, model_factory: Optional[ModelFactory] = None,
                   on_epoch: Optional[EpochCallback] = None) -> TrainResult:
    """Return a model trained from scratch on `data` without its spurious examples, with cfg's seeds (protocol §8.5).

    The same `seed` gives the same initial weights; the shuffling differs, the training set being smaller.
    """
    return train(cfg, data.without_spurious(), model_factory, on_epoch)


def parameter_distance(model_a: torch.nn.Module, model_b: torch.nn.Module) -> float:
    """Return the L2 distance between two models' parameters, all tensors taken as one vector."""
    a, b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise SpuriousError("parameter_distance needs two models of the same architecture")
    with torch.no_grad():
        squares = (float((a[k].double() - b[k].to(a[k].device).double()).square().sum()) for k in a)
        return math.sqrt(sum(squares))


REPORT_METRICS = ("spurious_score", "spurious_score_nontarget", "test_acc")


def deletion_report(before_model: torch.nn.Module, after_model: torch.nn.Module,
                    oracle_model: torch.nn.Module, data: PlantedData, wall_time_s: float = float("nan"),
                    tau: float = 0.1, batch_size: int = 2000) -> dict[str, float]:
    """Return flat metrics of a deletion: spurious scores and clean accuracy of the original (`before`),
    deleted (`after`) and oracle models, each one's parameter distance to the oracle, and the wall time."""
    row: dict[str, float] = {}
    for role, model in (("before", before_model), ("after", after_model), ("oracle", oracle_model)):
        scores = metrics.evaluate(model, data.x_test, data.y_test, data.x_test_patterned, data.target, tau,
                                  batch_size)
        row.update({f"{key}_{role}": scores[key] for key in REPORT_METRICS})
    row["distance_to_oracle_before"] = parameter_distance(before_model, oracle_model)
    row["distance_to_oracle_after"] = parameter_distance(after_model, oracle_model)
    row["wall_time_s"] = float(wall_time_s)
    return row
