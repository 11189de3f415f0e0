"""The ``slimssl bench`` command line (torch is imported only once the command runs)."""

from __future__ import annotations

import argparse

from ..cli_args import add_overrides, data_source, device_name, nonnegative_int, output_file, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="img/s of the data path, the slimmable step and the one-by-one baseline")
    p.add_argument("--config", help="YAML recipe (default: demo)")
    add_overrides(p, example="train.batch_size=256 train.compile=default")
    p.add_argument("--steps", type=positive_int, default=10,
                   help="timed steps per measurement (after warmup; default 10)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=positive_int, help="default: the config's train.batch_size")
    p.add_argument("--data", type=data_source,
                   help="measure on this dataset (e.g. an ImageFolder read with data.loader=stream) "
                        "instead of synthetic images in memory")
    p.add_argument("--device", type=device_name, metavar="DEVICE",
                   help="train.device: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N (default: the "
                        "config's, or a --set of it)")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-by-one baseline")
    p.add_argument("--data-only", action="store_true", help="measure the data path alone (no training step)")
    p.add_argument("--profile", type=output_file(".txt"), metavar="FILE.txt",
                   help="also write the operators that take the most time in the slimmable step (torch.profiler "
                        "table: self CUDA time on a GPU, self CPU time otherwise) to FILE")
    p.add_argument("--json", action="store_true", help="print the table's rows as JSON on stdout")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..cli_args import emit
    from ..config import load_config
    from ..errors import UsageError
    from ..report.table import markdown_table
    from .measure import run_bench

    if args.data_only and args.profile:
        raise UsageError("--profile profiles the training step, which --data-only does not run; drop one of them")
    # steady state: every sub-network runs (no slow start); synthetic images in memory unless --data, one batch
    # of them unless --set data.fake_size says otherwise
    data = [f"data.source={args.data}"] if args.data else ["data.source=fake", "data.loader=memory"]
    device = [f"train.device={args.device}"] if args.device else []
    # no kNN: nothing measured evaluates, and its splits would be loaded for every trainer built
    sets = [*data, *args.set, *device, "slim.slow_start=0.0", "train.knn=false"]
    cfg = load_config(args.config, sets)
    batch = args.batch_size or cfg.train.batch_size
    fake_size = [] if args.data or any(s.split("=", 1)[0].strip() == "data.fake_size" for s in args.set) \
        else [f"data.fake_size={batch}"]
    cfg = load_config(args.config, [*sets, f"train.batch_size={batch}", *fake_size])
    rows = run_bench(cfg, args.steps, args.warmup, baseline=not (args.no_baseline or args.data_only),
                     data_only=args.data_only, profile=args.profile)
    for r in rows:  # and the run's settings: the JSON alone says what was measured
        r.update(config=cfg.name, data=cfg.data.source, loader=cfg.data.loader, resolution=cfg.data.resolution)
    shown = [{"measurement": ("  " if r["what"].startswith("dense ") else "") + r["what"],  # the baseline's parts
              "img/s (speed ratio)": f"{r['ratio']:.2f}x" if r.get("ratio") is not None else f"{r['img_per_s']:,.0f}",
              "peak GPU GiB": "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}",
              "GPU busy": "-" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"} for r in rows]
    device, hardware = rows[0]["device"], rows[0]["hardware"]
    where = hardware if hardware.startswith(device) else f"{device} ({hardware})"  # "cuda:0 (NVIDIA H100 ...)"
    header = (f"{cfg.name}: batch {batch}, data {cfg.data.source} ({cfg.data.loader}) at {cfg.data.resolution} px, "
              f"{where}, torch {torch.__version__}")
    emit(args, rows, header + "\n" + markdown_table(shown))
    return 0
