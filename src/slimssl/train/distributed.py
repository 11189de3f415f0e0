"""torch.distributed for slimssl: process group setup with a bounded timeout, fail-fast teardown, and the
one gradient all-reduce per iteration. Every helper also works in a single process.

Why not DistributedDataParallel. A slimmable step runs several sub-networks and accumulates their
gradients; a sub-network's private BatchNorms (and, for depth sub-networks, whole blocks) take part only
when that sub-network is drawn. DDP then needs ``find_unused_parameters=True`` (a graph traversal after
every synchronising backward), and even so it would hand the optimizer a *zero* gradient, not *no*
gradient, for a parameter no sub-network used this step: with weight decay or momentum such a parameter
then moves under N processes but not under one. Instead :class:`GradientSync` averages the gradients
itself, once per step, after the last sub-network's backward: every online parameter's gradient is
copied into one flat buffer (a parameter without a gradient contributes zeros), the buffer is
all-reduced once, and the average is copied back **only into the parameters that have a gradient**.
Which parameters have one is a function of the drawn sub-networks, and those are a pure function of
(seed, step) (:class:`~slimssl.slim.policy.SlimPolicy`), so the set is the same on every rank: a
parameter of a sub-network that did not run keeps ``grad is None`` everywhere and the optimizer leaves
it (and its momentum) alone, exactly as in a single process. Backward passes need no ``no_sync``: they
never communicate gradients (SyncBatchNorm, with ``train.sync_bn``, all-reduces its statistics' gradients
in its own backward). The price: the all-reduce does not overlap the last backward (with K sub-networks
per step at most 1/K of the backward time could have been hidden) and the flat buffer costs one copy of
the online parameters in memory.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError
from ..launch import torchrun_processes, warn_of_srun_tasks

log = logging.getLogger("slimssl")

TIMEOUT_ENV = "SLIMSSL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # longer than rank 0's checkpoint writes, which the other ranks wait through


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
    """Concatenate ``x`` from every process along dim 0 in rank order (no gradient flows through it)."""
    if not is_distributed() or world_size() == 1:
        return x
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    x = x.contiguous()  # the parts must share its memory layout (a channels-last x would be received garbled)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    out = torch.cat(parts)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@torch.no_grad()
def shuffled_forward(fn, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to the global batch rearranged by ``order`` (a permutation, the same on every process),
    each process computing its share; returns ``fn``'s outputs for this process's own rows of ``x``, in their
    order. With one process it is ``fn(x[order])`` put back in order. (MoCo's shuffle-BN.)"""
    everything = all_gather_nograd(x)
    b, r = len(x), rank()
    out = all_gather_nograd(fn(everything[order[r * b:(r + 1) * b]]))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return out[inverse[r * b:(r + 1) * b]]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over processes (a copy; ``x`` itself in a single process)."""
    if not is_distributed() or world_size() == 1:
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y.div_(world_size())


def timeout_seconds() -> float:
    """The process-group timeout: ``$SLIMSSL_DIST_TIMEOUT`` seconds, default 1800."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise UsageError(f"${TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


def init_from_env() -> None:
    """Join the process group that torchrun (or SLURM through it) describes in the environment.

    The group gets a timeout (:func:`timeout_seconds`): a collective that waits longer than that for a
    rank that hangs fails instead of blocking forever. A rank that *dies* ends the job sooner: torchrun
    sees its non-zero exit and stops the others (see :func:`fail_fast`).
    """
    if torchrun_processes() <= 1:
        warn_of_srun_tasks()
        return
    if is_distributed():
        return
    # NCCL for CUDA tensors and gloo for CPU ones, so a run on the CPU (--device cpu) works on a GPU machine
    # too; the process's GPU is chosen with the run's device (devices.pick_device), before any collective
    backend = os.environ.get("SLIMSSL_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available()
                                                         else "gloo")
    if "nccl" in backend:
        # the NCCL watchdog turns a timed-out collective into an abort of the process (default in recent
        # torch; set explicitly so the bound holds on older versions too)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
    except (AssertionError, ValueError) as e:  # torch asserts a known backend name
        if "SLIMSSL_DIST_BACKEND" not in os.environ:
            raise
        raise UsageError(f"$SLIMSSL_DIST_BACKEND {backend!r}: {e}; expected a backend such as gloo or nccl, or "
                         "cpu:gloo,cuda:nccl") from None


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def failed_because_of_another(error: BaseException) -> bool:
    """Whether ``error`` is a collective of this process failing because another process exited (gloo: its
    connection closed) or stopped answering (the timeout): the error that explains it is that process's."""
    # by the words of gloo and NCCL: a DistBackendError may also be this process's own failure; the store's
    # network errors (DistNetworkError) come from a process that has gone
    signs = ("closed by peer", "reset by peer", "Timed out waiting", "Watchdog caught collective operation timeout",
             "remote process exit")
    return isinstance(error, dist.DistNetworkError) or (
        isinstance(error, RuntimeError) and any(sign in str(error) for sign in signs))


def fail_fast(error: BaseException, code: int = 1, traceback: bool = True) -> None:
    """End this process now after an error in a distributed run, without waiting on the other ranks.

    The normal exit path would tear the process group down, and with NCCL that can block on collectives
    the other ranks still wait in. ``os._exit`` skips it; torchrun sees the non-zero exit of this rank
    and terminates the rest of the job (SIGTERM, then SIGKILL after its grace period). A process whose
    collective failed because of another says so in one line: torchrun's summary may name it first, but
    the error that explains the failure is the other process's.
    """
    if failed_because_of_another(error):
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.error("rank %d of %d stopped: another process exited, or stopped answering for longer than $%s (%g s), "
                  "while this one waited for it; that process's error says why (rank N of %d failed: ...). Here: "
                  "%s: %s", rank(), world_size(), TIMEOUT_ENV, timeout_seconds(), world_size(), type(error).__name__,
                  first_line,
                  exc_info=(type(error), error, error.__traceback__) if log.isEnabledFor(logging.DEBUG) else None)
    elif isinstance(error, KeyboardInterrupt):  # a stop signal outside training: no failure, and nothing lost
        log.error("rank %d of %d: interrupted (%s); nothing it had saved is lost", rank(), world_size(),
                  str(error) or "Ctrl-C")
    else:
        log.error("rank %d of %d failed: %s: %s", rank(), world_size(), type(error).__name__, error,
                  exc_info=(type(error), error, error.__traceback__) if traceback else None)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(code)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s (once, at setup)."""
    if not is_distributed() or world_size() == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)


class GradientSync:
    """Average the gradients of ``params`` over processes with exactly one all-reduce (see the module doc).

    ``flag`` (a float, 0 or 1) travels in the same all-reduce; :attr:`any_flag` then tells whether any
    rank raised it (used to skip a step with a non-finite loss on every rank alike).
    """

    def __init__(self, params: list[nn.Parameter]):
        self.params = list(params)
        if not self.params:
            raise ValueError("GradientSync needs at least one parameter")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"GradientSync expects parameters of one dtype, got {sorted(map(str, dtypes))}")
        self.enabled = world_size() > 1
        self.flat: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        if self.enabled:
            numel = sum(p.numel() for p in self.params)
            self.flat = torch.zeros(numel + 1, dtype=self.params[0].dtype, device=self.params[0].device)
            offset = 0
            for p in self.params:
                self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self.calls = 0  # all-reduces issued, for tests
        self._local_flag: torch.Tensor | float | None = None  # one process: the flag is its own

    @torch.no_grad()
    def __call__(self, flag: torch.Tensor | float | None = None) -> None:
        if not self.enabled:
            self._local_flag = flag
            return
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if have:
            torch._foreach_copy_([self.views[i] for i in have], [self.params[i].grad for i in have])
        if missing:
            torch._foreach_zero_([self.views[i] for i in missing])
        if isinstance(flag, torch.Tensor):
            self.flat[-1:].copy_(flag.reshape(1))
        else:  # fill_ with a Python number: no host-to-device copy, which would wait for the GPU
            self.flat[-1:].fill_(0.0 if flag is None else float(flag))
        dist.all_reduce(self.flat)
        self.calls += 1
        self.flat.div_(world_size())
        if have:
            torch._foreach_copy_([self.params[i].grad for i in have], [self.views[i] for i in have])

    def any_flag(self) -> bool:
        """Whether any rank passed a non-zero ``flag`` to the last call (a host sync)."""
        if not self.enabled:
            return bool(self._local_flag is not None and float(self._local_flag) > 0)
        return bool(self.flat[-1].item() > 0)


def barrier() -> None:
    """Wait for every process (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank (``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_objects_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    every: list[Any] = [None] * world_size()
    dist.all_gather_object(every, obj)
    return every


def _objects_device() -> torch.device | None:
    """Where broadcast_object's objects travel: torch's choice, but in a group of NCCL alone this process's GPU
    (torch would take the current one: the first GPU for every process until a run picks its own device, as
    before the default run directory is named)."""
    if dist.get_backend() != "nccl":
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
