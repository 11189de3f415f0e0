"""MoCo v2 (Chen et al., 2020): InfoNCE against the momentum key and a queue of full-width keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train.distributed import all_gather_nograd
from .base import Layer, Method, MethodOutput, PerView
from .losses import contrastive_loss, info_nce_logits


class MoCoV2(Method):
    name = "mocov2"
    augment = "mocov2"
    distill_on_logits = True
    settings_read = frozenset({"proj_hidden", "proj_dim", "temperature", "momentum", "momentum_schedule",
                               "queue_size", "symmetric"})

    @staticmethod
    def projector_layers(hidden: int, out: int) -> list[Layer]:
        return [Layer(hidden, None, "relu"), Layer(out)]  # MoCo v2's MLP head has no BatchNorm

    @staticmethod
    def predictor_layers(hidden: int, out: int) -> None:
        return None

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def views_used(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        # MoCo v2 as published: the query from view 1 only, the key (and the queue's new keys) from view 2 only
        return ((0, 1), (0, 1)) if self.cfg.symmetric else ((0,), (1,))

    def loss(self, online: PerView, target: PerView) -> MethodOutput:
        pairs = [(0, 1), (1, 0)] if self.cfg.symmetric else [(0, 1)]
        logits = [info_nce_logits(online[i], target[j], self.queue, self.cfg.temperature) for i, j in pairs]
        labels = torch.zeros(len(online[0]), dtype=torch.long, device=online[0].device)
        return MethodOutput(sum(contrastive_loss(lg, labels) for lg in logits), logits)

    @torch.no_grad()
    def after_step(self, target: PerView) -> None:
        views = target if self.cfg.symmetric else target[1:]
        # view by view, each gathered over the processes: the queue holds the same keys in the same places
        # whatever the number of processes
        keys = F.normalize(torch.cat([all_gather_nograd(v) for v in views]).float(), dim=1)
        n, size = len(keys), len(self.queue)
        if size == 0:
            return
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size  # a ring buffer, no host sync
        self.queue[idx[-size:]] = keys[-size:]
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
