"""Param spaces as plain data, one function per research question, composed with `merge` (protocol §7, §10).

Experimental factors (pattern, count, class, seed) are grid axes; nuisance and mitigation
hyperparameters are sampled. Optimiser variants that change several keys at once are grid axes over
small dicts under a named key; the trainable flattens them. The values use the vocabulary of YAML study
files (`{"grid": [...]}`, `{"loguniform": [low, high]}`, …; see study/space.py, which alone turns
them into Ray Tune objects, expands and counts them): this package imports no Ray.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from spurious.errors import SpuriousError

PAPER_PATTERNS = ("s1", "s2", "s3", "r1", "r2", "r3", "core")
MNIST_COUNTS = (0, 3, 5, 10, 20, 100, 2000, 5000)
CIFAR_COUNTS = (0, 3, 5, 10, 20, 100, 500)
SEEDS = (0, 1, 2, 3, 4)
# Documented upper bound of the noise search: σ = 1 already costs most clean accuracy (protocol §10.4).
NOISE_SIGMA_MAX = 1.0


def grid(values: Iterable[Any]) -> dict:
    """Return a grid axis over `values`: `{"grid": [...]}` in the YAML study-file vocabulary."""
    return {"grid": list(values)}


def merge(*spaces: dict) -> dict:
    """Return the union of param spaces; a key set by two spaces raises (compose, never override)."""
    out: dict = {}
    for space in spaces:
        clash = set(out) & set(space)
        if clash:
            raise SpuriousError(f"search spaces both set {', '.join(sorted(clash))}")
        out.update(space)
    return out


def rarity_grid(patterns: Sequence[str] = PAPER_PATTERNS, n_spurious: Sequence[int] = MNIST_COUNTS,
                targets: Sequence[int] = (0, 1), data_seeds: Sequence[int] = SEEDS) -> dict:
    """Return the pattern × n_spurious × target × data_seed grid (the paper's core design, protocol §7.1)."""
    return {"pattern": grid(patterns), "n_spurious": grid(n_spurious), "target": grid(targets),
            "data_seed": grid(data_seeds)}


def optimizer_space(variants: Sequence[dict]) -> dict:
    """Return a grid over optimiser variants, each a dict of optimizer/lr/grad_clip/momentum settings."""
    return {"optim": grid(variants)}


# The mitigations `study tune-mitigation --mitigations` can search (protocol §10.3, §10.5).
MITIGATIONS = ("l2", "noise", "dp")
# Documented DP-SGD search bounds (protocol §10.5): noise multiplier and per-example clip norm, both log-uniform.
DP_NOISE_RANGE = (0.5, 4.0)
DP_CLIP_RANGE = (0.1, 10.0)


def _bounds(name: str, bounds: tuple[float, float], low_inclusive_zero: bool = False) -> tuple[float, float]:
    lo, hi = bounds
    ok = (0 <= lo <= hi) if low_inclusive_zero else (0 < lo < hi)
    if not ok:
        rule = "0 <= low <= high" if low_inclusive_zero else "0 < low < high"
        raise SpuriousError(f"{name} bounds must satisfy {rule}, got {bounds}")
    return float(lo), float(hi)


def l2_space(l2: tuple[float, float] = (1e-6, 1e-1)) -> dict:
    """Return the weight-decay (L2) search: log-uniform over `l2` (its floor stands in for "off")."""
    return {"l2": {"loguniform": list(_bounds("l2", l2))}}


def noise_space(noise_sigma: tuple[float, float] = (0.0, NOISE_SIGMA_MAX)) -> dict:
    """Return the Gaussian input-noise search: σ uniform over `noise_sigma` (pixel units, images in [0, 1])."""
    return {"noise_sigma": {"uniform": list(_bounds("noise_sigma", noise_sigma, low_inclusive_zero=True))}}


def dp_space(noise_multiplier: tuple[float, float] = DP_NOISE_RANGE,
             max_grad_norm: tuple[float, float] = DP_CLIP_RANGE) -> dict:
    """Return the DP-SGD search (protocol §10.5): noise multiplier σ_DP and per-example clip norm C, both
    log-uniform; every setting trains with DP (σ_DP > 0)."""
    return {"dp_noise_multiplier": {"loguniform": list(_bounds("dp noise multiplier", noise_multiplier))},
            "dp_max_grad_norm": {"loguniform": list(_bounds("dp clip norm", max_grad_norm))}}


def mitigation_space(l2: tuple[float, float] = (1e-6, 1e-1),
                     noise_sigma: tuple[float, float] = (0.0, NOISE_SIGMA_MAX)) -> dict:
    """Return a sampled space: L2 weight log-uniform (its floor stands in for "off") and input-noise σ uniform."""
    return merge(l2_space(l2), noise_space(noise_sigma))


def mitigation_grid(l2: Sequence[float] = (), noise_sigma: Sequence[float] = (),
                    grad_clip: Sequence[float] = (), dp_noise_multiplier: Sequence[float] = (),
                    dp_max_grad_norm: float = 1.0) -> dict:
    """Return a grid over one mitigation at a time plus the unmitigated baseline (protocol §10.2); with
    `dp_noise_multiplier` values also DP-SGD at each noise multiplier with clip norm `dp_max_grad_norm`
    (protocol §10.5; the other variants then carry dp_noise_multiplier = 0)."""
    variants = [{"l2": 0.0, "noise_sigma": 0.0, "grad_clip": 0.0}]
    if dp_noise_multiplier:
        variants[0]["dp_noise_multiplier"] = 0.0
    for key, values in (("l2", l2), ("noise_sigma", noise_sigma), ("grad_clip", grad_clip),
                        ("dp_noise_multiplier", dp_noise_multiplier)):
        extra = {"dp_max_grad_norm": float(dp_max_grad_norm)} if key == "dp_noise_multiplier" else {}
        variants += [{**variants[0], key: float(v), **extra} for v in values]
    return {"mitigation": grid(variants)}


# The optimiser variants of grids G1 and G3 (protocol §7.1).
G1_OPTIMIZERS = (
    {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "grad_clip": 0.0},
    {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "grad_clip": 0.1},
    {"optimizer": "adam", "lr": 0.01, "grad_clip": 0.0},
    {"optimizer": "adam", "lr": 0.01, "grad_clip": 1.0},
    {"optimizer": "adam", "lr": 0.01, "grad_clip": 0.1},
    {"optimizer": "adam", "lr": 0.01, "grad_clip": 0.01},
)
G3_OPTIMIZERS = (
    {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "grad_clip": 0.0},
    {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "grad_clip": 0.1},
    {"optimizer": "adam", "lr": 0.01, "grad_clip": 0.0},
    {"optimizer": "adam", "lr": 0.01, "grad_clip": 0.1},
)


# The two optimisers of the reference's Fashion-MNIST runs with LargeMLP (protocol §7.1).
FASHION_OPTIMIZERS = (
    {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9},
    {"optimizer": "adam", "lr": 0.01},
)


def paper_fashion_space(patterns: Sequence[str] = PAPER_PATTERNS, counts: Sequence[int] = MNIST_COUNTS,
                        targets: Sequence[int] = (0, 1), data_seeds: Sequence[int] = SEEDS,
                        optimizers: Sequence[dict] = FASHION_OPTIMIZERS, epochs: int = 70) -> dict:
    """Return the reference protocol on Fashion-MNIST (protocol §7.2): LargeMLP, batch 128, no weight decay,
    the given optimisers × patterns × counts × classes × data seeds."""
    return merge({"dataset": "fashion", "model": "large_mlp", "epochs": epochs, "batch_size": 128, "l2": 0.0},
                 rarity_grid(patterns, counts, targets, data_seeds), optimizer_space(optimizers))


def two_class_grid(patterns: Sequence[str], n_spurious: Sequence[int], classes: tuple[int, int] = (0, 1),
                   data_seeds: Sequence[int] = SEEDS) -> dict:
    """Return the two-class design (protocol §3.2): the pattern planted into n images of each of `classes`, one
    RandomState, two successive draws; each model is scored once per class (`target` a grid axis over the
    two classes, sharing one training)."""
    return {"targets": list(classes), "target": grid(classes), "pattern": grid(patterns),
            "n_spurious": grid(n_spurious), "data_seed": grid(data_seeds)}


def g1_space() -> dict:
    """Return grid G1: {mnist, fashion} × 7 patterns × n × c × seeds × {LargeMLP, CNN002} × 6 optimisers."""
    return merge({"dataset": grid(["mnist", "fashion"]), "model": grid(["large_mlp", "cnn002"]),
                  "epochs": 70, "batch_size": 128, "l2": 0.0},
                 rarity_grid(PAPER_PATTERNS, MNIST_COUNTS), optimizer_space(G1_OPTIMIZERS))


def g3_space() -> dict:
    """Return grid G3: CIFAR-10 × 7 patterns × n ≤ 500 × c × seeds, aug01 ResNet20, 4 optimisers, wd 1e-4."""
    return merge({"dataset": "cifar10", "model": "resnet20", "augmentation": "aug01", "epochs": 70,
                  "batch_size": 128, "l2": 1e-4},
                 rarity_grid(PAPER_PATTERNS, CIFAR_COUNTS), optimizer_space(G3_OPTIMIZERS))


def regularization_space(dataset: str = "mnist") -> dict:
    """Return the protocol §10.2 sweep: Adam 0.01, class 0, S3, 5 seeds, one mitigation at a time (wd, clip, noise)."""
    if dataset == "cifar10":
        base = {"dataset": "cifar10", "model": "resnet20", "augmentation": "aug01"}
        mitigations = mitigation_grid(l2=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2), noise_sigma=(0.1, 0.2, 0.5, 1.0, 2.0),
                                      grad_clip=(0.01, 0.1, 1.0, 10.0))
        counts = (0, 1, 3, 5, 10, 20, 100, 1000)
    else:
        base = {"dataset": dataset, "model": "large_mlp"}
        mitigations = mitigation_grid(l2=(1e-5, 1e-4, 1e-3, 1e-2, 5e-2, 1e-1),
                                      noise_sigma=(0.05, 0.1, 0.2, 0.5, 0.75, 1.0, 5.0),
                                      grad_clip=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5))
        counts = (0, 1, 3, 5, 10, 20, 100)
    return merge({**base, "optimizer": "adam", "lr": 0.01, "epochs": 70, "batch_size": 128},
                 rarity_grid(["s3"], counts, [0], SEEDS), mitigations)


