"""The ``slimssl`` command line. Results go to stdout (one JSON document with --json); logs to stderr."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time

from . import __version__
from .cli_args import (add_overrides, data_source, device_name, emit, nonnegative_float, nonnegative_int, output_dir,
                       positive_int)
from .errors import SlimsslError, UsageError
from .launch import torchrun_processes

log = logging.getLogger("slimssl")


# ---- the model commands: export, profile, config ------------------------------------------------------

def _supernet_from_args(args: argparse.Namespace):
    """The supernet named by CHECKPOINT, or by --config with --random-init; its config; and the checkpoint's
    record of ``slimssl recalibrate`` (None when it has none, or for a random initialisation)."""
    from .exporter import open_supernet

    _check_model_source(args)
    return open_supernet(args.checkpoint, args.config, args.set or ())


def _check_model_source(args: argparse.Namespace) -> None:
    """CHECKPOINT, or --config (with --random-init where the command has it): one model to read."""
    from .config import check_assignment

    for assignment in args.set or []:  # a CHECKPOINT after --set is taken as an override: say that first
        check_assignment(assignment)
    if args.checkpoint:
        if args.set and not args.config:
            raise UsageError("--set changes a --config file; a CHECKPOINT is read with the config saved in it")
        if getattr(args, "random_init", False):
            raise UsageError("--random-init exports a new supernet of --config; drop it to export the CHECKPOINT")
    elif not args.config:
        needs = " (with --random-init)" if hasattr(args, "random_init") else ""
        raise UsageError(f"give a CHECKPOINT, or --config FILE{needs}")
    elif getattr(args, "random_init", True) is False:
        raise UsageError("--config without a CHECKPOINT exports random weights: add --random-init to confirm")


def cmd_export(args: argparse.Namespace) -> int:
    from .eval.commands import data_keywords
    from .exporter import export_run
    from .report.table import markdown_table

    if bool(args.subnet) == bool(args.all):
        raise UsageError("give exactly one of --subnet NAME [NAME ...] or --all")
    if args.random_init and args.recalibrate_bn:
        raise UsageError("--recalibrate-bn re-estimates a trained checkpoint's BatchNorm statistics; --random-init "
                         "exports the initial ones: drop one of them")
    _check_model_source(args)
    rows = export_run(args.checkpoint, args.out, "all" if args.all else args.subnet, config=args.config,
                      overrides=args.set or (), fmt=args.format, overwrite=args.overwrite, verify=args.verify,
                      resolution=args.resolution, recalibrate_bn=args.recalibrate_bn, device=args.device,
                      eval_batch_size=args.eval_batch_size, **data_keywords(args))
    emit(args, rows, markdown_table(rows))
    worst = max((v for r in rows for k, v in r.items() if k.endswith("max_rel_diff")), default=0.0)
    if worst > args.tolerance:
        log.error("export differs from the supernet by %.3g (relative to its largest output), more than "
                  "--tolerance %g", worst, args.tolerance)
        return 1
    return 0


# ---- profile -----------------------------------------------------------------------------------------

def cmd_profile(args: argparse.Namespace) -> int:
    from .report.profile import profile_supernet
    from .report.table import markdown_table

    supernet, config, _ = _supernet_from_args(args)
    resolution = args.resolution or config.data.resolution
    rows = profile_supernet(supernet, resolution, args.num_classes, latency=not args.no_latency)
    for row in rows:
        row.update(resolution=resolution, num_classes=args.num_classes)
    emit(args, rows, markdown_table(rows, ["subnet", "params", "macs", *(["latency_ms"] if rows and "latency_ms" in rows[0] else [])]))
    return 0


# ---- config ------------------------------------------------------------------------------------------

def cmd_config(args: argparse.Namespace) -> int:
    from .config import find_config, load_config, packaged_configs

    if args.list:  # the names --config takes, each with the first line of its header comment
        if args.config or args.set:
            raise UsageError("--list lists the shipped recipes and takes no --config or --set; drop --list to "
                             "print the resolved config")
        names = [name.removesuffix(".yaml") for name in packaged_configs()]
        width = max(map(len, names))
        for name in names:
            header = find_config(name).read_text(encoding="utf-8").splitlines()
            first = next((line.lstrip("# ").rstrip() for line in header if line.startswith("#")), "")
            if first and not first.endswith("."):  # the sentence goes on in the file
                first = first.rstrip(",:;") + " ..."
            print(f"{name:<{width}}  {first}".rstrip())
        return 0
    print(load_config(args.config, args.set).to_yaml(), end="")
    return 0


# ---- parser ------------------------------------------------------------------------------------------

def _add_config(p: argparse.ArgumentParser, required: bool = False, default: str = "") -> None:
    p.add_argument("--config", required=required,
                   help=f"YAML recipe: a path or a shipped name such as 'demo'{default}")
    add_overrides(p)


def _register_model_commands(sub: argparse._SubParsersAction) -> None:
    """export, profile and config: the commands of this module."""
    from .eval import DEFAULT_RECALIBRATE_BATCHES
    from .eval.commands import add_loader_args  # export reads train batches as the evaluation commands do

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
    p.add_argument("--verify", action="store_true", help="compare each export with the supernet's sub-network "
                   "(with shared BatchNorm: the re-estimated copy it was exported from)")
    p.add_argument("--tolerance", type=nonnegative_float, default=1e-5,
                   help="--verify fails above this max difference, relative to the largest output where that is "
                   "above 1 (absolute below)")
    p.add_argument("--resolution", type=positive_int,
                   help="input size for --verify, and ONNX's tracing size (the graph takes any size; default: the "
                        "config's)")
    p.add_argument("--recalibrate-bn", type=nonnegative_int, metavar="N",
                   help="shared BatchNorm: re-estimate each sub-network's statistics on N train batches before "
                        "exporting it, as evaluation does, so that the export is the model evaluation measured "
                        f"(default: {DEFAULT_RECALIBRATE_BATCHES} when the checkpoint's BatchNorm is shared, else 0; "
                        "0: export the statistics as stored)")
    p.add_argument("--data", type=data_source,
                   help="dataset name or path of --recalibrate-bn's train batches (default: the checkpoint "
                        "config's data.source)")
    add_loader_args(p)
    p.add_argument("--device", type=device_name, metavar="DEVICE", default="auto",
                   help="where --recalibrate-bn runs: auto (default: cuda if available), cpu, cuda or cuda:N; the "
                        "export is written from the CPU")
    p.add_argument("--eval-batch-size", type=positive_int,
                   help="--recalibrate-bn's batch size (default: config eval.batch_size, as evaluation)")
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
    _add_config(p, default=" (default: demo)")
    p.add_argument("--list", action="store_true", help="list the shipped recipes")
    p.set_defaults(func=cmd_config)


EXIT_CODES = """exit codes:
  0    done
  1    export --verify found a difference over its tolerance; stdout closed early (| head)
  2    bad input or a failed run: the error names what was wrong (argparse's usage errors too)
  3    pretrain (or reproduce) stopped by SIGTERM or SIGINT after saving: the same run continues it
  4    reproduce --time-budget ran out with work left: run the same command again
  130  Ctrl-C outside a training loop: the command stopped; nothing it had saved is lost

environment:
  SLIMSSL_DATA          where cifar10/cifar100 are downloaded (default ~/.cache/slimssl/data)
  SLIMSSL_CACHE         the decoded-image cache (default ~/.cache/slimssl/decoded)
  SLIMSSL_CACHE_GB      its size limit in GiB, least recently used splits dropped past it (default 20; 0: off)
  SLIMSSL_DIST_TIMEOUT  seconds a torchrun process waits for the others (default 1800)
  SLIMSSL_DIST_BACKEND  torch.distributed backend (default cpu:gloo,cuda:nccl with CUDA, else gloo)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimssl",
        description="Slimmable self-supervised pretraining: pretrain one network, use every sub-network. "
                    "With --json a command prints one JSON document on stdout; logs go to stderr.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"slimssl {__version__}")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE before the command (repeatable): a module name, found in this folder "
                             "too, or a .py file; a method of your own registers itself there (docs/extending.md)")
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
    parser.commands = sub.choices  # each command's parser, for its own usage line in an error (main)
    return parser


