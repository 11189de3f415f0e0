"""The random streams of a run, each derived from ``train.seed``, the stream's name and its counters.

Every random draw of training is a pure function of (seed, stream, counters such as the step): every process
draws the same without communicating, and a resumed run draws what the uninterrupted run would have drawn.
The inputs are mixed by numpy's ``SeedSequence``, so no two streams or counters share a seed, which
arithmetic such as ``seed * K + step`` cannot promise (one stream's step 31k would be another's step k).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import numpy as np
import torch

F = TypeVar("F", bound=Callable)

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


def callers_random_state_kept():
    """A block after which torch's global generators are as they were before it: the CPU's, and the current GPU's
    when CUDA had been started (the GPU a process uses; not every GPU of the machine, which a process of a
    multi-GPU job does not touch). slimssl's own draws come from the generators above; what draws from the
    global ones is the initialisation of networks about to be loaded (and a run's seeding with ``train.seed``)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def keeps_random_state(function: F) -> F:
    """Decorates a public function: the caller's draws after it are those they would have made without it."""
    @functools.wraps(function)
    def keeping(*args, **kwargs):
        with callers_random_state_kept():
            return function(*args, **kwargs)
    return keeping  # type: ignore[return-value]
