"""Whether stored weights fit the network their config describes, found before the network is allocated.

A checkpoint's config, or an export's config.json, says how large a network to build; the weights beside it say
how large it was. A damaged or hand-edited config (a base width of 100000, a stage of 20000 blocks) would have
the network built, in gigabytes, before ``load_state_dict`` found that the weights do not fit. Here the depths
are read from the weights' names, and the network is built on the meta device (shapes, no memory) to compare
every tensor's shape.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.")  # a residual block's entries: layer<stage>.<block>.<...>


def stored_depths(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The blocks of each stage that ``state``'s names hold (ResNet naming: ``layer2.3.conv1.weight``)."""
    depths: dict[int, int] = {}
    for key in state:
        found = _BLOCK.match(key)
        if found:
            stage, block = int(found.group(1)), int(found.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    return tuple(depths.get(stage, 0) for stage in range(1, max(depths, default=0) + 1))


def weights_misfit(build: Callable[[], nn.Module], depths: Sequence[int],
                   state: Mapping[str, torch.Tensor]) -> str | None:
    """The first way ``state`` does not fit the network ``build`` makes (whose stages have ``depths`` blocks), or
    None when every entry is there with its shape. ``build`` runs on the meta device, and only when the depths
    agree: a config's depths could ask for more blocks than any memory holds."""
    held = stored_depths(state)
    if tuple(held) != tuple(depths):
        return f"the config's stages have {list(depths)} blocks, the weights' {list(held)}"
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build().state_dict().items()}
    missing = [name for name in expected if name not in state]
    if missing:
        return f"missing key {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        return f"unexpected key {unexpected[0]!r}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            return (f"size mismatch for {name}: the weights hold {list(state[name].shape)}, the config makes "
                    f"{list(shape)}")
    return None
