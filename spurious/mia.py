"""Membership-inference attacks on target models and their metrics (protocol §9).

A target model is trained on the `mia_target` split's training quarter (members, which hold the planted
spurious examples) and tested on its test quarter (non-members); shadow models are trained on the
`mia_shadow` quarters, which are disjoint from the target's, so every target example is OUT for every
shadow model (protocol §9.1). Three attacks give one membership score per target example, higher = "member":

- `loss`: minus the example's cross-entropy (a loss-threshold attack, Yeom et al. 2018);
- `shadow`: the reference's black-box attack (protocol §9.3): a logistic regression on the sorted logits plus a
  correct-prediction bit (11 features for 10 classes), standardised with statistics fitted on the shadow
  features, C chosen by 3-fold cross-validation over {0.01, 0.1, 1, 10}, trained to tell the shadow
  model's training quarter from its test quarter;
- `lira`: offline LiRA (Carlini et al. 2022): a Gaussian fitted to the shadow models' logit-scaled
  confidences on each example, all OUT; the score is the one-sided probability of the target's confidence
  under it.

The evaluation set is balanced and correct: members are the target's training examples and non-members
its test examples. The reference's non-member block repeated the member logits (protocol §11.5); here each block
is scored from its own logits. `evaluate_attack` reports AUC, TPR at 1 % and 0.1 % FPR and attack
accuracy over all examples, and the same over the spurious members alone (protocol §9.4).

    from spurious import mia
    target = mia.split_logits(target_model, data.x_train, data.y_train, data.x_test, data.y_test)
    scores = mia.loss_attack(target)
    row = mia.evaluate_attack(scores.member, scores.nonmember,
                              mia.spurious_mask(len(data.y_train), data.spurious_idx), scores.threshold)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import optimize, special, stats

from spurious import metrics
from spurious.errors import SpuriousError

ATTACKS = ("loss", "shadow", "lira")
C_GRID = (0.01, 0.1, 1.0, 10.0)
LIRA_VARIANCES = ("auto", "per_example", "global")
MIN_STD = 1e-8  # floor on a fitted standard deviation, so constant confidences do not divide by zero
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
    rule (score ≥ threshold → member), or None when accuracy is taken at the best threshold."""

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


def tpr_at_fpr(scores, labels, fpr: float) -> float:
    """Return the highest TPR of any threshold whose FPR is at most `fpr` (Carlini et al. 2022)."""
    curve_fpr, curve_tpr, _ = roc_curve(scores, labels)
    return float(curve_tpr[curve_fpr <= fpr].max())


def best_threshold(scores, labels) -> tuple[float, float]:
    """Return (threshold, accuracy) of the rule "score ≥ threshold → member" that maximises accuracy."""
    scores, labels = _scores_and_labels(scores, labels)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    accuracy = (tpr * n_pos + (1 - fpr) * n_neg) / max(n_pos + n_neg, 1)
    best = int(np.argmax(accuracy))
    return float(thresholds[best]), float(accuracy[best])


def attack_accuracy(scores, labels, threshold: Optional[float] = None) -> float:
    """Return the accuracy of "score ≥ threshold → member"; with no threshold, the best one's."""
    if threshold is None:
        return best_threshold(scores, labels)[1]
    scores, labels = _scores_and_labels(scores, labels)
    return float(((scores >= threshold) == labels).mean())


def _metrics(members: np.ndarray, nonmembers: np.ndarray) -> dict[str, float]:
    """Return AUC and TPR at 1 % and 0.1 % FPR of members against non-members."""
    scores = np.r_[members, nonmembers]
    labels = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    values = (roc_auc(scores, labels), tpr_at_fpr(scores, labels, 0.01), tpr_at_fpr(scores, labels, 0.001))
    return dict(zip(METRIC_KEYS, values))


