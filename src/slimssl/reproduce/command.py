"""The ``slimssl reproduce`` command line (torch is imported only once the command runs)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ..cli_args import add_overrides, data_source, device_name, nonnegative_float, output_dir, positive_int
from ..errors import UsageError
from . import (DEFAULT_EPOCHS, DEFAULT_PROBE_EPOCHS, DEFAULT_RECIPES, EXIT_CONTINUE, REPORT_HEADING, REPORT_JSON,
               REPORT_MD)

log = logging.getLogger("slimssl")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="slimmable vs one-by-one pretraining on CIFAR-10: pretrain, evaluate, compare (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For each recipe, pretrain (a) the slimmable network and (b) each menu entry alone with\n"
                    "the same method, epochs and batch; evaluate every network by kNN and linear probe; write\n"
                    "OUT/reproduction.md, OUT/reproduction.json and accuracy-vs-MACs plots.\n"
                    "Run the same command again to continue an unfinished reproduction (see docs/results.md).",
        epilog="exit codes:\n  0  done: the report is written (again, if it was already)\n"
               "  2  bad arguments, or settings that differ from the runs already in --out\n"
               "  3  stopped by SIGTERM, SIGINT or SIGUSR1 after saving: run the same command again\n"
               f"  {EXIT_CONTINUE}  the --time-budget ran out with work left: run the same command again\n"
               "  (1 and 130: as every command's, see slimssl --help)")
    p.add_argument("--recipes", action="extend", nargs="+", metavar="RECIPE",
                   help="shipped config names or YAML paths, space-separated (a comma-separated list works too) "
                        f"(default: {' '.join(DEFAULT_RECIPES)})")
    p.add_argument("--data", type=data_source,
                   help="dataset name or path for every recipe (default: the recipes' data.source)")
    p.add_argument("--out", required=True, type=output_dir, help="folder of the runs and the report")
    p.add_argument("--epochs", type=positive_int,
                   help=f"pretraining epochs of every run (default {DEFAULT_EPOCHS}, or --set train.epochs=N; this "
                   "flag wins over --set)")
    p.add_argument("--batch-size", type=positive_int, help="total batch of every run (default: the recipe's)")
    p.add_argument("--device", type=device_name, metavar="DEVICE",
                   help="auto, cpu, cuda or cuda:N for every run (default: the recipes' train.device, auto)")
    p.add_argument("--time-budget", type=nonnegative_float, metavar="SECONDS",
                   help=f"start no new epoch or probe after SECONDS of this call and exit {EXIT_CONTINUE} "
                        "(the first one always runs); default: run to the end")
    p.add_argument("--probe-epochs", type=positive_int, default=DEFAULT_PROBE_EPOCHS,
                   help=f"linear probe epochs (default {DEFAULT_PROBE_EPOCHS})")
    add_overrides(p, "config values of every recipe")
    p.add_argument("--json", action="store_true",
                   help="print reproduction.json on stdout (or the progress, when work is left)")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from ..layout import TRAINING_LOCK, where_in_a_run
    from ..train.lock import TrainingLock, refuse_if_training
    from ..train.signals import EXIT_INTERRUPTED, Interrupted
    from .plan import check_saved_configs, plan_jobs, recipe_overrides
    from .report import write_report
    from .run import (Budget, check_saved_probes, remove_killed_writes, require_labelled_splits,
                      restart_if_checkpoint_lost, run_jobs, stop_on_signals)

    given = args.recipes or list(DEFAULT_RECIPES)
    recipes = [r.strip() for item in given for r in item.split(",") if r.strip()]  # "a,b" as "a b"
    if not recipes:
        raise UsageError(f"--recipes {' '.join(given)!r} names no recipe; expected shipped config names or YAML "
                         "paths")
    where = where_in_a_run(args.out)
    if where is not None:  # its runs would be nested in another run's files
        raise UsageError(f"--out {args.out} is {where}; a reproduction's runs go in a folder of their own")
    working = False  # whether this call may have changed the runs (a report of an earlier call no longer holds)
    created = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    lock = TrainingLock(args.out)  # one reproduction in --out at a time: planning removes and restarts runs
    try:
        with stop_on_signals():  # from planning to the last line: every stop signal exits 3
            jobs = plan_jobs(recipes, args.out, recipe_overrides(args))
            check_saved_probes(jobs, args.probe_epochs)  # a probed run is kept: refused here if probed otherwise
            for job in jobs:  # a run that `slimssl pretrain` trains in --out now: its files are no leftovers
                refuse_if_training(job.run_dir)
            for job in jobs:  # before the settings are compared: a run that starts again may start otherwise
                restart_if_checkpoint_lost(job)
            check_saved_configs(jobs)
            require_labelled_splits(jobs)
            remove_killed_writes(jobs, args.out)
            budget = Budget(args.time_budget, start=getattr(args, "started", None))  # from the call's start
            working = True
            done = run_jobs(jobs, budget, args.probe_epochs)
            doc = write_report(args.out, jobs, args.probe_epochs) if done == len(jobs) else None
            working = doc is None
            return _finish(args, jobs, budget, done, doc)
    except (Interrupted, KeyboardInterrupt) as e:  # the loop saved and stopped; a signal anywhere else (or again)
        log.warning("%s", str(e) or "stopped by a second signal")
        log.warning("reproduction interrupted; what was saved is kept: run the same command again to continue")
        if working:
            _remove_earlier_report(args.out)
        return EXIT_INTERRUPTED
    finally:
        lock.release()
        if created and [p.name for p in args.out.iterdir()] == [TRAINING_LOCK]:  # refused before any work
            (args.out / TRAINING_LOCK).unlink()
            args.out.rmdir()


def _finish(args: argparse.Namespace, jobs, budget, done: int, doc: dict | None) -> int:
    """What a call that was not interrupted says: the report, or how far the work got."""
    from ..cli_args import emit
    from .report import report_markdown
    from .run import job_progress

    log.info("this call: %d unit%s of work in %.1f s", budget.units, "" if budget.units == 1 else "s",
             time.perf_counter() - budget.start)
    if doc is None:
        log.warning("%d of %d jobs done; run the same command again to continue", done, len(jobs))
        _remove_earlier_report(args.out)
        status = {"complete": False, "jobs_done": done, "jobs_total": len(jobs),
                  "jobs": [job_progress(j, args.probe_epochs) for j in jobs]}
        if args.json:
            emit(args, status, "")
        return EXIT_CONTINUE
    log.info("wrote %s and %s", args.out / REPORT_MD, args.out / REPORT_JSON)
    emit(args, doc, report_markdown(doc))
    return 0


def _remove_earlier_report(out: Path) -> None:
    """A call that leaves work removes the report of an earlier call, which would look current: the
    reproduction.json of a complete reproduction, the plots it lists and the reproduction.md written with it.
    Files of these names that a reproduction did not write are the user's, and are left alone."""
    try:
        doc = json.loads((out / REPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return
    if not (isinstance(doc, dict) and doc.get("complete") is True and isinstance(doc.get("recipes"), list)):
        return
    from .report import METRICS, plot_name

    md = out / REPORT_MD
    # the plots it lists, by the names a reproduction gives them: a file of another name is not its to remove
    plots = {plot_name(r.get("recipe"), key) for r in doc["recipes"] if isinstance(r, dict) for key in METRICS.values()}
    ours = [out / REPORT_JSON, *(out / name for r in doc["recipes"] if isinstance(r, dict)
                                for name in r.get("plots") or [] if isinstance(name, str) and name in plots)]
    if md.is_file() and md.read_text(encoding="utf-8", errors="replace").startswith(REPORT_HEADING):
        ours.append(md)
    stale = [p for p in ours if p.is_file() and p.parent == out]
    for path in stale:
        path.unlink()
    if stale:
        log.info("removed the report of an earlier call (%s): it is written again once every job is done",
                 ", ".join(p.name for p in stale))
