"""A plain ResNet with explicit channel counts: what an exported sub-network becomes.

No slimmable code here on purpose: this file is all a deployment needs. Parameter names follow
torchvision's ResNet, so a full-width, standard-depth export loads into ``torchvision.models.resnet*``
(with ``fc`` replaced by ``nn.Identity``) with ``strict=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..errors import InputError

IN_CHANNELS = 3  # RGB; the stem's input channels are fixed, not slimmed


def check_images(x, weight_dtype: torch.dtype) -> None:
    """``x`` must be a float batch of RGB images of the network's dtype (any float under autocast). Slimmable
    layers take their in-channels from the incoming tensor, so a 1-channel input would otherwise run silently
    on a slice of the stem's weights; a plain model would fail with torch's less telling message. Only the
    tensor's metadata is read (no device sync), so the check costs nothing in a compiled or traced forward."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == IN_CHANNELS and x.is_floating_point():
        if x.dtype == weight_dtype or torch.is_autocast_enabled(x.device.type):
            return
        raise InputError(f"expected images of the network's dtype {weight_dtype}, got {x.dtype}: convert them "
                         f"(x.to({weight_dtype})) or run under torch.autocast")
    got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
    raise InputError(f"expected a float tensor of images [batch, {IN_CHANNELS}, height, width], got {got}")


