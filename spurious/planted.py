"""Training/test data with a pattern planted into `n` training images of one class (protocol §1–3)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spurious import datasets, patterns
from spurious.errors import SpuriousError


@dataclass(frozen=True)
class PlantedData:
    """The patterned training set, the clean and patterned test sets, and which examples were planted."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_test_patterned: torch.Tensor
    spurious_idx: np.ndarray
    pattern: str
    target: int
    data_seed: int
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Return (C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])

    def without_spurious(self) -> "PlantedData":
        """Return the same data with the planted training examples deleted (for deletion studies)."""
        keep = np.setdiff1d(np.arange(len(self.y_train)), self.spurious_idx)
        keep_t = torch.from_numpy(keep)
        return PlantedData(self.x_train[keep_t], self.y_train[keep_t], self.x_test, self.y_test,
                           self.x_test_patterned, np.empty(0, np.int64), self.pattern, self.target,
                           self.data_seed, self.num_classes)

    def to(self, device: torch.device | str) -> "PlantedData":
        """Return the data moved to `device` (tensors only)."""
        move = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test",
                                                           "x_test_patterned")}
        return PlantedData(**move, spurious_idx=self.spurious_idx, pattern=self.pattern, target=self.target,
                           data_seed=self.data_seed, num_classes=self.num_classes)


def split_arrays(data: datasets.Dataset, split: str, seed: int):
    """Return (x_train, y_train, x_test, y_test) for `split`: the full set or a membership quarter (protocol §3.3)."""
    if split == "full":
        return data.x_train, data.y_train, data.x_test, data.y_test
    x_all = torch.cat([data.x_train, data.x_test])
    y_all = torch.cat([data.y_train, data.y_test])
    parts = datasets.membership_split(len(y_all), seed)
    role = {"mia_target": "target", "mia_shadow": "shadow"}.get(split)
    if role is None:
        raise SpuriousError(f"split {split!r} is not one of full, mia_target, mia_shadow")
    train_idx = torch.from_numpy(parts[f"{role}_train"])
    test_idx = torch.from_numpy(parts[f"{role}_test"])
    return x_all[train_idx], y_all[train_idx], x_all[test_idx], y_all[test_idx]


@dataclass(frozen=True)
class PlantedRows:
    """Planted data stored compactly: a base training tensor shared with other plantings plus the planted rows.

    `base_x` (N, C, H, W) and `base_y` (N,) are the split's training set; `planted_x` (n, C, H, W) holds the
    patterned images of rows `planted_idx` (n,). `base_dirty` lists base rows that are not clean (they hold
    another planting, as when compacting a PlantedData); only rows in `planted_idx` are read from
    `planted_x`, every other row comes from `base_x`. Bundles keep K members' data this way (issue 8).
    """

    base_x: torch.Tensor
    base_y: torch.Tensor
    base_dirty: np.ndarray
    planted_idx: np.ndarray
    planted_x: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_test_patterned: torch.Tensor
    pattern: str
    target: int
    data_seed: int
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Return (C, H, W) of one image."""
        return tuple(self.base_x.shape[1:])

    @classmethod
    def of(cls, data: "PlantedData | PlantedRows") -> "PlantedRows":
        """Return `data` in compact form, sharing its tensors (no copy of the training images)."""
        if isinstance(data, PlantedRows):
            return data
        idx = np.asarray(data.spurious_idx, np.int64)
        return cls(data.x_train, data.y_train, idx, idx, data.x_train[torch.from_numpy(idx)], data.x_test,
                   data.y_test, data.x_test_patterned, data.pattern, data.target, data.data_seed, data.num_classes)

    def materialize(self) -> PlantedData:
        """Return the data as a PlantedData (copies the training images when any row is planted)."""
        x = self.base_x
        if len(self.planted_idx):
            x = x.clone()
            x[torch.from_numpy(self.planted_idx)] = self.planted_x
        return PlantedData(x, self.base_y, self.x_test, self.y_test, self.x_test_patterned, self.planted_idx,
                           self.pattern, self.target, self.data_seed, self.num_classes)


def plant_rows(data: datasets.Dataset, pattern: str, n_spurious: int, target: int, data_seed: int,
               split: str = "full", arrays: tuple | None = None) -> PlantedRows:
    """Return `data` with `pattern` planted into `n_spurious` training images of class `target`, compactly.

    The examples are chosen exactly as the reference does (`RandomState(data_seed).choice`), and the
    patterned test set uses the same pattern and seed (protocol §2.3). Shadow splits of a membership
    study get no planted examples: the attacker's shadow models are trained on clean data. `arrays` may
    pass `split_arrays(data, split, data_seed)` computed once for several plantings.
    """
    patterns.get(pattern)
    x_train, y_train, x_test, y_test = arrays if arrays is not None else split_arrays(data, split, data_seed)
    n = 0 if split == "mia_shadow" else n_spurious
    idx = datasets.choose_spurious(y_train, target, n, data_seed)
    rows = x_train[torch.from_numpy(idx)]
    planted_x = patterns.apply(pattern, rows, data_seed) if len(idx) else rows
    return PlantedRows(x_train, y_train, np.empty(0, np.int64), idx, planted_x, x_test, y_test,
                       patterns.apply(pattern, x_test, data_seed), pattern, target, data_seed, data.num_classes)


def plant(data: datasets.Dataset, pattern: str, n_spurious: int, target: int, data_seed: int,
          split: str = "full") -> PlantedData:
    """Return `data` with `pattern` planted into `n_spurious` training images of class `target` (protocol §2.3, §3.1):
    `plant_rows(...)` with the planted rows written into a copy of the training set."""
    return plant_rows(data, pattern, n_spurious, target, data_seed, split).materialize()
