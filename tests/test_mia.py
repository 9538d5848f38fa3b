"""Membership-inference metrics on constructed scores with known values, and the three attacks (protocol §9)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from spurious import mia, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from spurious.planted import plant
from tests.test_influence import one_thread  # noqa: F401  (autouse fixture)


def brute_force_auc(members, nonmembers):
    diff = np.asarray(members)[:, None] - np.asarray(nonmembers)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def labelled(members, nonmembers):
    return np.r_[members, nonmembers], np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]


# ---------------------------------------------------------------- metrics

def test_auc_extremes_and_ties():
    assert mia.roc_auc(*labelled([2, 3], [0, 1])) == 1.0
    assert mia.roc_auc(*labelled([0, 1], [2, 3])) == 0.0
    assert mia.roc_auc(*labelled([1, 1], [1, 1, 1])) == 0.5
    assert mia.roc_auc(*labelled([3, 2], [3, 1])) == 0.625  # one tie counts ½: (0.5 + 1 + 0 + 1) / 4
    assert np.isnan(mia.roc_auc(*labelled([1, 2], [])))


def test_auc_equals_pairwise_count_and_curve_area_with_many_ties():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.integers(0, 8, 300), rng.integers(0, 6, 500)
    auc = mia.roc_auc(*labelled(members, nonmembers))
    assert auc == pytest.approx(brute_force_auc(members, nonmembers), abs=1e-12)
    fpr, tpr, _ = mia.roc_curve(*labelled(members, nonmembers))
    assert auc == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


def test_roc_curve_moves_tied_scores_together():
    fpr, tpr, thresholds = mia.roc_curve(*labelled([3, 2], [3, 1]))
    assert thresholds.tolist() == [np.inf, 3, 2, 1]
    assert tpr.tolist() == [0, 0.5, 1, 1] and fpr.tolist() == [0, 0.5, 0.5, 1]


def test_tpr_at_low_fpr_on_known_scores():
    """1000 distinct non-member scores 0..999; 5 members above all, 5 just above 995, 90 at the bottom.

    At FPR < 0.1 % (no false positive allowed) only the top 5 members are caught; at FPR < 1 % (nine)
    the threshold can go down to 991, catching 10.
    """
    nonmembers = np.arange(1000.0)
    members = np.r_[np.full(5, 999.5), np.full(5, 995.5), np.full(90, 0.5)]
    scores, labels = labelled(members, nonmembers)
    assert mia.tpr_at_fpr(scores, labels, 0.001) == pytest.approx(0.05)
    assert mia.tpr_at_fpr(scores, labels, 0.01) == pytest.approx(0.10)
    assert mia.tpr_at_fpr(scores, labels, 0.0, rule="le") == pytest.approx(0.05)
    assert mia.tpr_at_fpr(scores, labels, 1.0) == 1.0


def test_fpr_rule_lt_excludes_a_threshold_whose_fpr_is_exactly_the_target():
    """A member at 989.5 is caught only by flagging ten of the 1000 non-members (990..999): FPR exactly 1 %,
    which `le` allows and `lt` does not; at 0.1 %, `le` allows one false positive (999) and `lt` none."""
    nonmembers = np.arange(1000.0)
    members = np.r_[np.full(5, 999.5), np.full(5, 998.5), np.full(10, 989.5), np.zeros(80)]
    scores, labels = labelled(members, nonmembers)
    assert mia.tpr_at_fpr(scores, labels, 0.01, rule="le") == pytest.approx(0.20)
    assert mia.tpr_at_fpr(scores, labels, 0.01, rule="lt") == pytest.approx(0.10)
    assert mia.tpr_at_fpr(scores, labels, 0.01) == pytest.approx(0.10)  # the default is lt
    assert mia.tpr_at_fpr(scores, labels, 0.001, rule="le") == pytest.approx(0.10)
    assert mia.tpr_at_fpr(scores, labels, 0.001, rule="lt") == pytest.approx(0.05)


def test_fpr_rule_and_target_errors():
    scores, labels = labelled([1.0, 2.0], [0.0])
    with pytest.raises(SpuriousError, match="FPR rule 'leq' is not one of lt, le"):
        mia.tpr_at_fpr(scores, labels, 0.01, rule="leq")
    with pytest.raises(SpuriousError, match=r"target FPR 0.0 is not in \(0, 1\]"):
        mia.tpr_at_fpr(scores, labels, 0.0)
    with pytest.raises(SpuriousError, match=r"target FPR 1.5 is not in \[0, 1\]"):
        mia.threshold_at_fpr([0.0], 1.5, rule="le")
    with pytest.raises(SpuriousError, match="at least one non-member"):
        mia.threshold_at_fpr([], 0.1)


def test_threshold_at_fpr_is_the_lowest_threshold_below_the_target_fpr():
    """On non-members 0..999, FPR < 1 % allows nine false positives (991..999), so t lies just above 990;
    FPR ≤ 1 % allows ten, t just above 989; FPR < 0.1 % allows none, t just above 999."""
    nonmembers = np.random.default_rng(0).permutation(np.arange(1000.0))
    assert mia.threshold_at_fpr(nonmembers, 0.01) == np.nextafter(990.0, np.inf)
    assert mia.threshold_at_fpr(nonmembers, 0.01, rule="le") == np.nextafter(989.0, np.inf)
    assert mia.threshold_at_fpr(nonmembers, 0.001) == np.nextafter(999.0, np.inf)
    assert mia.threshold_at_fpr(nonmembers, 1.0, rule="le") == -np.inf  # everybody may be flagged
    for fpr, rule in ((0.01, "lt"), (0.01, "le"), (0.25, "lt")):
        realised = (nonmembers >= mia.threshold_at_fpr(nonmembers, fpr, rule)).mean()
        assert realised < fpr if rule == "lt" else realised <= fpr


def test_attack_accuracy_at_best_and_given_thresholds():
    scores, labels = labelled([3, 4, 5], [0, 1, 2, 3.5])
    threshold, acc = mia.best_threshold(scores, labels)
    assert acc == pytest.approx(6 / 7) and threshold == 4.0  # 3 and 4 tie at 6/7; the higher is returned
    assert mia.attack_accuracy(scores, labels, threshold) == pytest.approx(6 / 7)
    assert mia.attack_accuracy(scores, labels, threshold=10.0) == pytest.approx(4 / 7)  # nobody flagged
    assert mia.attack_accuracy(scores, labels, threshold=-1.0) == pytest.approx(3 / 7)  # everybody
    assert mia.calibrate_threshold([3, 4, 5], [0, 1, 2, 3.5]) == 4.0


def test_evaluate_attack_over_all_spurious_and_other_members():
    """90 ordinary members tie with the non-members; the 10 spurious ones sit above them all (1..2), so they
    are perfectly separable and alone carry the attack's advantage. The calibrated threshold 1.5 catches
    half of them; the oracle threshold, chosen on these labels, is the lowest spurious score and catches all."""
    nonmembers = np.zeros(100)
    members = np.r_[np.zeros(90), np.linspace(1, 2, 10)]
    mask = np.r_[np.zeros(90, bool), np.ones(10, bool)]
    row = mia.evaluate_attack(members, nonmembers, mask, 1.5)
    assert row["auc"] == pytest.approx(0.5 + 0.5 * 0.1)
    assert row["tpr_at_1pct_fpr"] == row["tpr_at_0_1pct_fpr"] == pytest.approx(0.1)
    assert row["spurious_auc"] == 1.0 and row["spurious_tpr_at_0_1pct_fpr"] == 1.0
    assert row["other_auc"] == 0.5 and row["other_tpr_at_1pct_fpr"] == row["other_tpr_at_0_1pct_fpr"] == 0.0
    assert row["attack_threshold"] == 1.5 and row["attack_acc"] == pytest.approx(105 / 200)
    assert row["spurious_attack_acc"] == 0.5 and row["other_attack_acc"] == 0.0
    assert row["nonmember_flag_rate"] == 0.0
    assert row["attack_threshold_oracle"] == 1.0 and row["attack_acc_oracle"] == pytest.approx(110 / 200)
    assert row["spurious_attack_acc_oracle"] == 1.0 and row["other_attack_acc_oracle"] == 0.0
    assert (row["n_members"], row["n_nonmembers"], row["n_spurious"], row["n_other"]) == (100, 100, 10, 90)
    assert set(row) == set(EVALUATE_KEYS)


EVALUATE_KEYS = tuple(f"{prefix}{k}" for prefix in ("", "spurious_", "other_") for k in mia.METRIC_KEYS) + (
    "attack_acc", "spurious_attack_acc", "other_attack_acc", "nonmember_flag_rate", "attack_threshold",
    "attack_acc_oracle", "spurious_attack_acc_oracle", "other_attack_acc_oracle", "attack_threshold_oracle",
    "n_members", "n_nonmembers", "n_spurious", "n_other")


def test_calibrated_threshold_comes_from_the_shadow_not_the_targets_labels():
    """Relabelling the target (swapping which examples are members) moves the oracle threshold and its
    accuracy, but not the threshold calibrated on the shadow model, at which attack_acc is taken."""
    rng = np.random.default_rng(0)
    threshold = mia.calibrate_threshold(rng.normal(1, 1, 500), rng.normal(0, 1, 500))
    assert 0.2 < threshold < 0.8  # the equal-variance optimum is 0.5
    members, nonmembers = rng.normal(1, 1, 300), rng.normal(0, 1, 300)
    before = mia.evaluate_attack(members, nonmembers, None, threshold)
    swapped = mia.evaluate_attack(np.r_[members[:150], nonmembers[:150]], np.r_[nonmembers[150:], members[150:]],
                                  None, threshold)
    assert before["attack_threshold"] == swapped["attack_threshold"] == threshold
    assert before["attack_threshold_oracle"] != swapped["attack_threshold_oracle"]
    assert before["attack_acc_oracle"] != swapped["attack_acc_oracle"]
    scores, labels = labelled(members, nonmembers)
    assert before["attack_acc"] == pytest.approx(((scores >= threshold) == labels).mean())
    assert before["attack_acc"] <= before["attack_acc_oracle"]


def test_evaluate_attack_needs_a_threshold_and_handles_missing_groups():
    with pytest.raises(SpuriousError, match="needs a threshold calibrated"):
        mia.evaluate_attack([1.0, 2.0], [0.0, 1.5], None, None)
    with pytest.raises(SpuriousError, match="needs a threshold calibrated"):
        mia.evaluate_attack([1.0, 2.0], [0.0, 1.5], None, float("nan"))
    row = mia.evaluate_attack([1.0, 2.0], [0.0, 1.5], None, 1.0)
    assert row["n_spurious"] == 0 and row["n_other"] == 2
    assert all(np.isnan(row[k]) for k in ("spurious_auc", "spurious_tpr_at_1pct_fpr", "spurious_attack_acc",
                                          "spurious_attack_acc_oracle"))
    assert row["other_auc"] == row["auc"] == 0.75 and row["nonmember_flag_rate"] == 0.5
    with pytest.raises(SpuriousError, match="spurious mask"):
        mia.evaluate_attack([1.0, 2.0], [0.0], np.ones(3, bool), 1.0)
    with pytest.raises(SpuriousError, match="NaN"):
        mia.roc_auc([np.nan, 1.0], [1, 0])


def test_per_example_tpr_on_a_hand_made_case():
    """Three targets, five examples, FPR < 50 %. Target 0's OUT scores {0, 1, 2} allow one false positive,
    so it flags scores > 1; target 1's OUT {3, 0} (a NaN ignored) allow none: > 3; target 2's {0, 1, 0.5}
    allow one: > 0.5. Example 0 is IN for targets 0 and 2, both flag it; example 1 for 0 (not flagged) and
    1 (flagged); example 2 for 1 (not flagged); example 3 never; example 4 only with a NaN score."""
    nan = np.nan
    scores = np.array([[5, 0.5, 0, 1, 2], [3, 4, 1.5, nan, 0], [2, 0, 1, 0.5, nan]])
    in_mask = np.array([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], bool)
    tpr, n_in = mia.per_example_tpr(scores, in_mask, 0.5)
    assert n_in.tolist() == [2, 2, 1, 0, 0]
    assert tpr[:3].tolist() == [1.0, 0.5, 0.0] and np.isnan(tpr[3:]).all()
    with pytest.raises(SpuriousError, match="target 0 has no OUT example"):
        mia.per_example_tpr(scores, np.ones_like(in_mask), 0.5)
    with pytest.raises(SpuriousError, match="same"):
        mia.per_example_tpr(scores, in_mask[:, :4], 0.5)


def test_per_example_tpr_of_one_target_averages_to_its_tpr_at_fpr():
    """With one target, the mean per-example TPR over its members is the ROC curve's TPR at that FPR:
    the threshold just above the highest forbidden non-member score is the curve's best one."""
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 40, (1, 600)).astype(float) + 3 * (np.arange(600) < 300)
    in_mask = np.arange(600)[None, :] < 300
    for fpr, rule in ((0.01, "lt"), (0.01, "le"), (0.1, "lt"), (0.5, "le")):
        tpr, _ = mia.per_example_tpr(scores, in_mask, fpr, rule)
        expected = mia.tpr_at_fpr(scores[0], in_mask[0], fpr, rule)
        assert np.nanmean(tpr) == pytest.approx(expected, abs=1e-12)


