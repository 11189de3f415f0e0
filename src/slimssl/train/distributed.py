"""Thin helpers over torch.distributed that also work in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0 (no gradient flows through other ranks' parts)."""
    if not is_distributed() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def init_from_env() -> None:
    """Join the process group that torchrun (or SLURM through it) describes in the environment."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
