"""Slimmable layers: weights are sliced to the active sub-network, BatchNorm is kept per sub-network.

Every slimmable layer reads the active sub-network from a :class:`SlimState` that the whole model shares.
Only a model's scoped ``subnet(...)`` context changes that state, so no call can leave a model narrowed.
Output channels follow :func:`scaled_channels`; input channels are taken from the incoming tensor.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .channels import scaled_channels
from .spec import Menu, SubnetError, SubnetSpec


class SlimState:
    """The sub-network a model runs right now, shared by all of its slimmable layers."""

    def __init__(self, full: SubnetSpec, menu: Menu, divisor: int = 1, private_bn: bool = True):
        self.full = full
        self.menu = menu
        self.divisor = divisor
        self.private_bn = private_bn
        self.active = full
        # training BatchNorm takes statistics over groups of this many consecutive samples (None: the batch)
        self.bn_group_size: int | None = None
        # training BatchNorm normalises each of this many equal parts of a batch on its own: the views of one
        # image batch that a forward carries together (SSLModel.views_in_one_batch)
        self.views = 1
        # shared BatchNorm: the sub-network whose statistics recalibrate_bn estimated last, and how many batches
        # the statistics had seen then (a training forward adds to them, and they belong to no width again)
        self.bn_estimated: tuple[str, int] | None = None

    def channels(self, full_channels: int) -> int:
        return scaled_channels(full_channels, self.active.width, self.divisor)


class SlimModule(nn.Module):
    """Base of the slimmable layers: gives access to the shared state once the model binds it."""

    _state: SlimState | None = None

    @property
    def state(self) -> SlimState:
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a slimmable model (call bind_state)")
        return self._state


def bind_state(module: nn.Module, state: SlimState) -> None:
    """Point every slimmable layer under ``module`` at ``state``."""
    for layer in module.modules():
        if isinstance(layer, SlimModule):
            object.__setattr__(layer, "_state", state)


class SlimConv2d(nn.Conv2d, SlimModule):
    """Conv2d using the leading ``out x in`` slice of its full weight (groups=1)."""

    def __init__(self, *args, slim_out: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1:
            raise ValueError("SlimConv2d supports groups=1 only")
        self.slim_out = slim_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.state.channels(self.out_channels) if self.slim_out else self.out_channels
        # The slice's gradient is zero, not None, outside the slice: weight decay and momentum move the channels
        # a narrow sub-network does not use. Every shipped sampler runs the full network each step, which
        # gives all of them a real gradient, as in US-Nets and SlimCLR.
        bias = None if self.bias is None else _leading(self.bias, out)
        return self._conv_forward(x, _leading_block(self.weight, out, x.shape[1]), bias)


class SlimLinear(nn.Linear, SlimModule):
    """Linear using the leading ``out x in`` slice of its full weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, slim_out: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.slim_out = slim_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.state.channels(self.out_features) if self.slim_out else self.out_features
        bias = None if self.bias is None else _leading(self.bias, out)
        return F.linear(x, _leading_block(self.weight, out, x.shape[-1]), bias)