def test_spurious_mask_marks_planted_members():
    assert mia.spurious_mask(5, [1, 3]).tolist() == [False, True, False, True, False]


# ---------------------------------------------------------------- per-example statistics

def test_loss_scores_scaled_confidence_and_true_label_probability():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 10)) * 3, rng.integers(0, 10, 50)
    expected = -F.cross_entropy(torch.tensor(logits), torch.tensor(labels), reduction="none").numpy()
    assert np.allclose(mia.loss_scores(logits, labels), expected)
    p = torch.tensor(logits).softmax(1).numpy()[np.arange(50), labels]
    assert np.allclose(mia.scaled_confidence(logits, labels), np.log(p / (1 - p)))
    assert np.allclose(mia.true_label_probability(logits, labels), p, rtol=1e-12)
    assert mia.true_label_probability(logits, labels).dtype == np.float64
    extreme = np.array([[1000.0, 0.0, 0.0], [-1000.0, 0.0, 0.0]])
    assert mia.scaled_confidence(extreme, np.array([0, 0])) == pytest.approx([1000 - np.log(2), -1000 - np.log(2)])
    assert mia.true_label_probability(extreme, np.array([0, 1])).tolist() == [1.0, 0.5]


def test_attack_features_are_sorted_logits_and_a_correctness_bit():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    features = mia.attack_features(logits, np.array([1, 2]))
    assert features.tolist() == [[-1.0, 0.1, 2.0, 1.0], [0.0, 1.0, 3.0, 0.0]]


