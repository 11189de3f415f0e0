"""Optimisers (SGD, LARS, AdamW) with no-weight-decay groups, and the per-step schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SlimsslError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Parameter groups with ``lars_exclude=True`` (biases and norms) get neither weight decay nor the
    trust ratio, as in BYOL and MoCo v3. A layer's gradient is scaled by ``lr * trust_coefficient * |w| / |g|``;
    with ``clip`` (LARC's clipping mode, which the common CIFAR recipes use with a trust coefficient of 0.02) by
    ``min(trust_coefficient * |w| / |g|, lr)``, so the schedule's lr only caps the step. Updates are batched
    with foreach ops; a group's parameters share one device (their norms are stacked into one vector).

    ``g`` is the gradient with the weight decay added (``g + wd * w``), as BYOL's and MoCo v3's LARS; solo-learn's
    LARC divides by ``|g| + wd * |w|`` instead. The two denominators differ by at most ``2 * wd * |w|``: small next
    to ``|g|`` at the CIFAR recipes' wd of 1e-5 unless the gradients become tiny (not measured).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, clip: bool = False, eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, clip=clip, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    def __setstate__(self, state):  # load_state_dict calls it: optimiser states saved before ``clip`` existed
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("clip", False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                # every layer's norm in one vector, so the trust ratios take a few kernels, not a few per layer
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                # trust ratio eta * |w| / |g| (clipped: at most 1 once multiplied by lr below), 1 where either norm
                # is zero, as plain SGD; stays on the device (no sync)
                trust = group["trust_coefficient"] * p_norm / (g_norm + group["eps"])
                if group["clip"] and group["lr"] > 0:
                    trust = (trust / group["lr"]).clamp_(max=1.0)
                ratios = torch.where((p_norm > 0) & (g_norm > 0), trust, torch.ones_like(p_norm))
                grads = torch._foreach_mul(grads, list(ratios.unbind(0)))
            bufs = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float, no_decay_1d: bool) -> list[dict]:
    """Two groups: weights with decay, and 1-D parameters (biases, norm affine) without decay or LARS."""
    decay = [p for _, p in params if not (no_decay_1d and p.ndim <= 1)]
    no_decay = [p for _, p in params if no_decay_1d and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


# The settings that shape the optimiser's saved state (its kind of state, its parameter groups): a resumed
# run must keep them.
OPTIMIZER_STATE_KEYS = ("optim.name", "optim.no_decay_1d")


def build_optimizer(cfg, params: list[tuple[str, nn.Parameter]], lr: float) -> torch.optim.Optimizer:
    groups = param_groups(params, cfg.weight_decay, cfg.no_decay_1d)
    foreach = {"foreach": True}
    if cfg.name == "sgd":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **foreach)
    if cfg.name == "adamw":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, **foreach)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient, clip=cfg.lars_clip)
    raise SlimsslError(f"unknown optimizer {cfg.name!r}; expected sgd, lars or adamw")


def scaled_lr(base_lr: float, cfg, total_batch: int) -> float:
    """The base lr at the run's total batch: ``lr * batch / reference_batch`` with linear scaling."""
    return base_lr * total_batch / cfg.reference_batch if cfg.lr_scaling == "linear" else base_lr


def effective_lr(cfg, world: int, joins_late: bool = True) -> dict:
    """The peak learning rate(s) of a run of ``cfg`` on ``world`` processes, with how they were obtained;
    ``joins_late``: whether its slow start lasts a step at least (else slim.slow_start_lr is never used)."""
    o, batch = cfg.optim, cfg.train.batch_size
    info = {"peak": scaled_lr(o.lr, o, batch), "base": o.lr, "scaling": o.lr_scaling,
            "reference_batch": o.reference_batch, "total_batch": batch, "per_process_batch": batch // max(1, world),
            "processes": world}
    if cfg.slim.slow_start_lr and cfg.slim.slow_start and joins_late:  # without a slow start nothing joins later
        info["peak_after_slow_start"] = scaled_lr(cfg.slim.slow_start_lr, o, batch)
    return info


def describe_lr(info: dict) -> list[str]:
    """:func:`effective_lr` as sentences: the log's summary and the comments atop RUN/config.yaml."""
    how = (f"optim.lr {info['base']:g} x train.batch_size {info['total_batch']} / optim.reference_batch "
           f"{info['reference_batch']} (linear scaling)" if info["scaling"] == "linear"
           else f"optim.lr {info['base']:g} (optim.lr_scaling: none)")
    lines = [f"effective peak lr {info['peak']:g} = {how}"]
    if "peak_after_slow_start" in info:
        lines.append(f"effective peak lr once sub-networks join: {info['peak_after_slow_start']:g}")
    processes = f"{info['processes']} process{'es' if info['processes'] != 1 else ''}"
    lines.append(f"total batch {info['total_batch']} = {info['per_process_batch']} per process x {processes} "
                 "(train.batch_size is the total)")
    return lines


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float = 0.0,
          schedule: str = "cosine") -> float:
    """Linear warmup to ``peak`` then cosine decay to ``peak * min_ratio`` (or constant)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