@dataclass(frozen=True)
class PlainResNetConfig:
    """The channels and depths of a plain ResNet (an exported sub-network), as its config.json records them."""

    block: str                  # "basic" or "bottleneck"
    stem: str                   # "imagenet" (7x7/2 + max-pool) or "cifar" (3x3/1, no max-pool)
    stem_channels: int
    mid_channels: tuple[int, ...]   # per stage: width of the 3x3 convs (bottleneck: its inner width)
    out_channels: tuple[int, ...]   # per stage: block output channels
    depths: tuple[int, ...]
    num_classes: int = 0        # 0: backbone only, the output is the pooled feature

    def __post_init__(self) -> None:  # an edited config.json: said here, not as torch's error deep in a layer
        def counts(value, least: int = 1) -> bool:
            values = value if isinstance(value, tuple) else (value,)
            return all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in values)

        problems = []
        if self.block not in ("basic", "bottleneck"):
            problems.append(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if self.stem not in ("imagenet", "cifar"):
            problems.append(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        stages = {len(self.mid_channels), len(self.out_channels), len(self.depths)}
        if len(stages) != 1 or not self.depths:
            problems.append("mid_channels, out_channels and depths need one entry per stage, got "
                            f"{len(self.mid_channels)}, {len(self.out_channels)} and {len(self.depths)}")
        for name in ("stem_channels", "mid_channels", "out_channels", "depths"):
            if not counts(getattr(self, name)):
                problems.append(f"{name} must be whole numbers >= 1, got {getattr(self, name)!r}")
        if not counts(self.num_classes, least=0):
            problems.append(f"num_classes must be a whole number >= 0, got {self.num_classes!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PlainResNetConfig":
        tuples = {"mid_channels", "out_channels", "depths"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})

    @property
    def feature_dim(self) -> int:
        return self.out_channels[-1]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> tuple[nn.Module, nn.Module]:
    """A bias-free conv and the BatchNorm after it (the one building block of the ResNet family)."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)


def has_downsample(block: str, stage: int, index: int) -> bool:
    """Torchvision's rule for the standard widths: the first block of every stage projects its shortcut,
    except in stage 1 of a basic-block ResNet, where input and output widths already agree."""
    return index == 0 and (stage > 0 or block == "bottleneck")


class PlainBlock(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3 with the stride as in v1.5, 1x1) residual block.

    ``conv_bn`` builds each conv and its BatchNorm; the slimmable supernet passes slimmable ones and
    reuses the rest, so the two models share one definition of the block.
    """

    __jit_unused_properties__ = ["last_bn"]  # a Python-side helper; TorchScript need not compile it

    def __init__(self, kind: str, cin: int, mid: int, cout: int, stride: int, downsample: bool,
                 conv_bn=_conv_bn):
        super().__init__()
        if kind == "basic":
            shapes = [(cin, mid, 3, stride), (mid, cout, 3, 1)]
        else:
            shapes = [(cin, mid, 1, 1), (mid, mid, 3, stride), (mid, cout, 1, 1)]
        for i, shape in enumerate(shapes, start=1):
            conv, bn = conv_bn(*shape)
            self.add_module(f"conv{i}", conv)
            self.add_module(f"bn{i}", bn)
        self.num_convs = len(shapes)
        if self.num_convs == 2:  # a basic block: forward tests these (None adds no state_dict keys)
            self.conv3 = self.bn3 = None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(*conv_bn(cin, cout, 1, stride))

    @property
    def last_bn(self) -> nn.Module:
        return self.bn2 if self.bn3 is None else self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written out, not looped over names, so that TorchScript compiles it
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.conv3 is not None:  # a bottleneck
            out = self.bn3(self.conv3(self.relu(out)))
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class PlainResNet(nn.Module):
    """A ResNet with fixed channels and depths, in torchvision's key layout: an exported sub-network.

    ``forward`` gives the pooled features, or the logits once ``fc`` is a classifier. ``metadata`` holds what
    an export records beside the weights (``resolution``, ``mean``, ``std`` of its inputs, ``source``,
    ``subnet``, ...): empty for a model built here, filled by :func:`slimssl.load_exported`, and written again
    by :func:`slimssl.save_exported`."""

    __jit_unused_properties__ = ["feature_dim"]  # a Python-side helper; TorchScript need not compile it

    def __init__(self, config: PlainResNetConfig):
        super().__init__()
        self.config = config
        self.metadata: dict = {}
        if config.stem == "imagenet":
            self.conv1, self.bn1 = _conv_bn(3, config.stem_channels, 7, 2)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1, self.bn1 = _conv_bn(3, config.stem_channels, 3, 1)
            self.maxpool = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        cin = config.stem_channels
        for stage, (mid, cout, depth) in enumerate(zip(config.mid_channels, config.out_channels, config.depths)):
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PlainBlock(config.block, cin, mid, cout, stride, has_downsample(config.block, stage, i)))
                cin = cout
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, config.num_classes) if config.num_classes else nn.Identity()

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.config.depths))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features ``[batch, feature_dim]``: the output without ``fc`` (a classifier head)."""
        if not torch.jit.is_scripting():  # TorchScript compiles without this branch
            # a trace (ONNX) records no Python check, and torch.fx's symbolic one (feature extractors, FX
            # quantisation) passes a Proxy, not a tensor; dynamo runs the check (no sync)
            if not torch.jit.is_tracing() and not isinstance(x, torch.fx.Proxy):
                check_images(x, self.conv1.weight.dtype)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name, stage in self.named_children():  # the stages in order; TorchScript unrolls this loop
            if name.startswith("layer"):
                x = stage(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features ``[batch, feature_dim]`` of images ``x`` (float ``[batch, 3, H, W]``, normalised as
        ``metadata`` says), or the logits once ``fc`` is a classifier."""
        return self.fc(self.forward_features(x))

    @property
    def feature_dim(self) -> int:
        """The size of the pooled features (``fc``'s input)."""
        return self.config.feature_dim

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "fc" and "config" in self.__dict__:  # config.num_classes follows a classifier set as fc, so that
            # PlainResNet(model.config) takes model.state_dict(); another head (an MLP, a Linear without bias) is
            # the caller's to describe
            linear = isinstance(value, nn.Linear) and value.bias is not None
            classes = value.out_features if linear else 0 if isinstance(value, nn.Identity) else self.config.num_classes
            if classes != self.config.num_classes:
                self.config = replace(self.config, num_classes=classes)