# ---------------------------------------------------------------- scikit-learn as an oracle

def test_roc_auc_and_tpr_at_fpr_match_scikit_learn_on_scores_with_ties():
    """The oracle TPR at FPR is the highest TPR of scikit-learn's full ROC curve (every threshold kept) whose
    FPR is < f (`lt`) or ≤ f (`le`); 200 non-members make FPR exactly f reachable for every f here."""
    sk_metrics = pytest.importorskip("sklearn.metrics")
    rules_differ = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        scores, labels = labelled(rng.integers(0, 40, 150) + 6, rng.integers(0, 40, 200))
        assert mia.roc_auc(scores, labels) == pytest.approx(sk_metrics.roc_auc_score(labels, scores), abs=1e-12)
        fpr, tpr, _ = sk_metrics.roc_curve(labels, scores, drop_intermediate=False)
        for f in (0.005, 0.01, 0.05, 0.1, 0.3):
            assert mia.tpr_at_fpr(scores, labels, f, rule="lt") == tpr[fpr < f].max()
            assert mia.tpr_at_fpr(scores, labels, f, rule="le") == tpr[fpr <= f].max()
            rules_differ += tpr[fpr < f].max() != tpr[fpr <= f].max()
    assert rules_differ > 0  # the data exercise the difference between the rules


