"""``slimssl pretrain``: build the run directory, train, print the per-sub-network table; and ``slimssl config``:
the recipe it would train, resolved (with --explain, every key commented), or the list of shipped ones."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli_args import (add_config, add_overrides, batch_int, data_source, device_name, output_dir, positive_int,
                        seed_int, write_out)
from ..wording import shell_quote
from ..errors import SlimsslError, UsageError, storage_error

log = logging.getLogger("slimssl")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="slimmable self-supervised pretraining (default: the embedded demo)")
    p.add_argument("--config", help="YAML recipe: a path or a shipped name (default: demo)")
    p.add_argument("--data", type=data_source,
                   help="dataset name (digits, cifar10, cifar100, fake, or one that a file given to --import "
                   "registers) or an ImageFolder path / .zip")
    p.add_argument("--out", type=output_dir, help="run directory (default: runs/<name>-<time>)")
    p.add_argument("--epochs", type=positive_int, help="train.epochs: the length of the schedule")
    p.add_argument("--batch-size", type=batch_int, help="train.batch_size: the total batch over all processes "
                   "(the learning rate scales with it: optim.lr_scaling)")
    p.add_argument("--max-steps", type=positive_int, help="stop once the run has made this many steps in all, counted "
                   "from its start (the schedule keeps its length)")
    p.add_argument("--device", type=device_name, metavar="DEVICE",
                   help="train.device: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=seed_int, help="train.seed: every random draw of the run (weights, views, "
                   "sub-networks) derives from it")
    add_overrides(p)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR (or --out) from its last checkpoint, with its saved config; "
                       "--set, --epochs and --data change it from then on (logged)")
    again.add_argument("--auto-resume", action="store_true",
                       help="continue the run in --out if it has a checkpoint, else start it: one command for a job "
                       "submitted again and again (--config and --set must give the saved run's settings)")
    p.add_argument("--json", action="store_true", help="print results.json on stdout at the end (stopped early: "
                   "the run directory and its step, with \"finished\": false)")
    p.add_argument("--wandb", metavar="PROJECT", help="also send the run's records (losses, spread, lr, img/s, kNN) "
                   "to Weights & Biases, project PROJECT: one W&B run per run directory, continued by a resume "
                   "(needs wandb; WANDB_MODE=offline and its other settings apply)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("config", help="print a resolved config (or --list the shipped ones)")
    add_config(p, default=" (default: demo)")
    p.add_argument("--list", action="store_true", help="list the shipped recipes")
    p.add_argument("--explain", action="store_true", help="each key with a comment: what it does and what it "
                   "accepts (the same YAML, loadable as a recipe; docs/config.md has them as tables)")
    p.set_defaults(func=cmd_config)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """--set, then the shortcut flags as overrides (so an explicit flag wins over --set)."""
    from .prepare import SHORTCUTS, shortcut_overrides

    return [*args.set, *shortcut_overrides(**{flag: getattr(args, flag, None) for flag in SHORTCUTS})]


def stopped_doc(run) -> dict:
    """--json of a run stopped before its end (--max-steps, or a signal): where it stands, with the
    finished document's (results.json) "subnets" list, empty."""
    return {"run_dir": str(run.run_dir), "finished": False, "step": run.step,
            "total_steps": run.total_steps, "subnets": []}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from . import distributed as dist
    from .signals import command_stop_signals

    dist.init_from_env()
    if not dist.is_main():  # rank 0 alone reports progress; the others still say what goes wrong
        log.setLevel(logging.WARNING)
    try:
        # SIGTERM outside the training loop too: a message and an exit code
        with command_stop_signals(ignore_sigterm_after_saved_stop=dist.world_size() > 1):
            return _run_pretrain(args)
    except BaseException as e:
        if dist.world_size() > 1:  # never leave the other ranks waiting: exit now, torchrun ends the job
            usage = isinstance(e, SlimsslError)  # a full disk while writing metrics is one too (train_run above)
            stopped = isinstance(e, KeyboardInterrupt)
            dist.fail_fast(e, 2 if usage else 130 if stopped else 1, traceback=not (usage or stopped))
        raise
    finally:
        dist.shutdown()


