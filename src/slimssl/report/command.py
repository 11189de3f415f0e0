"""``slimssl report``: the tables (and plots) of one or more run directories' results.json, from the files
alone (no torch import: a report answers at once); and ``slimssl profile``: params, MACs and CPU latency of every
sub-network of a CHECKPOINT, a --config or an export."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli_args import add_config, check_model_source, emit, nonnegative_int, output_file, positive_int
from ..errors import UsageError

log = logging.getLogger("slimssl")

PLOT_SUFFIXES = (".png", ".pdf", ".svg")  # formats matplotlib writes without extra packages
DEFAULT_METRIC = "knn_top1"


def cmd_report(args: argparse.Namespace) -> int:
    from .plot import plot_accuracy_vs_macs, plot_grad_norms
    from .report import grad_norm_series, load_runs, report_markdown, settings_apart, with_results

    run_dirs = with_results(args.run_dirs)
    results = load_runs(run_dirs)
    apart = settings_apart(results)
    if apart:
        log.warning("these runs were measured with other settings, so their numbers do not compare: %s",
                    "; ".join(apart))
    unused = [flag for flag, value in (("--metric", args.metric), ("--join-singles", args.join_singles)) if value]
    if unused and not args.plot:
        log.warning("%s %s only what --plot draws, and no --plot was given", " and ".join(unused),
                    "change" if len(unused) > 1 else "changes")
    series = {r["run"]: grad_norm_series(d) for r, d in zip(results, run_dirs)} if args.plot_grad else {}
    if args.plot_grad and not any(series.values()):  # refused before anything is drawn or printed
        raise UsageError(f"--plot-grad: no record with 'grad_norm' in metrics.jsonl of "
                         f"{', '.join(map(str, run_dirs))}; pretraining logs the gradient diagnostic only when "
                         "asked: --set train.grad_diagnostics_every=N")
    if args.plot:
        metric = args.metric or DEFAULT_METRIC
        plot_accuracy_vs_macs(results, metric, args.plot, join_singles=args.join_singles)
        log.info("wrote %s (%s against MACs)", args.plot, metric)
    if args.plot_grad:
        plot_grad_norms(series, args.plot_grad)  # labels are unique
        log.info("wrote %s (gradient norms)", args.plot_grad)
    emit(args, results, report_markdown(results))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from ..layout import is_export_dir

    exported = is_export_dir(args.checkpoint)  # profiled as exported: what a deployment of it runs
    if exported and (args.config or args.set):
        raise UsageError("an exported sub-network is profiled as exported: drop --config and --set")
    if not exported:
        check_model_source(args)  # before torch is imported: a mistake is said at once
    from ..checkpoint import open_supernet
    from ..eval.exported import supernet_of_export
    from .profile import profile
    from .table import markdown_table

    if exported:
        supernet, config = supernet_of_export(args.checkpoint)
    else:
        supernet, config = open_supernet(args.checkpoint, args.config, args.set or ())[:2]
    resolution = args.resolution or config.data.resolution
    rows = profile(supernet, resolution=resolution, num_classes=args.num_classes, latency=not args.no_latency,
                   threads=args.threads)
    for row in rows:
        row.update(resolution=resolution, num_classes=args.num_classes)
    timed = bool(rows) and "latency_ms" in rows[0]
    if timed:
        how = rows[0]["latency_settings"]
        log.info("CPU latency: median of %d forward passes of batch %d after %d warm-up, on %d thread(s); other "
                 "work on the machine makes it read slower", how["runs"], how["batch"], how["warmup"], how["threads"])
    emit(args, rows, markdown_table(rows, ["subnet", "params", "macs", *(["latency_ms"] if timed else [])]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables (and plots) of the results of one or more run directories")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directories (holding results.json): one table each, in this order")
    p.add_argument("--plot", type=output_file(*PLOT_SUFFIXES), metavar="FILE.png",
                   help="accuracy against MACs, one line per run (.png, .pdf or .svg)")
    p.add_argument("--metric",
                   help=f"what --plot draws: knn_top1, linear_top1, finetune_1pct_top1, ... (default {DEFAULT_METRIC})")
    p.add_argument("--join-singles", metavar="LABEL",
                   help="draw runs with a single sub-network (pretrained one by one) as one line named LABEL")
    p.add_argument("--plot-grad", type=output_file(*PLOT_SUFFIXES), metavar="FILE.png",
                   help="gradient norms on shared/other weights per sub-network (from metrics.jsonl)")
    p.add_argument("--json", action="store_true", help="print the runs' results.json contents as one JSON list")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("profile", help="params, MACs and CPU latency of every sub-network")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file or run directory, or an exported sub-network's "
                   "folder")
    add_config(p, checkpoint=True)
    p.add_argument("--resolution", type=positive_int, help="input size (default: the config's)")
    p.add_argument("--num-classes", type=nonnegative_int, default=0,
                   help="count a K-way classifier too (papers use 1000)")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads of the latency measurement (default: torch's; 1 reads steadier on a busy machine)")
    p.add_argument("--json", action="store_true", help="print the table's rows as JSON on stdout")
    p.set_defaults(func=cmd_profile)
