"""Membership-inference attacks on target models and their metrics (protocol §9).

A target model is trained on the `mia_target` split's training quarter (members, which hold the planted
spurious examples) and tested on its test quarter (non-members); shadow (reference) models are trained on
the `mia_shadow` quarters, which are disjoint from the target's, so every target example is OUT for every
shadow model (protocol §9.1). Each attack gives one membership score per example, higher = "member":

- `loss`: minus the example's cross-entropy (a loss-threshold attack, Yeom et al. 2018);
- `shadow`: the reference's black-box attack (protocol §9.3): a logistic regression on the sorted logits plus a
  correct-prediction bit (11 features for 10 classes), standardised with statistics fitted on the shadow
  features, C chosen by 3-fold cross-validation over {0.01, 0.1, 1, 10}, trained to tell the shadow
  model's training quarter from its test quarter;
- LiRA (Carlini et al. 2022) on the logit-scaled confidence φ = log(p_y / (1 − p_y)): offline
  (`lira_offline_scores`: −log Pr[Z > φ] under a Gaussian fitted to OUT reference models) and online
  (`lira_online_scores`: the log-likelihood ratio of IN and OUT Gaussians); the variance is per example
  with at least `GLOBAL_VARIANCE_BELOW` = 64 reference models and global below (Carlini et al. 2022);
- RMIA (Zarifzadeh, Liu & Shokri 2024, `rmia_scores`): the fraction of population samples z that x
  dominates in the pairwise likelihood ratio [Pr(x|θ)/Pr(x)] / [Pr(z|θ)/Pr(z)], online or offline
  (protocol §9.7).

`per_example_tpr` measures each example's vulnerability over many target models (Carlini et al. 2022):
the fraction of the targets that trained on it which flag it at a fixed low FPR.

Metrics (protocol §9.4, §9.6): the area under the ROC curve (AUROC, `auc`), the true-positive rate at a
fixed low false-positive rate (TPR at 1 % and 0.1 % FPR), and the attack success rate (accuracy, `attack_acc`)
of the rule "score ≥ t → member". The FPR rule is `lt` by default: the highest TPR of any threshold
whose FPR is strictly below the target, as Carlini et al.'s evaluation code computes it; `le` allows FPR
equal to it.

Thresholds are calibrated as an attacker must (protocol §9.6): t comes from data whose membership the
attacker knows — a shadow model's own members and non-members (`calibrate_threshold`,
`threshold_at_fpr`) or the attack's own rule (the logistic regression's log-odds > 0). A threshold chosen
with the target's own membership labels is a best case, and every result built on one ends in `_oracle`.

The evaluation set is balanced and correct: members are the target's training examples and non-members
its test examples. The reference's non-member block repeated the member logits (protocol §11.5); here each block
is scored from its own logits.

    from spurious import mia
    target = mia.split_logits(target_model, data.x_train, data.y_train, data.x_test, data.y_test)
    shadow = mia.split_logits(shadow_model, shadow_data.x_train, shadow_data.y_train,
                              shadow_data.x_test, shadow_data.y_test)
    on_shadow = mia.loss_attack(shadow)
    threshold = mia.calibrate_threshold(on_shadow.member, on_shadow.nonmember)
    scores = mia.loss_attack(target)
    row = mia.evaluate_attack(scores.member, scores.nonmember,
                              mia.spurious_mask(len(data.y_train), data.spurious_idx), threshold)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import optimize, special, stats

from spurious import metrics
from spurious.errors import SpuriousError

# Offline attacks need clean shadow models that never saw the target's pool; online ones need models trained on
# random halves of it (protocol §9.2).
OFFLINE_ATTACKS = ("loss", "shadow", "lira", "rmia")
ONLINE_ATTACKS = ("lira_online", "rmia_online")
ATTACKS = OFFLINE_ATTACKS + ONLINE_ATTACKS
C_GRID = (0.01, 0.1, 1.0, 10.0)
LIRA_VARIANCES = ("auto", "per_example", "global")
GLOBAL_VARIANCE_BELOW = 64  # `auto`: a global LiRA variance below this many reference models (Carlini et al. 2022)
FPR_RULES = ("lt", "le")  # a threshold counts at FPR target f when its FPR is < f ("lt") or ≤ f ("le")
MIN_STD = 1e-8  # floor on a fitted standard deviation, so constant confidences do not divide by zero
TINY = np.finfo(np.float64).tiny  # floor on RMIA probabilities, so an underflowed softmax stays positive
METRIC_KEYS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")


@dataclass(frozen=True)
class SplitLogits:
    """One model's logits (float64 numpy) and the labels on a member set and a non-member set."""

    member_logits: np.ndarray
    member_labels: np.ndarray
    nonmember_logits: np.ndarray
    nonmember_labels: np.ndarray

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (logits, labels) of the members followed by the non-members."""
        return (np.concatenate([self.member_logits, self.nonmember_logits]),
                np.concatenate([self.member_labels, self.nonmember_labels]))


@dataclass(frozen=True)
class AttackScores:
    """Membership scores of the members and the non-members; `threshold` is the attack's own decision
    rule (score ≥ threshold → member) when it has one, fixed without the target's membership labels
    (the shadow attack's log-odds > 0), else None and the caller calibrates one (`calibrate_threshold`)."""

    member: np.ndarray
    nonmember: np.ndarray
    threshold: Optional[float] = None


def split_logits(model: torch.nn.Module, x_members: torch.Tensor, y_members: torch.Tensor,
                 x_nonmembers: torch.Tensor, y_nonmembers: torch.Tensor,
                 batch_size: int = 2000) -> SplitLogits:
    """Return the model's logits (eval mode) on a member set and a non-member set."""
    def run(x):
        return metrics.logits(model, x, batch_size).cpu().double().numpy()
    def labels(y):
        return torch.as_tensor(y).cpu().numpy()
    return SplitLogits(run(x_members), labels(y_members), run(x_nonmembers), labels(y_nonmembers))


def spurious_mask(n_members: int, spurious_idx: Sequence[int]) -> np.ndarray:
    """Return a boolean mask over the members that marks the planted spurious examples."""
    mask = np.zeros(n_members, dtype=bool)
    mask[np.asarray(spurious_idx, dtype=np.int64)] = True
    return mask


# ---------------------------------------------------------------- per-example statistics of logits

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - special.logsumexp(logits, axis=1, keepdims=True)


def loss_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return minus the cross-entropy of each example (higher = more member-like)."""
    return _log_softmax(np.asarray(logits, np.float64))[np.arange(len(labels)), labels]


def true_label_probability(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return softmax(logits)[label] per example, float64, as exp(log-softmax) (RMIA's Pr(x|θ))."""
    return np.exp(loss_scores(logits, labels))


def scaled_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return log(p_y / (1 − p_y)) per example, computed stably as z_y − logsumexp_{j≠y} z_j (LiRA)."""
    logits = np.asarray(logits, np.float64)
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return logits[rows, labels] - special.logsumexp(others, axis=1)


def attack_features(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the reference's attack features: the logits sorted ascending, then 1[prediction correct]."""
    logits = np.asarray(logits, np.float64)
    correct = (logits.argmax(1) == np.asarray(labels)).astype(np.float64)
    return np.column_stack([np.sort(logits, axis=1), correct])


# ---------------------------------------------------------------- metrics on scores

def _scores_and_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).astype(bool).ravel()
    if len(scores) != len(labels):
        raise SpuriousError(f"{len(scores)} scores but {len(labels)} labels")
    if np.isnan(scores).any():
        raise SpuriousError("membership scores contain NaN")
    return scores, labels


