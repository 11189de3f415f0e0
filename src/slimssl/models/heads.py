"""Slimmable MLP heads (projectors and predictors), declared as a list of layer tuples.

Each tuple is a :class:`Layer`: ``(out_dim, norm, activation, bias)`` with norm one of None, "bn",
"bn_noaffine". Hidden layers scale with the sub-network's width; the last layer's output dimension is fixed,
so every sub-network lands in the same embedding space as the full network (and its target). Each method
declares its own heads (``Method.projector_layers`` / ``predictor_layers``).
"""

from __future__ import annotations

from numbers import Integral
from typing import NamedTuple, Sequence

from torch import nn

from ..errors import ExtensionError
from ..nn.channels import scaled_channels
from ..nn.layers import SlimBatchNorm, SlimLinear
from ..nn.spec import Menu


class Layer(NamedTuple):
    out_dim: int
    norm: str | None = None  # None, "bn" or "bn_noaffine"
    act: str | None = None  # None or "relu"
    bias: bool | None = None  # None: a bias only where no BatchNorm follows (it would cancel it)


NORMS = (None, "bn", "bn_noaffine")
ACTIVATIONS = (None, "relu")


def check_layers(layers: Sequence, where: str = "head declaration") -> list[Layer]:
    """``layers`` as Layers (plain tuples work too), each with a known norm and activation."""
    if not layers:
        raise ExtensionError(f"{where} declares no layers; expected a list of Layer(out_dim, norm, act, bias)")
    checked = []
    for layer in layers:
        try:
            out_dim, norm, act, bias = Layer(*layer)
        except TypeError:
            raise ExtensionError(f"{where}: {layer!r} is not a Layer(out_dim, norm, act, bias)") from None
        if isinstance(out_dim, bool) or not isinstance(out_dim, Integral) or out_dim < 1:  # NumPy's ints too
            raise ExtensionError(f"{where}: {layer!r} has out_dim {out_dim!r}; expected a whole number of features, at "
                                 "least 1 (e.g. hidden // 4, not hidden / 4)")
        out_dim = int(out_dim)
        if norm not in NORMS:
            raise ExtensionError(f"unknown norm {norm!r} in {where}; expected None, 'bn' or 'bn_noaffine'")
        if act not in ACTIVATIONS:
            raise ExtensionError(f"unknown activation {act!r} in {where}; expected None or 'relu'")
        checked.append(Layer(out_dim, norm, act, bias))
    return checked


class SlimMLP(nn.Sequential):
    """An MLP of slimmable linear layers with BatchNorm per sub-network (``bn="private"``, keyed by name) or one
    BatchNorm sliced to each width (``bn="shared"``)."""

    def __init__(self, in_dim: int, layers: Sequence[Layer], menu: Menu, bn: str = "private", divisor: int = 1,
                 where: str = "head declaration"):
        modules: list[nn.Module] = []
        layers = check_layers(layers, where)  # ``where``: who declared them, for the error
        for i, (out_dim, norm, act, bias) in enumerate(layers):
            last = i == len(layers) - 1
            bias = norm is None if bias is None else bias
            modules.append(SlimLinear(in_dim, out_dim, bias=bias, slim_out=not last))
            if norm is not None:
                subnets = None if bn == "shared" else {
                    s.name: (out_dim if last else scaled_channels(out_dim, s.width, divisor)) for s in menu}
                modules.append(SlimBatchNorm(out_dim, dim=1, subnets=subnets, affine=norm == "bn"))
            if act == "relu":
                modules.append(nn.ReLU(inplace=True))
            in_dim = out_dim
        super().__init__(*modules)
        self.out_dim = in_dim
