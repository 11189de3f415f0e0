"""How much each sub-network's loss weighs in a step (``slim.loss_weights``), and how to add a rule of one's own.

A rule is a function ``(specs, progress) -> weights``: ``specs`` are the sub-networks trained in the step,
largest first (the full network alone during slow start), ``progress`` is the fraction of training done before
the step (0 at the first), and the result is one weight >= 0 per sub-network, in that order. Each
sub-network's backward pass is scaled by its weight. A rule must be a pure function of its arguments: every
process calls it alone, and a resumed run must weigh its steps as the uninterrupted run did.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Sequence

from ..errors import ExtensionError
from ..nn.spec import SubnetSpec

LossWeights = Callable[[Sequence[SubnetSpec], float], Sequence[float]]
LOSS_WEIGHTS: dict[str, LossWeights] = {}


def register_loss_weights(name: str) -> Callable[[LossWeights], LossWeights]:
    """Make the decorated function the rule of ``slim.loss_weights: <name>``; the function is returned as it is.

    Registering again a function of the same module and name (a notebook cell run twice) replaces it; a name
    that another function holds is an error."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ExtensionError(f"register_loss_weights takes a name such as 'by_width' (letters, digits, _), got "
                             f"{name!r}")

    def register(fn: LossWeights) -> LossWeights:
        if not callable(fn):
            raise ExtensionError(f"register_loss_weights({name!r}) decorates a function (specs, progress) -> "
                                 f"weights, got {fn!r}")
        taken = LOSS_WEIGHTS.get(name)
        if taken is not None and _where(taken) != _where(fn):
            raise ExtensionError(f"loss weights {name!r} are taken by {_where(taken)}; give {_where(fn)} another name")
        LOSS_WEIGHTS[name] = fn
        return fn

    return register


def _where(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


@register_loss_weights("uniform")
def uniform(specs: Sequence[SubnetSpec], progress: float) -> list[float]:
    """Every sub-network's loss weighs 1."""
    return [1.0] * len(specs)


@register_loss_weights("slimclr")
def slimclr(specs: Sequence[SubnetSpec], progress: float) -> list[float]:
    """SlimCLR's re-weighting: the full network's loss weighs 1 + the sum of the other sub-networks' widths, so
    its gradient dominates the shared weights; the others weigh 1."""
    return [1.0 + sum(s.width for s in specs[1:]), *[1.0] * (len(specs) - 1)]


def loss_weights_rule(name: str) -> LossWeights:
    """The rule registered as ``name``; an unknown name is an error that lists the known ones."""
    if name not in LOSS_WEIGHTS:
        raise ExtensionError(f"unknown loss weights {name!r}; known: {', '.join(LOSS_WEIGHTS)}. A rule of your own "
                             "must be registered first: @slimssl.slim.register_loss_weights(name) in Python, "
                             "`slimssl --import MODULE` for the command line")
    return LOSS_WEIGHTS[name]


def weigh(name: str, specs: Sequence[SubnetSpec], progress: float) -> list[float]:
    """The weights of ``specs`` by the rule ``name``, checked: one finite number >= 0 each, not all 0."""
    weights = loss_weights_rule(name)(list(specs), progress)
    where = f"loss weights {name!r} ({_where(LOSS_WEIGHTS[name])})"
    try:
        weights = list(weights)
    except TypeError:
        raise ExtensionError(f"{where} returned {weights!r}; expected one weight per sub-network") from None
    if len(weights) != len(specs):
        raise ExtensionError(f"{where} returned {len(weights)} weight(s) for the step's {len(specs)} sub-network(s) "
                             f"({', '.join(s.name for s in specs)}); expected one each, in that order")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or w < 0]
    if bad:
        raise ExtensionError(f"{where} returned {weights!r}; expected finite numbers >= 0")
    if not any(weights):
        raise ExtensionError(f"{where} weighs every sub-network of the step 0 ({', '.join(s.name for s in specs)}): "
                             "the step would train nothing")
    return [float(w) for w in weights]
