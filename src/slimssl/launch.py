"""What the launcher says about this process, read from the environment without importing torch (the CLI
checks it before any command loads)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("slimssl")


def torchrun_processes() -> int:
    """How many processes torchrun started for this job; 1 outside torchrun. LOCAL_RANK tells torchrun's
    processes apart from a single one in a cluster job that exports WORLD_SIZE to everything it runs."""
    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) if world.isdigit() and "LOCAL_RANK" in os.environ else 1


def warn_of_repeated_work(what: str) -> None:
    """Say, in a Python script run by torchrun, that ``what`` (an evaluation or export, which runs on one
    process) is done whole by every process: the same work N times, on one GPU each, merging the same results."""
    processes = torchrun_processes()
    if processes > 1:
        log.warning("%s runs whole on each of the %d processes torchrun started, and each writes the same results; "
                    "call it on one of them, e.g. under `if os.environ.get('RANK', '0') == '0':`", what, processes)
