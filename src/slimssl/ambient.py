"""The caller's torch modes, which a pretraining or an evaluation must not inherit: a notebook cell or a test left
under ``torch.no_grad()`` or ``torch.inference_mode()``, a ``torch.set_default_dtype(torch.float64)``, an outer
``torch.autocast``. Each made these calls fail with torch's own errors (a loss without a gradient, float64 layers
fed float32 images, a kNN vote in bfloat16). Inside :func:`own_torch_modes` grad mode is on, inference mode off,
the default dtype float32 and autocast off (a run's own precision turns it on where it trains); the caller's
modes come back after it."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def own_torch_modes() -> Iterator[None]:
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
                torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.set_default_dtype(dtype)
