"""Membership-inference metrics on constructed scores with known values, and the three attacks (protocol §9)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

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

    At FPR ≤ 0.1 % (one false positive allowed) only the top 5 members are caught; at FPR ≤ 1 % (ten)
    the threshold can go down to 990, catching 10.
    """
    nonmembers = np.arange(1000.0)
    members = np.r_[np.full(5, 999.5), np.full(5, 995.5), np.full(90, 0.5)]
    scores, labels = labelled(members, nonmembers)
    assert mia.tpr_at_fpr(scores, labels, 0.001) == pytest.approx(0.05)
    assert mia.tpr_at_fpr(scores, labels, 0.01) == pytest.approx(0.10)
    assert mia.tpr_at_fpr(scores, labels, 0.0) == pytest.approx(0.05)
    assert mia.tpr_at_fpr(scores, labels, 1.0) == 1.0


def test_attack_accuracy_at_best_and_given_thresholds():
    scores, labels = labelled([3, 4, 5], [0, 1, 2, 3.5])
    threshold, acc = mia.best_threshold(scores, labels)
    assert acc == pytest.approx(6 / 7) and threshold in (3.0, 4.0)
    assert mia.attack_accuracy(scores, labels) == pytest.approx(6 / 7)
    assert mia.attack_accuracy(scores, labels, threshold=10.0) == pytest.approx(4 / 7)  # nobody flagged
    assert mia.attack_accuracy(scores, labels, threshold=-1.0) == pytest.approx(3 / 7)  # everybody


def test_evaluate_attack_over_all_and_over_spurious_members():
    """90 ordinary members tie with the non-members; the 10 spurious ones sit above them all, so they
    are perfectly separable and alone carry the attack's advantage."""
    nonmembers = np.zeros(100)
    members = np.r_[np.zeros(90), np.linspace(1, 2, 10)]
    mask = np.r_[np.zeros(90, bool), np.ones(10, bool)]
    row = mia.evaluate_attack(members, nonmembers, mask)
    assert row["auc"] == pytest.approx(0.5 + 0.5 * 0.1)
    assert row["tpr_at_1pct_fpr"] == row["tpr_at_0_1pct_fpr"] == pytest.approx(0.1)
    assert row["attack_acc"] == pytest.approx(110 / 200)
    assert row["spurious_auc"] == 1.0 and row["spurious_tpr_at_0_1pct_fpr"] == 1.0
    assert row["spurious_attack_acc"] == 1.0
    assert (row["n_members"], row["n_nonmembers"], row["n_spurious"]) == (100, 100, 10)
    at_fixed = mia.evaluate_attack(members, nonmembers, mask, threshold=1.5)
    assert at_fixed["spurious_attack_acc"] == pytest.approx(0.5) and at_fixed["attack_threshold"] == 1.5


def test_evaluate_attack_without_spurious_examples_gives_nan_subset_metrics():
    row = mia.evaluate_attack([1.0, 2.0], [0.0, 1.5], None)
    assert row["n_spurious"] == 0
    assert all(np.isnan(row[k]) for k in ("spurious_auc", "spurious_tpr_at_1pct_fpr", "spurious_attack_acc"))
    with pytest.raises(SpuriousError, match="spurious mask"):
        mia.evaluate_attack([1.0, 2.0], [0.0], np.ones(3, bool))
    with pytest.raises(SpuriousError, match="NaN"):
        mia.roc_auc([np.nan, 1.0], [1, 0])


def test_spurious_mask_marks_planted_members():
    assert mia.spurious_mask(5, [1, 3]).tolist() == [False, True, False, True, False]


# ---------------------------------------------------------------- per-example statistics

def test_loss_scores_and_scaled_confidence():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 10)) * 3, rng.integers(0, 10, 50)
    expected = -F.cross_entropy(torch.tensor(logits), torch.tensor(labels), reduction="none").numpy()
    assert np.allclose(mia.loss_scores(logits, labels), expected)
    p = torch.tensor(logits).softmax(1).numpy()[np.arange(50), labels]
    assert np.allclose(mia.scaled_confidence(logits, labels), np.log(p / (1 - p)))
    extreme = mia.scaled_confidence(np.array([[1000.0, 0.0, 0.0], [-1000.0, 0.0, 0.0]]), np.array([0, 0]))
    assert extreme == pytest.approx([1000 - np.log(2), -1000 - np.log(2)])