def test_fit_logistic_matches_scikit_learn_lbfgs():
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    t = (x @ [1.0, -2.0, 0.5] + rng.normal(size=400) > 0.3).astype(float)
    for c in mia.C_GRID:
        params = mia.fit_logistic(x, t, c)
        oracle = linear_model.LogisticRegression(C=c, solver="lbfgs", tol=1e-12, max_iter=10_000).fit(x, t)
        assert np.allclose(params[:-1], oracle.coef_[0], atol=1e-5), c
        assert params[-1] == pytest.approx(oracle.intercept_[0], abs=1e-5), c


def test_folds_and_chosen_c_match_scikit_learns_grid_search():
    """GridSearchCV(LogisticRegression(), {"C": C_GRID}, cv=StratifiedKFold(3)) as the oracle, on datasets whose
    class counts are and are not multiples of 3 (where the remainders must be spread as scikit-learn does),
    and on the quarter size of the membership split (two classes of 17,500). The oracle's tol is tight so
    that an early stop cannot flip a borderline prediction."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    t = np.r_[np.ones(17_500), np.zeros(17_500)]
    for k, (_, test) in enumerate(StratifiedKFold(3).split(t[:, None], t)):
        assert np.array_equal(np.flatnonzero(mia.stratified_folds(t, 3) == k), test)
    chosen, uneven = set(), 0
    for seed in range(9):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(91, 5))
        t = (0.5 * x @ rng.normal(size=5) + rng.normal(size=91) > 0.6).astype(float)
        uneven += int(t.sum()) % 3 != 0
        folds = mia.stratified_folds(t, 3)
        for k, (_, test) in enumerate(StratifiedKFold(3).split(x, t)):
            assert np.array_equal(np.flatnonzero(folds == k), test), seed
        oracle = GridSearchCV(LogisticRegression(tol=1e-10, max_iter=10_000), {"C": list(mia.C_GRID)},
                              cv=StratifiedKFold(3)).fit(x, t)
        chosen.add(mia.choose_c(x, t))
        assert mia.choose_c(x, t) == oracle.best_params_["C"], seed
    assert len(chosen) >= 3 and uneven >= 3  # different C picked, remainders exercised: agreement is not luck


# ---------------------------------------------------------------- the loss and shadow attacks

def test_fit_logistic_satisfies_its_optimality_conditions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    t = (x @ [1.0, -2.0, 0.5] + rng.normal(size=400) > 0).astype(float)
    for c in mia.C_GRID:
        params = mia.fit_logistic(x, t, c)
        residual = 1 / (1 + np.exp(-mia.decision(params, x))) - t
        assert np.abs(c * x.T @ residual + params[:-1]).max() < 1e-5 * max(c, 1)
        assert abs(c * residual.sum()) < 1e-5 * max(c, 1)


def test_cross_validation_folds_are_stratified_and_c_comes_from_the_grid():
    t = np.r_[np.ones(30), np.zeros(60)]
    folds = mia.stratified_folds(t, 3)
    for k in range(3):
        assert (t[folds == k] == 1).sum() == 10 and (t[folds == k] == 0).sum() == 20
    # Separable data: a vanishing C shrinks the weights to ~0, so only the unpenalised intercept is left and
    # it predicts the majority class (accuracy 2/3); a large C separates the classes (accuracy 1).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2)) + 8 * t[:, None]
    assert mia.choose_c(x, t, grid=(1e-6, 100.0)) == 100.0
    assert mia.choose_c(x, t, grid=(100.0, 1e-6)) == 100.0
    # Ties go to the first C of the grid, as GridSearchCV's do (both separate the classes perfectly).
    assert mia.choose_c(x, t, grid=(10.0, 100.0)) == 10.0 and mia.choose_c(x, t, grid=(100.0, 10.0)) == 100.0


def fake_model_outputs(rng, n, member, classes=10):
    """Return logits of a model that is more confident, and more often right, on its members."""
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += 4.0 if member else 1.5
    return logits, labels


def fake_split(rng, n=500):
    return mia.SplitLogits(*fake_model_outputs(rng, n, True), *fake_model_outputs(rng, n, False))


def auc_of(scores: mia.AttackScores) -> float:
    return mia.roc_auc(*labelled(scores.member, scores.nonmember))


def test_shadow_attack_learns_membership_and_uses_its_own_decision():
    rng = np.random.default_rng(0)
    target, shadow = fake_split(rng), fake_split(rng)
    scores = mia.shadow_attack(target, shadow)
    row = mia.evaluate_attack(scores.member, scores.nonmember, None, scores.threshold)
    assert row["auc"] > 0.85 and row["attack_acc"] > 0.75
    labels = np.r_[np.ones(500), np.zeros(500)]
    decided = (np.r_[scores.member, scores.nonmember] > 0) == labels
    assert row["attack_acc"] == pytest.approx(decided.mean())


def test_scoring_the_non_members_from_their_own_logits_fixes_the_reference_bug():
    """Protocol §11.5: the reference scored target-train logits for both blocks, which pins the AUC at 0.5."""
    rng = np.random.default_rng(0)
    target, shadow = fake_split(rng), fake_split(rng)
    buggy = mia.SplitLogits(target.member_logits, target.member_labels, target.member_logits,
                            target.member_labels)
    for split, low, high in ((target, 0.85, 1.0), (buggy, 0.5, 0.5)):
        assert low <= auc_of(mia.shadow_attack(split, shadow)) <= high


def test_loss_attack_ranks_by_loss_and_calibrates_on_the_shadow():
    rng = np.random.default_rng(0)
    target, shadow = fake_split(rng), fake_split(rng)
    scores = mia.loss_attack(target)
    assert np.allclose(scores.member, mia.loss_scores(target.member_logits, target.member_labels))
    assert auc_of(scores) > 0.85
    on_shadow = mia.loss_attack(shadow)
    threshold = mia.calibrate_threshold(on_shadow.member, on_shadow.nonmember)
    row = mia.evaluate_attack(scores.member, scores.nonmember, None, threshold)
    assert row["attack_threshold"] == threshold != row["attack_threshold_oracle"]
    assert 0.75 < row["attack_acc"] <= row["attack_acc_oracle"]  # shadow and target behave alike here


# ---------------------------------------------------------------- LiRA

def two_class_split(phi_members, phi_nonmembers):
    """Return 2-class logits [φ, 0] with label 0, whose logit-scaled confidence is exactly φ."""
    def logits(phi):
        return np.column_stack([phi, np.zeros_like(phi)])
    zeros = np.zeros(len(phi_members), np.int64), np.zeros(len(phi_nonmembers), np.int64)
    return mia.SplitLogits(logits(phi_members), zeros[0], logits(phi_nonmembers), zeros[1])


def lira_world(k_shadows, n=1000, spread=3.0, noise=0.5, gap=1.0, seed=0):
    """Examples differ a lot in difficulty (μ_i ~ N(0, spread²)); training adds `gap` to a member's
    confidence. Per-example OUT statistics remove the difficulty; a global loss threshold cannot."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, spread, 2 * n)
    target_phi = mu + noise * rng.normal(size=2 * n) + gap * (np.arange(2 * n) < n)
    target = two_class_split(target_phi[:n], target_phi[n:])
    shadows = [two_class_split(*np.split(mu + noise * rng.normal(size=2 * n), 2)) for _ in range(k_shadows)]
    return target, shadows


