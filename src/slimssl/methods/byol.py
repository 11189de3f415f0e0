"""BYOL (Grill et al., 2020): the online prediction regresses the target projection of the other view."""

from __future__ import annotations

import torch

from .base import Method, MethodOutput
from .losses import regression_loss


class BYOL(Method):
    name = "byol"  # the base class's heads (two-layer MLPs) and view recipe are BYOL's
    symmetric_only = True
    distill_reads_temperature = False  # its distillation regresses the full network's predictions
    settings_read = frozenset({"proj_hidden", "proj_dim", "pred_hidden", "momentum", "momentum_schedule"})

    def loss(self, online: list[torch.Tensor], target: list[torch.Tensor]) -> MethodOutput:
        p1, p2 = online
        z1, z2 = target
        return MethodOutput(regression_loss(p1, z2) + regression_loss(p2, z1), [p1, p2])

    def distill(self, student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float) -> torch.Tensor:
        # no logits here: the student's predictions regress the full network's (detached) ones
        return sum(regression_loss(s, t.detach()) for s, t in zip(student, teacher))
