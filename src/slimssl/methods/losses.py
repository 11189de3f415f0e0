"""The SSL and distillation losses as pure functions of tensors (each tested against hand values)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised regression, ``2 - 2 cos(p, z)``, averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()


def full_precision(x: torch.Tensor):
    """Autocast off on ``x``'s device: inside a bf16 region a matrix product of float32 tensors would still
    be computed in bf16, about 0.4% of each similarity, and 1/temperature magnifies it."""
    return torch.autocast(x.device.type, enabled=False)


def info_nce_logits(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None,
                    temperature: float) -> torch.Tensor:
    """MoCo v2 logits in float32: column 0 is each query's positive key, the rest the queued negatives,
    over ``T``."""
    with full_precision(query):
        q, k = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
        positive = (q * k).sum(1, keepdim=True)
        negatives = q @ queue.float().T if queue is not None and len(queue) else q.new_zeros(len(q), 0)
        return torch.cat([positive, negatives], dim=1) / temperature


def in_batch_logits(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3 logits in float32: every query against every key (keys may be gathered from all processes)."""
    with full_precision(query):
        return F.normalize(query.float(), dim=1) @ F.normalize(keys.float(), dim=1).T / temperature


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of ``logits`` with its positive at ``labels``."""
    return F.cross_entropy(logits, labels)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Distillation: cross-entropy of the student's distribution against the teacher's (detached) one,
    both softened by ``temperature`` and scaled by ``temperature**2`` so gradients keep their size."""
    t = temperature
    teacher = F.softmax(teacher_logits.detach().float() / t, dim=1)
    return -(teacher * F.log_softmax(student_logits.float() / t, dim=1)).sum(1).mean() * t * t
