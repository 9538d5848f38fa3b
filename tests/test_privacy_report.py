"""The DP section of a training study's report (analysis/privacy.py, protocol §10.5): ε and the planted group's
bound beside the score, and DP against L2 and input noise at matched clean accuracy, on constructed frames."""
import math

import pandas as pd
import pytest

from analysis import privacy


def trial(pattern, n, seed, score, acc, l2=0.0, noise=0.0, dp=0.0, clip=1.0, eps=math.nan):
    k = max(n, 1)
    return {"kind": "train", "status": "TERMINATED", "dataset": "fashion", "model": "large_mlp", "pattern": pattern,
            "n_spurious": n, "target": 0, "data_seed": seed, "l2": l2, "noise_sigma": noise, "grad_clip": 0.0,
            "dp_noise_multiplier": dp, "dp_max_grad_norm": clip, "spurious_score": score, "test_acc": acc,
            "dp_epsilon": eps, "dp_delta_used": 1e-5 if dp else math.nan,
            "dp_group_epsilon": k * eps if dp else math.nan,
            "dp_group_delta": min(1.0, k * math.exp((k - 1) * eps) * 1e-5) if dp else math.nan}


def study_frame():
    rows = []
    for seed in (0, 1, 2):
        for pattern in ("s3", "r3"):
            for n in (0, 3, 100):
                rows.append(trial(pattern, n, seed, 0.5 if n else 0.01, 0.86))
                rows.append(trial(pattern, n, seed, 0.1 if n else 0.01, 0.80, dp=1.0, eps=0.9))
                rows.append(trial(pattern, n, seed, 0.3 if n else 0.01, 0.83, dp=0.6, eps=2.5))
                rows.append(trial(pattern, n, seed, 0.2 + 0.01 * seed, 0.805, l2=1e-2))
                rows.append(trial(pattern, n, seed, 0.4, 0.85, l2=1e-4))
                rows.append(trial(pattern, n, seed, 0.35, 0.829, noise=0.5))
    return pd.DataFrame(rows)


def test_the_privacy_table_puts_epsilon_and_the_group_bound_beside_the_score():
    table = privacy.privacy_table(study_frame())
    assert len(table) == 2 * 2 * 2  # 2 DP settings × 2 patterns × n ∈ {3, 100}; n = 0 has no planted group
    row = table[(table.pattern == "R3") & (table.n_spurious == 3) & (table.dp_noise_multiplier == 1.0)].iloc[0]
    assert row.epsilon == 0.9 and row.delta == 1e-5 and row.replicates == 3
    assert row.group_bound == f"2.7 (δ={3 * math.exp(1.8) * 1e-5:.2g})"
    assert row.spurious_score == "0.100 ± 0.000" and row.unmitigated_score == "0.500 ± 0.000"
    assert row.n0_score == "0.010 ± 0.000"  # the same DP setting without planted images
    big = table[(table.n_spurious == 100) & (table.dp_noise_multiplier == 0.6)].iloc[0]
    assert big.group_bound == "250 (vacuous: δ = 1)"


def test_each_dp_setting_is_matched_with_the_l2_and_noise_setting_of_closest_clean_accuracy():
    matched = privacy.matched_table(study_frame())
    strong = matched[matched.dp == "DP σ=1 C=1"]
    assert sorted(set(strong.n_spurious)) == [0, 3, 100]  # n = 0 too: each setting's floor
    assert set(strong.l2) == {"L2 0.01"} and set(strong.noise) == {"noise σ=0.5"}  # 0.805 is nearest to 0.80
    weak = matched[matched.dp == "DP σ=0.6 C=1"]
    assert set(weak.l2) == {"L2 0.0001"} and weak.iloc[0].dp_acc == pytest.approx(0.83)
    row = strong[(strong.pattern == "S3") & (strong.n_spurious == 3)].iloc[0]
    assert row.l2_score == "0.210 ± 0.006" and row.dp_score == "0.100 ± 0.000" and row.l2_acc == 0.805
    assert row.l2_gap == pytest.approx(0.005) and row.noise_gap == pytest.approx(0.029) and row.pattern == "S3"


def test_the_section_appears_only_with_dp_trials():
    frame = study_frame()
    (title, text, figures), = privacy.sections(frame)
    assert "group-privacy bound" in text and "matched clean accuracy" in text and "No test is run" in text
    plain = frame[frame.dp_noise_multiplier == 0]
    assert privacy.sections(plain) == [] and privacy.matched_table(plain).empty
    only_dp = frame[(frame.l2 == 0) & (frame.noise_sigma == 0)]
    (_, text, _), = privacy.sections(only_dp)
    assert "matched clean accuracy" not in text


def test_matching_reads_validation_accuracy_when_the_study_has_it():
    frame = study_frame()
    frame["val_acc"] = frame["test_acc"]
    frame.loc[frame.l2 == 1e-4, "val_acc"] = 0.80  # on validation L2 1e-4 is the closest to DP σ=1 (0.80)
    assert privacy.match_column(frame) == "val_acc"
    matched = privacy.matched_table(frame)
    assert set(matched[matched.dp == "DP σ=1 C=1"].l2) == {"L2 0.0001"}
    (_, text, _), = privacy.sections(frame)
    assert "mean clean validation accuracy" in text
    (_, text, _), = privacy.sections(study_frame())
    assert "TEST accuracy (the study has no validation split" in text


def test_the_tradeoff_figure_sweeps_dp_and_keeps_dp_trials_out_of_the_other_sweeps():
    from analysis import figures

    frame = study_frame()
    assert figures.mitigation_knobs(frame) == ["l2", "noise_sigma", "dp_noise_multiplier"]
    l2 = figures.tradeoff_points(frame, "l2")
    assert l2[l2.l2 == 0.0].test_acc.tolist() == [0.86, 0.86]  # the unmitigated models only, not DP's 0.80/0.83
    dp = figures.tradeoff_points(frame, "dp_noise_multiplier")
    assert sorted(dp.dp_noise_multiplier.unique()) == [0.0, 0.6, 1.0]
    assert figures.tradeoff_figure(frame) is not None
