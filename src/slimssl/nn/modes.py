"""Running models in eval mode for a while, and giving them back in the mode they came in."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the ``with`` block; the mode of every module of each model is restored after it,
    exceptions included (an evaluation that fails must not leave a caller's model in another mode, nor turn
    on the layers a caller keeps in eval mode inside a training model, such as frozen BatchNorm)."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
