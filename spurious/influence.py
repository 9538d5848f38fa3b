"""Group-influence deletion: inverse-Hessian-vector products, their residual, and the first-order group
update (protocol §8.2, §8.3; differences from the reference in protocol §11.3).

H is the Hessian of the mean cross-entropy over the training set D at θ (all parameters that require a
gradient, model in eval mode, no L2 term); v = Σ_{z∈Z} ∇θ ℓ(z) for the group Z to delete; the update is
θ ← θ + g/(m − n), m = |D| (Z included), n = |Z|. Two modes:

- `corrected` (the default): g estimates (H + λI)⁻¹ v with λ = `damping`, by one of two solvers:
  `cg`, conjugate gradients with Hessian-vector products on all of D (deterministic, stops at a relative
  residual `tol` or after `max_iter` iterations, and fails on negative curvature), or `lissa`, the
  recursion h_t = v + (1 − λ/s)·h_{t−1} − (1/s)·H_t h_{t−1} on random batches, divided by s at the end
  (fixed point (H + λI)⁻¹ v), averaged over `repeats` runs.
- `reference`: what the reference's code applies (protocol §8.3, §11.3): ONE run of its recursion
  h_t = v + (1 − d)·h_{t−1} − (1/s)·(H_t h_{t−1} + a_{t−1}·∂v/∂θ·∇ℓ(x_t)), not divided by s, then
  divided by r = `repeats`. The extra term comes from its v keeping the autograd graph (a_t = 1 + (1 − d)·a_{t−1},
  a_0 = 0, and ∂v/∂θ is the group examples' Hessian); without it and averaged, the recursion would
  estimate s·(H + d·s·I)⁻¹ v. So the applied g is (s/r)·(H + d·s·I)⁻¹ v from one stochastic run, plus
  what the extra term adds (on a 2-epoch LargeMLP it dominated: protocol §8.6).

Every estimate can be checked with `relative_residual`: ‖(H_B + λI)h − v‖/‖v‖ on a fixed evaluation
batch B (`residual_indices`); for `reference`, h = (first run)/s and λ = d·s, the system its recursion is
meant to solve.

    from spurious import influence
    settings = influence.defaults_for("fashion", n=20)          # solver cg, damping 1.0
    new_model, stats = influence.group_influence(model, x_group, y_group, x_train, y_train, **settings)
    stats["ihvp_residual"]
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from spurious import datasets
from spurious.errors import SpuriousError
from spurious.train import TrainingError

LossFn = Callable[[nn.Module], torch.Tensor]

SOLVERS = ("cg", "lissa")
MODES = ("corrected", "reference")
# protocol §8.2: the reference's (scale, depth when n >= 100, depth when n < 100); its d is 0.01 and r = 10.
REFERENCE_DEFAULTS = {"fashion": (100.0, 1000, 2000), "cifar10": (100.0, 1000, 1000),
                      "mnist": (25.0, 1000, 2000)}
REFERENCE_DAMPING = 0.01
DEFAULT_REPEATS = 10
DEFAULT_MAX_NORM_RATIO = 1e6
DEFAULT_TOL = 1e-3
DEFAULT_MAX_ITER = 100
DEFAULT_RESIDUAL_BATCH = 4096
RESIDUAL_SEED = 830  # the evaluation batch's permutation seed: fixed, and apart from the LiSSA draws
HVP_CHUNK = 2048  # examples per double-backward pass when a product runs over many examples
# Divergence by growth (protocol §8.3): the median increment |h_t − h_{t−1}| over the latest window between
# checks is over GROWTH_FACTOR times the one about half as many steps back, and it grew at each of the
# last GROWTH_CHECKS checks. A converging recursion's increments shrink or, stochastically, wander at a
# noise floor that rises no faster than its estimate; a diverging one's grow geometrically. Medians ignore
# the single large steps of batch-1 products (an example's own Hessian can have eigenvalues far beyond 2s).
GROWTH_FACTOR = 4.0
GROWTH_CHECKS = 6


def defaults_for(dataset: str, n: int, mode: str = "corrected") -> dict:
    """Return the group-influence settings for `dataset` and group size `n` (protocol §8.2).

    `reference`: the reference's LiSSA (solver lissa; depth, scale s, repeats r and its d = 0.01 as
    `damping`). `corrected`: solver cg with damping d·s, the reference's effective damping (1.0 on
    Fashion-MNIST and CIFAR-10, 0.25 on MNIST), tolerance and iteration cap; the LiSSA keys keep the
    reference's depth, scale and repeats for `solver="lissa"`.
    """
    name = datasets.DATASETS.canonical(dataset)
    if name not in REFERENCE_DEFAULTS:
        raise SpuriousError(f"no group-influence defaults for dataset {dataset!r}; "
                            f"known: {', '.join(REFERENCE_DEFAULTS)}")
    _check_choice("mode", mode, MODES)
    scale, depth_large, depth_small = REFERENCE_DEFAULTS[name]
    lissa = {"depth": depth_large if n >= 100 else depth_small, "scale": scale, "repeats": DEFAULT_REPEATS}
    if mode == "reference":
        return {"mode": mode, "solver": "lissa", "damping": REFERENCE_DAMPING, **lissa}
    return {"mode": mode, "solver": "cg", "damping": REFERENCE_DAMPING * scale, "tol": DEFAULT_TOL,
            "max_iter": DEFAULT_MAX_ITER, **lissa}


def _check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise SpuriousError(f"group-influence {key} {value!r} is not one of {', '.join(allowed)}")


# ---------------------------------------------------------------- gradients and Hessian-vector products

def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters that require gradients (θ of protocol §8.3), in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False,
              retain_graph: Optional[bool] = None) -> torch.Tensor:
    """Return ∇θ loss as one flat vector (zeros for parameters the loss does not use)."""
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, retain_graph=retain_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def hvp(model: nn.Module, loss_fn: LossFn, params: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """Return H v, the Hessian of `loss_fn(model)` in `params` times the flat vector v (double backprop)."""
    grad = flat_grad(loss_fn(model), params, create_graph=True)
    return flat_grad(grad @ v, params).detach()


def data_hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
             chunk: int = HVP_CHUNK) -> torch.Tensor:
    """Return H_D v for the mean cross-entropy over all of (x, y), summed over chunks of `chunk` examples."""
    params, total = trainable_params(model), torch.zeros_like(v)
    for start in range(0, len(y), chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        total += hvp(model, ce_loss(xb, yb), params, v) * (len(yb) / len(y))
    return total


def ce_loss(x: torch.Tensor, y: torch.Tensor) -> LossFn:
    """Return a loss function: the mean cross-entropy of the model on (x, y)."""
    return lambda model: F.cross_entropy(model(x), y)


def summed_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return Σ ∇θ ℓ(z) over the examples (x, y): one example's gradient, or a group's v (protocol §8.3)."""
    return flat_grad(F.cross_entropy(model(x), y, reduction="sum"), trainable_params(model))