def _labelled(members, nonmembers) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores, labels) of members (label True) followed by non-members (label False)."""
    members = np.asarray(members, np.float64).ravel()
    nonmembers = np.asarray(nonmembers, np.float64).ravel()
    return np.r_[members, nonmembers], np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (fpr, tpr, thresholds) of the rule "score ≥ threshold → member", thresholds descending from
    +inf (nobody flagged) through every distinct score; tied scores enter together."""
    scores, labels = _scores_and_labels(scores, labels)
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], labels[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
    tp, fp = np.cumsum(pos)[last_of_tie], np.cumsum(~pos)[last_of_tie]
    n_pos, n_neg = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, s[last_of_tie]])


def roc_auc(scores, labels) -> float:
    """Return the ROC AUC = P(member score > non-member score) + ½ P(tie), from average ranks (Mann–Whitney);
    NaN when either class is empty."""
    scores, labels = _scores_and_labels(scores, labels)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)  # ties get their average rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _within(curve_fpr: np.ndarray, fpr: float, rule: str) -> np.ndarray:
    """Return which points of an ROC curve satisfy the FPR rule: FPR < fpr (`lt`) or FPR ≤ fpr (`le`)."""
    if rule not in FPR_RULES:
        raise SpuriousError(f"FPR rule {rule!r} is not one of {', '.join(FPR_RULES)}")
    if not (0.0 < fpr <= 1.0 if rule == "lt" else 0.0 <= fpr <= 1.0):
        bounds = "(0, 1]" if rule == "lt" else "[0, 1]"
        raise SpuriousError(f"target FPR {fpr!r} is not in {bounds} (rule {rule!r})")
    return curve_fpr < fpr if rule == "lt" else curve_fpr <= fpr


