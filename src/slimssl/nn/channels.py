"""The one rule that turns a full-width channel count into the count of a narrower sub-network."""

from __future__ import annotations


def scaled_channels(channels: int, width: float, divisor: int = 1) -> int:
    """Channels of a layer with ``channels`` at full width, at width multiplier ``width``.

    ``divisor == 1`` is SlimCLR's rule, ``int(channels * width)``. A larger divisor rounds to the nearest
    multiple of it (never below 90% of the exact value, as in MobileNet's ``make_divisible``), which keeps
    tensor-core friendly shapes on a GPU.
    """
    if width >= 1.0:
        return channels  # the full network is always the whole weight
    exact = channels * width
    if divisor <= 1:
        # the small epsilon keeps e.g. 0.7 * 10 = 6.9999... from flooring to 6
        return max(1, int(exact + 1e-6))
    rounded = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * exact:
        rounded += divisor
    return min(rounded, channels)
