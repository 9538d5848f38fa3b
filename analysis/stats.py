"""The statistics of every analysis table: mean ± standard error per cell, the one-sided Welch p-values
against a baseline over replicates and over per-test-image indicators, Holm's adjustment, when a
significance mark may be shown (protocol §4.3, §4.4), and the 'mean ± se' text of a cell."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd


def mean_se(df: pd.DataFrame, keys: Sequence[str], column: str) -> pd.DataFrame:
    """Return one row per cell of `keys` (missing values are a cell too): the keys, then the mean of `column`,
    its standard error (sample s.d., ddof = 1, over √count; NaN for fewer than two values) and the count of
    its non-missing values (protocol §4.3)."""
    values = df[column].astype(float)
    grouped = values.groupby([df[k] for k in keys], dropna=False, sort=True)
    out = grouped.agg(mean="mean", sd="std", count="count")
    out["se"] = out["sd"] / np.sqrt(out["count"])
    return out[["mean", "se", "count"]].reset_index()


def welch_greater_p(sample: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray) -> float:
    """Return the p-value of the one-sided Welch t-test that `sample`'s mean is greater than `baseline`'s
    (`spurious.metrics.welch_greater`: NaN with fewer than two values a side; protocol §4.3)."""
    from spurious.metrics import welch_greater

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on near-identical seeds; p stands
        return welch_greater(sample, baseline)


def cell(mean: float, se: float, digits: int = 3) -> str:
    """Return a table cell 'mean ± se' with `digits` decimals ('mean' alone when se is NaN). A standard error
    that is not zero but would round to zero is shown to one significant digit ('0.012 ± 0.0002'), so that
    '± 0.000' always means replicates without variance."""
    if math.isnan(se):
        return f"{mean:.{digits}f}"
    if 0 < se < 0.5 * 10 ** -digits:
        return f"{mean:.{digits}f} ± {se:.1g}" if se >= 1e-4 else f"{mean:.{digits}f} ± {se:.0e}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"

# The significance tests of the summary tables (protocol §4.3), by the key that names their columns:
# `p_<key>` (raw) and `p_<key>_holm` (Holm-adjusted over the table's cells).
REPLICATE_TEST = "welch_replicates"
PER_EXAMPLE_TEST = "welch_per_example"
TESTS = {
    REPLICATE_TEST: "one-sided Welch t-test over per-replicate values vs n = 0",
    PER_EXAMPLE_TEST: ("one-sided Welch t-test over the {n_images} per-test-image indicators r(x) of the lowest-seed "
                       "model vs the n = 0 model (the reference's test)"),
}
# A replicate-test mark needs this many independent models on each side (protocol §4.3).
MIN_REPLICATES = 3


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return Holm–Bonferroni step-down adjusted p-values, same shape as `pvalues` (protocol §4.3).

    The family is the non-NaN entries (m of them); NaN entries stay NaN. With p₍₁₎ ≤ … ≤ p₍ₘ₎ sorted,
    adjusted p₍ᵢ₎ = min(1, max_{j ≤ i} (m − j + 1) p₍ⱼ₎), so the adjusted values keep the raw order and
    are never below the raw ones."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p.ravel()))
    order = present[np.argsort(p.ravel()[present], kind="stable")]
    m = len(order)
    scaled = (m - np.arange(m)) * p.ravel()[order]
    out.ravel()[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def welch_per_example_p(indicators_cell: Sequence[float] | np.ndarray,
                        indicators_baseline: Sequence[float] | np.ndarray) -> float:
    """Return the reference's p-value (protocol §4.4): the one-sided Welch t-test that the per-test-image
    indicator vector r(x) (N,) of one planted model has a greater mean than that of one clean model (N,),
    i.e. the N images of each model are the replicates (`spurious.metrics.welch_greater`)."""
    return welch_greater_p(np.asarray(indicators_cell, dtype=float), np.asarray(indicators_baseline, dtype=float))


def _models(values: np.ndarray, models: Sequence | None) -> int:
    """Return how many distinct trained models gave `values` (one per value when `models` is None)."""
    if models is None:
        return len(values)
    ids = pd.Series(list(models), dtype=object)
    return int(ids.nunique(dropna=True) + ids.isna().sum())


def mark_suppression(sample: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                     sample_models: Sequence | None = None, baseline_models: Sequence | None = None,
                     min_replicates: int = MIN_REPLICATES) -> str:
    """Return why the replicate test's mark of a cell may not be shown, "" when it may (protocol §4.3).

    `sample` and `baseline` are the per-replicate values of the cell and of its n = 0 cell; `*_models` the
    training_id of each value when known (equal ids: one trained model scored several times). Suppressed:
    fewer than `min_replicates` independent models on either side, or a side whose values do not vary (the
    test then treats that side's mean as known exactly, e.g. n = 0 rows that are copies of one model)."""
    a, b = np.asarray(sample, dtype=float), np.asarray(baseline, dtype=float)
    for side, values, models in (("cell", a, sample_models), ("n = 0 baseline", b, baseline_models)):
        count = _models(values, models)
        if count < min_replicates:
            copies = f" ({len(values)} rows)" if count != len(values) else ""
            return f"{side} has {count} independent model{'s' * (count != 1)}{copies} < {min_replicates}"
    for side, values in (("cell", a), ("n = 0 baseline", b)):
        if np.var(values) == 0:
            return f"{side} has zero variance over replicates"
    return ""


def per_example_suppression(indicators_cell: np.ndarray, indicators_baseline: np.ndarray) -> str:
    """Return why the per-example test's mark may not be shown, "" when it may: both indicator vectors
    constant (the t statistic is undefined; `welch_greater` then returns 0 or 1 by convention)."""
    if np.var(indicators_cell) == 0 and np.var(indicators_baseline) == 0:
        return "both indicator vectors are constant"
    return ""


def describe_test(test: str, n_images: int | None = None) -> str:
    """Return the plain-words name of a summary test key (TESTS), with the indicator count when known."""
    return TESTS[test].format(n_images=f"{n_images:,}" if n_images else "N")