def test_lira_uses_per_example_statistics_to_beat_the_loss_attack():
    """With 8 shadows `auto` takes a global σ, so LiRA ranks by φ − μ̂_out: ideal AUC
    Φ(1/√(2·0.25·(1 + 1/8))) ≈ 0.91; the loss attack ≈ Φ(1/√(2·9.25)) ≈ 0.59."""
    target, shadows = lira_world(k_shadows=8)
    assert auc_of(mia.lira_offline(target, shadows)) > 0.87 and auc_of(mia.loss_attack(target)) < 0.65


def reference_world(k, n=400, gap=1.5, seed=0):
    """Return (phi_target, phi_refs (k, n), in_refs, in_target): example i has difficulty μ_i ~ N(0, 3²) and
    its own noise scale s_i ∈ [0.3, 1.5]; a model trained on it (IN, probability ½) adds `gap`."""
    rng = np.random.default_rng(seed)
    mu, s = rng.normal(0, 3, n), rng.uniform(0.3, 1.5, n)
    in_refs, in_target = rng.random((k, n)) < 0.5, rng.random(n) < 0.5
    refs = mu + s * rng.normal(size=(k, n)) + gap * in_refs
    return mu + s * rng.normal(size=n) + gap * in_target, refs, in_refs, in_target


def direct_gaussian(refs, mask, per_example):
    """Return per-example (mean, std) fitted example by example: NaN mean without observations, own σ with
    two or more (per_example), else σ of all selected observations together."""
    pooled = np.std(refs[mask])
    mean = np.array([refs[m, i].mean() if m.any() else np.nan for i, m in enumerate(mask.T)])
    std = np.array([np.std(refs[m, i]) if per_example and m.sum() >= 2 else pooled
                    for i, m in enumerate(mask.T)])
    return mean, np.maximum(std, mia.MIN_STD)


