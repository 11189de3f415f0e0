"""The random streams of a run, each derived from ``train.seed``, the stream's name and its counters.

Every random draw of training is a pure function of (seed, stream, counters such as the step): every process
draws the same without communicating, and a resumed run draws what the uninterrupted run would have drawn.
The inputs are mixed by numpy's ``SeedSequence``, so no two streams or counters share a seed, which
arithmetic such as ``seed * K + step`` cannot promise (one stream's step 31k would be another's step k).
"""

from __future__ import annotations

import numpy as np
import torch

STREAMS = (
    "epoch_order",  # the order of the images in an epoch (counter: epoch)
    "step_views",  # the batched on-device augmentation of a step (counter: step)
    "sample_crop",  # a streamed sample's crop boxes, cut in a loader worker (counters: step, row in the batch)
    "subnet_draw",  # the sub-networks of a sandwich step (counter: step)
    "shuffle_bn",  # the order of the key network's batch under MoCo's shuffle-BN (counters: step, view)
    "probe_head",  # a linear probe head's initial weights (counter: crc32 of its sub-network's name)
    "whole_crop",  # an evaluation's random crop of a whole streamed picture (counter: its place in the order)
)


def derived_seed(seed: int, stream: str, *counters: int) -> int:
    """A 64-bit seed for ``stream`` at ``counters`` (non-negative ints)."""
    high, low = np.random.SeedSequence([seed % 2**64, STREAMS.index(stream), *counters]).generate_state(2, np.uint32)
    return int(high) << 32 | int(low)


def derived_generator(seed: int, stream: str, *counters: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with :func:`derived_seed`."""
    return torch.Generator(device).manual_seed(derived_seed(seed, stream, *counters))