def tpr_at_fpr(scores, labels, fpr: float, rule: str = "lt") -> float:
    """Return the highest TPR of any rule "score ≥ t → member" whose FPR is below `fpr` (protocol §9.6).

    `rule` (FPR_RULES): `lt`, the default, counts only FPR strictly below `fpr`, as the released evaluation
    code of Carlini et al. (2022) computes it (`tpr[fpr < .001]`); `le` also counts FPR equal to it. They
    differ only when some threshold's FPR is exactly `fpr`: with 1000 non-members, `lt` at 0.1 % allows no
    false positive, `le` one. Flagging nobody (FPR 0) always qualifies, so the result is at least 0; `fpr`
    must lie in (0, 1] for `lt` and [0, 1] for `le`.
    """
    curve_fpr, curve_tpr, _ = roc_curve(scores, labels)
    return float(curve_tpr[_within(curve_fpr, fpr, rule)].max())


def threshold_at_fpr(nonmember_scores, fpr: float, rule: str = "lt") -> float:
    """Return the lowest threshold t of "score ≥ t → member" whose FPR on these non-members (a shadow
    model's, or a target's OUT examples in `per_example_tpr`) is below `fpr` by `rule` (protocol §9.6).

    If flagging the non-members down to score s breaks the rule, every t in (s, next higher score] gives the
    same FPR; the lowest float above s is returned, so that on new scores it flags exactly what the best
    threshold of `tpr_at_fpr` would (members strictly above s). −inf when no non-member breaks the rule.
    """
    scores = np.asarray(nonmember_scores, np.float64).ravel()
    if not len(scores):
        raise SpuriousError("threshold_at_fpr needs at least one non-member score")
    curve_fpr, _, thresholds = roc_curve(scores, np.zeros(len(scores), bool))
    broken = ~_within(curve_fpr, fpr, rule)
    if not broken.any():
        return -np.inf
    return float(np.nextafter(thresholds[broken][0], np.inf))


def best_threshold(scores, labels) -> tuple[float, float]:
    """Return (threshold, accuracy) of the rule "score ≥ threshold → member" that maximises accuracy on
    these labels; the highest such threshold on ties."""
    scores, labels = _scores_and_labels(scores, labels)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    accuracy = (tpr * n_pos + (1 - fpr) * n_neg) / max(n_pos + n_neg, 1)
    best = int(np.argmax(accuracy))
    return float(thresholds[best]), float(accuracy[best])


def calibrate_threshold(member_scores, nonmember_scores) -> float:
    """Return the accuracy-maximising threshold of "score ≥ t → member" on a SHADOW model's known members
    and non-members, for use on a target (protocol §9.6)."""
    return best_threshold(*_labelled(member_scores, nonmember_scores))[0]


