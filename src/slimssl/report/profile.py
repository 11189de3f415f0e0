"""Cost of every sub-network: parameters, MACs (PyTorch's FLOP counter) and CPU latency."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.plain import PlainResNet
from ..models.resnet import SlimResNet
from ..seeds import keeps_random_state
from ..nn.spec import Subnets, SubnetSpec

log = logging.getLogger("slimssl")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-accumulates of one image, from PyTorch's FLOP counter (convolutions and matmuls)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, resolution, resolution))
    return counter.get_total_flops() // 2


LATENCY_RUNS, LATENCY_WARMUP = 10, 3


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, resolution: int, runs: int = LATENCY_RUNS, warmup: int = LATENCY_WARMUP,
                   batch: int = 1) -> float:
    """Median wall time of one forward pass on the CPU, in milliseconds, on torch's threads (a machine busy
    with other work reads far slower: the threads wait for cores)."""
    x = torch.zeros(batch, 3, resolution, resolution)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def plain_with_head(supernet: SlimResNet, spec: SubnetSpec, num_classes: int) -> PlainResNet:
    """The exported sub-network with a ``num_classes``-way classifier, as papers count it: in float32 on the CPU,
    where it is measured, whatever the supernet's dtype and device."""
    plain = supernet.export(spec).to("cpu", torch.float32)
    if num_classes:
        plain.fc = nn.Linear(plain.config.feature_dim, num_classes)
    return plain.eval()


def profile_supernet(supernet: SlimResNet, resolution: int, num_classes: int = 0,
                     latency: bool = True, runs: int = LATENCY_RUNS,
                     specs: Sequence[SubnetSpec] | None = None, threads: int | None = None) -> list[dict]:
    """One row per sub-network of ``specs`` (default: the menu): subnet, params, macs, and latency_ms (CPU,
    batch 1) when asked, on ``threads`` CPU threads (default: torch's), with how it was measured
    (``latency_settings``: runs, warm-up runs, batch, threads)."""
    rows = []
    for spec in (supernet.menu if specs is None else specs):
        plain = plain_with_head(supernet, spec, num_classes)
        row = {"subnet": spec.name, "width": spec.width, "depths": list(spec.depths),
               "params": count_params(plain), "macs": count_macs(plain, resolution)}
        if latency:
            with torch_threads(threads):
                row["latency_ms"] = round(cpu_latency_ms(plain, resolution, runs=runs), 3)
                row["latency_settings"] = {"runs": runs, "warmup": LATENCY_WARMUP, "batch": 1,
                                           "threads": torch.get_num_threads()}
        rows.append(row)
    return rows


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` within the block (None: as they are)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@keeps_random_state
def profile(model: SlimResNet | str | os.PathLike, subnets: Subnets = "all", *, resolution: int | None = None,
            num_classes: int = 0, latency: bool = False, threads: int | None = None) -> list[dict]:
    """What ``slimssl profile`` prints, from Python: one row per sub-network (``subnets``: a width or name, a
    list, or ``"all"``, the menu) with its params and MACs at ``resolution`` (backbone only; ``num_classes``
    counts a classifier too, as the papers do), and its CPU latency at batch 1 with ``latency=True``, on
    ``threads`` CPU threads (default: torch's; 1 reads steadier on a machine busy with other work).

    ``model`` is a supernet in memory (``resolution`` then needed), a run directory or checkpoint file, or an
    exported sub-network's folder (both: at the resolution their config records, unless given)."""
    from ..errors import UsageError

    for name, value, least in (("resolution", 1 if resolution is None else resolution, 1),
                               ("num_classes", num_classes, 0), ("threads", 1 if threads is None else threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:  # said before any loading
            raise UsageError(f"{name} must be a whole number >= {least}, got {value!r}")
    if not isinstance(latency, bool):
        raise UsageError(f"latency must be True or False, got {latency!r}")
    if threads is not None and not latency:
        log.warning("threads %s is the latency measurement's, and there is none (no-latency): it changes nothing",
                    threads)
    if isinstance(model, SlimResNet):
        supernet, recorded = model, None
    elif isinstance(model, (str, os.PathLike)):
        from ..checkpoint import load_supernet
        from ..layout import is_export_dir
        from ..eval.exported import supernet_of_export

        supernet, cfg = supernet_of_export(model) if is_export_dir(model) else load_supernet(model)
        recorded = cfg.data.resolution
    else:
        raise UsageError(f"profile takes a SlimResNet supernet, a run directory or checkpoint file, or an exported "
                         f"sub-network's folder; got {type(model).__name__}")
    resolution = resolution if resolution is not None else recorded
    if resolution is None:
        raise UsageError("profile of a supernet in memory needs resolution=, the side of the square images it costs")
    return profile_supernet(supernet, resolution, num_classes, latency=latency, specs=supernet.resolve_many(subnets),
                            threads=threads)
