"""Slimmable MLP heads (projectors and predictors), declared as a list of layer tuples.

Each tuple is ``(out_dim, norm, activation)`` with norm one of None, "bn", "bn_noaffine". Hidden layers
scale with the sub-network's width; the last layer's output dimension is fixed, so every sub-network
lands in the same embedding space as the full network (and its target).
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from ..errors import SlimsslError
from ..nn.channels import scaled_channels
from ..nn.layers import SlimBatchNorm, SlimLinear
from ..nn.spec import Menu

Layer = tuple[int, str | None, str | None]

# The heads of the three methods (DESIGN.md section 2); ``hidden`` is the full-width hidden size.
HEADS: dict[str, dict[str, Callable[[int, int], list[Layer]]]] = {
    "byol": {
        "projector": lambda hidden, out: [(hidden, "bn", "relu"), (out, None, None)],
        "predictor": lambda hidden, out: [(hidden, "bn", "relu"), (out, None, None)],
    },
    "mocov2": {
        "projector": lambda hidden, out: [(hidden, None, "relu"), (out, None, None)],
    },
    "mocov3": {
        "projector": lambda hidden, out: [(hidden, "bn", "relu"), (out, "bn_noaffine", None)],
        "predictor": lambda hidden, out: [(hidden, "bn", "relu"), (out, "bn_noaffine", None)],
    },
}


class SlimMLP(nn.Sequential):
    """An MLP of slimmable linear layers with per-sub-network BatchNorm (private, keyed by name)."""

    def __init__(self, in_dim: int, layers: Sequence[Layer], menu: Menu, bn: str = "private", divisor: int = 1):
        modules: list[nn.Module] = []
        for i, (out_dim, norm, act) in enumerate(layers):
            last = i == len(layers) - 1
            modules.append(SlimLinear(in_dim, out_dim, bias=norm is None, slim_out=not last))
            if norm is not None:
                subnets = None if bn == "shared" else {
                    s.name: (out_dim if last else scaled_channels(out_dim, s.width, divisor)) for s in menu}
                modules.append(SlimBatchNorm(out_dim, dim=1, subnets=subnets, affine=norm == "bn"))
            if act == "relu":
                modules.append(nn.ReLU(inplace=True))
            elif act is not None:
                raise SlimsslError(f"unknown activation {act!r} in head declaration")
            in_dim = out_dim
        super().__init__(*modules)
        self.out_dim = in_dim