def attack_accuracy(scores, labels, threshold: float) -> float:
    """Return the accuracy of "score ≥ threshold → member" (the attack success rate)."""
    scores, labels = _scores_and_labels(scores, labels)
    return float(((scores >= threshold) == labels).mean())


def _flag_rate(scores: np.ndarray, threshold: float) -> float:
    """Return the fraction of scores ≥ threshold; NaN when there are none."""
    return float((scores >= threshold).mean()) if len(scores) else float("nan")


def _metrics(members: np.ndarray, nonmembers: np.ndarray, rule: str) -> dict[str, float]:
    """Return AUC and TPR at 1 % and 0.1 % FPR of members against non-members; NaN with no members."""
    if not len(members):
        return dict.fromkeys(METRIC_KEYS, float("nan"))
    scores, labels = _labelled(members, nonmembers)
    values = (roc_auc(scores, labels), tpr_at_fpr(scores, labels, 0.01, rule),
              tpr_at_fpr(scores, labels, 0.001, rule))
    return dict(zip(METRIC_KEYS, values))


def evaluate_attack(member_scores, nonmember_scores, spurious_mask: Optional[np.ndarray],
                    threshold: Optional[float], fpr_rule: str = "lt") -> dict[str, float]:
    """Return the attack's metrics over all members, the spurious members and the other members, each
    against all non-members (protocol §9.4, §9.6).

    `threshold` (required) must be calibrated without the target's membership labels: on a shadow model's
    members/non-members (`calibrate_threshold`) or the attack's own rule. At it: `attack_acc` (accuracy over
    all members and non-members), `spurious_attack_acc` / `other_attack_acc` (the fraction of spurious /
    other members flagged, their TPR, as the reference's `spu_tst_acc`) and `nonmember_flag_rate` (the
    realised FPR on the target). The same three accuracies ending in `_oracle` are taken at
    `attack_threshold_oracle`, the threshold that maximises `attack_acc` on the target's own labels (a
    best case no attacker can choose). `auc`, `tpr_at_1pct_fpr`, `tpr_at_0_1pct_fpr` (rule `fpr_rule`) and
    their `spurious_` and `other_` versions do not depend on a threshold; NaN for an empty group.
    """
    if threshold is None or np.isnan(threshold):
        raise SpuriousError("evaluate_attack needs a threshold calibrated without the target's membership "
                            "labels (calibrate_threshold on a shadow model, or the attack's own rule), "
                            f"not {threshold}")
    members, nonmembers = (np.asarray(s, np.float64).ravel() for s in (member_scores, nonmember_scores))
    mask = np.zeros(len(members), bool) if spurious_mask is None else np.asarray(spurious_mask, bool)
    if mask.shape != members.shape:
        raise SpuriousError(f"spurious mask has shape {mask.shape}, the members {members.shape}")
    groups = {"": members, "spurious_": members[mask], "other_": members[~mask]}
    oracle, oracle_acc = best_threshold(*_labelled(members, nonmembers))
    row = {f"{prefix}{k}": v for prefix, group in groups.items()
           for k, v in _metrics(group, nonmembers, fpr_rule).items()}
    row.update(attack_acc=attack_accuracy(*_labelled(members, nonmembers), threshold),
               spurious_attack_acc=_flag_rate(groups["spurious_"], threshold),
               other_attack_acc=_flag_rate(groups["other_"], threshold),
               nonmember_flag_rate=_flag_rate(nonmembers, threshold), attack_threshold=float(threshold),
               attack_acc_oracle=oracle_acc, spurious_attack_acc_oracle=_flag_rate(groups["spurious_"], oracle),
               other_attack_acc_oracle=_flag_rate(groups["other_"], oracle), attack_threshold_oracle=oracle,
               n_members=len(members), n_nonmembers=len(nonmembers), n_spurious=int(mask.sum()),
               n_other=int((~mask).sum()))
    return row


