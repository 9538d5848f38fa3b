"""Param spaces as plain data, and the one place that turns them into Ray Tune objects.

A space maps config keys to values in the vocabulary of YAML study files and `--set`:

- a plain value (number, string, bool, a variant dict of several keys): fixed;
- a grid axis: `{"grid_search": [v1, v2, …]}` (written `[v1, v2]` or `{grid: [v1, v2]}` in YAML; this is
  also Tune's own grid format, so Tune takes it as it is);
- a sampled axis: `{"loguniform": [low, high]}`, `{"uniform": [low, high]}`, `{"randint": [low, high]}`
  (high exclusive) or `{"choice": [v1, v2, …]}`.

`search_spaces/` and the catalog build such plain dicts without importing Ray; `to_tune` converts the
sampled axes into Tune domains when a Tuner is built; `points` expands the grid (sampling each sampled axis
once, for validation) and `count` counts trials, both without Ray.
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Any, Iterable, Mapping

from spurious.errors import SpuriousError

GRID = "grid_search"
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
NONNEGATIVE_KEYS = ("l2", "noise_sigma", "grad_clip")
# Keys whose value is itself a list (`targets: [0, 1]`, a two-class planting): a list of numbers is the value,
# a list of lists a grid over values.
LIST_KEYS = ("targets",)


def grid(values: Iterable[Any]) -> dict:
    """Return a grid axis over `values` (a non-empty list)."""
    values = list(values)
    if not values:
        raise SpuriousError("an empty list is not a valid grid axis")
    return {GRID: values}


def grid_values(value: Mapping[str, Any]) -> list:
    """Return the values of a grid axis."""
    return value[GRID]


def is_grid(value: Any) -> bool:
    """Return whether `value` is a grid axis."""
    return isinstance(value, dict) and set(value) == {GRID}


def is_sampled(value: Any) -> bool:
    """Return whether `value` is a sampled axis such as `{"loguniform": [1e-5, 1e-2]}`."""
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def from_yaml(value: Any, key: str | None = None) -> Any:
    """Return the space value for a YAML / `--set` value of config key `key`: a list → grid (for a LIST_KEYS key,
    a list of lists → grid and any other list is the value), `{grid: […]}` → grid, a distribution checked
    (`loguniform`/`uniform`/`randint` need [low, high], `choice` a non-empty list), anything else as is.

    Raises SpuriousError on a malformed axis.
    """
    if isinstance(value, list) and key in LIST_KEYS and not any(isinstance(v, list) for v in value):
        return value
    if isinstance(value, list):
        return grid(value)
    if isinstance(value, dict) and len(value) == 1:
        (kind, args), = value.items()
        if kind in ("grid", GRID):
            return grid(args if isinstance(args, list) else [args])
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise SpuriousError(f"choice needs a non-empty list, got {args!r}")
            return {kind: list(args)}
        if kind in DISTRIBUTIONS:
            if (not isinstance(args, list) or len(args) != 2
                    or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
                raise SpuriousError(f"{kind} needs [low, high], got {args!r}")
            low, high = args
            if not low < high or (kind == "loguniform" and low <= 0):
                raise SpuriousError(f"{kind} needs {'0 < ' if kind == 'loguniform' else ''}low < high, got {args!r}")
            return {kind: [low, high]}
    return value


def to_tune(space: Mapping[str, Any]) -> dict:
    """Return `space` with each sampled axis as a Tune domain (grids and plain values unchanged)."""
    from ray import tune

    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint,
              "choice": lambda *values: tune.choice(list(values))}
    out = {}
    for key, value in space.items():
        if is_sampled(value):
            (kind, args), = value.items()
            out[key] = makers[kind](*args)
        else:
            out[key] = value
    return out


def variant_dicts(space: Mapping[str, Any]) -> list[dict]:
    """Return the dicts of keys that grid axes over variant dicts set (`{"optim": grid([{...}, ...])}`)."""
    return [v for value in space.values() if is_grid(value) for v in value[GRID] if isinstance(v, dict)]


def sample(value: Any, rng: random.Random | None = None) -> Any:
    """Return one draw of a sampled axis (the value itself if it is not one)."""
    if not is_sampled(value):
        return value
    rng = rng or random.Random(0)
    (kind, args), = value.items()
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    if kind == "randint":
        return rng.randrange(int(low), int(high))
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def normalise(space: Mapping[str, Any]) -> dict:
    """Return `space` with its grid axes in the resolved form (`{"grid": […]}` → `{"grid_search": […]}`)."""
    return {k: from_yaml(v) if isinstance(v, dict) else v for k, v in space.items()}


def points(space: Mapping[str, Any]) -> list[dict]:
    """Return every grid point of `space`; each sampled axis takes one (seeded) draw, for validation."""
    space = normalise(space)
    rng = random.Random(0)
    keys = list(space)
    axes = [space[k][GRID] if is_grid(space[k]) else [sample(space[k], rng)] for k in keys]
    return [dict(zip(keys, values)) for values in itertools.product(*axes)]


def count(space: Mapping[str, Any], num_samples: int = 1) -> int:
    """Return how many trials Tune creates from `space`: the product of the grid axes' lengths × num_samples."""
    total = num_samples
    for value in normalise(space).values():
        if is_grid(value):
            total *= len(value[GRID])
    return total


def check_domains(space: Mapping[str, Any]) -> None:
    """Raise SpuriousError if a sampled range of L2, input noise or clipping reaches below zero."""
    for key in NONNEGATIVE_KEYS:
        value = space.get(key)
        if is_sampled(value) and next(iter(value)) != "choice":
            low = next(iter(value.values()))[0]
            if low < 0:
                raise SpuriousError(f"{key} range starts at {low}; {key} must be >= 0")
