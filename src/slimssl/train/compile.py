"""``train.compile``: torch.compile of the online and target forward passes, one graph per sub-network.

The slimmable layers read the active sub-network from plain Python state, so dynamo guards on it and
keeps one compiled graph per sub-network (recompiling once for each the first time it runs). The limit
on graphs per function is raised to fit the menu while the run's Trainer is open, and each run compiles a copy
of the forward's code: dynamo keeps its graphs on the code object, where an earlier run's graphs in the same
process (a sweep) would count against this run's limit. ``reduce-overhead`` (and ``max-autotune``) also capture
each graph in a CUDA graph, which removes the kernel-launch cost that dominates narrow widths at small
resolutions.
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Callable, Iterator

import torch

from ..config import ConfigError
from ..errors import SlimsslError

log = logging.getLogger("slimssl")

MODES = ("off", "default", "reduce-overhead", "max-autotune")
BACKEND = "inductor"  # tests switch this to "aot_eager", which traces the same graphs without a C++ compiler


def compile_forward(fn: Callable, mode: str) -> Callable:
    """``fn`` (a function or a bound method) compiled with ``mode`` (``off``: ``fn`` itself), with graphs of its
    own: see the module's docstring, and :func:`graph_limit` for how many it may keep."""
    if mode == "off":
        return fn
    if mode not in MODES:
        raise SlimsslError(f"unknown train.compile mode {mode!r}; expected one of {', '.join(MODES)}")
    kwargs = {"mode": mode} if mode != "default" and BACKEND == "inductor" else {}
    return torch.compile(_with_own_code(fn), backend=BACKEND, dynamic=False, **kwargs)


def _with_own_code(fn: Callable) -> Callable:
    """``fn`` run by a copy of its code object (bound to the same object, for a method)."""
    func = getattr(fn, "__func__", fn)
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = func.__kwdefaults__, func.__qualname__
    return types.MethodType(copy, fn.__self__) if hasattr(fn, "__func__") else copy


_RAISED: list[int] = []  # the limits the open blocks of graph_limit ask for
_BEFORE: dict[str, int] = {}  # dynamo's limits before the first of them opened


@contextlib.contextmanager
def graph_limit(num_graphs: int) -> Iterator[None]:
    """dynamo's limit on the graphs of one function raised to ``num_graphs`` (and two to spare) inside the block,
    and given back once no such block is open (a setting of the whole process; two Trainers may be open at once,
    and close in any order)."""
    import torch._dynamo

    config = torch._dynamo.config
    keys = [key for key in ("recompile_limit", "cache_size_limit") if hasattr(config, key)]  # renamed in torch 2.6
    if not _RAISED:
        _BEFORE.update({key: getattr(config, key) for key in keys})
    _RAISED.append(num_graphs + 2)
    try:
        for key in keys:
            setattr(config, key, max([_BEFORE[key], *_RAISED]))
        yield
    finally:
        _RAISED.remove(num_graphs + 2)
        for key in keys:
            setattr(config, key, max([_BEFORE[key], *_RAISED]))


def refuse_cuda_graphs_with_micro_batches(mode: str, micro_batches: int, device: torch.device) -> None:
    """A compile ``mode`` that captures CUDA graphs is refused with ``train.micro_batches`` above 1: a captured
    backward replayed for each micro-batch while the gradients of the last ones accumulate is something slimssl has
    not verified, and a wrong gradient would pass silently."""
    if micro_batches > 1 and device.type == "cuda" and uses_cuda_graphs(mode):
        raise ConfigError(f"train.compile {mode} captures CUDA graphs, which slimssl does not combine with "
                          f"train.micro_batches {micro_batches}: set train.compile=default, or train.micro_batches=1")


def uses_cuda_graphs(mode: str) -> bool:
    """Whether ``mode`` captures CUDA graphs (``reduce-overhead``, and ``max-autotune`` too in recent torch).
    Their outputs are overwritten by the graph's next replay, so callers must clone what they keep."""
    if mode in ("off", "default"):
        return False
    from torch._inductor import list_mode_options  # inductor's own table of what each mode turns on

    return bool(list_mode_options(mode).get("triton.cudagraphs", False))


def step_begins(mode: str) -> None:
    """Tell the CUDA-graph trees that a new training iteration starts (earlier outputs may be reused)."""
    if uses_cuda_graphs(mode):
        torch.compiler.cudagraph_mark_step_begin()


def _cuda_graph_skips() -> int:
    """How many compiled graphs inductor has run without capturing a CUDA graph, in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


class CudaGraphWatch:
    """Warns when a mode that captures CUDA graphs ran a graph without one (inductor skips the capture of a graph
    it cannot replay safely, and says so only under ``TORCH_LOGS=perf_hints``): those steps launch every kernel,
    as ``train.compile=default`` would, which is the cost the mode was chosen to remove."""

    def __init__(self, mode: str):
        self.enabled = uses_cuda_graphs(mode)
        self.seen = _cuda_graph_skips() if self.enabled else 0

    def check(self) -> None:
        if not self.enabled:
            return
        skips = _cuda_graph_skips()
        if skips > self.seen:
            log.warning("torch.compile ran %d graph(s) of this run without CUDA graphs (%d in this process so far): "
                        "their steps launch every kernel, as train.compile=default would; TORCH_LOGS=perf_hints "
                        "says why", skips - self.seen, skips)
            self.seen = skips
