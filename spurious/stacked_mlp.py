"""K MLPs of one shape run as batched matmuls over their stacked parameters, with a hand-written backward.

For a model made only of Flatten, Linear and ReLU (`models.MLP`, or a plain `nn.Sequential` of those),
each Linear layer of K members is one `torch.baddbmm` on (K, B, D_in) activations and the stacked
(K, D_out, D_in) weights, and the backward is the two matmuls per layer that autograd would run
(dW = dzᵀ h and dh = dz W, both `torch.bmm`; none for the input layer's dh), the bias sums and ReLU's
mask, written out. A training step of K members thus costs a fixed ~25 tensor operations however large K
is, where separate models pay Python, dispatch and autograd per member; it is `spurious.bundle`'s CPU path
(issue 15). The arithmetic per member is that of `F.linear`, `F.relu` and `F.cross_entropy` (mean over the
batch), so results equal a separate model's up to float rounding (the matmuls block differently).
DP-SGD members use `ghost_clipped_sum` instead of `loss_and_grads`: the per-example clipped gradient sum of
every member by ghost norms (`spurious.dp`), on padded batches with a row mask.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from spurious import models

# One Linear layer: the names of its weight (D_out, D_in) and bias (D_out,) parameters.
Layer = tuple[str, str]


def linear_layers(model: nn.Module) -> Optional[list[Layer]]:
    """Return the (weight, bias) parameter names of the Linear layers, in forward order, of a model that is
    Flatten → Linear → (ReLU → Linear)* (a `models.MLP` or a plain `nn.Sequential`); None for any other."""
    if type(model) is models.MLP:
        seq, prefix = model.layers, "layers."
    elif type(model) is nn.Sequential:
        seq, prefix = model, ""
    else:
        return None
    children = list(seq.named_children())
    if not children or not _is_flatten(children[0][1]) or len(children) % 2:
        return None
    layers = []
    for i, (name, module) in enumerate(children[1:]):
        wanted = nn.ReLU if i % 2 else nn.Linear
        if type(module) is not wanted or (wanted is nn.Linear and module.bias is None):
            return None
        if wanted is nn.Linear:
            layers.append((f"{prefix}{name}.weight", f"{prefix}{name}.bias"))
    return layers


def _is_flatten(module: nn.Module) -> bool:
    """Return whether the module flattens all but the batch dimension (nn.Flatten's default)."""
    return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1


class StackedMLP:
    """Forward, backward and logits of K stacked MLPs; `params` maps parameter names to (K, ...) tensors."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the logits (K, B, classes) of flattened inputs x (K, B, D) and every Linear layer's input."""
        inputs, h = [], x
        for i, (weight, bias) in enumerate(self.layers):
            inputs.append(h)
            h = torch.baddbmm(params[bias].unsqueeze(1), h, params[weight].transpose(1, 2))
            if i < len(self.layers) - 1:
                h = h.relu_()
        return h, inputs

    def backward(self, params: dict[str, torch.Tensor], inputs: list[torch.Tensor], dz: torch.Tensor,
                 into: Optional[dict[str, torch.Tensor]] = None, beta: float = 0.0) -> dict[str, torch.Tensor]:
        """Return the gradients (K, ...) of every parameter given the logits' gradient dz (K, B, classes).

        With `into` (name to (K, ...) tensors) each gradient is added in place to `beta` times `into[name]`
        instead (SGD's momentum update, buf = momentum·buf + g, fused into the weight-gradient matmul), and
        `into` is returned.
        """
        grads = {} if into is None else into
        for i in reversed(range(len(self.layers))):
            weight, bias = self.layers[i]
            if into is None:
                grads[weight], grads[bias] = torch.bmm(dz.transpose(1, 2), inputs[i]), dz.sum(1)
            else:
                into[weight].baddbmm_(dz.transpose(1, 2), inputs[i], beta=beta)
                into[bias].mul_(beta).add_(dz.sum(1))
            if i:  # the layer's input is the previous ReLU's output, which also gives ReLU's mask
                dz = torch.ops.aten.threshold_backward(torch.bmm(dz, params[weight]), inputs[i], 0)
        return grads

    def loss_and_grads(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       into: Optional[dict[str, torch.Tensor]] = None,
                       beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Return each member's mean cross-entropy (K,), its number of correct predictions (K,) and the
        gradients of its loss (`backward`, with its `into` and `beta`), for inputs x (K, B, ...) and labels y (K, B)."""
        z, inputs = self.forward(params, x.flatten(2))
        logp = z.log_softmax(2)
        loss = torch.stack([F.nll_loss(member, labels) for member, labels in zip(logp, y)])  # Engine's reduction
        grad_logp = torch.zeros_like(logp).scatter_(2, y.unsqueeze(2), -1.0 / y.shape[1])
        dz = torch._log_softmax_backward_data(grad_logp, logp, 2, logp.dtype)
        return loss, (z.argmax(2) == y).sum(1), self.backward(params, inputs, dz, into, beta)

    @torch.no_grad()
    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Return the logits (K, N, classes) of K members on the same inputs x (N, ...).

        The first layer of all members is one matmul, x (N, D) by the members' weights side by side (D, K·H).
        """
        (weight, bias), k = self.layers[0], params[self.layers[0][0]].shape[0]
        first = params[weight].flatten(0, 1)  # (K·H, D): the members' weights stacked row-wise
        h = torch.mm(x.flatten(1), first.T).view(len(x), k, -1).transpose(0, 1) + params[bias].unsqueeze(1)
        if len(self.layers) == 1:
            return h
        h = h.relu_()
        for i, (weight, bias) in enumerate(self.layers[1:], 1):
            h = torch.baddbmm(params[bias].unsqueeze(1), h, params[weight].transpose(1, 2))
            if i < len(self.layers) - 1:
                h = h.relu_()
        return h

    @torch.no_grad()
    def ghost_clipped_sum(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                          mask: torch.Tensor, max_norm: float | torch.Tensor
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return DP-SGD's clipped per-example gradient sum of every member by ghost norms (`spurious.dp`), for
        inputs x (K, B, ...), labels y (K, B) and a row mask (K, B) (1: a row of the member's batch, 0:
        padding): ({name: (K, ...)} Σ_i c_i g_i, per-example norms (K, B), per-example cross-entropy losses (K, B)
        (0 on padding), logits (K, B, classes)). `max_norm` is C, a float or per member (K, 1).

        Per member and layer, δ (K, B, out) is the gradient of Σ_i mask_i ℓ_i w.r.t. the layer's output and a
        (K, B, in) its input: ‖g_i‖² = Σ_layers ‖δ_i‖²(‖a_i‖² + 1), c_i = min(1, C / (‖g_i‖ + 1e-6)), and the
        sums are bmm((c·δ)ᵀ, a) (K, out, in) and Σ_i c_i δ_i (K, out). A padded row has δ = 0, hence norm 0 and
        no contribution."""
        z, inputs = self.forward(params, x.flatten(2))
        logp = z.log_softmax(2)
        losses = -logp.gather(2, y.unsqueeze(2)).squeeze(2) * mask
        grad_logp = torch.zeros_like(logp).scatter_(2, y.unsqueeze(2), -1.0) * mask.unsqueeze(2)
        dz = torch._log_softmax_backward_data(grad_logp, logp, 2, logp.dtype)
        deltas = [dz] * len(self.layers)
        for i in reversed(range(1, len(self.layers))):
            dz = torch.ops.aten.threshold_backward(torch.bmm(dz, params[self.layers[i][0]]), inputs[i], 0)
            deltas[i - 1] = dz
        square = torch.zeros_like(mask)
        for a, delta in zip(inputs, deltas):
            square += (a.square().sum(2) + 1) * delta.square().sum(2)
        norms = square.sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        sums = {}
        for (weight, bias), a, delta in zip(self.layers, inputs, deltas):
            scaled = delta * scale.unsqueeze(2)
            sums[weight], sums[bias] = torch.bmm(scaled.transpose(1, 2), a), scaled.sum(1)
        return sums, norms, losses, z
