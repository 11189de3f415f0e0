"""The slimmable ResNet supernet (v1.5; basic and bottleneck blocks; CIFAR and ImageNet stems).

A sub-network keeps the leading channels of every layer (width) and the first ``d_i`` blocks of stage
``i`` (depth), so a ResNet-34 supernet contains ResNet-18. Parameter names follow torchvision's ResNet
(``conv1``, ``layer1.0.bn2``...), private BatchNorms add ``.bns.<subnet name>``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import SlimsslError
from ..nn.channels import scaled_channels
from ..nn.layers import SlimBatchNorm, SlimConv2d, SlimState, bind_state
from ..nn.slimmable import SlimmableMixin
from ..nn.spec import Menu, SubnetError, SubnetLike, SubnetSpec
from .arch import EXPANSION, subnet_channels
from .plain import IN_CHANNELS, InputError, check_images  # noqa: F401  (InputError: importable from here too)
from .plain import PlainBlock, PlainResNet, PlainResNetConfig, has_downsample

def slim_conv_bn(norm: Callable[[int], SlimBatchNorm]):
    """The ``conv_bn`` factory of :class:`PlainBlock` for the supernet: slimmable conv, the given BatchNorm."""
    def build(cin: int, cout: int, kernel: int, stride: int = 1) -> tuple[SlimConv2d, SlimBatchNorm]:
        return SlimConv2d(cin, cout, kernel, stride, kernel // 2, bias=False), norm(cout)
    return build


class SlimResNet(SlimmableMixin, nn.Module):
    """A ResNet whose every sub-network in ``menu`` can be run, trained and exported.

    ``model(x)`` returns pooled features of the active sub-network (the full one by default);
    ``model(x, subnet=spec)`` or ``with model.subnet(spec): model(x)`` run another one.
    """

    def __init__(self, block: str = "basic", depths: Sequence[int] = (2, 2, 2, 2), base_width: int = 64,
                 stem: str = "imagenet", menu: Sequence[SubnetSpec | str | float] | None = None, bn: str = "private",
                 channel_divisor: int = 1, zero_init_residual: bool = False):
        super().__init__()
        if block not in EXPANSION:
            raise SlimsslError(f"block must be one of {list(EXPANSION)}, got {block!r}")
        if stem not in ("imagenet", "cifar"):
            raise SlimsslError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if bn not in ("private", "shared"):
            raise SlimsslError(f"bn must be 'private' or 'shared', got {bn!r}")
        for name, value in (("base_width", base_width), ("channel_divisor", channel_divisor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SlimsslError(f"{name} must be a positive whole number, got {value!r}")
        full = SubnetSpec(1.0, depths)  # checks the depths
        self.block, self.depths, self.base_width, self.stem = block, full.depths, base_width, stem
        self.menu = Menu(menu or [full], full.depths)  # a width alone is the width at full depth
        for spec in self.menu:
            spec.check_fits(self.depths)
        if bn == "private" and full not in self.menu:  # a forward without a sub-network runs the full network
            raise SubnetError(f"menu {self.menu.names} lacks the full network {full.name}: with private "
                              "BatchNorm only the menu's sub-networks have statistics, and the full one is the "
                              "default (add it to the menu, or use bn='shared')")
        self.slim_state = SlimState(full, self.menu, channel_divisor, private_bn=bn == "private")

        def norm(channels: int, position: tuple[int, int] | None = None) -> SlimBatchNorm:
            if bn == "shared":
                return SlimBatchNorm(channels)
            return SlimBatchNorm(channels, subnets={
                s.name: scaled_channels(channels, s.width, channel_divisor)
                for s in self.menu if position is None or s.depths[position[0]] > position[1]})

        k, s = (7, 2) if stem == "imagenet" else (3, 1)
        self.conv1 = SlimConv2d(IN_CHANNELS, base_width, k, s, k // 2, bias=False)
        self.bn1 = norm(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        cin = base_width
        for stage, depth in enumerate(self.depths):
            mid = base_width * 2**stage
            cout = mid * EXPANSION[block]
            blocks = []
            for i in range(depth):
                blocks.append(PlainBlock(block, cin, mid, cout, 2 if stage > 0 and i == 0 else 1,
                                         has_downsample(block, stage, i),
                                         slim_conv_bn(lambda c, p=(stage, i): norm(c, p))))
                cin = cout
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        self._init_weights(zero_init_residual)
        bind_state(self, self.slim_state)

    def _init_weights(self, zero_init_residual: bool) -> None:
        if self.conv1.weight.is_meta:  # built for its shapes alone (a checkpoint's check): no values to draw
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each residual branch starts as identity (Goyal et al.)
            for stage in self.stages():
                for blk in stage:
                    for bn in blk.last_bn.modules():
                        if isinstance(bn, nn.BatchNorm2d):
                            nn.init.zeros_(bn.weight)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.depths))]

    def feature_dim(self, subnet: SubnetLike | None = None) -> int:
        spec = self.resolve(subnet)
        return scaled_channels(self.num_features, spec.width, self.slim_state.divisor)

    def forward(self, x: torch.Tensor, subnet: SubnetLike | None = None) -> torch.Tensor:
        """The pooled features ``[batch, feature_dim(subnet)]`` of images ``x`` (float ``[batch, 3, H, W]``,
        normalised, in the network's dtype) through ``subnet`` (a name, a width alone, a spec; default: the one
        active, set by ``with supernet.subnet(...)``, else the full network)."""
        if subnet is not None:
            with self.subnet(subnet):
                return self.forward(x)
        check_images(x, self.conv1.weight.dtype)
        depths = self.slim_state.active.depths
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage, depth in zip(self.stages(), depths):
            for blk in list(stage)[:depth]:  # not stage[:depth], which builds a new nn.Sequential every forward
                x = blk(x)
        return torch.flatten(self.avgpool(x), 1)

    # ---- export -------------------------------------------------------------------------------------

    def plain_config(self, subnet: SubnetLike | None = None, num_classes: int = 0) -> PlainResNetConfig:
        """Channel counts and depths of ``subnet`` as a plain ResNet."""
        spec = self.resolve(subnet)
        stem, mids, outs = subnet_channels(self.block, self.base_width, spec.width, self.slim_state.divisor,
                                           len(self.depths))
        return PlainResNetConfig(block=self.block, stem=self.stem, stem_channels=stem, mid_channels=mids,
                                 out_channels=outs, depths=spec.depths, num_classes=num_classes)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # loaded statistics are not those recalibrate_bn estimated (a checkpoint of slimssl recalibrate marks
        # its own again once loaded: checkpoint.supernet_of)
        self.slim_state.bn_estimated = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def export(self, subnet: SubnetLike | None = None) -> PlainResNet:
        """A standalone plain ResNet holding a copy of ``subnet``'s weights and BatchNorm statistics, in this
        network's mode (train or eval; :func:`slimssl.load_exported` gives eval mode), dtype and device."""
        spec = self.resolve(subnet)
        weight = self.conv1.weight
        plain = PlainResNet(self.plain_config(spec)).to(device=weight.device, dtype=weight.dtype)
        modules = dict(self.named_modules())
        state = {}
        for key, target in plain.state_dict().items():
            owner, attr = key.rsplit(".", 1)
            layer = modules[owner]
            source = getattr(layer.norm_for(spec), attr) if isinstance(layer, SlimBatchNorm) else getattr(layer, attr)
            if target.dim() > 0:  # leading slices: the "weight[:out, :in]" rule
                source = source[tuple(slice(0, n) for n in target.shape)]
            state[key] = source.detach().clone().contiguous()
        plain.load_state_dict(state, strict=True)
        return plain.train(self.training)
