"""What a self-supervised method is to slimssl: heads plus a loss over (online, target) outputs.

A method never knows about sub-networks. The slim layer (``slimssl.slim``) decides which sub-networks
run, with which weight and teacher, and calls :meth:`Method.loss` / :meth:`Method.distill` for each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..models.heads import Layer
from .losses import soft_cross_entropy

if TYPE_CHECKING:
    from ..config import MethodConfig

# A network's outputs, one entry per view (two). A view that :meth:`Method.views_used` leaves out on that side is
# None in its place; the type says the usual case, a symmetric loss that gets every view, so that a method's
# hooks and the MethodOutput they return type-check as written.
PerView = list[torch.Tensor]


@dataclass
class MethodOutput:
    """The loss of one sub-network and what a student of it would be distilled on (logits or predictions):
    needed only with ``slim.teacher: online``, None otherwise."""

    loss: torch.Tensor
    distill_on: list[torch.Tensor] | None = None


class Method(nn.Module):
    """Base class. A subclass sets ``name``, implements :meth:`loss`, and declares its heads and augmentation
    where they differ from BYOL's; :func:`slimssl.methods.register_method` makes it a ``method.name``.

    Every other hook has a default that suits a two-view method with a momentum target. ``self.cfg`` is the
    run's ``method`` config section; ``self.options`` is ``default_options`` updated by ``method.options``.
    """

    name: str = ""
    augment: str = "byol"  # the view recipe (``data.augment``) a run uses unless its config names one
    default_options: dict[str, Any] = {}  # a method's own settings and their defaults (``method.options``)
    symmetric_only = False  # True where the loss is symmetric whatever ``method.symmetric`` says (refused false)
    # True where distill_on are logits of cosine similarities over method.temperature, which the base class's
    # distill fits (the contrastive methods); online distillation warns otherwise, unless distill is overridden
    distill_on_logits = False
    # False where distill ignores its temperature (a regression, as BYOL's): slim.distill_temperature then warns.
    # Declared beside the distill it describes: a subclass that overrides distill is not held to it
    distill_reads_temperature = True
    # the ``method`` settings the method reads (a run that sets another warns: it would change nothing); None:
    # any of them (a method of your own, unless it says). name, options and shuffle_bn are read for every method.
    # Declared by a class for itself: a subclass that does not declare its own is not warned for
    settings_read: frozenset[str] | None = None

    @staticmethod
    def projector_layers(hidden: int, out: int) -> list[Layer]:
        """The projector after the backbone, as layers; ``hidden`` is ``method.proj_hidden`` (narrowed with
        the sub-network's width) and ``out`` is ``method.proj_dim`` (the same for every sub-network)."""
        return [Layer(hidden, "bn", "relu"), Layer(out)]

    @staticmethod
    def predictor_layers(hidden: int, out: int) -> list[Layer] | None:
        """The predictor after the projector (online network only), from ``method.pred_hidden`` and
        ``method.proj_dim``; None for no predictor."""
        return [Layer(hidden, "bn", "relu"), Layer(out)]

    def __init__(self, cfg: MethodConfig):
        super().__init__()
        self.cfg = cfg
        self.options = {**self.default_options, **cfg.options}  # checked against the defaults by the config

    def loss(self, online: PerView, target: PerView) -> MethodOutput:
        """``online``: the online network's outputs for the views; ``target``: the full-size target's. A view
        left out by :meth:`views_used` is ``None`` there."""
        raise NotImplementedError

    def prepare_target(self, target: PerView) -> PerView:
        """The target's outputs as every sub-network's loss takes them, computed once per step, or per
        micro-batch with ``train.micro_batches`` (e.g. keys gathered over the processes). Unchanged by default."""
        return target

    def views_used(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(views the online network runs on, views the target runs on): the loop computes only these. Both
        views on both sides by default (symmetric losses)."""
        return (0, 1), (0, 1)

    def distill(self, student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float) -> torch.Tensor:
        """Online distillation from the full network's detached outputs (SlimCLR): soft cross-entropy
        between the similarity distributions over the same keys, summed over the views like the SSL losses.

        ``student``/``teacher`` are the loss's logits, cosine similarities over ``method.temperature``; the
        distillation softens the cosine similarities by its own ``temperature`` and scales by its square, as
        SlimCLR does (5 for MoCo v2; 1 for MoCo v3, whose tau is 1 in SlimCLR's recipe and 0.2 in the CIFAR
        one). The teacher's own entropy is subtracted: the gradient is the same, and the logged loss is 0 when
        the student matches (the cross-entropy alone is about 25 ln(number of keys) at temperature 5).
        Regression methods override this."""
        tau = self.cfg.temperature  # back to cosine similarities
        return sum(soft_cross_entropy(s * tau, t * tau, temperature) - soft_cross_entropy(t * tau, t * tau, temperature)
                   for s, t in zip(student, teacher))

    def momentum(self, progress: float) -> float:
        """EMA coefficient of the target at ``progress`` in [0, 1] of training."""
        m = self.cfg.momentum
        if self.cfg.momentum_schedule == "constant":
            return m
        return 1 - (1 - m) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def after_step(self, target: PerView) -> None:
        """Update method state (e.g. a queue of keys) once per iteration, after all sub-networks ran. With
        ``train.micro_batches``, ``target`` holds every micro-batch's prepared outputs, view by view, in order."""