def per_example_tpr(scores, in_mask, fpr: float, rule: str = "lt") -> tuple[np.ndarray, np.ndarray]:
    """Return (tpr, n_in), each (N,): per-example vulnerability over T target models (Carlini et al. 2022).

    `scores` (T, N) are T target models' membership scores on the same N examples, `in_mask` (T, N) whether
    each example is IN (trained on) for each target. For every target, the threshold is the lowest whose
    FPR on that target's OUT examples is below `fpr` (`threshold_at_fpr`, `rule`); an example's TPR is the
    fraction of the targets where it is IN that flag it. NaN scores are ignored (neither counted in
    `n_in` nor flagged); the TPR is NaN for an example with no IN score. Raises if a target has no OUT score.
    """
    scores, inn = np.asarray(scores, np.float64), np.asarray(in_mask, bool)
    if scores.ndim != 2 or inn.shape != scores.shape:
        raise SpuriousError(f"scores {scores.shape} and in_mask {inn.shape} must be the same (T, N) shape")
    valid = ~np.isnan(scores)
    flagged = np.zeros(scores.shape, bool)
    for t in range(len(scores)):
        out = scores[t, valid[t] & ~inn[t]]
        if not len(out):
            raise SpuriousError(f"target {t} has no OUT example with a score to set its threshold")
        flagged[t] = scores[t] >= threshold_at_fpr(out, fpr, rule)
    n_in = (inn & valid).sum(0)
    hits = (flagged & inn).sum(0)  # a NaN score is never flagged
    return np.where(n_in > 0, hits / np.maximum(n_in, 1), np.nan), n_in


def dp_tpr_bound(epsilon, delta, fpr):
    """Return the highest TPR any membership test can reach at false-positive rate `fpr` against a model trained
    by an (ε, δ)-DP algorithm: min(1, e^ε·FPR + δ, 1 − e^{−ε}·(1 − δ − FPR)), the hypothesis-testing region of
    (ε, δ)-DP (Kairouz, Oh & Viswanath 2015, Theorem 2.1; Wasserman & Zhou 2010). For k examples together use
    the group bound (kε, k·e^{(k−1)ε}·δ) (`spurious.dp.group_epsilon`). ε = ∞ (no DP) gives 1, NaN gives NaN;
    elementwise over arrays (a float for scalars)."""
    eps, dlt = np.asarray(epsilon, np.float64), np.asarray(delta, np.float64)
    fpr = np.asarray(fpr, np.float64)
    finite = np.isfinite(eps)
    safe = np.where(finite, eps, 0.0)
    with np.errstate(over="ignore"):
        bound = np.minimum(np.exp(safe) * fpr + dlt, 1 - np.exp(-safe) * (1 - dlt - fpr))
    out = np.where(finite, np.minimum(1.0, bound), np.where(np.isnan(eps), np.nan, 1.0))
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------- the loss and shadow attacks

def loss_attack(target: SplitLogits) -> AttackScores:
    """Return loss-threshold membership scores (−cross-entropy) of the target's members and non-members."""
    return AttackScores(loss_scores(target.member_logits, target.member_labels),
                        loss_scores(target.nonmember_logits, target.nonmember_labels))


def fit_logistic(x: np.ndarray, t: np.ndarray, c: float) -> np.ndarray:
    """Return [w, b] minimising C·Σ log-loss + ½‖w‖² (intercept unpenalised, as scikit-learn's lbfgs)."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)

    def objective(params):
        w, b = params[:-1], params[-1]
        z = x @ w + b
        residual = special.expit(z) - t
        loss = c * (np.logaddexp(0.0, z) - t * z).sum() + 0.5 * w @ w
        return loss, np.r_[c * x.T @ residual + w, c * residual.sum()]

    result = optimize.minimize(objective, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                               options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15})
    return result.x


def decision(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Return the logistic regression's log-odds of membership."""
    return np.asarray(x, np.float64) @ params[:-1] + params[-1]


