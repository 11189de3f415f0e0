"""``slimssl pretrain``: build the run directory, train, print the per-sub-network table."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..cli_args import add_overrides, output_dir, positive_int
from ..errors import SlimsslError, UsageError

log = logging.getLogger("slimssl")

RUN_FILES = ("results.json", "metrics.jsonl", "tb")  # written by a run besides its checkpoints


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
    from ..checkpoint import load_checkpoint
    from ..cli_args import emit
    from ..config import check_processes, config_from_dict, load_config
    from ..report.table import markdown_table
    from . import distributed as dist
    from .loop import EXIT_INTERRUPTED, Interrupted, Trainer

    dist.init_from_env()
    if not dist.is_main():  # rank 0 alone reports progress; the others still say what goes wrong
        log.setLevel(logging.WARNING)
    try:
        if args.resume is not None:
            run_dir = Path(args.out if args.resume is True else args.resume) if (args.out or args.resume is not True) else None
            if run_dir is None:
                raise UsageError("--resume needs a run directory: --resume RUN_DIR (or --out RUN_DIR)")
            if args.config:
                raise UsageError("--resume continues with the config saved in the run; drop --config (--set, "
                                 "--epochs and --data still apply)")
            last = run_dir / "checkpoints" / "last.pt"
            if not last.is_file():
                what = "is not a file" if last.exists() else "does not exist"
                raise UsageError(f"cannot resume: {last} {what}")
            stored = load_checkpoint(last)["config"]
            cfg = config_from_dict(stored.model_dump(mode="json"), f"{last} (stored config)", flag_overrides(args))
        else:
            cfg = load_config(args.config, flag_overrides(args))
            run_dir = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            if (run_dir / "checkpoints" / "last.pt").exists():
                raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                                 "or choose another --out")
            leftovers = [name for name in RUN_FILES if (run_dir / name).exists()]
            if leftovers:  # a run whose checkpoint is gone: writing there would mix two runs' logs
                raise UsageError(f"{run_dir} holds files of an earlier run ({', '.join(leftovers)}) without its "
                                 "checkpoint; choose another --out")
        check_processes(cfg, dist.world_size(), str(last) if args.resume is not None else args.config or "demo")
        created = dist.is_main() and not run_dir.exists()
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
        log.info("run directory: %s", run_dir)
        try:
            trainer = Trainer(cfg, run_dir, resume=args.resume is not None)
        except BaseException:
            if created and not any(run_dir.iterdir()):  # refused before writing anything: leave no trace
                run_dir.rmdir()
            raise
        if dist.is_main():  # only once the run is set up (a failed resume leaves the saved run untouched)
            (run_dir / "config.yaml").write_text(lr_header(cfg, dist.world_size()) + cfg.to_yaml())
        try:
            results = trainer.fit(args.max_steps)
        except Interrupted as e:
            log.warning("%s; continue with: slimssl pretrain --resume %s", e, run_dir)
            return EXIT_INTERRUPTED
        if results:
            cols = ["subnet", "params", "macs", "knn_top1_random_init", "knn_top1"]
            emit(args, results, markdown_table(results["subnets"], cols))
        else:
            log.info("stopped at step %d of %d; continue with: slimssl pretrain --resume %s",
                     trainer.state.step, trainer.total_steps, run_dir)
        return 0
    except BaseException as e:
        if dist.world_size() > 1:  # never leave the other ranks waiting: exit now, torchrun ends the job
            usage = isinstance(e, SlimsslError)
            dist.fail_fast(e, 2 if usage else 130 if isinstance(e, KeyboardInterrupt) else 1,
                           traceback=not usage)
        raise
    finally:
        dist.shutdown()


def lr_header(cfg, world: int) -> str:
    """Comment lines for RUN/config.yaml: the learning rate the run actually uses, and how it follows."""
    from .optim import scaled_lr

    o, batch = cfg.optim, cfg.train.batch_size
    peak = scaled_lr(o.lr, o, batch)
    how = (f"optim.lr {o.lr:g} x train.batch_size {batch} / optim.reference_batch {o.reference_batch}"
           if o.lr_scaling == "linear" else f"optim.lr {o.lr:g} (optim.lr_scaling: none)")
    lines = [f"# effective peak lr: {peak:g} = {how}"]
    if cfg.slim.slow_start_lr:
        lines.append(f"# effective peak lr once sub-networks join: {scaled_lr(cfg.slim.slow_start_lr, o, batch):g}")
    lines.append(f"# processes: {world}; batch per process: {batch // max(1, world)} (train.batch_size is the total)")
    return "\n".join(lines) + "\n"
