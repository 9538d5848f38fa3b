"""The summary statistics on hand-built frames (no training): Holm's adjustment, the two named Welch tests,
when a mark is suppressed, the smallest significant n, the claims and the report's test names (protocol §4.3)."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from analysis import claims, frames, report, stats
from spurious.metrics import pack_indicators, unpack_indicators

N_IMAGES = 200
REPLICATE_NAME = "one-sided Welch t-test over per-replicate values vs n = 0"
PER_EXAMPLE_NAME = ("one-sided Welch t-test over the 200 per-test-image indicators r(x) of the lowest-seed model "
                    "vs the n = 0 model (the reference's test)")


def rows(pattern: str, n: int, scores, seeds=None, indicators=None, training_ids=None, **extra) -> list[dict]:
    """Return finished training rows of one cell: one per score, data_seed = seed = 0, 1, … unless given."""
    seeds = list(range(len(scores))) if seeds is None else seeds
    out = []
    for k, (score, seed) in enumerate(zip(scores, seeds)):
        row = {"experiment": "synthetic", "kind": "train", "status": "TERMINATED", "pattern": pattern,
               "n_spurious": n, "data_seed": seed, "seed": seed, "spurious_score": score,
               "spurious_indicators": None if indicators is None else pack_indicators(indicators[k])}
        if training_ids is not None:
            row["training_id"] = training_ids[k]
        out.append({**row, **{key: value[k] for key, value in extra.items()}})
    return out


def indicator_vector(rate: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(N_IMAGES) < rate).astype(np.uint8)


# ---------------------------------------------------------------- Holm

@pytest.mark.parametrize("raw, adjusted", [
    ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
    ([math.nan, 0.02, 0.5, 0.01], [math.nan, 0.04, 0.5, 0.03]),  # NaN is not in the family (m = 3)
    ([0.4, 0.9], [0.8, 0.9]),
    ([0.6, 0.7], [1.0, 1.0]),  # capped at 1, monotone
    ([math.nan, math.nan], [math.nan, math.nan]),
    ([], []),
])
def test_holm_matches_hand_computed_values(raw, adjusted):
    np.testing.assert_allclose(stats.holm(raw), adjusted, rtol=0, atol=1e-12, equal_nan=True)


def test_holm_is_never_below_raw_and_keeps_the_order():
    p = np.random.default_rng(0).random((50, 12)) ** 3
    for row in p:
        adjusted = stats.holm(row)
        assert (adjusted >= row).all() and (adjusted <= 1).all()
        order = np.argsort(row)
        assert (np.diff(adjusted[order]) >= 0).all()


# ---------------------------------------------------------------- the two tests

def test_per_example_p_is_scipys_welch_on_the_unpacked_indicators_of_the_lowest_seeds():
    vectors = {(n, seed): indicator_vector(0.3 if n else 0.2, 10 * n + seed) for n in (0, 10) for seed in range(4)}
    planted = rows("s3", 10, [0.3, 0.31, 0.32], seeds=[2, 0, 1], indicators=[vectors[10, s] for s in (2, 0, 1)])
    clean = rows("s3", 0, [0.2, 0.21, 0.22], seeds=[3, 0, 1], indicators=[vectors[0, s] for s in (3, 0, 1)])
    no_seed0 = rows("r3", 0, [0.2, 0.21, 0.22], seeds=[3, 2, 1], indicators=[vectors[0, s] for s in (3, 2, 1)])
    r3 = rows("r3", 10, [0.3, 0.31, 0.32], seeds=[2, 0, 1], indicators=[vectors[10, s] for s in (2, 0, 1)])
    summary = frames.summarize(pd.DataFrame(planted + clean + no_seed0 + r3)).set_index(["pattern", "n_spurious"])

    def scipy_p(a, b):
        return scipy_stats.ttest_ind(a.astype(float), b.astype(float), equal_var=False, alternative="greater").pvalue

    a = unpack_indicators(planted[1]["spurious_indicators"])
    assert (a == vectors[10, 0]).all()
    assert summary.loc[("s3", 10), "p_welch_per_example"] == pytest.approx(scipy_p(a, vectors[0, 0]), abs=1e-15)
    # the n = 0 cell has no data seed 0: its lowest seed (1) is the baseline
    assert summary.loc[("r3", 10), "p_welch_per_example"] == pytest.approx(scipy_p(a, vectors[0, 1]), abs=1e-15)
    assert summary.loc[("s3", 10), "n_test_images"] == N_IMAGES
    assert np.isnan(summary.loc[("s3", 0), "p_welch_per_example"])
    holm = stats.holm(summary["p_welch_per_example"].to_numpy())
    np.testing.assert_allclose(summary["p_welch_per_example_holm"], holm, equal_nan=True)


def test_per_example_p_is_nan_for_old_records_and_other_metrics():
    df = pd.DataFrame(rows("s3", 0, [0.0, 0.01, 0.02]) + rows("s3", 10, [0.3, 0.31, 0.32], test_acc=[0.9] * 3))
    df.loc[0, "test_acc"] = 0.9
    assert frames.summarize(df)["p_welch_per_example"].isna().all()
    assert frames.summarize(df)["p_welch_replicates"].notna().sum() == 1
    with_indicators = pd.DataFrame(rows("s3", 0, [0.0] * 3, indicators=[indicator_vector(0.1, 0)] * 3)
                                   + rows("s3", 10, [0.3] * 3, indicators=[indicator_vector(0.5, 1)] * 3,
                                          test_acc=[0.9] * 3))
    with_indicators["test_acc"] = 0.9
    assert frames.summarize(with_indicators, metric="test_acc")["p_welch_per_example"].isna().all()


def test_replicate_p_is_welch_over_the_per_replicate_values_then_holm_over_the_table():
    planted, clean = [0.30, 0.34, 0.31, 0.36], [0.25, 0.20, 0.28]
    df = pd.DataFrame(rows("s3", 0, clean) + rows("s3", 10, planted) + rows("s3", 100, [0.5, 0.6, 0.7]))
    summary = frames.summarize(df).set_index("n_spurious")
    p10 = scipy_stats.ttest_ind(planted, clean, equal_var=False, alternative="greater").pvalue
    p100 = scipy_stats.ttest_ind([0.5, 0.6, 0.7], clean, equal_var=False, alternative="greater").pvalue
    assert summary.loc[10, "p_welch_replicates"] == pytest.approx(p10)
    np.testing.assert_allclose(summary.loc[[10, 100], "p_welch_replicates_holm"], stats.holm([p10, p100]))
    assert summary.loc[100, "p_welch_replicates_holm"] == pytest.approx(2 * p100)  # the smaller p, times m = 2


# ---------------------------------------------------------------- suppressed marks

@pytest.fixture
def marked_frame() -> pd.DataFrame:
    """s3: 3 vs 3 replicates, clearly greater (marked); r3: its n = 0 rows are one model scored three times
    (seed policy "reference"); s1: two replicates a side; r1: a constant n = 0 cell without training ids."""
    return pd.DataFrame(
        rows("s3", 0, [0.00, 0.01, 0.02]) + rows("s3", 10, [0.30, 0.31, 0.32])
        + rows("r3", 0, [0.01, 0.01, 0.01], training_ids=["m0", "m0", "m0"])
        + rows("r3", 10, [0.30, 0.31, 0.32], training_ids=["a", "b", "c"])
        + rows("s1", 0, [0.00, 0.01]) + rows("s1", 10, [0.30, 0.32])
        + rows("r1", 0, [0.02, 0.02, 0.02]) + rows("r1", 10, [0.30, 0.31, 0.32]))


def test_zero_variance_or_fewer_than_three_models_get_no_mark_and_a_reason(marked_frame):
    summary = frames.summarize(marked_frame)
    cells = summary.set_index(["pattern", "n_spurious"])
    assert cells.loc[("s3", 10), "mark_suppressed"] == ""
    assert cells.loc[("r3", 10), "mark_suppressed"] == "n = 0 baseline has 1 independent model (3 rows) < 3"
    assert cells.loc[("s1", 10), "mark_suppressed"] == "cell has 2 independent models < 3"
    assert cells.loc[("r1", 10), "mark_suppressed"] == "n = 0 baseline has zero variance over replicates"
    assert cells.loc[("r1", 10), "p_welch_replicates_holm"] < 0.05  # significant, but not shown as such
    table = frames.pivot_cells(summary, mark_p=0.05)
    assert table.loc["s3", "n=10"].endswith("*")
    for pattern in ("r3", "s1", "r1"):
        assert table.loc[pattern, "n=10"].endswith("†") and "*" not in table.loc[pattern, "n=10"]
    assert not table.loc["s3", "n=0"].endswith(("*", "†"))
    legend = frames.mark_legend(summary, 0.05)
    assert legend.splitlines()[0] == f"* p < 0.05: {REPLICATE_NAME}, Holm-adjusted over the 4 cells of this table."
    assert "† mark suppressed (cell has 2 independent models < 3): pattern=s1 n_spurious=10." in legend


def test_mark_suppression_helper():
    assert stats.mark_suppression([1, 2, 3], [0, 0.1, 0.2]) == ""
    assert stats.mark_suppression([1, 2], [0, 0.1, 0.2]) == "cell has 2 independent models < 3"
    assert stats.mark_suppression([1, 2, 3], [0, 0, 0]) == "n = 0 baseline has zero variance over replicates"
    assert stats.mark_suppression([1, 1, 1], [0, 0.1, 0.2]) == "cell has zero variance over replicates"
    assert "1 independent model" in stats.mark_suppression([1, 2, 3], [0, 0.1, 0.2], baseline_models=["x"] * 3)
    assert stats.per_example_suppression(np.zeros(5), np.zeros(5)) == "both indicator vectors are constant"
    assert stats.per_example_suppression(np.array([0, 1, 0]), np.zeros(3)) == ""


# ---------------------------------------------------------------- smallest significant n

def test_smallest_significant_n_per_pattern():
    clean = [0.00, 0.01, 0.02, 0.01]
    df = pd.DataFrame(rows("s3", 0, clean) + rows("s3", 3, [0.00, 0.02, 0.01, 0.02])
                      + rows("s3", 10, [0.30, 0.31, 0.32, 0.33]) + rows("s3", 100, [0.60, 0.61, 0.62, 0.63])
                      + rows("r3", 0, clean) + rows("r3", 10, [0.0, 0.02, 0.01, 0.0])
                      + rows("s1", 0, [0.01, 0.01, 0.01, 0.01]) + rows("s1", 10, [0.5, 0.52, 0.53, 0.51]))
    summary = frames.summarize(df)
    found = frames.smallest_significant_n(summary).set_index("pattern")
    assert list(found.columns) == ["test", "smallest_significant_n", "p_holm", "n_tested", "n_suppressed",
                                   "suppressed_because", "test_name"]
    assert found.loc["s3", "smallest_significant_n"] == 10 and found.loc["s3", "n_tested"] == 3
    assert found.loc["s3", "p_holm"] < 0.05 and found.loc["s3", "n_suppressed"] == 0
    assert pd.isna(found.loc["r3", "smallest_significant_n"])
    assert pd.isna(found.loc["s1", "smallest_significant_n"])  # significant p, but a constant baseline
    assert found.loc["s1", "n_suppressed"] == 1 and "zero variance" in found.loc["s1", "suppressed_because"]
    assert found.loc["s1", "test_name"].startswith("one-sided Welch t-test over per-replicate values")
    strict = frames.smallest_significant_n(summary, alpha=1e-12).set_index("pattern")
    assert strict["smallest_significant_n"].isna().all()
    per_example = frames.smallest_significant_n(summary, test=stats.PER_EXAMPLE_TEST)
    assert per_example["smallest_significant_n"].isna().all() and (per_example["n_tested"] == 0).all()


def test_smallest_significant_n_under_the_per_example_test():
    low, high = indicator_vector(0.05, 1), indicator_vector(0.5, 2)
    df = pd.DataFrame(rows("s3", 0, [0.05], indicators=[low]) + rows("s3", 3, [0.05], indicators=[low])
                      + rows("s3", 5, [0.5], indicators=[high]))
    found = frames.smallest_significant_n(frames.summarize(df), test=stats.PER_EXAMPLE_TEST)
    assert found["smallest_significant_n"].tolist() == [5] and found["test"].tolist() == [stats.PER_EXAMPLE_TEST]


# ---------------------------------------------------------------- claims

@pytest.fixture
def claims_frame() -> pd.DataFrame:
    l2 = {"s1": 1.0, "s3": 3.0, "r1": 2.0, "r3": 6.0}
    level = {"s1": 0.1, "s3": 0.4, "r1": 0.3, "r3": 0.2}
    parts = []
    for pattern in l2:
        for n in (0, 10, 100):
            scores = [level[pattern] * (n > 0) * (1 + n / 100) + 0.01 * k for k in range(3)]
            parts += rows(pattern, n, scores, pattern_l2=[l2[pattern] + 0.1 * k for k in range(3)],
                          test_acc=[0.9 - 0.001 * n - 0.01 * k for k in range(3)])
    return pd.DataFrame(parts)


def test_claims_spearman_equals_scipys_on_the_pattern_means(claims_frame):
    found = claims.claims(claims_frame)["size_vs_score"].set_index("n_spurious")
    for n in (10, 100):
        means = claims_frame[claims_frame["n_spurious"] == n].groupby("pattern")[["pattern_l2", "spurious_score"]]
        expected = scipy_stats.spearmanr(means.mean()["pattern_l2"], means.mean()["spurious_score"])
        assert found.loc[n, "spearman_rho"] == pytest.approx(expected.statistic)
        assert found.loc[n, "spearman_p"] == pytest.approx(expected.pvalue)
        assert found.loc[n, "n_patterns"] == 4
    assert 0 not in found.index


def test_claims_spearman_needs_three_patterns_and_pattern_l2(claims_frame):
    two = claims_frame[claims_frame["pattern"].isin(["s1", "s3"])]
    assert claims.claims(two)["size_vs_score"]["spearman_rho"].isna().all()
    assert claims.claims(claims_frame.drop(columns="pattern_l2"))["size_vs_score"].empty
    assert claims.claims(claims_frame.assign(pattern_l2=np.nan))["size_vs_score"].empty


def test_claims_accuracy_cost_is_the_mean_difference_with_its_standard_error(claims_frame):
    cost = claims.claims(claims_frame)["accuracy_cost"].set_index(["pattern", "n_spurious"])
    row = cost.loc[("s3", 100)]
    acc = claims_frame.set_index(["pattern", "n_spurious"])["test_acc"]
    a, b = acc.loc[("s3", 100)], acc.loc[("s3", 0)]
    assert row["test_acc_change"] == pytest.approx(a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert row["test_acc_change_se"] == pytest.approx(se) and row["count"] == 3 and row["count_n0"] == 3
    assert len(cost) == 8


def test_format_claims_says_what_was_computed(claims_frame):
    text = claims.format_claims(claims.claims(claims_frame))
    assert "Smallest significant n" in text and REPLICATE_NAME in text
    assert "pattern=s3: n = 10" in text
    assert "Spearman rank correlation over patterns" in text and "over 4 patterns" in text
    assert "Accuracy cost" in text and "pattern=s3 n_spurious=100: -0.1000 ± 0.0082" in text


# ---------------------------------------------------------------- report

def test_summary_md_and_index_name_both_tests_and_the_claims(claims_frame):
    vectors = [indicator_vector(0.05 + 0.2 * (n > 0), n) for n in claims_frame["n_spurious"]]
    df = claims_frame.assign(spurious_indicators=[pack_indicators(v) for v in vectors])
    summaries = {m: frames.summarize(df, metric=m) for m in report.SUMMARY_METRICS}
    found = claims.claims(df)
    text = report.summary_markdown(df, summaries, found)
    assert f"### {REPLICATE_NAME}" in text and f"### {PER_EXAMPLE_NAME}" in text
    assert f"\\* p < 0.05: {REPLICATE_NAME}, Holm-adjusted over the 8 cells of this table." in text
    assert f"\\* p < 0.05: {PER_EXAMPLE_NAME}, Holm-adjusted over the 8 cells of this table." in text
    assert "## Claims" in text and "Spearman rank correlation" in text
    assert text.count(f"### {PER_EXAMPLE_NAME}") == 1  # only the spurious score has indicators
    page = report.index_html([Path("synthetic")], df, summaries, [], (), found)
    assert PER_EXAMPLE_NAME.replace("'", "&#x27;") in page and "<h2>Claims</h2>" in page
    without = report.summary_markdown(claims_frame, {m: frames.summarize(claims_frame, metric=m)
                                                     for m in report.SUMMARY_METRICS})
    assert PER_EXAMPLE_NAME not in without and "## Claims" not in without


def test_score_table_names_its_test():
    df = pd.DataFrame(rows("s3", 0, [0.00, 0.01, 0.02]) + rows("s3", 10, [0.30, 0.31, 0.32]))
    table = frames.score_table(df)
    assert f"* p < 0.05: {REPLICATE_NAME}, Holm-adjusted over the 1 cells of this table." in table
    assert "0.310 ± 0.006*" in table
    assert "*" not in frames.score_table(df, mark_p=None)
