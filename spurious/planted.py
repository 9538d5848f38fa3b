"""Training/test data with a pattern planted into `n` training images of one class (protocol §1–3)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from spurious import datasets, patterns
from spurious.errors import SpuriousError


@dataclass(frozen=True)
class PlantedData:
    """The patterned training set, the clean and patterned test sets, and which examples were planted.

    `spurious_idx` are rows of `x_train`. With a validation split (`val_size` > 0, protocol §3.4) `x_val`
    (V, C, H, W), `y_val` (V,) and `x_val_patterned` hold the held-out images, which are not in `x_train`;
    without one they are None.
    """

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
    x_val: Optional[torch.Tensor] = None
    y_val: Optional[torch.Tensor] = None
    x_val_patterned: Optional[torch.Tensor] = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Return (C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])

    @property
    def has_val(self) -> bool:
        """Return whether the data has a validation split."""
        return self.x_val is not None and len(self.x_val) > 0

    def without_spurious(self) -> "PlantedData":
        """Return the same data with the planted training examples deleted (for deletion studies)."""
        keep = np.setdiff1d(np.arange(len(self.y_train)), self.spurious_idx)
        keep_t = torch.from_numpy(keep)
        return PlantedData(self.x_train[keep_t], self.y_train[keep_t], self.x_test, self.y_test,
                           self.x_test_patterned, np.empty(0, np.int64), self.pattern, self.target,
                           self.data_seed, self.num_classes, self.x_val, self.y_val, self.x_val_patterned)

    def to(self, device: torch.device | str) -> "PlantedData":
        """Return the data moved to `device` (tensors only)."""
        move = {k: None if getattr(self, k) is None else getattr(self, k).to(device)
                for k in ("x_train", "y_train", "x_test", "y_test", "x_test_patterned", "x_val", "y_val",
                          "x_val_patterned")}
        return PlantedData(**move, spurious_idx=self.spurious_idx, pattern=self.pattern, target=self.target,
                           data_seed=self.data_seed, num_classes=self.num_classes)


def split_arrays(data: datasets.Dataset, split: str, seed: int, subset: int = 0):
    """Return (x_base, y_base, x_test, y_test) for `split` (protocol §3.3, §9.1).

    `full`: the dataset's own training and test sets. `mia_target`: the target-train and target-test
    quarters. `mia_shadow` with subset 0: the shadow-train and shadow-test quarters (the reference's
    shadow model). `mia_shadow` with subset k ≥ 1 and `mia_online`: the base is a membership pool (two
    quarters; `membership_pool`) of which the model trains on the half `training_rows` gives, and the test
    set is a quarter no model of that kind trains on (target-test for shadows, shadow-test for online
    models). For `mia_online` the pool is the target's two quarters, target-train first, so the target's
    members are pool rows 0 … len(target-train) − 1.
    """
    if split == "full":
        return data.x_train, data.y_train, data.x_test, data.y_test
    if split not in SUBSET_SPLITS + ("mia_target",):
        raise SpuriousError(f"split {split!r} is not one of full, mia_target, mia_shadow, mia_online")
    x_all = torch.cat([data.x_train, data.x_test])
    y_all = torch.cat([data.y_train, data.y_test])
    parts = membership_split(len(y_all), seed)

    def take(*keys):
        idx = torch.from_numpy(np.concatenate([parts[k] for k in keys]))
        return x_all[idx], y_all[idx]
    if split == "mia_target" or (split == "mia_shadow" and subset == 0):
        role = "target" if split == "mia_target" else "shadow"
        return (*take(f"{role}_train"), *take(f"{role}_test"))
    if split == "mia_shadow":
        return (*take("shadow_train", "shadow_test"), *take("target_test"))
    return (*take("target_train", "target_test"), *take("shadow_test"))


# Splits whose models train on a half of a membership pool, chosen by `subset` (protocol §9.1).
SUBSET_SPLITS = ("mia_shadow", "mia_online")
SUBSET_STREAMS = {"mia_shadow": 0x736864, "mia_online": 0x6F6E6C}  # "shd", "onl": the halves' own streams


def membership_pool(split: str, n_total: int, seed: int) -> tuple[np.ndarray, int]:
    """Return (the pooled dataset indices of `split`'s membership pool, the length of its first quarter).

    `mia_shadow`: shadow-train then shadow-test; `mia_online` (and `mia_target`, whose members are the
    first quarter): target-train then target-test (protocol §9.1). Pooled index i < len(train) is
    training image i; the rest are test images (`membership_split`).
    """
    parts = membership_split(n_total, seed)
    role = "shadow" if split == "mia_shadow" else "target"
    first, second = parts[f"{role}_train"], parts[f"{role}_test"]
    return np.concatenate([first, second]), len(first)


def training_rows(split: str, subset: int, pool_size: int, seed: int) -> np.ndarray | None:
    """Return the sorted int64 pool rows a `split`/`subset` model trains on, or None when it trains on its
    whole base (`full`, `mia_target`, `mia_shadow` subset 0) (protocol §9.1).

    `mia_shadow` subset 0 is the reference's shadow model: the first quarter of the shadow pool. Every other
    subset is a uniformly random half (⌊pool/2⌋ rows) drawn from `numpy.random.default_rng([seed, stream,
    subset])`, a stream of its own per split, so the halves of different subsets are independent and a
    given example is in about half of them.
    """
    if split not in SUBSET_SPLITS or (split == "mia_shadow" and subset == 0):
        return None
    rng = np.random.default_rng([_check_int("data seed", seed, 0, 2**32 - 1), SUBSET_STREAMS[split],
                                 _check_int("subset", subset, 0, 2**32 - 1)])
    return np.sort(rng.permutation(pool_size)[:pool_size // 2]).astype(np.int64)


@dataclass(frozen=True)
class PlantedRows:
    """Planted data stored compactly: a base training tensor shared with other plantings plus the planted rows.

    `base_x` (N, C, H, W) and `base_y` (N,) are the split's training set; `planted_x` (n, C, H, W) holds the
    patterned images of rows `planted_idx` (n,). `base_dirty` lists base rows that are not clean (they hold
    another planting, as when compacting a PlantedData); only rows in `planted_idx` are read from
    `planted_x`, every other row comes from `base_x`. Bundles keep K members' data this way (issue 8).
    `subset_idx` (sorted base rows, None = all) is the half of a membership pool the model trains on
    (`training_rows`); `planted_idx` then lists only planted rows inside it.
    `val_idx` lists the base rows held out as the validation split (never planted; protocol §3.4): the
    training set is the other rows, in order. `x_val`, `y_val`, `x_val_patterned` are its images (None
    without a validation split).
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
    val_idx: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    x_val: Optional[torch.Tensor] = None
    y_val: Optional[torch.Tensor] = None
    x_val_patterned: Optional[torch.Tensor] = None
    subset_idx: Optional[np.ndarray] = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Return (C, H, W) of one image."""
        return tuple(self.base_x.shape[1:])

    @property
    def selects_rows(self) -> bool:
        """Return whether the training set is not the whole base (a validation split or a pool half)."""
        return bool(len(self.val_idx)) or self.subset_idx is not None

    @property
    def train_rows(self) -> np.ndarray:
        """Return the base rows that form the training set, in order: `subset_idx` (all rows when None) less
        `val_idx`."""
        rows = np.arange(len(self.base_y)) if self.subset_idx is None else self.subset_idx
        return np.setdiff1d(rows, self.val_idx)

    @classmethod
    def of(cls, data: "PlantedData | PlantedRows") -> "PlantedRows":
        """Return `data` in compact form, sharing its tensors (no copy of the training images)."""
        if isinstance(data, PlantedRows):
            return data
        idx = np.asarray(data.spurious_idx, np.int64)
        return cls(data.x_train, data.y_train, idx, idx, data.x_train[torch.from_numpy(idx)], data.x_test,
                   data.y_test, data.x_test_patterned, data.pattern, data.target, data.data_seed, data.num_classes,
                   np.empty(0, np.int64), data.x_val, data.y_val, data.x_val_patterned)

    def materialize(self) -> PlantedData:
        """Return the data as a PlantedData (copies the training images when any row is planted or held out);
        its `spurious_idx` are rows of the training set, which leaves out the validation rows."""
        x, y, idx = self.base_x, self.base_y, self.planted_idx
        if len(idx):
            x = x.clone()
            x[torch.from_numpy(idx)] = self.planted_x
        if self.selects_rows:
            keep = self.train_rows
            x, y = x[torch.from_numpy(keep)], y[torch.from_numpy(keep)]
            idx = np.searchsorted(keep, idx).astype(np.int64)
        return PlantedData(x, y, self.x_test, self.y_test, self.x_test_patterned, idx, self.pattern, self.target,
                           self.data_seed, self.num_classes, self.x_val, self.y_val, self.x_val_patterned)


def plant_rows(data: datasets.Dataset, pattern: str, n_spurious: int, target: int, data_seed: int,
               split: str = "full", arrays: tuple | None = None, val_size: int = 0,
               targets: tuple = (), subset: int = 0) -> PlantedRows:
    """Return `data` with `pattern` planted into `n_spurious` training images of class `target` (or of each of
    the two classes `targets`), compactly.

    The examples are chosen exactly as the reference does (`RandomState(data_seed).choice`, protocol §3.1;
    two successive draws for `targets`, protocol §3.2), and the patterned test set uses the same pattern
    and seed (protocol §2.3). Then `val_size` of the other training images are held out as the validation
    split (`choose_validation`, its own random stream, so the planted indices stay the reference's;
    protocol §3.4). Shadow splits of a membership study get no planted examples: the attacker's shadow
    models are trained on clean data. `mia_online` models train on the half `subset` of the target's
    membership pool: the examples are chosen in its first quarter exactly as for `mia_target` (so they are
    the target's), and the model trains on those of them its half holds, patterned (protocol §9.1).
    `arrays` may pass `split_arrays(data, split, data_seed, subset)` computed once for several plantings.
    """
    patterns.get(pattern)
    if arrays is None:
        arrays = split_arrays(data, split, data_seed, subset)
    x_train, y_train, x_test, y_test = arrays
    n = 0 if split == "mia_shadow" else n_spurious
    subset_idx, candidates = None, y_train
    if split in SUBSET_SPLITS and not (split == "mia_shadow" and subset == 0):
        if val_size:
            raise SpuriousError(f"val_size must be 0 for a model on a half of a membership pool (split {split}, "
                                f"subset {subset}), got {val_size}")
        first_quarter = len(membership_split(len(data.y_train) + len(data.y_test), data_seed)[
            "shadow_train" if split == "mia_shadow" else "target_train"])
        subset_idx = training_rows(split, subset, len(y_train), data_seed)
        candidates = y_train[:first_quarter]
    if targets:
        idx = choose_spurious_two_class(candidates, targets[0], targets[1], n, data_seed)
    else:
        idx = choose_spurious(candidates, target, n, data_seed)
    if subset_idx is not None:
        idx = np.sort(idx[np.isin(idx, subset_idx)]) if len(idx) else idx
    rows = x_train[torch.from_numpy(idx)]
    planted_x = patterns.apply(pattern, rows, data_seed) if len(idx) else rows
    val = {}
    if val_size:
        val_idx = choose_validation(y_train, val_size, data_seed, exclude=idx)
        x_val = x_train[torch.from_numpy(val_idx)]
        val = {"val_idx": val_idx, "x_val": x_val, "y_val": y_train[torch.from_numpy(val_idx)],
               "x_val_patterned": patterns.apply(pattern, x_val, data_seed)}
    return PlantedRows(x_train, y_train, np.empty(0, np.int64), idx, planted_x, x_test, y_test,
                       patterns.apply(pattern, x_test, data_seed), pattern, target, data_seed, data.num_classes,
                       **val, subset_idx=subset_idx)


def plant(data: datasets.Dataset, pattern: str, n_spurious: int, target: int, data_seed: int,
          split: str = "full", val_size: int = 0, targets: tuple = (), subset: int = 0) -> PlantedData:
    """Return `data` with `pattern` planted into `n_spurious` training images of class `target` (protocol §2.3, §3.1):
    `plant_rows(...)` with the planted rows written into a copy of the training set, less the validation rows."""
    return plant_rows(data, pattern, n_spurious, target, data_seed, split, val_size=val_size,
                      targets=targets, subset=subset).materialize()


def plant_config(data: datasets.Dataset, cfg) -> PlantedData:
    """Return the planted data of a TrainConfig `cfg` (`plant` with its data fields)."""
    return plant(data, cfg.pattern, cfg.n_spurious, cfg.target, cfg.data_seed, cfg.split, cfg.val_size,
                 tuple(cfg.targets), cfg.subset)


def plant_config_rows(data: datasets.Dataset, cfg, arrays: tuple | None = None) -> PlantedRows:
    """Return the planted data of a TrainConfig `cfg` compactly (`plant_rows` with its data fields)."""
    return plant_rows(data, cfg.pattern, cfg.n_spurious, cfg.target, cfg.data_seed, cfg.split, arrays,
                      cfg.val_size, tuple(cfg.targets), cfg.subset)


# ---------------------------------------------------------------- choosing the planted examples (protocol §3.1, §3.2)

def _as_numpy_labels(y: np.ndarray | torch.Tensor) -> np.ndarray:
    """Return labels as a 1-D numpy array."""
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim != 1:
        raise SpuriousError(f"labels must be 1-D, got shape {arr.shape}")
    return arr


def _check_int(label: str, value: int, low: int, high: int) -> int:
    """Return `value` as an int if it is an integer in [low, high], else raise a SpuriousError."""
    try:
        number = int(value.__index__())
    except (AttributeError, TypeError):
        raise SpuriousError(f"{label} must be an integer in {low}..{high}, got {value!r}") from None
    if not low <= number <= high:
        raise SpuriousError(f"{label} must be in {low}..{high}, got {number}")
    return number


def _class_indices(y: np.ndarray, target: int, n: int) -> np.ndarray:
    """Return the indices of class `target`, after checking `target` and `n` against the labels."""
    num_classes = int(y.max()) + 1 if len(y) else 0
    _check_int("target class", target, 0, num_classes - 1)
    pool = np.where(y == target)[0]
    _check_int(f"n (spurious examples of class {target})", n, 0, len(pool))
    return pool


def choose_spurious(y: np.ndarray | torch.Tensor, target: int, n: int, seed: int) -> np.ndarray:
    """Return int64 indices of `n` training examples of class `target`, chosen as the reference does (protocol §3.1)."""
    y = _as_numpy_labels(y)
    seed = _check_int("data seed", seed, 0, 2**32 - 1)
    pool = _class_indices(y, target, n)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    return np.random.RandomState(seed).choice(pool, size=n, replace=False).astype(np.int64)


def choose_spurious_two_class(y: np.ndarray | torch.Tensor, c1: int, c2: int, n: int,
                              seed: int) -> np.ndarray:
    """Return 2n indices: n of class c1 then n of class c2, drawn in turn from one RandomState (protocol §3.2)."""
    y = _as_numpy_labels(y)
    seed = _check_int("data seed", seed, 0, 2**32 - 1)
    pools = [_class_indices(y, c1, n), _class_indices(y, c2, n)]
    if c1 == c2:
        raise SpuriousError(f"the two classes must differ, got {c1} twice")
    if n == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.RandomState(seed)
    return np.concatenate([rng.choice(pool, size=n, replace=False) for pool in pools]).astype(np.int64)


# ---------------------------------------------------------------- validation split (protocol §3.4)

VAL_STREAM = 0x76616C  # "val": the validation draw's own stream, apart from the planted draw's RandomState


def choose_validation(y: np.ndarray | torch.Tensor, size: int, seed: int,
                      exclude: np.ndarray | None = None) -> np.ndarray:
    """Return `size` sorted int64 training rows held out as the validation split (protocol §3.4).

    Stratified by class: class j gets round(size · N_j / N) rows (largest remainders, so the sizes add up
    to `size`). Each class's rows are taken in the order of a permutation drawn from
    `numpy.random.default_rng([seed, VAL_STREAM])`, skipping the rows in `exclude` (the planted examples),
    so the split never holds a planted image and the planted draw (the reference's RandomState(seed)) is
    untouched. Raises SpuriousError when `size` leaves a class without enough rows.
    """
    y = _as_numpy_labels(y)
    seed = _check_int("data seed", seed, 0, 2**32 - 1)
    size = _check_int("val_size", size, 0, max(len(y) - 1, 0))
    if size == 0:
        return np.empty(0, np.int64)
    classes, counts = np.unique(y, return_counts=True)
    exact = size * counts / len(y)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[:size - quota.sum()]] += 1
    rng, skip = np.random.default_rng([seed, VAL_STREAM]), set(np.asarray(exclude if exclude is not None else [],
                                                                           np.int64).tolist())
    out = []
    for c, k in zip(classes, quota):
        rows = np.where(y == c)[0][rng.permutation(int((y == c).sum()))]
        rows = np.array([r for r in rows if r not in skip], np.int64) if skip else rows
        if k >= len(rows):
            raise SpuriousError(f"val_size {size} holds out {k} images of class {c}, but only {len(rows)} "
                                f"unplanted ones exist; choose a smaller val_size")
        out.append(rows[:k])
    return np.sort(np.concatenate(out)).astype(np.int64)


# ---------------------------------------------------------------- membership split (protocol §3.3)

MEMBERSHIP_PARTS = ("target_train", "target_test", "shadow_train", "shadow_test")


def membership_split(n_total: int, seed: int) -> dict[str, np.ndarray]:
    """Return four disjoint, covering, sorted int64 index sets over the pooled train+test set (protocol §3.3).

    The reference's mem* split code is missing; this is our definition: a RandomState(seed) permutation
    of range(n_total) cut into quarters (70,000 -> 4 x 17,500; 60,000 -> 4 x 15,000), in the order of
    MEMBERSHIP_PARTS. Pooled index i < len(train) is training image i; the rest are test images.
    """
    n_total = _check_int("n_total", n_total, 0, 2**62)
    seed = _check_int("membership seed", seed, 0, 2**32 - 1)
    perm = np.random.RandomState(seed).permutation(n_total)
    parts = np.array_split(perm, len(MEMBERSHIP_PARTS))
    return {key: np.sort(part).astype(np.int64) for key, part in zip(MEMBERSHIP_PARTS, parts)}
