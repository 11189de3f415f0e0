"""Where this process runs, known without importing torch (the CLI checks it before any command loads): the
device names slimssl accepts, and what the launcher (torchrun) says about the process in the environment."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("slimssl")

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"  # auto: a CUDA GPU when there is one, else the CPU; cuda:N: that GPU
DEVICES = "auto, cpu, cuda or cuda:N"
SEED_RANGE = (-2**63, 2**63)  # the seeds torch's generators take (a 64-bit integer)


def unsupported_device_hint(name: object) -> str:
    """What a device error adds for a device PyTorch has and slimssl does not run on yet (an Apple GPU)."""
    if isinstance(name, str) and name.lower().startswith("mps"):
        return " (Apple GPUs, mps, are not supported yet: use cpu)"
    return ""


def torchrun_processes() -> int:
    """How many processes torchrun (or another launcher) started for this job; 1 outside one. A process of
    such a job has WORLD_SIZE and its RANK, which joining the process group needs: WORLD_SIZE alone, as a
    cluster job may export it to everything it runs, is one process."""
    world = os.environ.get("WORLD_SIZE", "").strip()
    if "RANK" not in os.environ or not world:
        return 1
    if not world.isdigit() or int(world) < 1:
        from .errors import UsageError

        raise UsageError(f"WORLD_SIZE must be the number of processes of the job (a positive int), got {world!r}")
    return int(world)


def processes_on_this_machine() -> int:
    """How many of the job's processes run on this machine (torchrun's LOCAL_WORLD_SIZE); 1 outside a job."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return int(local) if torchrun_processes() > 1 and local.isdigit() and int(local) > 0 else 1


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity where the system has one (a Slurm job's cpuset, taskset,
    a container's cpuset), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have none; a sandbox may refuse it
        return os.cpu_count() or 1


def warn_of_srun_tasks() -> None:
    """Say, in one of several tasks srun started without torchrun (``srun --ntasks=N python -m slimssl pretrain``),
    that each task trains a run of its own: slimssl's processes join one training only as torchrun starts them."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "").strip()
    if tasks.isdigit() and int(tasks) > 1 and torchrun_processes() == 1:
        log.warning("this is task %s of the %s that srun started, and it trains a run of its own: to train one run on "
                    "several GPUs, start torchrun with one task per node (srun torchrun --nproc_per_node=GPUS ..., "
                    "docs/distributed.md)", os.environ.get("SLURM_PROCID", "?"), tasks)


def warn_of_repeated_work(what: str) -> None:
    """Say, in a Python script run by torchrun, that ``what`` (an evaluation or export, which runs on one
    process) is done whole by every process: the same work N times, on one GPU each, merging the same results."""
    processes = torchrun_processes()
    if processes > 1:
        log.warning("%s runs whole on each of the %d processes torchrun started, and each writes the same results; "
                    "call it on one of them, e.g. under `if os.environ.get('RANK', '0') == '0':`", what, processes)
