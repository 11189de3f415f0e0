"""Running models in eval mode for a while, and giving them back in the mode they came in."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the ``with`` block; each model's own mode is restored after it, exceptions included
    (an evaluation that fails must not leave a caller's model in another mode)."""
    modes = [(model, model.training) for model in models]
    for model, _ in modes:
        model.eval()
    try:
        yield
    finally:
        for model, training in modes:
            model.train(training)
