"""The ``slimssl bench`` command line (torch is imported only once the command runs)."""

from __future__ import annotations

import argparse

from ..cli_args import add_overrides, data_source, nonnegative_int, output_file, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="img/s of the data path, the slimmable step and the one-by-one baseline")
    p.add_argument("--config", help="YAML recipe (default: demo)")
    add_overrides(p)
    p.add_argument("--steps", type=positive_int, default=10,
                   help="timed steps per measurement (after warmup; default 10)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=positive_int, help="default: the config's train.batch_size")
    p.add_argument("--data", type=data_source,
                   help="measure on this dataset (e.g. an ImageFolder read with data.loader=stream) "
                        "instead of synthetic images in memory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-by-one baseline")
    p.add_argument("--data-only", action="store_true", help="measure the data path alone (no training step)")
    p.add_argument("--profile", type=output_file(".txt"), metavar="FILE.txt",
                   help="also write the operators that take the most time in the slimmable step (torch.profiler "
                        "table: self CUDA time on a GPU, self CPU time otherwise) to FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..cli_args import emit
    from ..config import load_config
    from .measure import run_bench

    # steady state: every sub-network runs (no slow start); synthetic images in memory unless --data
    data = [f"data.source={args.data}"] if args.data else ["data.source=fake", "data.loader=memory"]
    sets = [*data, *args.set, f"train.device={args.device}", "slim.slow_start=0.0"]
    cfg = load_config(args.config, sets)
    batch = args.batch_size or cfg.train.batch_size
    cfg = load_config(args.config, [*sets, f"train.batch_size={batch}", f"data.fake_size={batch}"])
    rows = run_bench(cfg, args.steps, args.warmup, baseline=not args.no_baseline, data_only=args.data_only,
                     profile=args.profile)
    lines = ["| measurement | img/s | peak GPU GiB | GPU busy |", "|---|---|---|---|"]
    for r in rows:
        value = f"{r['img_per_s']:.2f}x" if "ratio" in r["what"] else f"{r['img_per_s']:,.0f}"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        busy = "-" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
        lines.append(f"| {r['what']} | {value} | {peak} | {busy} |")
    header = (f"{cfg.name}: batch {batch}, data {cfg.data.source} ({cfg.data.loader}), {rows[0]['device']}, "
              f"torch {torch.__version__}")
    emit(args, rows, header + "\n" + "\n".join(lines))
    return 0
