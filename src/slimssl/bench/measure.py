"""Timing the data path, the slimmable step and each dense network of the one-by-one baseline."""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..config import ConfigError, standalone_config
from ..devices import hardware_name, synchronize
from ..train.loop import Trainer

log = logging.getLogger("slimssl")


@dataclass
class Measurement:
    seconds: float  # per call
    peak_gib: float | None  # peak GPU memory (None on the CPU)
    gpu_busy: float | None  # share of the wall time the GPU spends running kernels (None on the CPU)


def _measure(fn, steps: int, warmup: int, device: torch.device) -> Measurement:
    """Time ``steps`` calls of ``fn(i)`` after ``warmup`` calls; on CUDA also the peak memory and, from a
    second, profiled pass, how busy the GPU was (kernel time over the unprofiled wall time)."""
    for i in range(warmup):
        fn(i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        fn(i)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    if device.type != "cuda":
        return Measurement(seconds, None, None)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    kernels = _kernel_intervals(fn, range(warmup + steps, warmup + 2 * steps), device)
    return Measurement(seconds, peak, busy_fraction(kernels, seconds * steps * 1e6))


@contextlib.contextmanager
def _profiled(activities) -> Iterator[torch.profiler.profile]:
    """torch.profiler over one cycle (the block), without torch 2.11's warning that it keeps one cycle's events."""
    from torch.profiler import profile

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)
        with profile(activities=activities) as prof:
            yield prof


def _kernel_intervals(fn, calls, device: torch.device) -> list[tuple[float, float]]:
    """(start, end) in microseconds of every GPU kernel and copy run by ``fn`` over ``calls``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    with _profiled([ProfilerActivity.CUDA]) as prof:
        for i in calls:
            fn(i)
        synchronize(device)
    return [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]


def write_operator_table(fn, calls, device: torch.device, path: Path, rows: int = 30) -> None:
    """The ``rows`` operators with the most self time over ``calls`` of ``fn``, as torch.profiler's table:
    where a step's time goes when the throughput falls short."""
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with _profiled(activities) as prof:
        for i in calls:
            fn(i)
        synchronize(device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by=sort, row_limit=rows)
    path.write_text(f"{len(calls)} calls, sorted by {sort}\n{table}", encoding="utf-8")
    log.info("wrote the operator table of the slimmable step to %s", path)


def busy_fraction(intervals: list[tuple[float, float]], wall_us: float) -> float:
    """The share of ``wall_us`` covered by the union of ``intervals`` (kernels on several streams may
    overlap; overlapping time counts once)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return min(1.0, covered / wall_us) if wall_us > 0 else 0.0


@contextlib.contextmanager
def _set_up_quietly():
    """Trainers built to time their steps: their set-up lines (kNN, learning rate) say nothing about speed, and the
    baseline's would repeat the slimmable one's. Warnings still show."""
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def run_bench(cfg, steps: int, warmup: int, baseline: bool = True, data_only: bool = False,
              profile: Path | None = None) -> list[dict]:
    """The table's rows: img/s of the data path, the slimmable step and, with ``baseline``, each dense
    network and their sum; the trainers' run directories are temporary."""
    with tempfile.TemporaryDirectory(prefix="slimssl-bench-") as scratch:
        return _run_bench(cfg, steps, warmup, baseline, data_only, profile, Path(scratch))


def _run_bench(cfg, steps: int, warmup: int, baseline: bool, data_only: bool, profile: Path | None,
               scratch: Path) -> list[dict]:
    rows = []
    # each network trained alone, checked before anything is measured (a width may have no network of its own)
    try:
        dense_configs = {spec.name: standalone_config(cfg, spec) for spec in cfg.subnet_menu()} if baseline else {}
    except ConfigError as e:
        raise ConfigError(f"{e}; or measure without the one-by-one baseline (--no-baseline)") from None
    batch = cfg.train.batch_size

    def row(what: str, m: Measurement) -> dict:
        return {"what": what, "img_per_s": batch / m.seconds, "peak_gib": m.peak_gib, "gpu_busy": m.gpu_busy}

    with _set_up_quietly():
        trainer = Trainer(cfg, scratch / "slim")
    with trainer:  # closed: its writer thread would write in a removed folder
        device = trainer.device
        rows.append(row(f"data path (two augmented views, {cfg.data.loader})",
                        _measure(trainer.views, steps, warmup, device)))
        if data_only:
            return _tag(rows, device, batch)
        slim = _measure(trainer.train_step, steps, warmup, device)
        trainer.cuda_graphs.check()  # a compiled mode that lost its CUDA graphs measures something else
        if profile is not None:
            write_operator_table(trainer.train_step, range(warmup + 2 * steps, warmup + 3 * steps), device, profile)
        n = len(trainer.policy.draw(warmup))
    rows.append(row(f"slimmable step ({n} sub-networks)", slim))
    if baseline:
        del trainer
        dense_rows = []
        for name, dense_cfg in dense_configs.items():
            _forget(cfg.train.compile, device)
            with _set_up_quietly():
                dense = Trainer(dense_cfg, scratch / f"dense-{name}")
            with dense:
                dense_rows.append(row(f"dense {name}", _measure(dense.train_step, steps, warmup, device)))
                dense.cuda_graphs.check()
            del dense
        total = sum(batch / r["img_per_s"] for r in dense_rows)
        rows += dense_rows
        peaks = [r["peak_gib"] for r in dense_rows if r["peak_gib"] is not None]
        rows.append({"what": "one-by-one baseline (sum of dense steps)", "img_per_s": batch / total,
                     "peak_gib": max(peaks) if peaks else None, "gpu_busy": None})
        rows.append({"what": "slimmable / one-by-one speed ratio", "img_per_s": None, "ratio": total / slim.seconds,
                     "peak_gib": None, "gpu_busy": None})
    return _tag(rows, device, batch)


def _forget(compile_mode: str, device: torch.device) -> None:
    """Free what the last trainer left behind before the next is measured: its compiled graphs (dynamo would
    reuse them for a network of the same structure, and CUDA-graph trees keep its memory pool) and cached
    GPU memory, so that each row's peak memory is its own."""
    if compile_mode != "off":
        torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tag(rows: list[dict], device: torch.device, batch: int) -> list[dict]:
    """Each row says what it was measured on, so the JSON alone does (the text's header says it once)."""
    for r in rows:
        r.update(device=str(device), hardware=hardware_name(device), batch=batch, torch=torch.__version__)
    return rows
