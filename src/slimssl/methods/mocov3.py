"""MoCo v3 (Chen et al., 2021): symmetric contrastive loss over in-batch keys, scaled by 2 tau."""

from __future__ import annotations

import torch

from ..train.distributed import all_gather_nograd, rank
from .base import Layer, Method, MethodOutput
from .losses import contrastive_loss, in_batch_logits


class MoCoV3(Method):
    name = "mocov3"
    augment = "mocov3"
    symmetric_only = True
    distill_on_logits = True
    settings_read = frozenset({"proj_hidden", "proj_dim", "pred_hidden", "temperature", "momentum",
                               "momentum_schedule"})

    # no biases; the projector ends with a BatchNorm without affine, the predictor's last layer has no BatchNorm
    @staticmethod
    def projector_layers(hidden: int, out: int) -> list[Layer]:
        return [Layer(hidden, "bn", "relu"), Layer(out, "bn_noaffine")]

    @staticmethod
    def predictor_layers(hidden: int, out: int) -> list[Layer]:
        return [Layer(hidden, "bn", "relu"), Layer(out, bias=False)]

    def prepare_target(self, target: list[torch.Tensor]) -> list[torch.Tensor]:
        # the keys of every process are negatives: gathered once per step, for all the sub-networks
        return [all_gather_nograd(k) for k in target]

    def loss(self, online: list[torch.Tensor], target: list[torch.Tensor]) -> MethodOutput:
        """``target``: the keys of all processes (:meth:`prepare_target`); this process's positives sit at
        offset rank * batch."""
        q1, q2 = online
        k1, k2 = target
        tau = self.cfg.temperature
        labels = torch.arange(len(q1), device=q1.device) + rank() * len(q1)
        logits = [in_batch_logits(q1, k2, tau), in_batch_logits(q2, k1, tau)]
        loss = sum(contrastive_loss(lg, labels) for lg in logits) * 2 * tau
        return MethodOutput(loss, logits)
