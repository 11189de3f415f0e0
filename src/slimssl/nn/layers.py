"""Slimmable layers: weights are sliced to the active sub-network, BatchNorm is kept per sub-network.

Every slimmable layer reads the active sub-network from a :class:`SlimState` that the whole model shares.
Only a model's scoped ``subnet(...)`` context changes that state, so no call can leave a model narrowed.
Output channels follow :func:`scaled_channels`; input channels are taken from the incoming tensor.
"""

from __future__ import annotations

from contextlib import contextmanager
from numbers import Real
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .channels import scaled_channels
from .spec import Menu, SubnetError, SubnetLike, Subnets, SubnetSpec


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
        group = self.state.bn_group_size
        if bn.training and group and x.shape[0] > group:
            return grouped_batch_norm(bn, x, group)
        return bn(x) if self.bns is not None else _sliced_batch_norm(bn, x)


def _shared_bn_batches(model: nn.Module) -> int:
    """How many batches the shared BatchNorm statistics have seen (its first layer's count): a recalibration
    resets the count, and every training forward adds one."""
    for layer in model.modules():
        if isinstance(layer, SlimBatchNorm) and layer.bns is None:
            return int(layer.bn.num_batches_tracked)
    return 0


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


class SlimmableMixin:
    """Scoped activation of a sub-network for a model that owns a :class:`SlimState`."""

    slim_state: SlimState

    def resolve(self, subnet: SubnetLike | None) -> SubnetSpec:
        """Turn a spec, its text or a width (``0.5``: full depth) into a spec this model can run, or raise a
        clear error."""
        state = self.slim_state
        if subnet is None:
            return state.full
        subnet = SubnetSpec.coerce(subnet, state.full.depths)
        subnet.check_fits(state.full.depths)
        if state.private_bn and subnet not in state.menu:  # its BatchNorm was never made
            raise SubnetError(f"sub-network {subnet.name} is not in the menu {state.menu.names}: with private "
                              "BatchNorm (model.bn: private) only the menu's entries have BatchNorm layers, made and "
                              "trained for each; pick one of them, or pretrain with model.bn: shared, where any width "
                              "and depth runs once its statistics are re-estimated")
        return subnet

    def resolve_many(self, subnets: Subnets) -> list[SubnetSpec]:
        """The menu (``subnets`` None or ``"all"``), or each of ``subnets`` (one alone too) resolved, in order and
        without repeats."""
        if subnets is None or (isinstance(subnets, str) and subnets == "all"):
            return list(self.slim_state.menu)
        names = [subnets] if isinstance(subnets, (str, Real, SubnetSpec, Mapping)) else list(subnets)
        if not names:
            raise SubnetError("no sub-network given: name at least one, or 'all' (the menu)")
        return list(dict.fromkeys(self.resolve(t) for t in names))

    def bn_statistics_estimated(self, subnet: SubnetLike | None) -> bool:
        """Whether the BatchNorm statistics are ``subnet``'s own: always with private BatchNorm; with shared
        BatchNorm, when :func:`recalibrate_bn` estimated them for it last and no training forward moved them, or
        when the menu has ``subnet`` alone and nothing was recalibrated (training ran no other width)."""
        state = self.slim_state
        if state.private_bn:
            return True
        spec = self.resolve(subnet)
        if state.bn_estimated is None:
            return list(state.menu) == [spec]
        return state.bn_estimated == (spec.name, _shared_bn_batches(self))

    def mark_bn_estimated(self, subnet: SubnetLike | None) -> None:
        """Record that the shared BatchNorm statistics are now ``subnet``'s own (what recalibrate_bn does, and
        what a checkpoint written by ``slimssl recalibrate`` holds)."""
        if not self.slim_state.private_bn:
            self.slim_state.bn_estimated = (self.resolve(subnet).name, _shared_bn_batches(self))

    @contextmanager
    def subnet(self, subnet: SubnetLike | None) -> Iterator[SubnetSpec]:
        """Run the model as ``subnet`` inside the block; the previous sub-network is restored on exit."""
        spec = self.resolve(subnet)
        previous = self.slim_state.active
        self.slim_state.active = spec
        try:
            yield spec
        finally:
            self.slim_state.active = previous


@torch.no_grad()
def recalibrate_bn(model: SlimmableMixin, subnet: SubnetLike, batches,
                   device: torch.device | str | None = None) -> None:
    """Re-estimate, in place, the BatchNorm running statistics of ``subnet`` from ``batches`` of input images.

    Needed in shared-BN mode before evaluating a sub-network, since the shared statistics belong to
    whichever widths ran last. Statistics are a plain average over the batches (momentum None). Only what
    ``subnet`` runs changes: the channels beyond its width and the layers beyond its depth keep their
    statistics, which belong to other sub-networks.
    """
    if not isinstance(getattr(model, "_orig_mod", model), SlimmableMixin):  # torch.compile's wrapper forwards
        raise SubnetError(f"recalibrate_bn takes a slimmable supernet (slimssl.build_supernet, load_supernet), got "
                          f"{type(model).__name__}; a plain model's BatchNorm statistics are re-estimated by "
                          "torch.optim.swa_utils.update_bn(batches, model)")
    with model.subnet(subnet) as spec:
        layers = [layer for layer in model.modules() if isinstance(layer, SlimBatchNorm)
                  and (layer.bns is None or spec.name in layer.bns)]  # private: blocks within its depth
        norms = [layer.norm_for(spec) for layer in layers]
        momenta = [bn.momentum for bn in norms]
        saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in norms]
        channels: dict[int, int] = {}  # id(norm) -> the channels the sub-network ran through it
        hooks = [layer.register_forward_pre_hook(
            lambda _, inputs, key=id(bn): channels.__setitem__(key, inputs[0].shape[1]))
            for layer, bn in zip(layers, norms)]
        was_training = model.training
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over all batches
            bn.train()
        count, done = 0, False
        try:
            for images in batches:
                if isinstance(images, (tuple, list)):
                    images = images[0]
                model(images if device is None else images.to(device))
                count += 1
            if count == 0:
                raise SubnetError(f"recalibrate_bn of {spec.name} got no batches; expected at least one batch of "
                                  "input images")
            done = True
            model.mark_bn_estimated(spec)
        finally:
            for hook in hooks:
                hook.remove()
            for bn, momentum, state in zip(norms, momenta, saved):
                bn.momentum = momentum
                used = channels.get(id(bn)) if done else None  # failed or empty: keep what was found
                if used is None:  # not run by this sub-network (or no recalibration): as it was
                    bn.load_state_dict(state)
                elif bn.running_mean is not None:  # the shared BatchNorm's channels of wider sub-networks
                    bn.running_mean[used:] = state["running_mean"][used:]
                    bn.running_var[used:] = state["running_var"][used:]
            model.train(was_training)
