"""DP-SGD (Abadi et al. 2016) in the shared training recipe: Poisson-sampled batches, per-example gradient
clipping and Gaussian noise, and the privacy accounting of a maintained library (opacus' accountants).

A training run is DP when `cfg.dp_noise_multiplier` σ > 0. Each epoch then takes ⌊N / B⌋ steps (N training
examples, B = `batch_size`); each step's batch holds every example independently with probability q = B / N
(Poisson sampling, the accountant's assumption, drawn from the run's own generator). For the batch b:

    g_i = ∇θ ℓ(z_i; θ) per example (torch.func vmap over grad)
    ḡ_i = g_i · min(1, C / ‖g_i‖)                 (C = dp_max_grad_norm)
    g = (Σ_i ḡ_i + N(0, σ² C² I)) / (q N)        (divided by the expected batch size, as opacus does)

and the run's optimiser (SGD with momentum or Adam, weight decay as configured) steps with g: post-processing
of a DP gradient, so the bound holds for the whole run. ε at δ (`dp_delta`, 0 = 1/N) after t steps is opacus'
RDP accountant's for (σ, q, t) (`epsilon`); k examples together (the n planted images) are covered by group
privacy: (kε, k·e^{(k−1)ε}·δ) (`group_epsilon`). Models with BatchNorm mix examples within a batch, so their
per-example gradients are not defined: they are refused in one line (`check_model`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from spurious.errors import SpuriousError


def enabled(cfg) -> bool:
    """Return whether `cfg` trains with DP-SGD (noise multiplier > 0)."""
    return cfg.dp_noise_multiplier > 0


def delta(cfg, n_train: int) -> float:
    """Return the run's δ: `cfg.dp_delta`, or 1/N when it is 0."""
    return cfg.dp_delta if cfg.dp_delta > 0 else 1.0 / n_train


def sample_rate(cfg, n_train: int) -> float:
    """Return q = batch_size / N, the probability that an example joins a step's batch (at most 1)."""
    return min(1.0, cfg.batch_size / n_train)


def steps_per_epoch(cfg, n_train: int) -> int:
    """Return the steps of one DP epoch: ⌊N / batch_size⌋, at least 1 (one expected pass over the data)."""
    return max(1, n_train // cfg.batch_size)


def check_model(model: nn.Module, name: str) -> None:
    """Raise a one-line SpuriousError for a model whose per-example gradients DP-SGD cannot take (BatchNorm)."""
    norms = [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise SpuriousError(f"model {name!r} has {norms[0]} layers, which mix the examples of a batch, so DP-SGD's "
                            "per-example gradients are not defined; train it without dp_noise_multiplier or use a "
                            "model without BatchNorm (the MLPs, cnn002)")


def poisson_batches(n_train: int, q: float, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Return `steps` batches of row indices, each example included independently with probability q, drawn from
    `generator` (on its device); a batch may be empty."""
    device = generator.device
    return [torch.nonzero(torch.rand(n_train, generator=generator, device=device) < q).flatten()
            for _ in range(steps)]


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable = F.cross_entropy
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Return ({parameter name: (B, *shape)} per-example gradients of `loss_fn(model(x_i), y_i)`, the per-example
    losses (B,), the logits (B, classes)), by torch.func (vmap over grad; dropout draws differ per example)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        loss = loss_fn(out, yi.unsqueeze(0))
        return loss, (loss.detach(), out.detach().squeeze(0))

    grads, (losses, logits) = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
        params, x, y)
    return grads, losses, logits


def clipped_sum(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Return (Σ_i ḡ_i per parameter, per-example norms ‖g_i‖ (B,)): each example's gradient over all parameters
    scaled by min(1, max_norm / ‖g_i‖)."""
    flat = [g.reshape(len(g), -1) for g in grads.values()]
    norms = torch.cat(flat, dim=1).norm(dim=1) if flat and len(flat[0]) else torch.zeros(0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {k: torch.einsum("b,b...->...", scale, g) for k, g in grads.items()}
    return summed, norms


def noisy_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise_multiplier: float, max_norm: float,
                   expected_batch: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Set every trainable parameter's `.grad` to DP-SGD's noisy mean gradient of the batch (x, y) (module
    docstring): clipped per-example sum plus N(0, (σC)²) noise drawn from `generator`, over `expected_batch`.
    Return the batch's per-example losses (B,) and logits (B, classes)."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if len(y):
        grads, losses, logits = per_example_grads(model, x, y)
        summed, _ = clipped_sum(grads, max_norm)
    else:
        summed = {k: torch.zeros_like(p) for k, p in named}
        losses, logits = torch.zeros(0, device=y.device), torch.zeros((0, 1), device=y.device)
    for name, p in named:
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        p.grad = (summed[name] + noise_multiplier * max_norm * noise) / expected_batch
    return losses, logits


def epsilon(noise_multiplier: float, q: float, steps: int, target_delta: float) -> float:
    """Return ε at δ after `steps` Poisson-sampled steps of noise multiplier σ and sample rate q, by opacus' RDP
    accountant (no model, optimiser or DataLoader wrapped); inf for σ = 0 (no privacy), 0 before any step."""
    if noise_multiplier <= 0:
        return math.inf
    if steps <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(q), int(steps))]
    return float(accountant.get_epsilon(delta=target_delta))


def group_epsilon(eps: float, target_delta: float, k: int) -> tuple[float, float]:
    """Return the (ε, δ) bound for a group of k examples (group privacy): (kε, k·e^{(k−1)ε}·δ) (Dwork & Roth
    2014, Thm 2.2 with δ); k = 0 or 1 gives (ε, δ) back."""
    if k <= 1:
        return eps, target_delta
    return k * eps, min(1.0, k * math.exp((k - 1) * eps) * target_delta) if math.isfinite(eps) else 1.0



def noise_for_epsilon(target_epsilon: float, q: float, steps: int, target_delta: float) -> float:
    """Return the smallest noise multiplier σ (to opacus' tolerance, 0.01 in ε) whose RDP ε at `target_delta`
    after `steps` steps of sample rate q is at most `target_epsilon` (opacus' `get_noise_multiplier`): the floor
    of a σ search held to a privacy budget. Raises SpuriousError for a budget no σ ≤ 1e4 meets."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=q,
                                          steps=steps, accountant="rdp"))
    except ValueError as exc:
        raise SpuriousError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {target_delta:.3g} in "
                            f"{steps} steps of sample rate {q:.3g}: {exc}") from None
