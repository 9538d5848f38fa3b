"""Spurious score and the other per-epoch metrics (protocol §4)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spurious import patterns
from spurious.errors import SpuriousError

SUBSETS = ("all", "nontarget")


@torch.inference_mode()
def logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Return the model's logits on `x` in eval mode, computed in batches on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out.float()


def rise_indicator(p_clean: torch.Tensor, p_patterned: torch.Tensor, target: int, tau: float) -> torch.Tensor:
    """Return r(x) = 1[p_c(x') − p_c(x) > τ] per example (protocol §4.1)."""
    return (p_patterned[:, target] - p_clean[:, target] > tau).float()


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_patterned: torch.Tensor,
             target: int, tau: float = 0.1, batch_size: int = 2000) -> dict[str, float]:
    """Return test loss/accuracy, spurious scores and patterned-image metrics in one pass (protocol §4.1, §4.2)."""
    y = y.to(next(model.parameters()).device)
    clean, patterned = logits(model, x, batch_size), logits(model, x_patterned, batch_size)
    rise = rise_indicator(clean.softmax(1), patterned.softmax(1), target, tau)
    other = y != target
    pred_patterned = patterned.argmax(1)
    stats = torch.stack([
        F.cross_entropy(clean, y), (clean.argmax(1) == y).float().mean(), rise.mean(), rise[other].mean(),
        (pred_patterned[other] == y[other]).float().mean(), (pred_patterned[other] == target).float().mean(),
    ]).tolist()
    keys = ("test_loss", "test_acc", "spurious_score", "spurious_score_nontarget", "patterned_acc",
            "patterned_target_rate")
    return dict(zip(keys, stats))


def spurious_score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pattern: str, target: int,
                   seed: int, tau: float = 0.1, subset: str = "all") -> float:
    """Return the fraction of test images whose target-class probability rises by more than τ (protocol §4.1)."""
    if subset not in SUBSETS:
        raise SpuriousError(f"subset {subset!r} is not one of {', '.join(SUBSETS)}")
    rise = spurious_indicators(model, x, pattern, target, seed, tau)
    if subset == "nontarget":
        rise = rise[torch.as_tensor(y).to(rise.device) != target]
    return float(rise.mean())


def spurious_indicators(model: torch.nn.Module, x: torch.Tensor, pattern: str, target: int, seed: int,
                        tau: float = 0.1) -> torch.Tensor:
    """Return the per-example indicator vector r(x) on `x` (for the reference's Welch test, protocol §4.4)."""
    clean = logits(model, x).softmax(1)
    patterned = logits(model, patterns.apply(pattern, x, seed)).softmax(1)
    return rise_indicator(clean, patterned, target, tau)


def welch_greater(sample: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray) -> float:
    """Return the p-value of the one-sided Welch t-test that `sample` has a greater mean than `baseline`.

    The reference compares per-example indicator vectors of two models (protocol §4.4); the same test also
    applies to per-seed scores. Fewer than two values on either side give NaN; two constant samples
    give 0.0 when `sample`'s mean is strictly greater and 1.0 otherwise.
    """
    from scipy import stats

    a, b = np.asarray(sample, dtype=float), np.asarray(baseline, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if a.var() == 0 and b.var() == 0:
        return 0.0 if a.mean() > b.mean() else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)
