"""The ``slimssl`` command line. Results go to stdout (one JSON document with --json); logs to stderr."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import __version__
from .cli_args import add_overrides, emit, nonnegative_float, nonnegative_int, output_dir, positive_int
from .errors import SlimsslError, UsageError

log = logging.getLogger("slimssl")


# ---- export ------------------------------------------------------------------------------------------

def _supernet_from_args(args: argparse.Namespace):
    """The supernet named by CHECKPOINT, or by --config with --random-init."""
    from .checkpoint import load_supernet
    from .config import load_config
    from .models.build import build_supernet

    if args.checkpoint:
        if args.set and not args.config:
            raise UsageError("--set changes a --config file; a CHECKPOINT is read with the config saved in it")
        if getattr(args, "random_init", False):
            raise UsageError("--random-init exports a new supernet of --config; drop it to export the CHECKPOINT")
        config = load_config(args.config, args.set) if args.config else None
        return load_supernet(args.checkpoint, config)
    if not args.config:
        needs = " (with --random-init)" if hasattr(args, "random_init") else ""
        raise UsageError(f"give a CHECKPOINT, or --config FILE{needs}")
    if getattr(args, "random_init", True) is False:
        raise UsageError("--config without a CHECKPOINT exports random weights: add --random-init to confirm")
    config = load_config(args.config, args.set)
    return build_supernet(config).eval(), config


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ONNX, check_export_folder, export_subnet, load_exported, verify_export
    from .report.table import markdown_table

    if bool(args.subnet) == bool(args.all):
        raise UsageError("give exactly one of --subnet NAME [NAME ...] or --all")
    supernet, config = _supernet_from_args(args)
    # every name is checked before anything is written
    specs = supernet.resolve_many("all" if args.all else args.subnet)
    source = str(args.checkpoint or args.config)
    for spec in specs:
        check_export_folder(args.out, spec, source, args.overwrite)
    _warn_of_unestimated_statistics(args, supernet, specs)
    resolution = args.resolution or config.data.resolution
    rows = []
    for spec in specs:
        folder = export_subnet(supernet, spec, args.out, fmt=args.format, resolution=resolution,
                               metadata={"source": source, "resolution": resolution,
                                         "mean": list(config.data.mean), "std": list(config.data.std)},
                               overwrite=args.overwrite)
        row = {"subnet": spec.name, "path": str(folder)}
        if args.verify:  # the files as written, read back: safetensors, and the ONNX graph when exported
            row["max_abs_diff"] = verify_export(supernet, spec, load_exported(folder), resolution)
            if args.format == "onnx":
                row["onnx_max_abs_diff"] = verify_export(supernet, spec, folder / ONNX, resolution)
        rows.append(row)
        log.info("exported %s to %s", spec.name, folder)
    emit(args, rows, markdown_table(rows))
    worst = max((v for r in rows for k, v in r.items() if k.endswith("max_abs_diff")), default=0.0)
    if worst > args.tolerance:
        log.error("export differs from the supernet by %.3g, more than --tolerance %g", worst, args.tolerance)
        return 1
    return 0


def _warn_of_unestimated_statistics(args: argparse.Namespace, supernet, specs) -> None:
    """With shared BatchNorm any width runs, but only the menu's trained the shared statistics: a width outside
    the menu exports them as they are unless its checkpoint was recalibrated for it (slimssl recalibrate)."""
    outside = [s.name for s in specs if s not in supernet.menu]
    if not outside or not args.checkpoint:
        return
    from .checkpoint import load_checkpoint

    recalibrated = (load_checkpoint(args.checkpoint).get("recalibrated") or {}).get("subnet")
    for name in outside:
        if name != recalibrated:
            log.warning("%s is not in the menu: its BatchNorm statistics are the shared ones, estimated on the menu's "
                        "widths; re-estimate them first: slimssl recalibrate %s --subnet %s --out FILE.pt, then "
                        "export FILE.pt", name, args.checkpoint, name)


# ---- profile -----------------------------------------------------------------------------------------

def cmd_profile(args: argparse.Namespace) -> int:
    from .report.profile import profile_supernet
    from .report.table import markdown_table

    supernet, config = _supernet_from_args(args)
    resolution = args.resolution or config.data.resolution
    rows = profile_supernet(supernet, resolution, args.num_classes, latency=not args.no_latency)
    for row in rows:
        row.update(resolution=resolution, num_classes=args.num_classes)
    emit(args, rows, markdown_table(rows, ["subnet", "params", "macs", *(["latency_ms"] if rows and "latency_ms" in rows[0] else [])]))
    return 0


# ---- config ------------------------------------------------------------------------------------------

def cmd_config(args: argparse.Namespace) -> int:
    from .config import load_config, packaged_configs

    if args.list:
        print("\n".join(packaged_configs()))
        return 0
    print(load_config(args.config, args.set).to_yaml(), end="")
    return 0


# ---- parser ------------------------------------------------------------------------------------------

def _add_config(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML recipe: a path or a shipped name such as 'demo'")
    add_overrides(p)


def _register_model_commands(sub: argparse._SubParsersAction) -> None:
    """export, profile and config: the commands of this module."""
    p = sub.add_parser("export", help="export sub-networks as plain models (safetensors + JSON, or ONNX)")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint or run directory")
    _add_config(p)
    p.add_argument("--random-init", action="store_true", help="export a randomly initialised supernet of --config")
    p.add_argument("--subnet", action="extend", nargs="+", metavar="SUBNET",
                   help="sub-network(s) to export (canonical name, or a width such as 0.5; several may follow)")
    p.add_argument("--all", action="store_true", help="export every sub-network of the menu")
    p.add_argument("--out", required=True, type=output_dir, help="output folder (one sub-folder per sub-network)")
    p.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors",
                   help="onnx: the safetensors files and an ONNX graph (needs slimssl[onnx])")
    p.add_argument("--overwrite", action="store_true", help="replace exports in --out that came from another "
                   "checkpoint or config (an export of the same one is always replaced)")
    p.add_argument("--verify", action="store_true", help="compare each export with the supernet's sub-network")
    p.add_argument("--tolerance", type=nonnegative_float, default=1e-5, help="--verify fails above this max abs difference")
    p.add_argument("--resolution", type=positive_int, help="input size for --verify and ONNX (default: the config's)")
    p.add_argument("--json", action="store_true", help="print the table's rows as JSON on stdout")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("profile", help="params, MACs and CPU latency of every sub-network")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint or run directory")
    _add_config(p)
    p.add_argument("--resolution", type=positive_int, help="input size (default: the config's)")
    p.add_argument("--num-classes", type=nonnegative_int, default=0, help="count a K-way classifier too (papers use 1000)")
    p.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    p.add_argument("--json", action="store_true", help="print the table's rows as JSON on stdout")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("config", help="print a resolved config (or --list the shipped ones)")
    _add_config(p)
    p.add_argument("--list", action="store_true", help="list the shipped recipes")
    p.set_defaults(func=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimssl",
        description="Slimmable self-supervised pretraining: pretrain one network, use every sub-network. "
                    "With --json a command prints one JSON document on stdout; logs go to stderr.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"slimssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from .bench.command import register as register_bench
    from .eval.commands import register as register_eval
    from .reproduce.command import register as register_reproduce
    from .train.command import register as register_pretrain

    # listed in --help in this order: train, evaluate, take out, measure
    register_pretrain(sub)
    register_eval(sub)
    _register_model_commands(sub)
    register_bench(sub)
    register_reproduce(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # a command's time budget counts from here (reproduce --time-budget)
    args = build_parser().parse_args(argv)
    args.started = started
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(message)s")
    if not args.command:
        build_parser().print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except SlimsslError as e:
        log.error("slimssl %s: error: %s", args.command, e)
        return 2
    except BrokenPipeError:  # stdout piped into a reader that stopped early (e.g. | head): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1


if __name__ == "__main__":
    sys.exit(main())
