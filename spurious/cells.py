"""Cells and trainings: each distinct model is trained once and scored under every cell that needs it
(protocol §7.3).

A *cell* is one analysed configuration (a TrainConfig: pattern, n, class, data seed, τ, …). Cells whose
training is identical — equal `config.training_key`, e.g. every n = 0 cell of one training seed, whatever
its pattern, class or data seed — share one trained model: the first cell's config trains it and every
other cell scores it with its own pattern, class, data seed and τ. Each cell still gets its own metrics
row, so analysis sees one row per cell. Example::

    from spurious import cells
    trials = cells.plan(cfgs, bundle_size=1)  # [(cell configs, model index of each cell), ...]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from spurious import bundle, dp, metrics
from spurious.config import TrainConfig, count_trainings, group_by_training  # noqa: F401 (re-exported)
from spurious.planted import PlantedRows


def plan(cfgs: Sequence[TrainConfig], bundle_size: int = 1) -> list[tuple[list[TrainConfig], list[int]]]:
    """Return the trials that train every distinct model of `cfgs` once: per trial its cells and, per cell, the
    index of the trial's model that scores it (model m is trained with the config of its first cell).

    With `bundle_size` K > 1, up to K trainings that may share a bundle (`bundle.compatible_key`) share a trial;
    otherwise each trial trains one model. A DP-SGD training shares a trial only when the bundle runs it as
    batched matmuls (`bundle.dp_batched`: Flatten/Linear/ReLU models on the CPU), where the members' ghost
    norms are taken together and the members share one copy of the training data; any other DP training has
    a trial of its own, since `bundle.lockstep` would step it as separate Engines, each holding its own copy
    of the data (21 LargeMLP runs on Fashion-MNIST took 9.6 GB), for no gain in speed. Every cell appears in
    exactly one trial.
    """
    trainings = [[cfgs[i] for i in members] for members in group_by_training(cfgs)]
    if bundle_size <= 1:
        return [(cells, [0] * len(cells)) for cells in trainings]
    by_key: dict[tuple, list[list[TrainConfig]]] = {}
    trials = []
    for cells in trainings:
        if dp.enabled(cells[0]) and not bundle.dp_batched(cells[0]):
            trials.append((cells, [0] * len(cells)))
        else:
            by_key.setdefault(bundle.compatible_key(cells[0]), []).append(cells)
    for chunk_of in by_key.values():
        for start in range(0, len(chunk_of), bundle_size):
            chunk = chunk_of[start:start + bundle_size]
            trials.append(([c for cells in chunk for c in cells],
                           [m for m, cells in enumerate(chunk) for _ in cells]))
    return trials


@dataclass(frozen=True)
class CellData:
    """What scoring a model as one cell needs: the clean test set, the cell's patterned test set and, with a
    validation split, the cell's validation images (protocol §3.4, §4.2)."""

    cfg: TrainConfig
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_test_patterned: torch.Tensor
    x_val: Optional[torch.Tensor] = None
    y_val: Optional[torch.Tensor] = None
    x_val_patterned: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, cfg: TrainConfig, rows: PlantedRows) -> "CellData":
        """Return the cell data of `cfg` from its planted data."""
        return cls(cfg, rows.x_test, rows.y_test, rows.x_test_patterned, rows.x_val, rows.y_val,
                   rows.x_val_patterned)

    @property
    def pattern_l2(self) -> float:
        """Return the mean ℓ2 change the cell's pattern makes to a test image (`metrics.mean_l2_change`)."""
        return metrics.mean_l2_change(self.x_test, self.x_test_patterned)


def score(model: torch.nn.Module, cell: CellData) -> dict[str, float]:
    """Return the model's TEST_KEYS metrics as cell `cell` (its pattern, class and τ), plus VAL_KEYS when the
    cell has a validation split (protocol §4.2)."""
    return metrics.evaluate_data(model, cell, cell.cfg.target, cell.cfg.tau, cell.cfg.eval_batch_size)


def final_record(model: torch.nn.Module, cell: CellData) -> dict[str, str]:
    """Return the record of a cell's final epoch: its per-test-image indicators r(x), bit-packed under
    `metrics.INDICATORS_KEY` (`metrics.pack_indicators`; for the reference's per-example test, protocol §4.4)."""
    cfg = cell.cfg
    clean = metrics.logits(model, cell.x_test, cfg.eval_batch_size).softmax(1)
    patterned = metrics.logits(model, cell.x_test_patterned, cfg.eval_batch_size).softmax(1)
    return {metrics.INDICATORS_KEY: metrics.pack_indicators(metrics.rise_indicator(clean, patterned, cfg.target,
                                                                                   cfg.tau))}