MULTI_PROCESS_COMMANDS = ("pretrain",)  # the others would evaluate, write and print once per process


def _refuse_several_processes(command: str) -> None:
    """Only pretraining is distributed; any other command started by torchrun on several processes is refused
    (by every process alike, before any work) rather than run N times over the same files."""
    world = torchrun_processes()
    if command not in MULTI_PROCESS_COMMANDS and world > 1:
        raise UsageError(f"slimssl {command} runs on one process, but torchrun started {world} (WORLD_SIZE): each "
                         "would do the same work and write the same files. Run it without torchrun (one GPU is "
                         "used; unset WORLD_SIZE and RANK if this is one process); only slimssl pretrain "
                         "trains on several processes")


def import_modules(names: list[str]) -> None:
    """``--import``: each a module name, looked for in the current folder too (as ``python -m`` does), or the
    path of a .py file, imported as its file name. An error inside it is reported as that module's."""
    import importlib
    import importlib.util
    from pathlib import Path

    for name in names:
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise UsageError(f"--import {name}: no such file (expected a module name or a .py file)")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module  # as a module of that name, so that its classes can be found
                spec.loader.exec_module(module)
            else:
                if os.getcwd() not in sys.path and "" not in sys.path:
                    sys.path.insert(0, os.getcwd())
                importlib.import_module(name)
        except SlimsslError:  # e.g. register_method refusing a class: its own message says what is wrong
            raise
        except ModuleNotFoundError as e:
            if e.name != name:  # the module was found; something it imports was not
                raise UsageError(f"--import {name} failed: {e}") from e
            raise UsageError(f"--import {name}: {e} (expected a module importable from here, or a .py file)") from e
        except Exception as e:
            raise UsageError(f"--import {name} failed: {type(e).__name__}: {e}") from e


