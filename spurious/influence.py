"""Group-influence deletion: LiSSA inverse-Hessian-vector products and the first-order group update (protocol §8).

The reference's LiSSA recursion (Agarwal et al. 2017, as used by Koh & Liang 2017) is

    h_t = v + (1 − d)·h_{t−1} − (1/s)·H_t h_{t−1},        h_0 = v,

whose fixed point is h = s·(H + d·s·I)⁻¹ v; the reference keeps h un-divided (protocol §8.3, §11.3),
so its scale s is at once a step size, a factor s on the result and part of the damping d·s. Here the
recursion runs with d = λ/s and the result is divided by s, so the estimate is of (H + λI)⁻¹ v with
λ = `damping`, whatever the scale; s only sets the step and must exceed about half of H's largest
eigenvalue for the recursion to converge. Mapping, exactly:

    reference (d, s)  ==  s · ours(damping = d·s, scale = s)
    ours (λ, s)       ==  reference(d = λ/s, s) / s

`reference_scaling=True` runs the reference verbatim (`damping` is then its d, and the result is not
divided), for reproducing its numbers. With the protocol §8.2 defaults (d = 0.01, s = 100) the reference
estimates 100·(H + I)⁻¹ v, while ours estimates (H + 0.01·I)⁻¹ v: the reference's update is up to s
times larger along high-curvature directions and much more damped along flat ones.

    from spurious import influence
    lissa = influence.defaults_for("fashion", n=20)
    new_model = influence.group_influence_update(model, x_group, y_group, x_train, y_train, **lissa)
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from spurious import datasets
from spurious.errors import SpuriousError
from spurious.train import TrainingError

LossFn = Callable[[nn.Module], torch.Tensor]

# protocol §8.2: (scale, depth when n >= 100, depth when n < 100); damping 0.01 and repeats 10 everywhere.
REFERENCE_DEFAULTS = {"fashion": (100.0, 1000, 2000), "cifar10": (100.0, 1000, 1000),
                      "mnist": (25.0, 1000, 2000)}
DEFAULT_DAMPING = 0.01
DEFAULT_REPEATS = 10
DEFAULT_MAX_NORM_RATIO = 1e6
CHECK_EVERY = 100  # steps between divergence checks (each check syncs with the device)


def defaults_for(dataset: str, n: int) -> dict:
    """Return the reference's LiSSA settings for `dataset` and group size `n` (protocol §8.2)."""
    name = datasets.DATASETS.canonical(dataset)
    if name not in REFERENCE_DEFAULTS:
        raise SpuriousError(f"no group-influence defaults for dataset {dataset!r}; "
                            f"known: {', '.join(REFERENCE_DEFAULTS)}")
    scale, depth_large, depth_small = REFERENCE_DEFAULTS[name]
    return {"depth": depth_large if n >= 100 else depth_small, "scale": scale, "damping": DEFAULT_DAMPING,
            "repeats": DEFAULT_REPEATS}


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters that require gradients (θ of protocol §8.3), in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False) -> torch.Tensor:
    """Return ∇θ loss as one flat vector (zeros for parameters the loss does not use)."""
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def hvp(model: nn.Module, loss_fn: LossFn, params: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """Return H v, the Hessian of `loss_fn(model)` in `params` times the flat vector v (double backprop)."""
    grad = flat_grad(loss_fn(model), params, create_graph=True)
    return flat_grad(grad @ v, params).detach()


def ce_loss(x: torch.Tensor, y: torch.Tensor) -> LossFn:
    """Return a loss function: the mean cross-entropy of the model on (x, y)."""
    return lambda model: F.cross_entropy(model(x), y)


def summed_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return Σ ∇θ ℓ(z) over the examples (x, y): one example's gradient (protocol §8.3 step 1), or a group's sum."""
    return flat_grad(F.cross_entropy(model(x), y, reduction="sum"), trainable_params(model))


def _check_estimate(h: torch.Tensor, v_norm: float, max_norm_ratio: float, where: str) -> None:
    """Raise TrainingError if the estimate is non-finite or its norm exceeds max_norm_ratio·‖v‖."""
    norm = float(h.norm())
    if not math.isfinite(norm) or norm > max_norm_ratio * v_norm:
        raise TrainingError(f"LiSSA diverged {where}: |h| = {norm:.3g} vs |v| = {v_norm:.3g} "
                            f"(limit {max_norm_ratio:g}x); raise the scale or the damping")


def _lissa_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, depth: int, scale: float,
               decay: float, batch_size: int, generator: Optional[torch.Generator],
               check: Callable[[torch.Tensor, int], None]) -> torch.Tensor:
    """Return h_depth of h_t = v + decay·h_{t−1} − (1/s)·H_t h_{t−1}, H_t on a random batch (protocol §8.3 step 2)."""
    params, h = trainable_params(model), v.clone()
    full = batch_size >= len(y)
    for step in range(1, depth + 1):
        idx = None if full else torch.randint(len(y), (batch_size,), generator=generator, device=y.device)
        loss_fn = ce_loss(x, y) if full else ce_loss(x[idx], y[idx])
        h = v + decay * h - hvp(model, loss_fn, params, h) / scale
        if step % CHECK_EVERY == 0 or step == depth:
            check(h, step)
    return h


def lissa_inverse_hvp(model: nn.Module, data_x: torch.Tensor, data_y: torch.Tensor, v: torch.Tensor,
                      depth: int, scale: float, damping: float = DEFAULT_DAMPING,
                      repeats: int = DEFAULT_REPEATS, generator: Optional[torch.Generator] = None,
                      batch_size: int = 1, reference_scaling: bool = False,
                      max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO) -> torch.Tensor:
    """Return the LiSSA estimate of (H + damping·I)⁻¹ v, H the mean cross-entropy Hessian on the data.

    Each of `repeats` runs takes `depth` steps, each on `batch_size` examples drawn with replacement
    (the reference uses batch 1; batch_size ≥ len(data) uses the full-data Hessian, deterministically);
    the runs are averaged; `generator` (on the data's device) makes the draws reproducible. With
    `reference_scaling` the reference's un-divided estimate s·(H + damping·s·I)⁻¹ v is returned instead
    (module docstring). Call it with the model in eval mode.
    """
    _check_lissa_args(depth, scale, damping, repeats, batch_size)
    v = v.detach()
    v_norm = float(v.norm())
    if not math.isfinite(v_norm):
        raise TrainingError(f"LiSSA got a non-finite vector v (|v| = {v_norm}): the model's gradient is not "
                            "finite")
    if v_norm == 0.0:
        return torch.zeros_like(v)
    decay = 1.0 - damping if reference_scaling else 1.0 - damping / scale
    divisor = 1.0 if reference_scaling else scale
    total = torch.zeros_like(v)
    for r in range(repeats):
        def check(h, step, r=r):
            _check_estimate(h / divisor, v_norm, max_norm_ratio, f"in repeat {r + 1} at step {step}")
        total += _lissa_run(model, data_x, data_y, v, depth, scale, decay, batch_size, generator, check)
    return total / (repeats * divisor)


def _check_lissa_args(depth: int, scale: float, damping: float, repeats: int, batch_size: int) -> None:
    """Raise a SpuriousError for LiSSA settings outside their domain."""
    for key, value in (("depth", depth), ("repeats", repeats), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise SpuriousError(f"LiSSA {key} must be an integer >= 1, got {value!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise SpuriousError(f"LiSSA scale must be finite and > 0, got {scale!r}")
    if not (math.isfinite(damping) and damping >= 0):
        raise SpuriousError(f"LiSSA damping must be finite and >= 0, got {damping!r}")


def group_inverse_hvp(model: nn.Module, x_group: torch.Tensor, y_group: torch.Tensor, x_train: torch.Tensor,
                      y_train: torch.Tensor, per_example: bool = True, **lissa) -> torch.Tensor:
    """Return g = Σ_{z∈Z} (H + λI)⁻¹ ∇θ ℓ(z), the LiSSA estimate summed over the group (protocol §8.3 steps 1–4).

    `per_example=True` runs LiSSA once per example, as the reference does; False runs it once on the
    summed gradient, which has the same expectation (LiSSA is linear in v) at 1/n of the cost.
    """
    if not per_example:
        return lissa_inverse_hvp(model, x_train, y_train, summed_gradient(model, x_group, y_group), **lissa)
    vectors = (summed_gradient(model, x_group[i:i + 1], y_group[i:i + 1]) for i in range(len(y_group)))
    return sum(lissa_inverse_hvp(model, x_train, y_train, v, **lissa) for v in vectors)


def group_influence_update(model: nn.Module, x_group: torch.Tensor, y_group: torch.Tensor,
                           x_train: torch.Tensor, y_train: torch.Tensor, m: Optional[int] = None,
                           per_example: bool = True, **lissa) -> nn.Module:
    """Return a copy of `model` (eval mode) with θ + g/((1 − p)·m): the first-order estimate of the
    parameters after deleting the group (Basu et al. 2020; protocol §8.3 step 5).

    m is the training-set size (default len(x_train), which should include the group) and p = n/m.
    The Hessian is of the cross-entropy alone, as in the reference: an L2 penalty is not included.
    """
    m = len(y_train) if m is None else m
    n = len(y_group)
    if n >= m:
        raise SpuriousError(f"the group ({n} examples) must be smaller than the training set (m = {m})")
    updated = copy.deepcopy(model).eval()
    if n == 0:
        return updated
    g = group_inverse_hvp(updated, x_group, y_group, x_train, y_train, per_example=per_example, **lissa)
    params = trainable_params(updated)
    with torch.no_grad():
        vector_to_parameters(parameters_to_vector(params) + g / (m - n), params)
    return updated