def stratified_folds(t: np.ndarray, folds: int) -> np.ndarray:
    """Return a fold number (0 … folds − 1) per example, stratified as scikit-learn's StratifiedKFold without
    shuffling (the reference's GridSearchCV, protocol §9.3): each class's examples, in order, are cut into
    contiguous blocks, one per fold, whose sizes are the class's counts when the labels, numbered by order of
    first appearance and sorted, are dealt round-robin to the folds (so remainders are spread over the folds
    across classes, not within each)."""
    t = np.asarray(t)
    values, first = np.unique(t, return_index=True)
    classes = values[np.argsort(first)]  # in order of first appearance
    code = np.empty(len(t), dtype=np.int64)
    for j, cls in enumerate(classes):
        code[t == cls] = j
    dealt = np.sort(code)
    sizes = np.array([np.bincount(dealt[k::folds], minlength=len(classes)) for k in range(folds)])
    fold = np.empty(len(t), dtype=np.int64)
    for j in range(len(classes)):
        fold[code == j] = np.repeat(np.arange(folds), sizes[:, j])
    return fold


def choose_c(x: np.ndarray, t: np.ndarray, grid: Sequence[float] = C_GRID, folds: int = 3) -> float:
    """Return the C of `grid` with the best mean cross-validated accuracy (first of ties, as GridSearchCV)."""
    fold = stratified_folds(t, folds)

    def fold_accuracy(c, k):
        params = fit_logistic(x[fold != k], t[fold != k], c)
        return ((decision(params, x[fold == k]) > 0) == t[fold == k]).mean()

    def cv_accuracy(c):
        return float(np.mean([fold_accuracy(c, k) for k in range(folds)]))
    return float(grid[int(np.argmax([cv_accuracy(c) for c in grid]))])


