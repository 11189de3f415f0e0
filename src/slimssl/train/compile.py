"""``train.compile``: torch.compile of the online and target forward passes, one graph per sub-network.

The slimmable layers read the active sub-network from plain Python state, so dynamo guards on it and
keeps one compiled graph per sub-network (recompiling once for each the first time it runs). The limit
on graphs per function is raised to fit the menu. ``reduce-overhead`` (and ``max-autotune``) also capture
each graph in a CUDA graph, which removes the kernel-launch cost that dominates narrow widths at small
resolutions.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..errors import SlimsslError

log = logging.getLogger("slimssl")

MODES = ("off", "default", "reduce-overhead", "max-autotune")
BACKEND = "inductor"  # tests switch this to "aot_eager", which traces the same graphs without a C++ compiler


def compile_forward(fn: Callable, mode: str, num_graphs: int) -> Callable:
    """``fn`` compiled with ``mode`` (``off``: ``fn`` itself), allowing ``num_graphs`` specialisations."""
    if mode == "off":
        return fn
    if mode not in MODES:
        raise SlimsslError(f"unknown train.compile mode {mode!r}; expected one of {', '.join(MODES)}")
    import torch._dynamo

    config = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, key):
            setattr(config, key, max(getattr(config, key), num_graphs + 2))
    kwargs = {"mode": mode} if mode != "default" and BACKEND == "inductor" else {}
    return torch.compile(fn, backend=BACKEND, dynamic=False, **kwargs)


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