# ---------------------------------------------------------------- residual

def residual_indices(m: int, size: int = DEFAULT_RESIDUAL_BATCH, seed: int = RESIDUAL_SEED) -> torch.Tensor:
    """Return the evaluation batch B: the first min(size, m) indices of a permutation of range(m) drawn
    on the CPU from `seed` (so it is the same on every device and independent of the LiSSA draws)."""
    if size < 1:
        raise SpuriousError(f"the residual batch must hold >= 1 example, got {size!r}")
    return torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:size]


def relative_residual(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, v: torch.Tensor,
                      damping: float, chunk: int = HVP_CHUNK) -> float:
    """Return ‖(H_B + damping·I)h − v‖ / ‖v‖ (a unitless ratio), H_B the mean cross-entropy Hessian on (x, y).

    With (x, y) the batch of `residual_indices` this checks any estimate of (H + λI)⁻¹ v; an exact solve
    with the full-data H still shows ‖(H_B − H)h‖/‖v‖, the floor of the batch (protocol §8.3).
    """
    v_norm = float(v.norm())
    if v_norm == 0.0:
        return 0.0
    return float((data_hvp(model, x, y, h.detach(), chunk) + damping * h - v).norm()) / v_norm


# ---------------------------------------------------------------- divergence by growth

@dataclass
class _Monitor:
    """Fails a recursion h_t that diverges: non-finite, over `max_norm_ratio`·‖v‖, or growing (GROWTH_FACTOR).

    Checks come at every step up to step 16, then every ⌊t/8⌋ steps (geometrically spaced, about 6 per
    doubling of t), and at the last step; the increment norms stay on the device between checks.
    """

    v_norm: float
    max_norm_ratio: float
    divisor: float
    where: str
    depth: int
    windows: list = field(default_factory=list)  # (step, median increment norm) at each check
    pending: list = field(default_factory=list)  # increment norms since the last check (0-d tensors)
    last: int = 0

    def step(self, t: int, new: torch.Tensor, old: torch.Tensor) -> None:
        self.pending.append((new - old).norm())
        if t == self.depth or t - self.last >= max(1, self.last // 8):
            self._check(t, new)

    def _check(self, t: int, h: torch.Tensor) -> None:
        median = float(torch.stack(self.pending).median())
        norm = float(h.norm()) / self.divisor
        if not (math.isfinite(norm) and math.isfinite(median)) or norm > self.max_norm_ratio * self.v_norm:
            raise TrainingError(f"LiSSA diverged {self.where} at step {t}: |h| = {norm:.3g} vs |v| = "
                                f"{self.v_norm:.3g} (limit {self.max_norm_ratio:g}x); {ADVICE}")
        self.windows.append((t, median))
        self.pending, self.last = [], t
        growth = self._growth(t)
        if growth > GROWTH_FACTOR:
            raise TrainingError(f"LiSSA diverged {self.where}: its steps |h_t − h_(t−1)| grew {growth:.3g}x "
                                f"from step {self._half(t)[0]} to step {t}; {ADVICE}")

    def _half(self, t: int) -> tuple[int, float]:
        return [w for w in self.windows if w[0] <= t / 2][-1]

    def _growth(self, t: int) -> float:
        """Return the growth of the median increment since t/2, or 0 unless it grew at the latest checks."""
        recent = [median for _, median in self.windows[-GROWTH_CHECKS - 1:]]
        if len(recent) <= GROWTH_CHECKS or any(a >= b for a, b in zip(recent, recent[1:])):
            return 0.0
        return recent[-1] / max(self._half(t)[1], torch.finfo(torch.float64).tiny)


ADVICE = ("raise `scale` (it must exceed half the largest Hessian eigenvalue) or `damping` (the Hessian may "
          "have negative curvature), or use solver=cg")


# ---------------------------------------------------------------- LiSSA: the project's and the reference's

def _check_lissa_args(depth: int, scale: float, damping: float, repeats: int, batch_size: int) -> None:
    """Raise a SpuriousError for LiSSA settings outside their domain."""
    for key, value in (("depth", depth), ("repeats", repeats), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise SpuriousError(f"LiSSA {key} must be an integer >= 1, got {value!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise SpuriousError(f"LiSSA scale must be finite and > 0, got {scale!r}")
    if not (math.isfinite(damping) and damping >= 0):
        raise SpuriousError(f"LiSSA damping must be finite and >= 0, got {damping!r}")


def _checked_norm(v: torch.Tensor, solver: str) -> float:
    v_norm = float(v.norm())
    if not math.isfinite(v_norm):
        raise TrainingError(f"{solver} got a non-finite vector v (|v| = {v_norm}): the model's gradient is not "
                            "finite")
    return v_norm


def _batch_loss(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                generator: Optional[torch.Generator]) -> LossFn:
    """Return the loss on `batch_size` examples drawn uniformly with replacement (all of them if that many)."""
    if batch_size >= len(y):
        return ce_loss(x, y)
    idx = torch.randint(len(y), (batch_size,), generator=generator, device=y.device)
    return ce_loss(x[idx], y[idx])


def lissa_inverse_hvp(model: nn.Module, data_x: torch.Tensor, data_y: torch.Tensor, v: torch.Tensor,
                      depth: int, scale: float, damping: float = REFERENCE_DAMPING,
                      repeats: int = DEFAULT_REPEATS, generator: Optional[torch.Generator] = None,
                      batch_size: int = 1, max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO) -> torch.Tensor:
    """Return the LiSSA estimate of (H + damping·I)⁻¹ v (shape of v), H the mean cross-entropy Hessian on
    the data (protocol §8.3, mode `corrected`).

    Each of `repeats` runs takes `depth` steps of h_t = v + (1 − λ/s)·h_{t−1} − (1/s)·H_t h_{t−1}, H_t on
    `batch_size` examples drawn with replacement (the reference uses batch 1; batch_size ≥ len(data)
    uses the full-data Hessian, deterministically); the runs are averaged and divided by s. Converges
    when 0 < μ + λ < 2s for every eigenvalue μ of H, at rate 1 − (μ + λ)/s per step. `generator` (on
    the data's device) makes the draws reproducible. Raises TrainingError (one line) when a run
    diverges (`_Monitor`). Call it with the model in eval mode.
    """
    _check_lissa_args(depth, scale, damping, repeats, batch_size)
    v = v.detach()
    v_norm = _checked_norm(v, "LiSSA")
    if v_norm == 0.0:
        return torch.zeros_like(v)
    params, total = trainable_params(model), torch.zeros_like(v)
    for r in range(repeats):
        monitor = _Monitor(v_norm, max_norm_ratio, scale, f"in repeat {r + 1}", depth)
        h = v.clone()
        for step in range(1, depth + 1):
            loss_fn = _batch_loss(data_x, data_y, batch_size, generator)
            new = v + (1.0 - damping / scale) * h - hvp(model, loss_fn, params, h) / scale
            monitor.step(step, new, h)
            h = new
        total += h
    return total / (repeats * scale)


def reference_lissa(model: nn.Module, x_z: torch.Tensor, y_z: torch.Tensor, data_x: torch.Tensor,
                    data_y: torch.Tensor, depth: int, scale: float, damping: float = REFERENCE_DAMPING,
                    generator: Optional[torch.Generator] = None, batch_size: int = 1,
                    max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO) -> torch.Tensor:
    """Return ONE run of the reference's LiSSA recursion for v = Σ ∇θ ℓ(z) over (x_z, y_z), not divided by s
    (protocol §8.3 "Mode reference", §11.3): a flat vector meant to estimate s·(H + d·s·I)⁻¹ v, d = `damping`
    (which it would, averaged, without the extra term below).

    h_0 = v; h_t = v + (1 − d)·h_{t−1} − (1/s)·∇θ(∇ℓ_t(θ)·h_{t−1}(θ)), where, as in the reference, h_{t−1}
    depends on θ through the a_{t−1} copies of v it contains (v built with create_graph), so the product is
    H_t h_{t−1} + a_{t−1}·(∂v/∂θ)ᵀ∇ℓ_t. The caller divides by r (the reference applies run 1 / r).
    """
    _check_lissa_args(depth, scale, damping, 1, batch_size)
    params = trainable_params(model)
    v_graph = flat_grad(F.cross_entropy(model(x_z), y_z, reduction="sum"), params, create_graph=True)
    v = v_graph.detach()
    v_norm = _checked_norm(v, "LiSSA")
    monitor = _Monitor(v_norm, max_norm_ratio, 1.0, "(reference mode)", depth)
    h, copies = v.clone(), 0.0
    for step in range(1, depth + 1):
        grad = flat_grad(_batch_loss(data_x, data_y, batch_size, generator)(model), params, create_graph=True)
        product = flat_grad(grad @ h + copies * (v_graph @ grad.detach()), params, retain_graph=True)
        new = v + (1.0 - damping) * h - product / scale
        monitor.step(step, new, h)
        h, copies = new, 1.0 + (1.0 - damping) * copies
    return h


# ---------------------------------------------------------------- conjugate gradients

def cg_inverse_hvp(model: nn.Module, data_x: torch.Tensor, data_y: torch.Tensor, v: torch.Tensor,
                   damping: float, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                   chunk: int = HVP_CHUNK) -> tuple[torch.Tensor, dict]:
    """Return (h, stats): conjugate gradients on (H + damping·I)h = v, H the mean cross-entropy Hessian on
    all of the data (products in chunks of `chunk` examples; protocol §8.3, solver `cg`).

    Starts at h = 0 and stops when the relative residual ‖r‖/‖v‖ of its recurrence is ≤ `tol`, or after
    `max_iter` products; stats: `cg_iterations`, `cg_residual` (that ratio, on all the data) and
    `cg_converged`. A direction p with pᵀ(H + λI)p ≤ 0 (the Hessian of a trained network can be
    indefinite) raises a one-line TrainingError saying how far to raise the damping.
    """
    if not (math.isfinite(damping) and damping >= 0):
        raise SpuriousError(f"CG damping must be finite and >= 0, got {damping!r}")
    if not (tol > 0 and int(max_iter) == max_iter and max_iter >= 1):
        raise SpuriousError(f"CG needs tol > 0 and an integer max_iter >= 1, got tol={tol!r}, max_iter={max_iter!r}")
    v = v.detach()
    v_norm = _checked_norm(v, "CG")
    h, r = torch.zeros_like(v), v.clone()
    if v_norm == 0.0:
        return h, {"cg_iterations": 0, "cg_residual": 0.0, "cg_converged": True}
    p, rr, k = r.clone(), float(r @ r), 0
    while k < max_iter and math.sqrt(rr) / v_norm > tol:
        k += 1
        ap = data_hvp(model, data_x, data_y, p, chunk) + damping * p
        p_ap = float(p @ ap)
        if not p_ap > 0:
            _negative_curvature(k, p_ap / float(p @ p), damping)
        alpha = rr / p_ap
        h, r = h + alpha * p, r - alpha * ap
        rr, rr_old = float(r @ r), rr
        if not math.isfinite(rr):
            raise TrainingError(f"CG produced a non-finite residual at iteration {k}: the model's Hessian is not "
                                "finite")
        p = r + (rr / rr_old) * p
    residual = math.sqrt(rr) / v_norm
    return h, {"cg_iterations": k, "cg_residual": residual, "cg_converged": residual <= tol}


def _negative_curvature(k: int, curvature: float, damping: float) -> None:
    if not math.isfinite(curvature):
        raise TrainingError(f"CG met a non-finite Hessian-vector product at iteration {k}: the model's Hessian "
                            "is not finite")
    raise TrainingError(f"CG met negative curvature at iteration {k}: pᵀ(H + λI)p/|p|² = {curvature:.3g} with "
                        f"damping λ = {damping:g}, so the Hessian has curvature {curvature - damping:.3g}; "
                        f"raise the damping above {damping - curvature:.3g}")


# ---------------------------------------------------------------- the group estimate and the update

@dataclass
class Estimate:
    """A group's inverse-HVP estimate (flat vectors of the trainable parameters' size).

    `step`: g, applied as θ + g/(m − n). `solution`: the estimate of (H + `damping`·I)⁻¹ `v` whose residual
    is reported (`step` itself in mode corrected; the first run / s in mode reference). `v`: Σ_z ∇θ ℓ(z).
    `stats`: solver diagnostics (CG's iterations and residual).
    """

    step: torch.Tensor
    solution: torch.Tensor
    v: torch.Tensor
    damping: float
    stats: dict


def _per_example_sum(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor, per_example: bool) -> torch.Tensor:
    """Return Σ over examples of fn(x_i, y_i), or fn(x, y) once on the whole group."""
    if not per_example:
        return fn(x, y)
    return sum(fn(x[i:i + 1], y[i:i + 1]) for i in range(len(y)))


def group_estimate(model: nn.Module, x_group: torch.Tensor, y_group: torch.Tensor, x_train: torch.Tensor,
                   y_train: torch.Tensor, solver: str = "cg", mode: str = "corrected", damping: float = 1.0,
                   per_example: bool = True, depth: int = 1000, scale: float = 100.0,
                   repeats: int = DEFAULT_REPEATS, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                   generator: Optional[torch.Generator] = None, batch_size: int = 1,
                   max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO, chunk: int = HVP_CHUNK) -> Estimate:
    """Return the group's Estimate (protocol §8.3) by `solver` in `mode` (module docstring); its vectors
    are flat, of the trainable parameters' total size.

    LiSSA runs once per example with `per_example` (as the reference does), else once on the summed
    gradient (the same expectation, 1/n of the cost). CG always solves the summed system once: it is
    deterministic and the solution is linear in v, so per-example solves would add up to the same g.
    `depth`, `scale`, `repeats`, `batch_size`, `generator` and `max_norm_ratio` are LiSSA's, `tol`, `max_iter`
    CG's, `chunk` the examples per product on many examples. Raises SpuriousError for settings outside
    their domain and a one-line TrainingError for a diverging LiSSA or negative curvature met by CG.
    Call it with the model in eval mode.
    """
    _check_choice("solver", solver, SOLVERS)
    _check_choice("mode", mode, MODES)
    v = summed_gradient(model, x_group, y_group)
    lissa = dict(depth=depth, scale=scale, damping=damping, generator=generator, batch_size=batch_size,
                 max_norm_ratio=max_norm_ratio)
    if mode == "reference":
        if solver != "lissa":
            raise SpuriousError("group-influence mode 'reference' runs the reference's LiSSA: it needs solver "
                                f"lissa, got {solver!r}")
        _check_lissa_args(depth, scale, damping, repeats, batch_size)
        first = _per_example_sum(lambda x, y: reference_lissa(model, x, y, x_train, y_train, **lissa),
                                 x_group, y_group, per_example)
        return Estimate(first / repeats, first / scale, v, damping * scale, {})
    if solver == "cg":
        h, stats = cg_inverse_hvp(model, x_train, y_train, v, damping, tol, max_iter, chunk)
        return Estimate(h, h, v, damping, stats)
    g = _per_example_sum(lambda x, y: lissa_inverse_hvp(model, x_train, y_train, summed_gradient(model, x, y),
                                                        repeats=repeats, **lissa), x_group, y_group, per_example)
    return Estimate(g, g, v, damping, {})


def group_inverse_hvp(model: nn.Module, x_group: torch.Tensor, y_group: torch.Tensor, x_train: torch.Tensor,
                      y_train: torch.Tensor, per_example: bool = True, **settings) -> torch.Tensor:
    """Return g (the `step` of `group_estimate`), e.g. Σ_{z∈Z} (H + λI)⁻¹ ∇θ ℓ(z) in mode corrected."""
    return group_estimate(model, x_group, y_group, x_train, y_train, per_example=per_example, **settings).step


def group_influence(model: nn.Module, x_group: torch.Tensor, y_group: torch.Tensor, x_train: torch.Tensor,
                    y_train: torch.Tensor, m: Optional[int] = None, residual_batch: Optional[int] = None,
                    **settings) -> tuple[nn.Module, dict]:
    """Return (a copy of `model` in eval mode with θ + g/(m − n), stats): the first-order estimate of the
    parameters after deleting the group (Basu et al. 2020; protocol §8.3 "Update").

    m is the training-set size (default len(x_train), which should include the group). `settings` go to
    `group_estimate`. stats holds the solver's diagnostics and, unless `residual_batch` is None,
    `ihvp_residual`: `relative_residual` of the estimate's `solution` on the `residual_batch` examples of
    `residual_indices`. The Hessian is of the cross-entropy alone, as in the reference (no L2 term).
    """
    m = len(y_train) if m is None else m
    n = len(y_group)
    if n >= m:
        raise SpuriousError(f"the group ({n} examples) must be smaller than the training set (m = {m})")
    updated = copy.deepcopy(model).eval()
    if n == 0:
        return updated, {}
    est = group_estimate(updated, x_group, y_group, x_train, y_train, **settings)
    stats = dict(est.stats)
    if residual_batch is not None:
        idx = residual_indices(len(y_train), residual_batch).to(y_train.device)
        stats["ihvp_residual"] = relative_residual(updated, x_train[idx], y_train[idx], est.solution, est.v,
                                                   est.damping, settings.get("chunk", HVP_CHUNK))
    params = trainable_params(updated)
    with torch.no_grad():
        vector_to_parameters(parameters_to_vector(params) + est.step / (m - n), params)
    return updated, stats


def group_influence_update(model: nn.Module, x_group: torch.Tensor, y_group: torch.Tensor,
                           x_train: torch.Tensor, y_train: torch.Tensor, m: Optional[int] = None,
                           **settings) -> nn.Module:
    """Return the updated copy of `group_influence` (no residual computed)."""
    return group_influence(model, x_group, y_group, x_train, y_train, m, **settings)[0]
