"""The device and autocast dtype a command runs on, waiting for a device's queued work before a clock is read,
and the copies that must stay cheap on a GPU. Shared by training, evaluation and the reproduction, so
``--device`` means the same everywhere."""

from __future__ import annotations

import logging
import os
import platform
import re

import torch

from .errors import SlimsslError
from .launch import DEVICE_PATTERN, DEVICES, unsupported_device_hint


log = logging.getLogger("slimssl")


class DeviceError(SlimsslError):
    """A device this machine does not have."""


def pick_device(name: str | torch.device, setting: str = "--device") -> torch.device:
    """``auto`` (a CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` (also as a
    ``torch.device``). In a process of a distributed job, ``cuda`` is this process's GPU (``LOCAL_RANK``).
    ``setting`` names the option in the error message."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise DeviceError(f"{setting} {name!r} is not a device slimssl runs on; expected {DEVICES}"
                          f"{unsupported_device_hint(name)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{setting} is {name}, but PyTorch sees no CUDA device here: use cpu, or auto to take a "
                          "CUDA GPU when there is one")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"{setting} is {name}, but PyTorch sees {torch.cuda.device_count()} CUDA device(s) here "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if name.startswith("cuda:"):
            raise DeviceError(f"{setting} is {name}, but each process of a distributed job takes its own GPU, "
                              "number LOCAL_RANK: use cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        if name == "cuda":
            return _this_process_gpu(setting)
    return torch.device(name)


def _this_process_gpu(setting: str) -> torch.device:
    """GPU ``LOCAL_RANK`` for a process of a distributed job, made the current device (NCCL's and the
    allocator's default)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"{setting} is cuda in process LOCAL_RANK={local_rank}, but this machine has {count} "
                          f"CUDA device(s): start at most {count} processes per node (torchrun --nproc-per-node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (auto: bf16 on a GPU that has it), or None for fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if precision == "fp16" and device.type == "cpu":  # few CPU kernels take float16: most convert and convert back
        log.warning("train.precision fp16 on the CPU runs several times slower than fp32 or bf16 (few CPU kernels "
                    "take float16); auto picks fp32 here")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without making the host wait: a copy to a GPU from pageable memory blocks
    until the GPU has done all its queued work, one from pinned memory does not."""
    if device.type != "cuda" or t.device.type != "cpu":  # (a GPU tensor: "cuda:0" is not equal to "cuda")
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # the pinned copy is freed only once the GPU read it


def copy_by_dtype(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dst.copy_(src)`` for each pair, one fused copy per dtype: on a GPU, the fused copy of a list that mixes
    dtypes (BatchNorm's int64 counters beside its fp32 statistics) falls back to one launch per tensor."""
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for dst, src in zip(dsts, srcs, strict=True):
        group = by_dtype.setdefault(dst.dtype, ([], []))
        group[0].append(dst)
        group[1].append(src)
    for group_dsts, group_srcs in by_dtype.values():
        torch._foreach_copy_(group_dsts, group_srcs)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall clock read next measures it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hardware_name(device: torch.device) -> str:
    """What a device is, for a timing to name: the GPU's model, or the CPU's architecture and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
