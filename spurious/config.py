"""The typed, frozen configuration of one training run (the paper's experimental unit)."""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping

from spurious.errors import SpuriousError, check

OPTIMIZERS = ("sgd", "adam")
AUGMENTATIONS = ("none", "aug01")
SPLITS = ("full", "mia_target", "mia_shadow", "mia_online")
# DP-SGD batch sampling: Poisson (each example joins a step's batch with probability batch_size/N), the
# sampling the privacy accountant assumes (spurious/dp.py).
DP_SAMPLING = ("poisson",)


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data (dataset, pattern, n_spurious, target, data_seed) and hyperparameters.

    `target` is the class whose spurious score is reported; the pattern is planted into `n_spurious`
    training images of it, or, with `targets = (c1, c2)`, into `n_spurious` images of each of the two
    classes (the reference's two-class datasets, protocol §3.2; `target` is then one of them). `val_size`
    training images (stratified by class, never a planted one) are held out as a validation split whose
    metrics are reported as `val_*` (protocol §4.2); 0 keeps the reference's protocol (no validation split).
    `split` chooses the data of a membership-inference model (protocol §9.1): `mia_target` (the target's
    quarter), `mia_shadow` (subset 0: the shadow quarter, as the reference; subset k ≥ 1: a random half of
    the shadow pool) or `mia_online` (a random half, number `subset`, of the target's pool: its members and
    non-members, so each of them is IN for about half of these models).
    """

    dataset: str = "fashion"
    model: str = "large_mlp"
    pattern: str = "s3"
    n_spurious: int = 0
    target: int = 0
    targets: tuple = ()
    data_seed: int = 0
    seed: int = 0
    split: str = "full"
    subset: int = 0
    val_size: int = 0
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    l2: float = 0.0
    grad_clip: float = 0.0
    noise_sigma: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 0.0
    dp_sampling: str = "poisson"
    augmentation: str = "none"
    epochs: int = 70
    batch_size: int = 128
    tau: float = 0.1
    eval_batch_size: int = 2000
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):  # a list from JSON or a YAML study file
            object.__setattr__(self, "targets", tuple(self.targets))
        check_types(self, "config key")
        _check_values(self)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain dict of primitives (`targets` as a list, as JSON gives it back)."""
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    def replace(self, **changes: Any) -> "TrainConfig":
        """Return a copy with `changes` applied (validated)."""
        return from_dict({**self.to_dict(), **changes})


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def field_names() -> list[str]:
    """Return the config keys in declaration order."""
    return list(FIELD_TYPES)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple[tuple[type, ...], bool]]:
    """Return {field: (types, optional)} of a settings dataclass from its type hints (`int | None` ->
    ((int,), True))."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) or (hint,)
        out[name] = tuple(a for a in args if a is not type(None)), type(None) in args
    return out


def _coerce(value: Any, types: tuple[type, ...]) -> Any:
    """Return `value` converted where the meaning is unchanged: an int for a float field, an integral float for
    an int field, a numpy scalar's Python value, a numeric string ('1e-4') for a numeric field."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if tuple in types and isinstance(value, list):
        return tuple(_coerce(v, (int,)) for v in value)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if int in types and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and str not in types:
        for kind in (int, float):
            if kind in types:
                try:
                    return kind(value)
                except ValueError:
                    pass
    return value


def check_types(settings: Any, noun: str) -> None:
    """Raise a one-line SpuriousError naming the first field of the settings dataclass instance `settings`
    whose value has the wrong type (`noun` names a field in the message, e.g. "config key")."""
    for key, (types, optional) in _field_types(type(settings)).items():
        value = getattr(settings, key)
        if value is None and optional:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join([{"tuple": "a list"}.get(t.__name__, t.__name__) for t in types]
                                 + (["None"] if optional else []))
            raise SpuriousError(f"{noun} {key!r} must be {wanted}, got {value!r} ({type(value).__name__})")


