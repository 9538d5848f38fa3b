"""`claims`: the paper's headline quantities computed from a training frame, and `format_claims` their text
(protocol §4.3): the smallest significant n per pattern under both tests, the rank correlation between a
pattern's size and its spurious score, and the clean-accuracy cost of the planted examples.

    from analysis import claims, load
    print(claims.format_claims(claims.claims(load("results/demo-20261128-120000"))))
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from analysis import frames, stats

MIN_PATTERNS = 3  # a rank correlation over fewer patterns is not reported
SCORE, ACCURACY, SIZE = "spurious_score", "test_acc", "pattern_l2"


def claims(df: pd.DataFrame, alpha: float = 0.05) -> dict[str, pd.DataFrame]:
    """Return the claims of a `load` frame's finished training rows (protocol §4.3), as three frames:

    "smallest_significant_n": `frames.smallest_significant_n` of the spurious score under both tests (column
    `test`), Holm-adjusted over the summary's cells, at level `alpha`;
    "size_vs_score": per n > 0 (and other varying factors), spearman_rho and spearman_p between the patterns'
    mean pattern_l2 (mean ‖x' − x‖₂ over test images) and their mean spurious score, over n_patterns patterns;
    empty without pattern_l2 values, NaN with fewer than MIN_PATTERNS patterns;
    "accuracy_cost": per pattern and n > 0, test_acc_change = mean test_acc − that of the n = 0 cell (same
    other keys), its s.e. √(se² + se₀²) (NaN when either side has one replicate) and both counts."""
    scores = frames.summarize(df, metric=SCORE)
    significant = [frames.smallest_significant_n(scores, test, alpha) for test in stats.TESTS]
    return {"smallest_significant_n": pd.concat(significant, ignore_index=True),
            "size_vs_score": size_vs_score(df),
            "accuracy_cost": accuracy_cost(df)}


def size_vs_score(df: pd.DataFrame) -> pd.DataFrame:
    """Return the Spearman rank correlation over patterns between mean pattern_l2 and mean spurious score, per
    n > 0 and other varying factors (`scipy.stats.spearmanr`; protocol §4.3)."""
    done = frames.finished(df)
    if SIZE not in done or done[SIZE].notna().sum() == 0 or SCORE not in done:
        return pd.DataFrame(columns=["n_spurious", "n_patterns", "spearman_rho", "spearman_p"])
    done = done[done[SIZE].notna() & done[SCORE].notna() & (done["n_spurious"] != 0)]
    keys = frames.cell_keys(done, ["pattern", "n_spurious"])
    per_pattern = done.groupby(keys, dropna=False, sort=True)[[SIZE, SCORE]].mean().reset_index()
    groups = [k for k in keys if k != "pattern"]
    rows = [[*(key if isinstance(key, tuple) else (key,)), *_spearman(part[SIZE], part[SCORE])]
            for key, part in per_pattern.groupby(groups, dropna=False, sort=True)]
    return pd.DataFrame(rows, columns=[*groups, "n_patterns", "spearman_rho", "spearman_p"])


def _spearman(x: pd.Series, y: pd.Series) -> tuple[int, float, float]:
    """Return (count, rho, p) of scipy's Spearman correlation; NaN below MIN_PATTERNS values or when constant."""
    from scipy.stats import spearmanr

    if len(x) < MIN_PATTERNS:
        return len(x), math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input gives NaN, which is reported as such
        result = spearmanr(x.to_numpy(dtype=float), y.to_numpy(dtype=float))
    return len(x), float(result.statistic), float(result.pvalue)


def accuracy_cost(df: pd.DataFrame) -> pd.DataFrame:
    """Return per pattern and n > 0 (and other varying factors) the mean test_acc change vs the n = 0 cell
    with every other key equal, with its standard error (protocol §4.3)."""
    acc = frames.summarize(df, metric=ACCURACY)
    columns = ["test_acc", "test_acc_n0", "test_acc_change", "test_acc_change_se", "count", "count_n0"]
    if acc.empty or "n_spurious" not in acc:
        return pd.DataFrame(columns=["pattern", "n_spurious", *columns])
    keys = [k for k in acc.columns if k not in frames.SUMMARY_COLUMNS]
    others = [k for k in keys if k != "n_spurious"]
    base = acc[acc["n_spurious"] == 0][[*others, "mean", "se", "count"]]
    merged = acc[acc["n_spurious"] != 0].merge(base, on=others, how="left", suffixes=("", "_n0"))
    merged = merged.rename(columns={"mean": "test_acc", "mean_n0": "test_acc_n0"})
    merged["test_acc_change"] = merged["test_acc"] - merged["test_acc_n0"]
    merged["test_acc_change_se"] = np.sqrt(merged["se"] ** 2 + merged["se_n0"] ** 2)
    return merged[[*keys, *columns]].reset_index(drop=True)


def format_claims(found: dict[str, pd.DataFrame], alpha: float = 0.05) -> str:
    """Return the claims of `claims` as plain text, one block per claim, each saying what was computed."""
    parts = [_format_smallest(found["smallest_significant_n"], alpha),
             _format_size(found["size_vs_score"]), _format_cost(found["accuracy_cost"])]
    return "\n\n".join(parts)


def _row_label(row: dict, skip: tuple[str, ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items() if k not in skip)


def _format_smallest(table: pd.DataFrame, alpha: float) -> str:
    lines = [f"Smallest significant n of the spurious score (p < {alpha} after Holm's adjustment over the cells of "
             f"the spurious_score summary, mark not suppressed), per test:"]
    for test, rows in table.groupby("test", sort=False):
        lines.append(f"  {rows['test_name'].iloc[0] if 'test_name' in rows else stats.describe_test(test)}:")
        if rows["n_tested"].sum() == 0:
            lines.append("    not computed (no p-values: no n = 0 cell, fewer than two replicates on a side, or no "
                         "per-test-image indicators recorded)")
            continue
        for row in rows.to_dict("records"):
            n = row["smallest_significant_n"]
            found = "none" if pd.isna(n) else f"n = {n} (p_holm = {row['p_holm']:.3g})"
            label = _row_label(row, ("test", "smallest_significant_n", "p_holm", "n_tested", "n_suppressed",
                                     "suppressed_because", "test_name"))
            tested = f"cells with n > 0 tested: {row['n_tested']}"
            if row["n_suppressed"]:
                tested += f", marks suppressed: {row['n_suppressed']} ({row['suppressed_because']})"
            lines.append(f"    {label}: {found} ({tested})")
    return "\n".join(lines) if len(table) else lines[0] + " no cells with n > 0."


def _format_rows(table: pd.DataFrame, head: str, empty: str, value, skip: tuple[str, ...]) -> str:
    """Return `head` then one line per row of `table`: its keys (all but `skip`) and `value(row)`."""
    if table.empty:
        return f"{head} {empty}"
    return "\n".join([head] + [f"  {_row_label(row, skip)}: {value(row)}" for row in table.to_dict("records")])


def _format_size(table: pd.DataFrame) -> str:
    def value(row: dict) -> str:
        rho = (f"rho = {row['spearman_rho']:.3f} (p = {row['spearman_p']:.3g})" if not pd.isna(row["spearman_rho"])
               else f"not computed (needs ≥ {MIN_PATTERNS} patterns with varying values)")
        return f"{rho} over {row['n_patterns']} patterns"

    return _format_rows(table, "Spearman rank correlation over patterns, mean pattern_l2 (‖x' − x‖₂) vs mean "
                        "spurious score:", "not computed (no pattern_l2 recorded).", value,
                        ("n_patterns", "spearman_rho", "spearman_p"))


def _format_cost(table: pd.DataFrame) -> str:
    return _format_rows(table, "Accuracy cost: mean test_acc change vs n = 0 (± s.e. of the difference):",
                        "no cells with n > 0 and n = 0.",
                        lambda row: stats.cell(row["test_acc_change"], row["test_acc_change_se"], 4),
                        ("test_acc", "test_acc_n0", "test_acc_change", "test_acc_change_se", "count", "count_n0"))