def _run_pretrain(args: argparse.Namespace) -> int:
    """``slimssl pretrain`` in this process (cmd_pretrain sets up the processes and the signals around it)."""
    from ..cli_args import emit
    from ..layout import checkpoint_path
    from ..report.table import markdown_table
    from . import distributed as dist
    from .prepare import prepare_run
    from .pretrain import train_run
    from .signals import EXIT_INTERRUPTED, Interrupted

    if isinstance(args.resume, str) and args.out is not None \
            and Path(args.resume).resolve() != args.out.resolve():  # a resumed run stays in its folder
        raise UsageError(f"--resume {args.resume} and --out {args.out} name two different folders; a run "
                         "continues in its own folder: give --resume RUN_DIR alone")
    out = args.resume if isinstance(args.resume, str) else args.out
    resume = "auto" if args.auto_resume else args.resume is not None
    cfg, run_dir, source, resume = prepare_run(args.config, out, overrides=flag_overrides(args), resume=resume)
    # how to continue it: with the modules this call imported (a method of one's own)
    again = " ".join(["slimssl", *(f"--import {shell_quote(m)}" for m in getattr(args, "imports", [])),
                      "pretrain", "--resume", shell_quote(run_dir)])
    callbacks = []
    if args.wandb and dist.is_main():  # the records are rank 0's
        from .tracking import WandbRecords

        callbacks.append(WandbRecords(args.wandb, run_dir, cfg.model_dump(mode="json")))
    try:
        try:
            run = train_run(cfg, run_dir, source, resume=resume, max_steps=args.max_steps, callbacks=callbacks)
        finally:  # before anything is printed (W&B writes to stdout as its run ends), and for a next run in-process
            for callback in callbacks:
                callback.finish()
    except OSError as e:  # a full disk or a read-only folder while writing the metrics or results
        # before the first checkpoint the start's files are gone again: the same command starts it over
        raise storage_error(e, again if checkpoint_path(run_dir).is_file() else "") or e
    except Interrupted as e:
        if dist.is_main():  # one hint for the job, not one per process
            log.warning("%s; continue with: %s", e, again)
            if args.json and e.run:
                emit(args, stopped_doc(e.run), "")
        return EXIT_INTERRUPTED
    if run.results:
        cols = ["subnet", "params", "macs", "knn_top1_random_init", "knn_top1"]
        emit(args, run.results, markdown_table(run.results["subnets"], cols))
        if dist.is_main():  # after minutes of progress, where the run is and what comes next
            where = shell_quote(run_dir)
            # no kNN though asked for: data without labels or a test split, which a probe cannot use either
            probe = "" if "knn" in run.results.get("protocols", {}) or not cfg.train.knn else \
                " --data DATA (labelled, with a test split, where the run's data is not)"
            log.info("done: the run is in %s (results.json, checkpoints/last.pt); next: slimssl linear %s%s, "
                     "slimssl export %s --all --out DIR, slimssl report %s", where, where, probe, where, where)
    elif dist.is_main():  # the other ranks have no results even when finished: rank 0 reports
        log.info("stopped at step %d of %d; continue with: %s", run.step, run.total_steps, again)
        if args.json:  # a script's json.loads needs a document whenever the command succeeds
            emit(args, stopped_doc(run), "")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.list:  # the names --config takes, each with the first line of its header comment (without torch)
        from ..layout import PACKAGED, packaged_configs

        if args.config or args.set or args.explain:
            raise UsageError("--list lists the shipped recipes and takes no --config, --set or --explain; drop "
                             "--list to print the resolved config")
        names = [name.removesuffix(".yaml") for name in packaged_configs()]
        width = max(map(len, names))
        for name in names:
            header = (PACKAGED / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
            first = next((line.lstrip("# ").rstrip() for line in header if line.startswith("#")), "")
            if first and not first.endswith("."):  # the sentence goes on in the file
                first = first.rstrip(",:;") + " ..."
            write_out(f"{name:<{width}}  {first}".rstrip() + "\n")
        return 0
    from ..config import load_config

    cfg = load_config(args.config, args.set)
    if args.explain:
        from ..config.reference import explained_yaml

        write_out(explained_yaml(cfg))
    else:
        write_out(cfg.to_yaml())
    return 0
