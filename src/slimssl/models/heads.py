"""Slimmable MLP heads (projectors and predictors), declared as a list of layer tuples.

Each tuple is a :class:`Layer`: ``(out_dim, norm, activation, bias)`` with norm one of None, "bn",
"bn_noaffine". Hidden layers scale with the sub-network's width; the last layer's output dimension is fixed,
so every sub-network lands in the same embedding space as the full network (and its target).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from torch import nn

from ..errors import SlimsslError
from ..nn.channels import scaled_channels
from ..nn.layers import SlimBatchNorm, SlimLinear
from ..nn.spec import Menu


class Layer(NamedTuple):
    out_dim: int
    norm: str | None = None  # None, "bn" or "bn_noaffine"
    act: str | None = None  # None or "relu"
    bias: bool | None = None  # None: a bias only where no BatchNorm follows (it would cancel it)


# The heads of the three methods (as their papers and official code build them; docs/recipes.md); ``hidden`` is the full-width hidden size.
# MoCo v3's linear layers have no bias, and its predictor ends without BatchNorm (its projector with one).
HEADS: dict[str, dict[str, Callable[[int, int], list[Layer]]]] = {
    "byol": {
        "projector": lambda hidden, out: [Layer(hidden, "bn", "relu"), Layer(out)],
        "predictor": lambda hidden, out: [Layer(hidden, "bn", "relu"), Layer(out)],
    },
    "mocov2": {
        "projector": lambda hidden, out: [Layer(hidden, None, "relu"), Layer(out)],
    },
    "mocov3": {
        "projector": lambda hidden, out: [Layer(hidden, "bn", "relu"), Layer(out, "bn_noaffine")],
        "predictor": lambda hidden, out: [Layer(hidden, "bn", "relu"), Layer(out, bias=False)],
    },
}


class SlimMLP(nn.Sequential):
    """An MLP of slimmable linear layers with per-sub-network BatchNorm (private, keyed by name)."""

    def __init__(self, in_dim: int, layers: Sequence[Layer], menu: Menu, bn: str = "private", divisor: int = 1):
        modules: list[nn.Module] = []
        for i, layer in enumerate(layers):
            out_dim, norm, act, bias = Layer(*layer)  # plain tuples work too
            last = i == len(layers) - 1
            bias = norm is None if bias is None else bias
            modules.append(SlimLinear(in_dim, out_dim, bias=bias, slim_out=not last))
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