def test_offline_lira_scores_equal_a_direct_scipy_computation():
    """Example 0 has no OUT observation (NaN), example 1 one (the global σ even per example)."""
    phi, refs, in_refs, _ = reference_world(k=6)
    out = ~in_refs
    out[:, 0], out[:, 1] = False, np.eye(6, dtype=bool)[0]
    for variance, per_example in (("per_example", True), ("global", False), ("auto", False)):
        mean, std = direct_gaussian(refs, out, per_example)
        expected = -stats.norm.logsf(phi, loc=mean, scale=std)
        scores = mia.lira_offline_scores(phi, refs, out, variance)
        assert np.isnan(scores[0]) and np.isnan(expected[0])
        np.testing.assert_allclose(scores, expected, rtol=1e-10, equal_nan=True)
    assert np.array_equal(mia.lira_offline_scores(phi, refs), mia.lira_offline_scores(phi, refs, np.ones_like(out)))


def test_lira_variance_rule_switches_to_per_example_at_64_reference_models():
    for k, rule in ((63, "global"), (64, "per_example")):
        phi, refs, in_refs, _ = reference_world(k=k, n=200)
        auto = mia.lira_offline_scores(phi, refs, ~in_refs)
        assert np.array_equal(auto, mia.lira_offline_scores(phi, refs, ~in_refs, rule)), k
        other = "per_example" if rule == "global" else "global"
        assert not np.allclose(auto, mia.lira_offline_scores(phi, refs, ~in_refs, other)), k
        online = mia.lira_online_scores(phi, refs, in_refs)
        assert np.array_equal(online, mia.lira_online_scores(phi, refs, in_refs, rule)), k
    assert mia.GLOBAL_VARIANCE_BELOW == 64


