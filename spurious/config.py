"""The typed, frozen configuration of one training run (the paper's experimental unit)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from spurious.errors import SpuriousError

OPTIMIZERS = ("sgd", "adam")
AUGMENTATIONS = ("none", "aug01")
SPLITS = ("full", "mia_target", "mia_shadow")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data (dataset, pattern, n_spurious, target, data_seed) and hyperparameters."""

    dataset: str = "fashion"
    model: str = "large_mlp"
    pattern: str = "s3"
    n_spurious: int = 0
    target: int = 0
    data_seed: int = 0
    seed: int = 0
    split: str = "full"
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    l2: float = 0.0
    grad_clip: float = 0.0
    noise_sigma: float = 0.0
    augmentation: str = "none"
    epochs: int = 70
    batch_size: int = 128
    tau: float = 0.1
    eval_batch_size: int = 2000
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain dict of primitives."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """Return a copy with `changes` applied (validated)."""
        return from_dict({**self.to_dict(), **changes})


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_PY_TYPES = {"str": str, "int": int, "float": float}


def field_names() -> list[str]:
    """Return the config keys in declaration order."""
    return list(FIELD_TYPES)


def _coerce(key: str, value: Any) -> Any:
    want = _PY_TYPES[FIELD_TYPES[key]]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _coerce(key, value.item())
    return value


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Build a validated config; unknown keys and wrong types raise a one-line SpuriousError."""
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise SpuriousError(f"unknown config key(s) {', '.join(map(repr, unknown))}; "
                            f"allowed keys: {', '.join(FIELD_TYPES)}")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def flatten(config: Mapping[str, Any], on_clash: str = "raise") -> dict[str, Any]:
    """Return a nested Tune config (e.g. a grid over optimiser variant dicts) as one flat dict.

    A key set twice with different values by different nested dicts raises a SpuriousError
    (`on_clash="raise"`, what the trainables need), or, with `on_clash="path"`, every key is kept by its
    dotted path instead (`{"a": {"lr": 0.1}, "b": {"lr": 0.2}}` -> `{"a.lr": 0.1, "b.lr": 0.2}`), so
    nothing is silently overwritten.
    """
    if on_clash not in ("raise", "path"):
        raise SpuriousError(f"on_clash must be 'raise' or 'path', got {on_clash!r}")
    try:
        return _merged(config)
    except SpuriousError:
        if on_clash == "raise":
            raise
        return _dotted(config)


def _merged(config: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        for k, v in (_merged(value).items() if isinstance(value, Mapping) else [(key, value)]):
            if k in flat and flat[k] != v:
                raise SpuriousError(f"config key {k!r} is set twice with different values ({flat[k]!r}, {v!r})")
            flat[k] = v
    return flat


def _dotted(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        out.update(_dotted(value, f"{name}.") if isinstance(value, Mapping) else {name: value})
    return out


def canonical(cfg: TrainConfig) -> TrainConfig:
    """Return `cfg` with its names in canonical form: the registered dataset, pattern and model names (aliases
    such as `v8` for `s3`, or `fashion_mnist`, resolved), and a reference model string such as
    `aug01-ce-tor-altResNet20Norm02` split into its architecture and its augmentation (protocol §5.2).

    Two configs that train the same model are then equal, and every record shows what was trained. Raises
    SpuriousError for an unknown name, or a model string whose augmentation contradicts `augmentation`.
    """
    # imported here: the registries import torch, and this module stays light for the CLI's quick commands
    from spurious import models

    spec = models.parse_model_name(cfg.model)
    augmentation = cfg.augmentation
    if spec.augmentation is not None:
        _require(spec.augmentation in AUGMENTATIONS, f"augmentation {spec.augmentation!r} in model name "
                                                     f"{cfg.model!r} is not one of {', '.join(AUGMENTATIONS)}")
        _require(augmentation in ("none", spec.augmentation),
                 f"model {cfg.model!r} names augmentation {spec.augmentation!r} but augmentation is {augmentation!r}")
        augmentation = spec.augmentation
    return dataclasses.replace(cfg, dataset=canonical_name("dataset", cfg.dataset), model=spec.arch,
                               pattern=canonical_name("pattern", cfg.pattern), augmentation=augmentation)


NAMED_KEYS = ("dataset", "model", "pattern")


def canonical_name(key: str, value: Any) -> Any:
    """Return the canonical form of a dataset, model or pattern name (`v8` -> `corner_square_5`, a reference
    model string -> its architecture); any other key's value as it is. Raises SpuriousError for an unknown
    name."""
    from spurious import datasets, models, patterns  # see `canonical`

    if key == "dataset":
        return datasets.DATASETS.canonical(value)
    if key == "model":
        return models.parse_model_name(value).arch
    if key == "pattern":
        return patterns.canonical(value)
    return value


def from_tune(nested: Mapping[str, Any]) -> TrainConfig:
    """Return the canonical, validated config of a Tune trial's (possibly nested) config: flattened, checked
    (unknown keys and wrong types raise) and canonical (see `canonical`)."""
    return canonical(from_dict(flatten(nested)))


def _check_types(cfg: TrainConfig) -> None:
    for key, type_name in FIELD_TYPES.items():
        value, want = getattr(cfg, key), _PY_TYPES[type_name]
        if isinstance(value, bool) or not isinstance(value, want):
            raise SpuriousError(f"config key {key!r} must be {type_name}, got {value!r} "
                                f"({type(value).__name__})")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SpuriousError(message)


def _check_values(cfg: TrainConfig) -> None:
    _require(cfg.optimizer in OPTIMIZERS, f"optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    _require(cfg.augmentation in AUGMENTATIONS,
             f"augmentation {cfg.augmentation!r} is not one of {', '.join(AUGMENTATIONS)}")
    _require(cfg.split in SPLITS, f"split {cfg.split!r} is not one of {', '.join(SPLITS)}")
    for key in ("lr", "l2", "noise_sigma", "grad_clip", "momentum", "tau"):
        _require(math.isfinite(getattr(cfg, key)), f"{key} must be finite, got {getattr(cfg, key)!r}")
    _require(cfg.lr > 0, f"lr must be > 0, got {cfg.lr!r}")
    _require(cfg.l2 >= 0, f"l2 must be >= 0, got {cfg.l2!r}")
    _require(cfg.noise_sigma >= 0, f"noise_sigma must be >= 0, got {cfg.noise_sigma!r}")
    _require(cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {cfg.grad_clip!r}")
    _require(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum!r}")
    _require(0 < cfg.tau < 1, f"tau must be in (0, 1), got {cfg.tau!r}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        _require(getattr(cfg, key) >= 1, f"{key} must be >= 1, got {getattr(cfg, key)!r}")
    for key in ("n_spurious", "data_seed", "seed", "target"):
        _require(getattr(cfg, key) >= 0, f"{key} must be >= 0, got {getattr(cfg, key)!r}")
    _require(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"),
             f"device {cfg.device!r} is not one of auto, cpu, cuda[:N], mps")
