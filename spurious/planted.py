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


def plant(data: datasets.Dataset, pattern: str, n_spurious: int, target: int, data_seed: int,
          split: str = "full") -> PlantedData:
    """Return `data` with `pattern` planted into `n_spurious` training images of class `target`.

    The examples are chosen exactly as the reference does (`RandomState(data_seed).choice`), and the
    patterned test set uses the same pattern and seed (protocol §2.3). Shadow splits of a membership
    study get no planted examples: the attacker's shadow models are trained on clean data.
    """
    patterns.get(pattern)
    x_train, y_train, x_test, y_test = split_arrays(data, split, data_seed)
    n = 0 if split == "mia_shadow" else n_spurious
    idx = datasets.choose_spurious(y_train, target, n, data_seed)
    x_train = patterns.apply_at(pattern, x_train, idx, data_seed) if len(idx) else x_train
    x_test_patterned = patterns.apply(pattern, x_test, data_seed)
    return PlantedData(x_train, y_train, x_test, y_test, x_test_patterned, idx, pattern, target, data_seed,
                       data.num_classes)