def test_online_lira_recovers_membership_and_equals_a_direct_scipy_computation():
    phi, refs, in_refs, in_target = reference_world(k=16)
    in_refs[:, 0], in_refs[:, 1] = False, True  # example 0 never IN, example 1 never OUT
    for variance, per_example in (("global", False), ("per_example", True)):
        mean_in, std_in = direct_gaussian(refs, in_refs, per_example)
        mean_out, std_out = direct_gaussian(refs, ~in_refs, per_example)
        expected = stats.norm.logpdf(phi, mean_in, std_in) - stats.norm.logpdf(phi, mean_out, std_out)
        scores = mia.lira_online_scores(phi, refs, in_refs, variance)
        np.testing.assert_allclose(scores, expected, rtol=1e-10, equal_nan=True)
        assert np.isnan(scores[:2]).all() and np.isfinite(scores[2:]).all()
        auc = mia.roc_auc(scores[2:], in_target[2:])
        assert auc > 0.8, variance
    with pytest.raises(SpuriousError, match="in_mask has shape"):
        mia.lira_online_scores(phi, refs, in_refs[:, :10])


def test_lira_offline_wrapper_masks_in_observations_and_needs_out_ones():
    target, shadows = lira_world(k_shadows=4)
    base = mia.lira_offline(target, shadows)
    poisoned = shadows + [two_class_split(np.full(1000, 50.0), np.full(1000, 50.0))]
    mask = np.r_[np.ones((4, 2000), bool), np.zeros((1, 2000), bool)]
    masked = mia.lira_offline(target, poisoned, out_mask=mask)
    assert np.allclose(masked.member, base.member) and np.allclose(masked.nonmember, base.nonmember)
    with pytest.raises(SpuriousError, match="no OUT shadow observation"):
        mia.lira_offline(target, shadows, out_mask=np.zeros((4, 2000), bool))
    assert np.isnan(mia.lira_offline_scores(np.zeros(3), np.zeros((2, 3)), np.zeros((2, 3), bool))).all()


# ---------------------------------------------------------------- RMIA

def brute_force_rmia(px, refs_x, pz, refs_z, online_x, online_z, gamma, a):
    """Return RMIA scores from the explicit N × Z matrix of likelihood ratios."""
    def marginal(refs, online):
        return refs.mean(0) if online else 0.5 * ((1 + a) * refs.mean(0) + (1 - a))
    lr = (px / marginal(refs_x, online_x))[:, None] / (pz / marginal(refs_z, online_z))[None, :]
    return (lr >= gamma).mean(1)


def test_rmia_equals_the_brute_force_pairwise_likelihood_ratios():
    """Online (masks given: the mean over every reference) and offline (the linear approximation with a),
    for several γ; example 0 is a copy of population sample 0, so its LR against it is exactly 1 and counts
    at γ = 1 (≥, not >)."""
    rng = np.random.default_rng(0)
    k, n, z = 4, 50, 37
    px, refs_x, pz, refs_z = rng.uniform(0.01, 1, n), rng.uniform(0.01, 1, (k, n)), rng.uniform(0.01, 1, z), \
        rng.uniform(0.01, 1, (k, z))
    px[0], refs_x[:, 0] = pz[0], refs_z[:, 0]
    in_x, in_z = rng.random((k, n)) < 0.5, rng.random((k, z)) < 0.5
    for online_x, online_z in ((True, True), (False, False), (True, False)):
        masks = dict(in_mask_x=in_x if online_x else None, in_mask_z=in_z if online_z else None)
        for gamma, a in ((1.0, 0.3), (0.5, 0.3), (2.0, 0.0), (1.0, 1.0)):
            expected = brute_force_rmia(px, refs_x, pz, refs_z, online_x, online_z, gamma, a)
            scores = mia.rmia_scores(px, refs_x, pz, refs_z, **masks, gamma=gamma, offline_a=a)
            assert np.array_equal(scores, expected), (online_x, online_z, gamma, a)
    strict = mia.rmia_scores(px, refs_x, pz, refs_z) - 1 / z  # without the tie with z_0
    lr = (px[0] / (0.5 * (1.3 * refs_x[:, 0].mean() + 0.7))) / (pz / (0.5 * (1.3 * refs_z.mean(0) + 0.7)))
    assert strict[0] == pytest.approx((lr > 1).mean())


def test_rmia_ranks_members_above_non_members():
    """A target that raises its members' probability by 0.3 over the references' is detected."""
    rng = np.random.default_rng(1)
    base_x, base_z = rng.uniform(0.2, 0.6, 400), rng.uniform(0.2, 0.6, 300)
    member = np.arange(400) < 200
    refs_x = base_x + 0.05 * rng.normal(size=(4, 400))
    refs_z = base_z + 0.05 * rng.normal(size=(4, 300))
    scores = mia.rmia_scores(base_x + 0.3 * member, refs_x.clip(0, 1), base_z, refs_z.clip(0, 1))
    assert ((scores >= 0) & (scores <= 1)).all() and mia.roc_auc(scores, member) > 0.95