GLOBAL_OPTIONS = ("--import", "-v", "--verbose", "--version")  # slimssl's own, before the command


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # a command's time budget counts from here (reproduce --time-budget)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the usage of the command they follow (argparse's parse_args shows slimssl's)
        given = sys.argv[1:] if argv is None else list(argv)
        after_command = args.command in given and unknown[0] in given and \
            given.index(unknown[0]) > given.index(args.command)
        where = "" if after_command or not args.command else \
            f" (options of {args.command} go after the word {args.command})"
        option = unknown[0].split("=", 1)[0]
        if after_command and option in GLOBAL_OPTIONS:
            where = f" ({option} is an option of slimssl itself: it goes before the command, slimssl {option} ... " \
                    f"{args.command} ...)"
        (parser.commands[args.command] if after_command else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}{where}")
    args.started = started
    if isinstance(sys.stdout, io.TextIOWrapper):  # redirected, it takes the locale's encoding (cp1252 on Windows):
        sys.stdout.reconfigure(errors="backslashreplace")  # a character it lacks is escaped, not a crash at the end
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(message)s")
    logging.getLogger("PIL").setLevel(logging.INFO)  # -v is for slimssl: PIL logs every chunk of every PNG
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        _refuse_several_processes(args.command)
        import_modules(args.imports)
        return args.func(args)
    except SlimsslError as e:
        log.debug("where the error was raised:", exc_info=True)
        log.error("slimssl %s: error: %s", args.command, e)
        return 2
    except KeyboardInterrupt as e:  # a training loop saves and exits 3 itself; anywhere else, stop without a traceback
        log.debug("where it was stopped:", exc_info=True)
        log.error("slimssl %s: interrupted (%s); nothing it had saved is lost", args.command, str(e) or "Ctrl-C")
        return 130
    except BrokenPipeError:  # stdout piped into a reader that stopped early (e.g. | head): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1


if __name__ == "__main__":
    sys.exit(main())
