"""SlimCLR's gradient-imbalance diagnostic.

For each sub-network's backward pass, the gradient it adds to the backbone's conv weights is split into the
slice every sub-network shares (the smallest sub-network's leading channels, in the blocks it runs) and the
rest: a block deeper than the smallest sub-network's depth in its stage shares nothing. SlimCLR shows the
shared slice receiving gradients of very different size and direction from the different widths; logging the
two norms per sub-network over training makes that visible (``slimssl report --plot-grad``).
"""

from __future__ import annotations

import torch

from ..models.plain import IN_CHANNELS
from ..models.resnet import SlimResNet
from ..nn.channels import scaled_channels
from ..nn.layers import SlimConv2d
from ..nn.spec import SubnetSpec


class GradientImbalance:
    """Collects, for each sub-network run in a step, the norms of its gradient on shared and other channels."""

    def __init__(self, backbone: SlimResNet, smallest: SubnetSpec, divisor: int = 1):
        # each conv weight with whether the smallest sub-network runs it: the stem, and the first blocks of a stage
        self.weights = [(backbone.conv1.weight, True)]
        for stage, depth in zip(backbone.stages(), smallest.depths):
            for i, block in enumerate(stage):
                self.weights += [(m.weight, i < depth) for m in block.modules() if isinstance(m, SlimConv2d)]
        self.width, self.divisor = smallest.width, divisor
        self.previous: list[torch.Tensor] | None = None
        self.record: dict[str, dict[str, float]] = {}
        self.grad_scale = 1.0

    def _shared_slice(self, w: torch.Tensor) -> tuple[slice, slice]:
        out = scaled_channels(w.shape[0], self.width, self.divisor)
        inp = w.shape[1] if w.shape[1] == IN_CHANNELS else scaled_channels(w.shape[1], self.width, self.divisor)
        return slice(0, out), slice(0, inp)

    @torch.no_grad()
    def start(self, grad_scale: float = 1.0) -> None:
        """Before the step's first backward. ``grad_scale``: the fp16 loss scale the gradients carry, taken
        out of the recorded norms."""
        self.previous = [torch.zeros_like(w) if w.grad is None else w.grad.detach().clone() for w, _ in self.weights]
        self.record = {}
        self.grad_scale = grad_scale

    @torch.no_grad()
    def after_backward(self, subnet_name: str) -> None:
        """Call right after ``subnet_name``'s backward: measures what that backward added."""
        shared_sq = rest_sq = 0.0
        current = []
        for (w, shared), before in zip(self.weights, self.previous):
            grad = torch.zeros_like(w) if w.grad is None else w.grad.detach()
            delta = (grad - before).float()
            if shared:
                o, i = self._shared_slice(w)
                shared_sq += delta[o, i].pow(2).sum()
                delta[o, i] = 0  # the rest summed on its own: total minus shared leaves a rounding residue
            rest_sq += delta.pow(2).sum()
            current.append(grad.clone())
        self.previous = current
        self.record[subnet_name] = {"shared": float(torch.as_tensor(shared_sq).sqrt()) / self.grad_scale,
                                    "rest": float(torch.as_tensor(rest_sq).sqrt()) / self.grad_scale}
