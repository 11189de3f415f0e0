"""``slimssl bench``: throughput of the data path, the slimmable step and the one-by-one baseline.

All three run on synthetic images of the config's resolution (``data.source=fake``), so the numbers measure
the compute path, not the disk. The baseline trains each menu entry as its own dense network (a supernet
whose full width *is* that entry) at the same batch, one after the other, which is what pretraining the
networks one by one costs per step.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

log = logging.getLogger("slimssl")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="img/s of the data path, the slimmable step and the one-by-one baseline")
    p.add_argument("--config", help="YAML recipe (default: demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, help="default: the config's train.batch_size")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-by-one baseline")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds per call of ``fn`` and peak GPU memory in GiB (None on the CPU)."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        fn(i)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def run_bench(cfg, steps: int, warmup: int, baseline: bool = True) -> list[dict]:
    from .config import standalone_config
    from .train.loop import Trainer

    rows = []
    trainer = Trainer(cfg, _scratch_dir())
    device, batch = trainer.device, cfg.train.batch_size
    t, peak = _measure(lambda i: trainer.views(i), steps, warmup, device)
    rows.append({"what": "data path (two augmented views)", "img_per_s": batch / t, "peak_gib": peak})
    t_slim, peak = _measure(lambda i: trainer.train_step(i), steps, warmup, device)
    n = len(trainer.policy.draw(warmup))
    rows.append({"what": f"slimmable step ({n} sub-networks)", "img_per_s": batch / t_slim, "peak_gib": peak})
    if baseline:
        del trainer
        total, peaks = 0.0, []
        for spec in cfg.subnet_menu():
            dense = Trainer(standalone_config(cfg, spec), _scratch_dir())
            t, peak = _measure(lambda i: dense.train_step(i), steps, warmup, dense.device)
            total += t
            peaks.append(peak or 0.0)
            rows.append({"what": f"  dense {spec.name}", "img_per_s": batch / t, "peak_gib": peak})
            del dense
        rows.append({"what": "one-by-one baseline (sum of dense steps)", "img_per_s": batch / total,
                     "peak_gib": max(peaks) if device.type == "cuda" else None})
        rows.append({"what": "slimmable / one-by-one speed ratio", "img_per_s": total / t_slim, "peak_gib": None})
    for row in rows:
        row.update(device=str(device), batch=batch)
    return rows


def _scratch_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="slimssl-bench-"))


def cmd_bench(args: argparse.Namespace) -> int:
    from .cli import _emit
    from .config import load_config

    # steady state: every sub-network runs (no slow start), synthetic data, no kNN
    sets = [*args.set, "data.source=fake", f"train.device={args.device}", "slim.slow_start=0.0"]
    cfg = load_config(args.config, sets)
    batch = args.batch_size or cfg.train.batch_size
    cfg = load_config(args.config, [*sets, f"train.batch_size={batch}", f"data.fake_size={batch}"])
    rows = run_bench(cfg, args.steps, args.warmup, baseline=not args.no_baseline)
    lines = ["| measurement | img/s | peak GPU GiB |", "|---|---|---|"]
    for r in rows:
        value = f"{r['img_per_s']:.2f}x" if "ratio" in r["what"] else f"{r['img_per_s']:,.0f}"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['what']} | {value} | {peak} |")
    header = f"{cfg.name}: batch {batch}, {rows[0]['device']}, torch {torch.__version__}"
    _emit(args, rows, header + "\n" + "\n".join(lines))
    return 0
