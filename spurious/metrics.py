"""Spurious score and the other per-epoch metrics (protocol §4)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spurious import patterns
from spurious.errors import SpuriousError

SUBSETS = ("all", "nontarget")
# The per-epoch metric keys, in report order: training metrics, then test metrics (protocol §4.2).
TRAIN_KEYS = ("train_loss", "train_acc")
TEST_KEYS = ("test_loss", "test_acc", "spurious_score", "spurious_score_nontarget", "patterned_acc",
             "patterned_target_rate")
# The same metrics on the validation split (protocol §3.4), reported when a run has one: val_loss, val_acc,
# val_spurious_score, …; model selection and tuning read only these.
VAL_KEYS = tuple("val_" + key.removeprefix("test_") for key in TEST_KEYS)
# A DP-SGD run's privacy guarantee, reported every epoch (`train.Engine.privacy`, protocol §10.5): ε at the δ used,
# and the group-privacy bound (kε, δ_k) for its k planted images. Properties of the training, not of a split.
PRIVACY_KEYS = ("dp_epsilon", "dp_delta_used", "dp_group_epsilon", "dp_group_delta")
# The final epoch's per-test-image indicators r(x) (protocol §4.4), bit-packed (`pack_indicators`).
INDICATORS_KEY = "spurious_indicators"


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
    """Return test loss/accuracy, spurious scores and patterned-image metrics in one pass (protocol §4.1, §4.2):
    `member_metrics` of one model (K = 1) on clean `x` (N, C, H, W) and `x_patterned`, labels `y` (N,)."""
    clean, patterned = logits(model, x, batch_size), logits(model, x_patterned, batch_size)
    y = y.to(clean.device)
    targets = torch.tensor([target], device=clean.device)
    taus = torch.tensor([tau], dtype=torch.float32, device=clean.device)
    return member_metrics(clean[None], patterned[None], y[None], targets, taus)[0]


def member_metrics(clean: torch.Tensor, patterned: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                 tau: torch.Tensor) -> list[dict[str, float]]:
    """Return one dict of TEST_KEYS per model from logits over a leading model axis (protocol §4.1, §4.2).

    clean, patterned: (K, N, classes) logits on the clean and patterned test sets; y: (K, N) labels;
    target: (K,) target classes; tau: (K,) float32 thresholds. The non-target metrics average over the
    examples whose label is not the target (NaN when there are none). Used with K = 1 by `evaluate`
    (hence by `train.Engine`) and with K members by `bundle.BundleEngine`.
    """
    k, n = y.shape
    loss = torch.stack([F.cross_entropy(clean[i], y[i]) for i in range(k)])
    index = target.view(k, 1, 1).expand(k, n, 1)
    p_clean, p_pat = (z.softmax(2).gather(2, index).squeeze(2) for z in (clean, patterned))
    rise = (p_pat - p_clean > tau[:, None]).float()  # r(x) of protocol §4.1, per model and example
    other = (y != target[:, None]).float()
    count, pred = other.sum(1), patterned.argmax(2)
    stats = torch.stack([loss, (clean.argmax(2) == y).float().mean(1), rise.mean(1), (rise * other).sum(1) / count,
                         ((pred == y).float() * other).sum(1) / count,
                         ((pred == target[:, None]).float() * other).sum(1) / count])
    return [dict(zip(TEST_KEYS, column)) for column in stats.T.tolist()]


def evaluate_data(model: torch.nn.Module, data, target: int, tau: float, batch_size: int = 2000) -> dict[str, float]:
    """Return `evaluate` on `data`'s clean and patterned test sets (`x_test`, `y_test`, `x_test_patterned`), plus
    the same on its validation split under VAL_KEYS when it has one (`x_val`, `y_val`, `x_val_patterned` not
    None and non-empty; protocol §4.2). `data` is a PlantedData or anything with those attributes."""
    row = evaluate(model, data.x_test, data.y_test, data.x_test_patterned, target, tau, batch_size)
    if data.x_val is not None and len(data.x_val):
        row.update(val_metrics(evaluate(model, data.x_val, data.y_val, data.x_val_patterned, target, tau,
                                        batch_size)))
    return row


def val_metrics(row: dict[str, float]) -> dict[str, float]:
    """Return a TEST_KEYS row computed on the validation split under VAL_KEYS names."""
    return {v: row[t] for t, v in zip(TEST_KEYS, VAL_KEYS)}


def pack_indicators(rise: torch.Tensor | np.ndarray) -> str:
    """Return the 0/1 indicator vector r(x) (N,) as text: `N:` then the base64 of `numpy.packbits` (big-endian
    bit order; 10,000 test images take 1,674 characters). `unpack_indicators` inverts it."""
    import base64

    bits = np.asarray(rise.detach().cpu() if isinstance(rise, torch.Tensor) else rise) > 0.5
    return f"{len(bits)}:" + base64.b64encode(np.packbits(bits)).decode("ascii")


def unpack_indicators(text: str) -> np.ndarray:
    """Return the uint8 0/1 vector (N,) packed by `pack_indicators`; SpuriousError for malformed text."""
    import base64
    import binascii

    try:
        count, payload = str(text).split(":", 1)
        bits = np.unpackbits(np.frombuffer(base64.b64decode(payload, validate=True), np.uint8))
        n = int(count)
    except (ValueError, binascii.Error):
        raise SpuriousError(f"malformed packed indicators {str(text)[:40]!r}") from None
    if not 0 <= n <= len(bits) < n + 8:
        raise SpuriousError(f"packed indicators say {n} values but hold {len(bits)} bits")
    return bits[:n]


def mean_l2_change(x: torch.Tensor, x_patterned: torch.Tensor) -> float:
    """Return the mean over images of ‖x' − x‖₂ (pixels in [0, 1]): how much a pattern changes an image
    (protocol §4.5), for the rank correlation with the spurious score in reports."""
    diff = (x_patterned.float() - x.float()).flatten(1)
    return float(diff.norm(dim=1).mean())


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