def from_values(cls: type, values: Mapping[str, Any], noun: str):
    """Return `cls(**values)` for a frozen settings dataclass (TrainConfig, DeleteSettings, MiaSettings,
    TuningOptions): unknown keys and wrong types raise one-line SpuriousErrors, values are coerced as
    `_coerce` says, and the dataclass's `__post_init__` checks the values (`errors.check`)."""
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise SpuriousError(f"unknown {noun}(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(types)}")
    return cls(**{k: _coerce(v, types[k][0]) for k, v in values.items()})


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Build a validated config; unknown keys and wrong types raise a one-line SpuriousError."""
    return from_values(TrainConfig, values, "config key")


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
        check([(spec.augmentation in AUGMENTATIONS,
                f"augmentation {spec.augmentation!r} in model name {cfg.model!r} is not one of "
                f"{', '.join(AUGMENTATIONS)}"),
               (augmentation in ("none", spec.augmentation),
                f"model {cfg.model!r} names augmentation {spec.augmentation!r} but augmentation is {augmentation!r}")])
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


def _check_values(cfg: TrainConfig) -> None:
    finite = ("lr", "l2", "noise_sigma", "grad_clip", "momentum", "tau", "dp_noise_multiplier", "dp_max_grad_norm",
              "dp_delta")
    check([
        (cfg.optimizer in OPTIMIZERS, f"optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"),
        (cfg.augmentation in AUGMENTATIONS,
         f"augmentation {cfg.augmentation!r} is not one of {', '.join(AUGMENTATIONS)}"),
        (cfg.split in SPLITS, f"split {cfg.split!r} is not one of {', '.join(SPLITS)}"),
        *[(math.isfinite(getattr(cfg, key)), f"{key} must be finite, got {getattr(cfg, key)!r}") for key in finite],
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr!r}"),
        (cfg.l2 >= 0, f"l2 must be >= 0, got {cfg.l2!r}"),
        (cfg.noise_sigma >= 0, f"noise_sigma must be >= 0, got {cfg.noise_sigma!r}"),
        (cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {cfg.grad_clip!r}"),
        (cfg.dp_noise_multiplier >= 0,
         f"dp_noise_multiplier must be >= 0 (0 = DP off), got {cfg.dp_noise_multiplier!r}"),
        (cfg.dp_max_grad_norm > 0, f"dp_max_grad_norm must be > 0, got {cfg.dp_max_grad_norm!r}"),
        (0 <= cfg.dp_delta < 1, f"dp_delta must be in [0, 1) (0 = 1/N, N the training set), got {cfg.dp_delta!r}"),
        (cfg.dp_sampling in DP_SAMPLING, f"dp_sampling {cfg.dp_sampling!r} is not one of {', '.join(DP_SAMPLING)}"),
        (cfg.dp_noise_multiplier == 0 or cfg.grad_clip == 0,
         "grad_clip (element-wise clipping of the batch gradient) and DP-SGD's per-example clipping exclude each "
         f"other; set grad_clip=0 with dp_noise_multiplier={cfg.dp_noise_multiplier!r}"),
        (0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum!r}"),
        (0 < cfg.tau < 1, f"tau must be in (0, 1), got {cfg.tau!r}"),
        *[(getattr(cfg, key) >= 1, f"{key} must be >= 1, got {getattr(cfg, key)!r}")
          for key in ("epochs", "batch_size", "eval_batch_size")],
        *[(getattr(cfg, key) >= 0, f"{key} must be >= 0, got {getattr(cfg, key)!r}")
          for key in ("n_spurious", "data_seed", "seed", "target")],
        (cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"),
         f"device {cfg.device!r} is not one of auto, cpu, cuda[:N], mps"),
        (cfg.val_size >= 0, f"val_size must be >= 0 (0 = no validation split), got {cfg.val_size!r}"),
        (cfg.subset >= 0, f"subset must be >= 0, got {cfg.subset!r}"),
        (cfg.subset == 0 or cfg.split in ("mia_shadow", "mia_online"),
         f"subset {cfg.subset} needs split mia_shadow or mia_online (it picks the half of a membership pool a "
         f"model trains on), got split {cfg.split!r}"),
        (cfg.val_size == 0 or not (cfg.split == "mia_online" or (cfg.split == "mia_shadow" and cfg.subset)),
         f"val_size must be 0 for a model on a half of a membership pool (split {cfg.split}, subset "
         f"{cfg.subset}), got {cfg.val_size}"),
        (cfg.targets == () or (len(cfg.targets) == 2 and all(isinstance(c, int) and not isinstance(c, bool)
                                                             and c >= 0 for c in cfg.targets)
                               and cfg.targets[0] != cfg.targets[1]),
         f"targets must be empty or two different class numbers (a two-class planting), got {list(cfg.targets)}"),
        (cfg.targets == () or cfg.target in cfg.targets,
         f"target {cfg.target} must be one of the two planted classes targets={list(cfg.targets)}"),
    ])


# Config keys that only change how a trained model is scored, never how it is trained (protocol §4.1).
SCORING_KEYS = ("tau", "eval_batch_size")


def group_by_training(cfgs: list[TrainConfig]) -> list[list[int]]:
    """Return the indices of `cfgs` grouped by training (`training_key`), groups and members in order of first
    appearance; `cfgs` should be canonical (`canonical`), or aliases of one name count as different."""
    groups: dict[TrainConfig, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(training_key(cfg), []).append(i)
    return list(groups.values())


def count_trainings(cfgs: list[TrainConfig]) -> int:
    """Return how many distinct models the cells `cfgs` need (protocol §7.3)."""
    return len(group_by_training(cfgs))


def training_key(cfg: TrainConfig) -> TrainConfig:
    """Return the config of the training `cfg` needs, with every key that only affects scoring set aside, so
    that two cells train the same model exactly when their keys are equal (protocol §7.3).

    Set aside: τ and the evaluation batch size always; the scored `target` of a two-class planting (both
    classes are planted); and, when nothing is planted (n = 0, or a shadow split), the pattern and the
    target, plus the data seed when it draws nothing else (the full split without a validation split: a
    membership split or a validation split is drawn from the data seed). `cfg` must be canonical
    (`canonical`), so that aliases of one pattern or model compare equal.
    """
    fields_ = {key: TrainConfig.__dataclass_fields__[key].default for key in SCORING_KEYS}
    if cfg.targets:
        fields_["target"] = min(cfg.targets)
    if cfg.n_spurious == 0 or cfg.split == "mia_shadow":
        fields_.update(pattern=TrainConfig.pattern, target=TrainConfig.target, targets=(),
                       n_spurious=0)
        if cfg.split == "full" and cfg.val_size == 0:
            fields_["data_seed"] = TrainConfig.data_seed
    return dataclasses.replace(cfg, **fields_)