def test_rmia_input_errors():
    p, refs = np.full(3, 0.5), np.full((2, 3), 0.5)
    with pytest.raises(SpuriousError, match="gamma > 0"):
        mia.rmia_scores(p, refs, p, refs, gamma=0.0)
    with pytest.raises(SpuriousError, match="offline_a"):
        mia.rmia_scores(p, refs, p, refs, offline_a=1.5)
    with pytest.raises(SpuriousError, match=r"must lie in \[0, 1\]"):
        mia.rmia_scores(p + 0.6, refs, p, refs)
    with pytest.raises(SpuriousError, match="p_refs_z"):
        mia.rmia_scores(p, refs, p[:2], refs)
    with pytest.raises(SpuriousError, match="in_mask_x has shape"):
        mia.rmia_scores(p, refs, p, refs, in_mask_x=np.ones((3, 3), bool))


# ---------------------------------------------------------------- dispatch and end to end

def test_attack_errors():
    rng = np.random.default_rng(0)
    target = fake_split(rng, 100)
    assert mia.shadow_attack(target, fake_split(rng, 100)).threshold > 0
    assert len(mia.lira_offline(target, [fake_split(rng, 100)]).member) == 100
    with pytest.raises(SpuriousError, match="at least one shadow"):
        mia.lira_offline(target, [])
    with pytest.raises(SpuriousError, match="variance 'local'"):
        mia.lira_offline(target, [target], variance="local")


def test_split_logits_runs_the_model_on_both_sets():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x_in, x_out = torch.rand(6, 1, 2, 2), torch.rand(4, 1, 2, 2)
    y_in, y_out = torch.zeros(6, dtype=torch.long), torch.ones(4, dtype=torch.long)
    split = mia.split_logits(model, x_in, y_in, x_out, y_out)
    assert split.member_logits.shape == (6, 3) and split.nonmember_logits.shape == (4, 3)
    assert split.member_logits.dtype == np.float64
    assert np.allclose(split.nonmember_logits, model(x_out).detach().numpy(), atol=1e-6)


def test_all_attacks_on_small_trained_target_and_shadow_models(tiny_data):
    """End to end on the synthetic data: membership quarters, planted target, clean shadows, 3 attacks.
    Thresholds without the target's labels: `loss` calibrated on shadow 0's own quarters, `shadow` its own
    rule, `lira` log 2 (φ above the fitted OUT median)."""
    base = dict(model="mlp", pattern="s3", n_spurious=5, epochs=15, lr=0.05, batch_size=32, device="cpu")
    planted = {split: plant(tiny_data, "s3", 5, 0, 0, split) for split in ("mia_target", "mia_shadow")}
    target_data, shadow_data = planted["mia_target"], planted["mia_shadow"]
    models = {}
    runs = (("target", "mia_target", 0), ("shadow0", "mia_shadow", 1), ("shadow1", "mia_shadow", 2))
    for name, split, seed in runs:
        models[name] = train.train(TrainConfig(**base, split=split, seed=seed), planted[split]).model
    d = target_data
    target = mia.split_logits(models["target"], d.x_train, d.y_train, d.x_test, d.y_test)
    shadow = mia.split_logits(models["shadow0"], shadow_data.x_train, shadow_data.y_train, shadow_data.x_test,
                              shadow_data.y_test)
    on_target = [mia.split_logits(models[k], d.x_train, d.y_train, d.x_test, d.y_test)
                 for k in ("shadow0", "shadow1")]
    mask = mia.spurious_mask(len(d.y_train), d.spurious_idx)
    on_shadow = mia.loss_attack(shadow)
    thresholds = {"loss": mia.calibrate_threshold(on_shadow.member, on_shadow.nonmember), "lira": np.log(2)}
    attacks = {"loss": lambda: mia.loss_attack(target), "shadow": lambda: mia.shadow_attack(target, shadow),
               "lira": lambda: mia.lira_offline(target, on_target)}
    for name, attack in attacks.items():
        scores = attack()
        threshold = scores.threshold if scores.threshold is not None else thresholds[name]
        row = mia.evaluate_attack(scores.member, scores.nonmember, mask, threshold)
        assert row["n_spurious"] == 5 and row["n_members"] == len(d.y_train) == 225, name
        assert all(0.0 <= row[k] <= 1.0 for k in row if not k.startswith(("n_", "attack_threshold"))), name
