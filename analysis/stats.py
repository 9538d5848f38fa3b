"""The statistics of every analysis table: mean ± standard error per cell, the one-sided Welch p-value
against a baseline (protocol §4.3), and the 'mean ± se' text of a cell."""
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
    """Return a table cell 'mean ± se' with `digits` decimals ('mean' alone when se is NaN)."""
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if not math.isnan(se) else "")