def test_attack_features_are_sorted_logits_and_a_correctness_bit():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    features = mia.attack_features(logits, np.array([1, 2]))
    assert features.tolist() == [[-1.0, 0.1, 2.0, 1.0], [0.0, 1.0, 3.0, 0.0]]


# ---------------------------------------------------------------- the attacks

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
        scores = mia.shadow_attack(split, shadow)
        assert low <= mia.evaluate_attack(scores.member, scores.nonmember)["auc"] <= high


def test_loss_attack_ranks_by_loss():
    rng = np.random.default_rng(0)
    target = fake_split(rng)
    scores = mia.loss_attack(target)
    assert np.allclose(scores.member, mia.loss_scores(target.member_logits, target.member_labels))
    assert mia.evaluate_attack(scores.member, scores.nonmember)["auc"] > 0.85


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
    """Ideal AUCs: LiRA ≈ Φ(1/√(2·0.25·(1 + 1/8))) ≈ 0.91 with known σ, the loss attack ≈ Φ(1/√(2·9.25))
    ≈ 0.59; observed 0.88 (σ estimated from 8 shadows) and 0.58."""
    target, shadows = lira_world(k_shadows=8)
    lira = mia.lira_offline(target, shadows)
    loss = mia.loss_attack(target)
    lira_auc = mia.evaluate_attack(lira.member, lira.nonmember)["auc"]
    loss_auc = mia.evaluate_attack(loss.member, loss.nonmember)["auc"]
    assert lira_auc > 0.85 and loss_auc < 0.65


def test_lira_with_one_shadow_falls_back_to_a_global_variance():
    target, shadows = lira_world(k_shadows=1)
    auto = mia.lira_offline(target, shadows)
    forced = mia.lira_offline(target, shadows, variance="global")
    assert np.array_equal(auto.member, forced.member)
    assert np.isfinite(auto.member).all() and np.isfinite(auto.nonmember).all()
    assert mia.evaluate_attack(auto.member, auto.nonmember)["auc"] > 0.75


def test_lira_out_mask_ignores_in_observations():
    target, shadows = lira_world(k_shadows=4)
    base = mia.lira_offline(target, shadows)
    poisoned = shadows + [two_class_split(np.full(1000, 50.0), np.full(1000, 50.0))]
    mask = np.r_[np.ones((4, 2000), bool), np.zeros((1, 2000), bool)]
    masked = mia.lira_offline(target, poisoned, out_mask=mask)
    assert np.allclose(masked.member, base.member) and np.allclose(masked.nonmember, base.nonmember)
    with pytest.raises(SpuriousError, match="no OUT shadow observation"):
        mia.lira_offline(target, shadows, out_mask=np.zeros((4, 2000), bool))


def test_attack_dispatch_and_errors():
    rng = np.random.default_rng(0)
    target = fake_split(rng, 100)
    assert np.array_equal(mia.run_attack("loss", target).member, mia.loss_attack(target).member)
    assert mia.run_attack("shadow", target, shadow=fake_split(rng, 100)).threshold > 0
    assert len(mia.run_attack("lira", target, shadows_on_target=[fake_split(rng, 100)]).member) == 100
    with pytest.raises(SpuriousError, match="needs a shadow model"):
        mia.run_attack("shadow", target)
    with pytest.raises(SpuriousError, match="at least one shadow"):
        mia.run_attack("lira", target)
    with pytest.raises(SpuriousError, match="'bbox' is not one of loss, shadow, lira"):
        mia.run_attack("bbox", target)
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
    """End to end on the synthetic data: membership quarters, planted target, clean shadows, 3 attacks."""
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
    for name in mia.ATTACKS:
        scores = mia.run_attack(name, target, shadow=shadow, shadows_on_target=on_target)
        row = mia.evaluate_attack(scores.member, scores.nonmember, mask, scores.threshold)
        assert row["n_spurious"] == 5 and row["n_members"] == len(d.y_train) == 225, name
        assert all(0.0 <= row[k] <= 1.0 for k in row if not k.startswith(("n_", "attack_threshold"))), name
