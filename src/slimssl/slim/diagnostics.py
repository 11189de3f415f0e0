"""SlimCLR's gradient-imbalance diagnostic.

For each sub-network's backward pass, the gradient it adds to the backbone's conv weights is split into the
slice every sub-network shares (the smallest sub-network's leading channels) and the rest. SlimCLR shows the
shared slice receiving gradients of very different size and direction from the different widths; logging the
two norms per sub-network over training makes that visible (``slimssl report --plot-grad``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.channels import scaled_channels
from ..nn.layers import SlimConv2d


class GradientImbalance:
    """Collects, for each sub-network run in a step, the norms of its gradient on shared and other channels."""

    def __init__(self, backbone: nn.Module, smallest_width: float, divisor: int = 1):
        self.weights = [m.weight for m in backbone.modules() if isinstance(m, SlimConv2d)]
        self.width, self.divisor = smallest_width, divisor
        self.previous: list[torch.Tensor] | None = None
        self.record: dict[str, dict[str, float]] = {}
        self.grad_scale = 1.0

    def _shared_slice(self, w: torch.Tensor) -> tuple[slice, slice]:
        out = scaled_channels(w.shape[0], self.width, self.divisor)
        inp = w.shape[1] if w.shape[1] == 3 else scaled_channels(w.shape[1], self.width, self.divisor)
        return slice(0, out), slice(0, inp)

    @torch.no_grad()
    def start(self, grad_scale: float = 1.0) -> None:
        """Before the step's first backward. ``grad_scale``: the fp16 loss scale the gradients carry, taken
        out of the recorded norms."""
        self.previous = [torch.zeros_like(w) if w.grad is None else w.grad.detach().clone() for w in self.weights]
        self.record = {}
        self.grad_scale = grad_scale

    @torch.no_grad()
    def after_backward(self, subnet_name: str) -> None:
        """Call right after ``subnet_name``'s backward: measures what that backward added."""
        shared_sq = rest_sq = 0.0
        current = []
        for w, before in zip(self.weights, self.previous):
            grad = torch.zeros_like(w) if w.grad is None else w.grad.detach()
            delta = (grad - before).float()
            o, i = self._shared_slice(w)
            shared_sq += delta[o, i].pow(2).sum()
            delta[o, i] = 0  # the rest summed on its own: total minus shared leaves a rounding residue
            rest_sq += delta.pow(2).sum()
            current.append(grad.clone())
        self.previous = current
        self.record[subnet_name] = {"shared": float(torch.as_tensor(shared_sq).sqrt()) / self.grad_scale,
                                    "rest": float(torch.as_tensor(rest_sq).sqrt()) / self.grad_scale}