# DP-SGD against L2 and input noise (protocol §10.5): noise multipliers (clip norm 1) and the L2 and σ values
# whose clean accuracies bracket theirs on Fashion-MNIST with LargeMLP.
DP_COMPARE_NOISE = (0.5, 1.0, 2.0)
DP_COMPARE_L2 = (3e-3, 1e-2, 2e-2)
DP_COMPARE_SIGMA = (0.4, 0.7, 1.0)


def dp_compare_space(patterns: Sequence[str] = ("s3", "r3"), counts: Sequence[int] = (0, 3, 10, 100),
                     data_seeds: Sequence[int] = (0, 1, 2), epochs: int = 4) -> dict:
    """Return the DP comparison (protocol §10.5): Fashion-MNIST, LargeMLP, SGD 0.05 with momentum, batch 256,
    5000 validation images (what the settings are matched on), class 0, patterns × counts × data seeds ×
    {unmitigated, DP at each of DP_COMPARE_NOISE, L2 at each of DP_COMPARE_L2, input noise at each of
    DP_COMPARE_SIGMA}."""
    return merge({"dataset": "fashion", "model": "large_mlp", "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                  "epochs": epochs, "batch_size": 256, "val_size": 5000},
                 rarity_grid(patterns, counts, [0], data_seeds),
                 mitigation_grid(l2=DP_COMPARE_L2, noise_sigma=DP_COMPARE_SIGMA, dp_noise_multiplier=DP_COMPARE_NOISE))


MIA_COUNTS = (1, 3, 5, 10, 20, 100, 1000)


def membership_grid(counts: Sequence[int] = MIA_COUNTS, shadow_subsets: Sequence[int] = (0, 1, 2, 3),
                    data_seeds: Sequence[int] = (0, 1, 2), online: int = 0) -> dict:
    """Return the membership-inference design (protocol §9.2): per data seed (which also seeds the membership
    split), one target model per count (split mia_target, training seed 0), one clean offline shadow model
    per subset (split mia_shadow; subset 0 is the reference's shadow quarter, subset k ≥ 1 a random half of
    the shadow pool; training seed k) and, with `online` > 0, that many online shadow models per count
    (split mia_online, subsets and training seeds 0 … online − 1: random halves of the target's pool, with its
    planted examples), as a grid over `role` variants × data seeds. Offline shadows do not depend on the
    count, so they are trained once per data seed."""
    targets = [{"split": "mia_target", "n_spurious": int(n), "subset": 0, "seed": 0} for n in counts]
    shadows = [{"split": "mia_shadow", "n_spurious": 0, "subset": int(k), "seed": int(k)} for k in shadow_subsets]
    online_shadows = [{"split": "mia_online", "n_spurious": int(n), "subset": k, "seed": k}
                      for n in counts for k in range(online)]
    return {"role": grid(targets + shadows + online_shadows), "data_seed": grid(data_seeds)}