def standardizer(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean, std) per column; a constant column gets std 1 (as scikit-learn's StandardScaler)."""
    std = features.std(0)
    return features.mean(0), np.where(std > 0, std, 1.0)


def shadow_attack(target: SplitLogits, shadow: SplitLogits, grid: Sequence[float] = C_GRID,
                  folds: int = 3) -> AttackScores:
    """Return the reference's shadow-model attack (protocol §9.3): scores are the log-odds of a logistic regression
    trained on the shadow model's own members/non-members; its decision is log-odds > 0."""
    shadow_logits, shadow_labels = shadow.stacked()
    x = attack_features(shadow_logits, shadow_labels)
    t = np.r_[np.ones(len(shadow.member_labels)), np.zeros(len(shadow.nonmember_labels))]
    mean, std = standardizer(x)
    x = (x - mean) / std
    params = fit_logistic(x, t, choose_c(x, t, grid, folds))

    def score(logits, labels):
        return decision(params, (attack_features(logits, labels) - mean) / std)
    # scikit-learn predicts "member" iff log-odds > 0, i.e. ≥ the smallest positive float
    return AttackScores(score(target.member_logits, target.member_labels),
                        score(target.nonmember_logits, target.nonmember_labels),
                        threshold=float(np.nextafter(0.0, 1.0)))


# ---------------------------------------------------------------- LiRA (Carlini et al. 2022)

def _per_example_variance(variance: str, n_refs: int) -> bool:
    """Return whether `variance` means per-example σ with `n_refs` reference models (`auto`: ≥ 64)."""
    if variance not in LIRA_VARIANCES:
        raise SpuriousError(f"LiRA variance {variance!r} is not one of {', '.join(LIRA_VARIANCES)}")
    return n_refs >= GLOBAL_VARIANCE_BELOW if variance == "auto" else variance == "per_example"


def _lira_inputs(phi_target, phi_refs, mask, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return phi_target (N,), phi_refs (K, N) as float64 and `mask` (K, N) as bool (None: all True)."""
    phi, refs = np.asarray(phi_target, np.float64), np.asarray(phi_refs, np.float64)
    if phi.ndim != 1 or refs.ndim != 2 or refs.shape[1] != len(phi) or not len(refs):
        raise SpuriousError(f"LiRA needs phi_target (N,) and phi_refs (K ≥ 1, N); got {phi.shape}, {refs.shape}")
    mask = np.ones(refs.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != refs.shape:
        raise SpuriousError(f"{name} has shape {mask.shape}, expected {refs.shape}")
    return phi, refs, mask


def _gaussian(refs: np.ndarray, mask: np.ndarray, per_example: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean, std) per example of the observations `mask` selects; NaN mean where it selects none.

    The global σ is the population standard deviation of all selected observations together (as in
    Carlini et al.'s released code); per-example σ uses each example's own, falling back to the global σ
    for an example with fewer than two observations. Both are floored at MIN_STD.
    """
    counts = mask.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(mask, refs, 0.0).sum(0) / counts
    std = np.full(len(mean), refs[mask].std() if mask.any() else np.nan)
    own = counts >= 2
    if per_example and own.any():
        squares = (np.where(mask, refs - mean, 0.0) ** 2).sum(0)
        std[own] = np.sqrt(squares[own] / counts[own])
    return mean, np.maximum(std, MIN_STD)


def lira_offline_scores(phi_target, phi_refs, out_mask: Optional[np.ndarray] = None,
                        variance: str = "auto") -> np.ndarray:
    """Return offline-LiRA scores (N,): −log Pr[Z > φ_target] with Z ~ N(μ_out, σ²_out) per example, the
    one-sided test of Carlini et al. (2022, offline variant).

    phi_target (N,): the target model's logit-scaled confidences (`scaled_confidence`); phi_refs (K, N): K
    reference models' on the same examples; out_mask (K, N): which reference observations are OUT (default
    all). `variance`: `per_example`, `global`, or `auto` (global with fewer than GLOBAL_VARIANCE_BELOW = 64
    reference models, per-example from 64 on: Carlini et al. find a global variance better with few
    shadows); see `_gaussian`. An example with no OUT observation gets NaN: the caller drops it.
    Protocol §9.7.
    """
    phi, refs, out = _lira_inputs(phi_target, phi_refs, out_mask, "out_mask")
    mean, std = _gaussian(refs, out, _per_example_variance(variance, len(refs)))
    return -special.log_ndtr((mean - phi) / std)  # log Pr[Z > φ] = log Φ((μ − φ) / σ)


def _normal_logpdf(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)


def lira_online_scores(phi_target, phi_refs, in_mask: np.ndarray, variance: str = "auto") -> np.ndarray:
    """Return online-LiRA scores (N,): log N(φ; μ_in, σ²_in) − log N(φ; μ_out, σ²_out) per example
    (Carlini et al. 2022), the IN/OUT means per example over the references where it is IN/OUT.

    Shapes and `variance` as `lira_offline_scores`; in_mask (K, N) marks the IN observations, the rest are
    OUT. With a global variance, σ_in is the spread of all IN observations and σ_out of all OUT ones.
    An example lacking IN or OUT observations gets NaN.
    """
    phi, refs, inn = _lira_inputs(phi_target, phi_refs, in_mask, "in_mask")
    per_example = _per_example_variance(variance, len(refs))
    mean_in, std_in = _gaussian(refs, inn, per_example)
    mean_out, std_out = _gaussian(refs, ~inn, per_example)
    return _normal_logpdf(phi, mean_in, std_in) - _normal_logpdf(phi, mean_out, std_out)


def lira_offline(target: SplitLogits, shadows_on_target: Sequence[SplitLogits], variance: str = "auto",
                 out_mask: Optional[np.ndarray] = None) -> AttackScores:
    """Return `lira_offline_scores` of the target's members and non-members: `shadows_on_target[k]` holds
    shadow k's logits on them, `out_mask` (K × examples, members first) its OUT observations (default all,
    as with the disjoint membership quarters). Raises if an example has no OUT observation."""
    if not shadows_on_target:
        raise SpuriousError("LiRA needs at least one shadow model evaluated on the target's examples")
    phi = scaled_confidence(*target.stacked())
    shadow_phi = np.stack([scaled_confidence(*s.stacked()) for s in shadows_on_target])
    out = _lira_inputs(phi, shadow_phi, out_mask, "out_mask")[2]
    if (missing := int((out.sum(0) == 0).sum())):
        raise SpuriousError(f"{missing} target examples have no OUT shadow observation")
    score = lira_offline_scores(phi, shadow_phi, out, variance)
    n = len(target.member_labels)
    return AttackScores(score[:n], score[n:])


# ---------------------------------------------------------------- RMIA (Zarifzadeh, Liu & Shokri 2024)

def _rmia_inputs(p_target, p_refs, in_mask, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return p_target (M,) and p_refs (K, M) as float64 floored at TINY, after checking shapes and range."""
    p, refs = np.asarray(p_target, np.float64), np.asarray(p_refs, np.float64)
    if p.ndim != 1 or refs.ndim != 2 or refs.shape[1] != len(p) or not len(refs) or not len(p):
        raise SpuriousError(f"RMIA needs p_target_{name} (M ≥ 1,) and p_refs_{name} (K ≥ 1, M); "
                            f"got {p.shape}, {refs.shape}")
    if not all(((a >= 0) & (a <= 1)).all() for a in (p, refs)):
        raise SpuriousError(f"RMIA probabilities of {name} must lie in [0, 1]")
    if in_mask is not None and np.shape(in_mask) != refs.shape:
        raise SpuriousError(f"in_mask_{name} has shape {np.shape(in_mask)}, expected {refs.shape}")
    return np.maximum(p, TINY), np.maximum(refs, TINY)


def _marginal(p_refs: np.ndarray, online: bool, offline_a: float) -> np.ndarray:
    """Return Pr(·) per point: the mean over all reference models (online), or ½[(1 + a)·mean_OUT + (1 − a)]
    with every reference OUT (offline, RMIA's linear approximation of the missing IN models)."""
    mean = p_refs.mean(0)
    return mean if online else 0.5 * ((1 + offline_a) * mean + (1 - offline_a))


def rmia_scores(p_target_x, p_refs_x, p_target_z, p_refs_z, in_mask_x: Optional[np.ndarray] = None,
                in_mask_z: Optional[np.ndarray] = None, gamma: float = 1.0, offline_a: float = 0.3) -> np.ndarray:
    """Return RMIA scores (N,) (Zarifzadeh, Liu & Shokri, ICML 2024): the fraction of population samples z
    with LR(x, z) = [Pr(x|θ)/Pr(x)] / [Pr(z|θ)/Pr(z)] ≥ `gamma`, θ the target model.

    p_target_x (N,), p_target_z (Z,): the target's probability of the true label (`true_label_probability`)
    on the examples and on the population samples; p_refs_x (K, N), p_refs_z (K, Z): the K reference
    models'. Pr(·) is the mean over reference models of Pr(·|θ_ref): with `in_mask_*` (K, ·) given, over
    every reference, IN and OUT (the online attack, references trained on random halves so that each point
    is IN for about half of them); with None, every reference is OUT and Pr(·) = ½[(1 + a)·mean_OUT +
    (1 − a)], a = `offline_a` (the offline attack). Each set picks its own estimate, so offline population
    samples (never trained on) go with online examples. Probabilities are floored at TINY. Protocol §9.7.

    Source: the paper's pairwise likelihood ratio LR_θ(x, z), its score Pr_z(LR_θ(x, z) ≥ γ) and its offline
    approximation of Pr(x); the equation numbers are not cited because the paper's text could not be
    consulted here. The formulas match the authors' released code (ml_privacy_meter, `run_rmia`), which
    counts LR > 1 strictly where the paper and this function use ≥ γ.
    """
    if not gamma > 0 or not 0 <= offline_a <= 1:
        raise SpuriousError(f"RMIA needs gamma > 0 and 0 ≤ offline_a ≤ 1; got {gamma}, {offline_a}")
    px, refs_x = _rmia_inputs(p_target_x, p_refs_x, in_mask_x, "x")
    pz, refs_z = _rmia_inputs(p_target_z, p_refs_z, in_mask_z, "z")
    ratio_x = px / _marginal(refs_x, in_mask_x is not None, offline_a)
    ratio_z = np.sort(pz / _marginal(refs_z, in_mask_z is not None, offline_a))
    # ratios are positive, so LR(x, z) ≥ γ ⇔ ratio_z ≤ ratio_x / γ: count by binary search, not an N × Z matrix
    return np.searchsorted(ratio_z, ratio_x / gamma, side="right") / len(ratio_z)