def evaluate_attack(member_scores, nonmember_scores, spurious_mask: Optional[np.ndarray] = None,
                    threshold: Optional[float] = None) -> dict[str, float]:
    """Return the attack's metrics over all examples and over the spurious members alone (protocol §9.4).

    Over all examples: AUC, TPR at 1 % / 0.1 % FPR, and attack accuracy (at `threshold`, else at the best
    threshold). Over the spurious members: AUC and TPRs against all non-members, and attack accuracy =
    the fraction of them flagged at that same threshold (their TPR, as the reference's `spu_tst_acc`).
    """
    members = np.asarray(member_scores, np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, np.float64).ravel()
    labels = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    if threshold is None:
        threshold = best_threshold(np.r_[members, nonmembers], labels)[0]
    row = _metrics(members, nonmembers)
    row["attack_acc"] = attack_accuracy(np.r_[members, nonmembers], labels, threshold)
    mask = np.zeros(len(members), bool) if spurious_mask is None else np.asarray(spurious_mask, bool)
    if mask.shape != members.shape:
        raise SpuriousError(f"spurious mask has shape {mask.shape}, the members {members.shape}")
    spurious = members[mask]
    nan = float("nan")
    sub = _metrics(spurious, nonmembers) if len(spurious) else dict.fromkeys(METRIC_KEYS, nan)
    row.update({f"spurious_{k}": v for k, v in sub.items()})
    row["spurious_attack_acc"] = float((spurious >= threshold).mean()) if len(spurious) else nan
    row.update(attack_threshold=float(threshold), n_members=len(members), n_nonmembers=len(nonmembers),
               n_spurious=int(mask.sum()))
    return row


# ---------------------------------------------------------------- the attacks

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
    """Return a fold number per example: each class's examples, in order, cut into `folds` contiguous
    parts (scikit-learn's StratifiedKFold without shuffling, up to how remainders are spread)."""
    fold = np.empty(len(t), dtype=np.int64)
    for cls in np.unique(t):
        for k, part in enumerate(np.array_split(np.flatnonzero(t == cls), folds)):
            fold[part] = k
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


def lira_offline(target: SplitLogits, shadows_on_target: Sequence[SplitLogits], variance: str = "auto",
                 out_mask: Optional[np.ndarray] = None) -> AttackScores:
    """Return offline-LiRA scores: −log Pr[Z > φ_target] with Z ~ N(μ_out, σ²_out) fitted, per example,
    to the shadow models' logit-scaled confidences φ on that example when it is not in their training set.

    `shadows_on_target[k]` holds shadow k's logits on the target's members and non-members. `out_mask`
    (K × examples, members first) marks which observations are OUT; by default all are, as with the
    disjoint membership quarters. `variance`: `per_example`, `global` (one σ over all OUT confidences, the
    fallback of Carlini et al. for few shadows) or `auto` (per-example when every example has ≥ 2 OUT
    observations, else global).
    """
    if variance not in LIRA_VARIANCES:
        raise SpuriousError(f"LiRA variance {variance!r} is not one of {', '.join(LIRA_VARIANCES)}")
    if not shadows_on_target:
        raise SpuriousError("LiRA needs at least one shadow model evaluated on the target's examples")
    phi = scaled_confidence(*target.stacked())
    shadow_phi = np.stack([scaled_confidence(*s.stacked()) for s in shadows_on_target])
    out = np.ones(shadow_phi.shape, bool) if out_mask is None else np.asarray(out_mask, bool)
    if out.shape != shadow_phi.shape:
        raise SpuriousError(f"out_mask has shape {out.shape}, expected {shadow_phi.shape}")
    counts = out.sum(0)
    if (counts == 0).any():
        raise SpuriousError(f"{int((counts == 0).sum())} target examples have no OUT shadow observation")
    values = np.where(out, shadow_phi, 0.0)
    mean = values.sum(0) / counts
    per_example = variance == "per_example" or (variance == "auto" and counts.min() >= 2)
    if per_example:
        std = np.sqrt((np.where(out, shadow_phi - mean, 0.0) ** 2).sum(0) / counts)
    else:
        std = np.full_like(mean, shadow_phi[out].std())
    score = -stats.norm.logsf(phi, loc=mean, scale=np.maximum(std, MIN_STD))
    n = len(target.member_labels)
    return AttackScores(score[:n], score[n:])


def run_attack(name: str, target: SplitLogits, shadow: Optional[SplitLogits] = None,
               shadows_on_target: Sequence[SplitLogits] = ()) -> AttackScores:
    """Return the scores of attack `name`: `loss`, `shadow` (needs `shadow`: a shadow model on its own
    quarters) or `lira` (needs `shadows_on_target`: shadow models on the target's quarters)."""
    if name == "loss":
        return loss_attack(target)
    if name == "shadow":
        if shadow is None:
            raise SpuriousError("the shadow attack needs a shadow model's logits on its own train/test "
                                "quarters")
        return shadow_attack(target, shadow)
    if name == "lira":
        return lira_offline(target, shadows_on_target)
    raise SpuriousError(f"attack {name!r} is not one of {', '.join(ATTACKS)}")
