"""The ResNet architectures by name, and the channels of a sub-network of one. Free of torch: the config schema
reads them, and reading a config (``slimssl config``, ``slimssl report``) need not wait for torch."""

from __future__ import annotations

from ..nn.channels import scaled_channels

ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def subnet_channels(block: str, base_width: int, width: float, divisor: int, stages: int = 4
                    ) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """The stem's channels, and each stage's inner and output channels, of the sub-network of ``width`` of a
    supernet of ``base_width`` (stage i: ``base_width * 2**i``, x4 out of a bottleneck), rounded by ``divisor``."""
    mids = [base_width * 2**i for i in range(stages)]
    return (scaled_channels(base_width, width, divisor), tuple(scaled_channels(m, width, divisor) for m in mids),
            tuple(scaled_channels(m * EXPANSION[block], width, divisor) for m in mids))
