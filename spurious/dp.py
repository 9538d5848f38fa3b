"""DP-SGD (Abadi et al. 2016) in the shared training recipe: Poisson-sampled batches, per-example gradient
clipping and Gaussian noise, and the privacy accounting of a maintained library (opacus' accountants).

A training run is DP when `cfg.dp_noise_multiplier` σ > 0. Each epoch then takes ⌊N / B⌋ steps (N training
examples, B = `batch_size`); each step's batch holds every example independently with probability q = B / N
(Poisson sampling, the accountant's assumption, drawn from the run's own generator). For the batch b:

    g_i = ∇θ ℓ(z_i; θ) per example
    ḡ_i = g_i · min(1, C / (‖g_i‖ + 1e-6))        (C = dp_max_grad_norm; ‖·‖ over all trainable parameters)
    g = (Σ_i ḡ_i + N(0, σ² C² I)) / (q N)        (divided by the expected batch size, as opacus does)

and the run's optimiser (SGD with momentum or Adam, weight decay as configured) steps with g: post-processing
of a DP gradient, so the bound holds for the whole run. ε at δ (`dp_delta`, 0 = 1/N) after t steps is opacus'
RDP accountant's for (σ, q, t) (`epsilon`); k examples together (the n planted images) are covered by group
privacy: (kε, k·e^{(k−1)ε}·δ) (`group_epsilon`). Models with BatchNorm mix examples within a batch, so their
per-example gradients are not defined: they are refused in one line (`check_model`).

Σ_i ḡ_i is computed one of two ways (`noisy_gradient`'s `method`; "auto" picks ghost where `ghost_supported`):

- "vmap" (any model): the per-example gradients themselves, {name: (B, *shape)}, by torch.func vmap over grad
  (`per_example_grads`), then `clipped_sum`. Memory-bound: B copies of every weight matrix per step.
- "ghost" (every trainable parameter is the weight or bias of an `nn.Linear` applied once, to (B, in) inputs:
  the MLPs): the per-example gradient of a Linear's weight is δ_i a_iᵀ, with a_i (in,) the layer's input and
  δ_i (out,) the gradient of ℓ_i w.r.t. its output, so ‖∇W_i‖² = ‖a_i‖²‖δ_i‖² and ‖∇b_i‖² = ‖δ_i‖²
  (Goodfellow 2015, "Efficient per-example gradient computations", arXiv:1510.01799; "ghost clipping" of
  Li et al. 2022, "Large language models can be strong differentially private learners", ICLR). One forward
  with hooks keeps every Linear's (a, z), one backward gives δ = ∂Σ_i ℓ_i/∂z (B, out), and with the clip
  factors c_i the clipped sum is Σ_i c_i δ_i a_iᵀ = (c·δ)ᵀ a (out, in) and Σ_i c_i δ_i (out,) per layer: no
  (B, out, in) tensor is ever made (`ghost_clipped_sum`). The same formula, the same noise draws: both
  methods give the same gradient up to float rounding. One forward means a layer with randomness (dropout;
  the project's MLPs have none) draws one mask per example, which is the gradient of that example's loss.

A bundle of DP runs of a Flatten/Linear/ReLU model (`spurious.bundle`, on the CPU) takes the same ghost norms
for all its members at once on stacked (K, B, ·) tensors (`stacked_mlp.StackedMLP.ghost_clipped_sum`), each
member with its own Poisson batches (padded to the step's largest with a row mask) and its own noise draws.
"""
from __future__ import annotations

import math
import warnings
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


class GhostUnsupported(SpuriousError):
    """The ghost path met a Linear layer it cannot account for exactly (`ghost_clipped_sum`)."""


METHODS = ("auto", "ghost", "vmap")


def ghost_supported(model: nn.Module) -> bool:
    """Return whether every trainable parameter of `model` is the weight or bias of an `nn.Linear` (exactly that
    class; no parametrisation, no parameter shared between layers) and there is at least one: the models whose
    per-example norms `ghost_clipped_sum` computes without per-example gradients. Whether each layer sees 2-D
    input, once per forward, is checked when it runs."""
    seen, linear = set(), False
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(module) is not nn.Linear or any(id(p) in seen for p in own):
            return False
        seen.update(id(p) for p in own)
        linear = True
    return linear


