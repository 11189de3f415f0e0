"""The device and autocast dtype a command runs on, and waiting for a device's queued work before a clock is
read. Shared by training, evaluation and the reproduction, so ``--device`` means the same everywhere."""

from __future__ import annotations

import os

import torch

from .errors import SlimsslError


class DeviceError(SlimsslError):
    """A device this machine does not have."""


def pick_device(name: str, setting: str = "--device") -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu`` or ``cuda``. In a process of a distributed job, ``cuda`` is
    this process's GPU (``LOCAL_RANK``). ``setting`` names the option in the error message."""
    if name not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"{setting} {name!r} is not a device slimssl runs on; expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{setting} is cuda, but PyTorch sees no CUDA device here: use --device cpu, or auto "
                          "to take a GPU when there is one")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (auto: bf16 on a GPU that has it), or None for fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall clock read next measures it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
