"""``slimssl pretrain``: build the run directory, train, print the per-sub-network table."""

from __future__ import annotations

import argparse
import logging

from ..cli_args import add_overrides, output_dir, positive_int
from ..errors import SlimsslError

log = logging.getLogger("slimssl")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="slimmable self-supervised pretraining (default: the embedded demo)")
    p.add_argument("--config", help="YAML recipe: a path or a shipped name (default: demo)")
    p.add_argument("--data", help="dataset name (digits, cifar10, cifar100, fake) or an ImageFolder path / .zip")
    p.add_argument("--out", type=output_dir, help="run directory (default: runs/<name>-<time>)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps (the schedule keeps its length)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    add_overrides(p)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (or --out) from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print results.json on stdout at the end")
    p.set_defaults(func=cmd_pretrain)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """--set, then the shortcut flags as overrides (so an explicit flag wins over --set)."""
    sets = list(args.set)
    flags = {"data": "data.source", "epochs": "train.epochs", "batch_size": "train.batch_size",
             "device": "train.device"}
    sets += [f"{key}={getattr(args, flag)}" for flag, key in flags.items() if getattr(args, flag, None)]
    return sets


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..cli_args import emit
    from ..report.table import markdown_table
    from . import distributed as dist
    from .loop import EXIT_INTERRUPTED, Interrupted
    from .pretrain import prepare_run, train_run

    dist.init_from_env()
    if not dist.is_main():  # rank 0 alone reports progress; the others still say what goes wrong
        log.setLevel(logging.WARNING)
    try:
        resume = args.resume is not None
        out = args.resume if resume and args.resume is not True else args.out
        cfg, run_dir, source = prepare_run(args.config, out,
                                           overrides=flag_overrides(args), resume=resume)
        try:
            run = train_run(cfg, run_dir, source, resume=resume, max_steps=args.max_steps)
        except Interrupted as e:
            log.warning("%s; continue with: slimssl pretrain --resume %s", e, run_dir)
            return EXIT_INTERRUPTED
        if run.results:
            cols = ["subnet", "params", "macs", "knn_top1_random_init", "knn_top1"]
            emit(args, run.results, markdown_table(run.results["subnets"], cols))
        else:
            log.info("stopped at step %d of %d; continue with: slimssl pretrain --resume %s",
                     run.step, run.total_steps, run_dir)
        return 0
    except BaseException as e:
        if dist.world_size() > 1:  # never leave the other ranks waiting: exit now, torchrun ends the job
            usage = isinstance(e, SlimsslError)
            dist.fail_fast(e, 2 if usage else 130 if isinstance(e, KeyboardInterrupt) else 1,
                           traceback=not usage)
        raise
    finally:
        dist.shutdown()