def ghost_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (Σ_i ḡ_i per trainable parameter, per-example norms ‖g_i‖ (B,), per-example cross-entropy losses
    (B,), logits (B, classes)) by ghost norms (module docstring), for a `ghost_supported` model and a non-empty
    batch: what `clipped_sum(per_example_grads(model, x, y)[0], max_norm)` gives, without per-example
    gradients. Raises GhostUnsupported, before any `.grad` or generator is touched, if a Linear with trainable
    parameters runs other than exactly once on a (B, in) input, or its input or output is changed in place."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and any(p.requires_grad for p in m.parameters())]
    calls: dict[nn.Module, list] = {m: [] for m in layers}

    def keep(module, inputs, output):
        calls[module].append((inputs[0], output, inputs[0]._version, output._version))

    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    batch = len(y)
    for module, seen in calls.items():
        if len(seen) != 1:
            raise GhostUnsupported(f"a Linear layer ran {len(seen)} times in one forward; ghost norms need once")
        a, z, a_version, z_version = seen[0]
        if a.dim() != 2 or a.shape[0] != batch or z.shape != (batch, module.out_features):
            raise GhostUnsupported(f"a Linear layer saw input of shape {tuple(a.shape)} for a batch of {batch}; "
                                   "ghost norms need (batch, features)")
        if a._version != a_version or z._version != z_version or not z.requires_grad:
            raise GhostUnsupported("a Linear layer's input or output was changed in place (or has no gradient)")
    losses = F.cross_entropy(logits, y, reduction="none")
    outputs = [seen[0][1] for seen in calls.values()]
    deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    square = torch.zeros(batch, device=logits.device, dtype=logits.dtype)
    for module, delta in zip(layers, deltas):
        if delta is None:
            continue
        a = calls[module][0][0].detach()
        weight = module.weight.requires_grad
        bias = module.bias is not None and module.bias.requires_grad
        factor = (a.square().sum(1) if weight else 0) + (1 if bias else 0)
        square += factor * delta.square().sum(1)
    norms = square.sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    sums: dict[int, torch.Tensor] = {}
    for module, delta in zip(layers, deltas):
        if delta is None:
            continue
        scaled = delta * scale[:, None]
        if module.weight.requires_grad:
            sums[id(module.weight)] = scaled.T @ calls[module][0][0].detach()
        if module.bias is not None and module.bias.requires_grad:
            sums[id(module.bias)] = scaled.sum(0)
    summed = {k: sums[id(p)] if id(p) in sums else torch.zeros_like(p)
              for k, p in model.named_parameters() if p.requires_grad}
    return summed, norms.detach(), losses.detach(), logits.detach()


def noisy_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise_multiplier: float, max_norm: float,
                   expected_batch: float, generator: torch.Generator, method: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Set every trainable parameter's `.grad` to DP-SGD's noisy mean gradient of the batch x (B, ...), y (B,)
    (module docstring): clipped per-example sum plus N(0, (σC)²) noise drawn from `generator`, one draw per
    trainable parameter in `named_parameters` order, over `expected_batch`. `method`: "vmap" (per-example
    gradients, any model), "ghost" (ghost norms; GhostUnsupported for other models) or "auto" (ghost where
    `ghost_supported` and the layers run as it needs, else vmap); the noise and the result are the same.
    Return the batch's per-example losses (B,) and logits (B, classes); an empty batch adds noise only."""
    if method not in METHODS:
        raise SpuriousError(f"DP method {method!r} is not one of {', '.join(METHODS)}")
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if not len(y):
        summed = {k: torch.zeros_like(p) for k, p in named}
        losses, logits = torch.zeros(0, device=y.device), torch.zeros((0, 1), device=y.device)
    elif method == "ghost" or (method == "auto" and ghost_supported(model)):
        if method == "ghost" and not ghost_supported(model):
            raise GhostUnsupported("ghost norms need every trainable parameter in an nn.Linear layer")
        try:
            summed, _, losses, logits = ghost_clipped_sum(model, x, y, max_norm)
        except GhostUnsupported as err:
            if method == "ghost":
                raise
            warnings.warn(f"DP-SGD: per-example gradients by vmap instead of ghost norms: {err}", stacklevel=2)
            summed, losses, logits = _vmap_clipped_sum(model, x, y, max_norm)
    else:
        summed, losses, logits = _vmap_clipped_sum(model, x, y, max_norm)
    for name, p in named:
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        p.grad = (summed[name] + noise_multiplier * max_norm * noise) / expected_batch
    return losses, logits


def _vmap_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Return (Σ_i ḡ_i per parameter, per-example losses, logits) from the per-example gradients (vmap)."""
    grads, losses, logits = per_example_grads(model, x, y)
    summed, _ = clipped_sum(grads, max_norm)
    return summed, losses, logits


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
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=target_delta))


def group_epsilon(eps: float, target_delta: float, k: int) -> tuple[float, float]:
    """Return the (ε, δ) bound for a group of k examples (group privacy): (kε, k·e^{(k−1)ε}·δ) (Dwork & Roth
    2014, Thm 2.2 with δ); k = 0 or 1 gives (ε, δ) back."""
    if k <= 1:
        return eps, target_delta
    if not math.isfinite(eps) or target_delta <= 0:
        return k * eps, 1.0 if not math.isfinite(eps) else 0.0
    log_delta = math.log(k) + (k - 1) * eps + math.log(target_delta)  # in logs: e^{(k−1)ε} overflows for large kε
    return k * eps, 1.0 if log_delta >= 0 else math.exp(log_delta)



def noise_for_epsilon(target_epsilon: float, q: float, steps: int, target_delta: float) -> float:
    """Return the smallest noise multiplier σ (to opacus' tolerance, 0.01 in ε) whose RDP ε at `target_delta`
    after `steps` steps of sample rate q is at most `target_epsilon` (opacus' `get_noise_multiplier`): the floor
    of a σ search held to a privacy budget. Raises SpuriousError for a budget no σ ≤ 1e4 meets."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # as in `epsilon`
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                              sample_rate=q, steps=steps, accountant="rdp"))
    except ValueError as exc:
        raise SpuriousError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {target_delta:.3g} in "
                            f"{steps} steps of sample rate {q:.3g}: {exc}") from None