class SlimBatchNorm(SlimModule):
    """BatchNorm for a slimmable model, in one of two modes.

    * private (``subnets`` given): one independent BatchNorm (affine and running statistics) per
      sub-network, keyed by its canonical name, as both DSPNet and SlimCLR use. Only menu entries have one.
    * shared (``subnets`` is None): one BatchNorm of the full width, sliced to the active width; the running
      statistics then need recalibration per sub-network (:func:`recalibrate_bn`).
    """

    def __init__(self, num_features: int, dim: int = 2, subnets: Mapping[str, int] | None = None,
                 affine: bool = True, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim]
        self.num_features = num_features
        if subnets is None:
            self.bn = norm(num_features, eps=eps, momentum=momentum, affine=affine)
            self.bns = None
        else:
            self.bn = None
            self.bns = nn.ModuleDict({name: norm(c, eps=eps, momentum=momentum, affine=affine)
                                      for name, c in subnets.items()})

    def __repr__(self) -> str:  # one line, not one per sub-network: a supernet's repr stays torchvision's size
        norms = [self.bn] if self.bns is None else list(self.bns.values())
        kind = type(norms[0]).__name__ + ("" if norms[0].affine else ", affine=False")  # SyncBatchNorm once converted
        if self.bns is None:
            return f"SlimBatchNorm({self.num_features}, shared {kind}: sliced to each width)"
        sizes = [bn.num_features for bn in norms]
        return f"SlimBatchNorm({self.num_features}, private {kind}: one per sub-network, of {sizes} features)"

    def norm_for(self, spec: SubnetSpec) -> nn.Module:
        """The BatchNorm module that normalises ``spec`` (the shared one in shared mode)."""
        if self.bns is None:
            return self.bn
        try:
            return self.bns[spec.name]
        except KeyError:
            raise SubnetError(
                f"no private BatchNorm for sub-network {spec.name}; this model has them for "
                f"{list(self.bns)}. Private BatchNorm exists only for menu entries: add {spec.name} to the "
                "menu, or build the model with shared BatchNorm and recalibrate it"
            ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn if self.bns is None else self.norm_for(self.state.active)
        views = self.state.views
        if bn.training and views > 1:  # each view with its own statistics, as if it ran alone (in order)
            return torch.cat([self._normalise(bn, part) for part in x.chunk(views)])
        return self._normalise(bn, x)

    def _normalise(self, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        group = self.state.bn_group_size
        if bn.training and group and x.shape[0] > group:
            return grouped_batch_norm(bn, x, group)
        return bn(x) if self.bns is not None else _sliced_batch_norm(bn, x)


def grouped_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Training BatchNorm with the statistics of each ``group_size`` consecutive samples, as if each group sat
    on its own GPU; the running statistics move towards the mean over groups. ``bn`` may be wider than ``x``
    (shared BatchNorm): its leading channels are used.

    Why: per-GPU statistics are part of some recipes (MoCo's shuffle-BN needs several groups), and a fixed
    group size makes a run independent of how many processes share the batch.
    """
    n, c = x.shape[:2]
    if n % group_size:
        raise ValueError(f"model.bn_group_size {group_size} must divide the batch of {n} samples that reach "
                         "BatchNorm (the per-process batch)")
    g = n // group_size
    # The groups folded into the channels, (G·S, C, ...) -> (S, G·C, ...): one ordinary BatchNorm of G·C
    # channels then normalises each group with its own statistics, in the fused kernel, which keeps one copy
    # of its input for the backward pass (statistics of the groups computed separately kept three, in fp32).
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    folded = x.unflatten(0, (g, group_size)).transpose(0, 1).flatten(1, 2).contiguous(memory_format=layout)
    track = bn.track_running_stats and bn.running_mean is not None
    momentum = 0.0
    if track:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    running_mean = _leading(bn.running_mean, c).repeat(g) if track else None  # one copy per group, averaged below
    running_var = _leading(bn.running_var, c).repeat(g) if track else None
    out = F.batch_norm(folded, running_mean, running_var,
                       None if bn.weight is None else _leading(bn.weight, c).repeat(g),
                       None if bn.bias is None else _leading(bn.bias, c).repeat(g), True, momentum, bn.eps)
    if track:  # each group's update is linear in its statistics: the mean of the updates is the update by the mean
        with torch.no_grad():
            torch.mean(running_mean.view(g, c), 0, out=_leading(bn.running_mean, c))
            torch.mean(running_var.view(g, c), 0, out=_leading(bn.running_var, c))
    return out.unflatten(1, (g, c)).transpose(0, 1).flatten(0, 1).contiguous(memory_format=layout)


def _sliced_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Run ``bn`` on the leading ``x.shape[1]`` channels; running statistics are updated in place."""
    c = x.shape[1]
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    else:
        momentum = 0.0 if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or bn.running_mean is None
    return F.batch_norm(
        x,
        None if bn.running_mean is None else _leading(bn.running_mean, c),
        None if bn.running_var is None else _leading(bn.running_var, c),
        None if bn.weight is None else _leading(bn.weight, c),
        None if bn.bias is None else _leading(bn.bias, c),
        use_batch_stats, momentum, bn.eps,
    )


def _leading_block(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``weight[:rows, :cols]`` (output, input channels) in one op: its gradient is one zero-fill and one copy
    on a GPU, where the two slices took two of each. At full size an alias, which autocast casts for each call
    as it casts a slice (its cache would give both views one cast, and sum their gradients in bf16)."""
    if rows > weight.shape[0] or cols > weight.shape[1] or torch.onnx.is_in_onnx_export():
        return weight[:rows, :cols]  # too many channels: the op's own error; ONNX's tracer wants slices
    if rows == weight.shape[0] and cols == weight.shape[1]:
        return weight.view(weight.shape)
    return weight.as_strided((rows, cols, *weight.shape[2:]), weight.stride())  # any layout: channels_last too


def _leading(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` entries of a 1-D ``t``; an alias of ``t`` when that is all of it: a slice is an op with a
    gradient of its own (two kernels on a GPU) even then, and ``t`` itself would let autocast share one cast
    between calls, as :func:`_leading_block` says."""
    return t.view(t.shape) if t.shape[0] == n else t[:n]

