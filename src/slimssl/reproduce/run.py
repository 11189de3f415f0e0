"""Running a reproduction's jobs within one call's budget: pretraining epoch by epoch and the linear probe,
with the seconds each took counted in ``RUN/timing.json`` (``timing.py``)."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Iterator


from ..layout import CHECKPOINTS, CONFIG, RESULTS, checkpoint_path
from ..config import Config
from ..data.files import BUILTIN, list_labelled_files
from ..data.registry import registered_name, registered_split
from ..devices import hardware_name, pick_device, synchronize
from ..errors import DataError, UsageError
from ..eval import linear_settings, recalibration_batches
from ..eval.inputs import DataOptions
from ..eval.evaluate import linear_probe
from ..atomic import remove_temporaries
from ..eval.results import read_results
from ..train.lock import TrainingLock
from ..train.prepare import RUN_FILES, remove_run_files
from ..train.signals import Interrupted, stop_signals_handled_by
from .plan import Job
from .timing import TIMING, TimedTrainer, read_timing, software_name, write_timing

log = logging.getLogger("slimssl")


# ---- per-job state -----------------------------------------------------------------------------------

def is_pretrained(job: Job) -> bool:
    """Trainer.finish wrote results.json (with ``steps``; an evaluation command on a partial run writes
    results.json too, without it)."""
    return (job.run_dir / RESULTS).is_file() and "steps" in read_results(job.run_dir)


# ---- the budget of one call --------------------------------------------------------------------------

@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """A stop signal outside a training loop (loading data, a probe, the final evaluation, the report) stops
    the call at once, as Ctrl-C does: with a KeyboardInterrupt, which no ``except Exception`` on the way (a
    checkpoint's or a cache file's reader) takes for a failure of its own. What was written before stays:
    checkpoints, results and times are written whole or not at all, and a probe cut short runs again in the next
    call. Inside the loop, the Trainer's own guard finishes the step and saves first (and raises
    :class:`Interrupted`)."""
    def stop(signum, frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    with stop_signals_handled_by(stop):
        yield


class Budget:
    """Units of work (an epoch of pretraining, one linear probe) of this call: the first always runs,
    later ones only start while ``seconds`` have not passed, so every call makes progress."""

    def __init__(self, seconds: float | None, start: float | None = None):
        """``start``: the ``time.perf_counter()`` the call began at (default: now)."""
        self.seconds, self.units = seconds, 0
        self.start = time.perf_counter() if start is None else start

    def allows(self) -> bool:
        return self.seconds is None or self.units == 0 or time.perf_counter() - self.start < self.seconds

    def used(self) -> None:
        self.units += 1


# ---- pretraining -------------------------------------------------------------------------------------

def run_chunk(trainer: TimedTrainer) -> dict:
    """Train one epoch (or up to the end); the results when finished. The trainer counts the seconds."""
    end = min(trainer.state.step + trainer.steps_per_epoch, trainer.total_steps)
    try:
        results = trainer.fit(max_steps=end)
    except Interrupted:  # stopped by a signal after saving: a chunk all the same (its seconds are counted)
        _count_chunk(trainer)
        raise
    # any other failure counts no chunk: the steps since the last checkpoint are trained again next call
    _count_chunk(trainer)
    if trainer.signal_received is not None:  # it came as the run ended: the call stops all the same
        raise Interrupted(f"stopped by {signal.Signals(trainer.signal_received).name}")
    return results


def _count_chunk(trainer: TimedTrainer) -> None:
    trainer.timing.chunks += 1
    write_timing(trainer.run_dir, trainer.timing)


def pretrain_job(job: Job, budget: Budget) -> bool:
    """Pretrain ``job`` epoch by epoch while the budget allows; True once its results.json exists."""
    if is_pretrained(job):
        return True
    if not budget.allows():
        return False
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with TrainingLock(job.run_dir):
        return _pretrain_held_job(job, budget)


def _pretrain_held_job(job: Job, budget: Budget) -> bool:
    resume = checkpoint_path(job.run_dir).is_file()
    timing = read_timing(job.run_dir)
    start = time.perf_counter()
    trainer = TimedTrainer(job.cfg, job.run_dir, resume=resume, timing=timing)
    timing.setup_seconds += time.perf_counter() - start
    timing.note_call(hardware_name(trainer.device), software_name())
    timing.align_to(trainer.state.step, job.label)
    with trainer:  # its writer thread and loader workers stop however this call ends
        log.info("%s: pretraining from step %d of %d", job.label, trainer.state.step, trainer.total_steps)
        while budget.allows():
            results = run_chunk(trainer)
            budget.used()
            if results:
                log.info("%s: pretrained in %.1f s", job.label, timing.pretrain_seconds)
                return True
        return False


# ---- the linear probe --------------------------------------------------------------------------------

def probe_settings(cfg: Config, epochs: int) -> dict:
    """What ``slimssl linear RUN --epochs EPOCHS`` stores under protocols.linear (its defaults: a head per
    sub-network on cached features), known without loading the run's checkpoint."""
    return linear_settings(DataOptions().settings(cfg), epochs=epochs,
                           recalibrate_bn=recalibration_batches(None, cfg.model.bn == "private"))


def check_saved_probes(jobs: list[Job], probe_epochs: int) -> None:
    """Every run already probed in ``--out`` was probed with this call's settings: the report compares them,
    and a run whose checkpoint did not travel could not be probed again."""
    for job in jobs:
        if not (job.run_dir / RESULTS).is_file():
            continue
        saved = read_results(job.run_dir).get("protocols", {}).get("linear")
        now = probe_settings(job.cfg, probe_epochs)
        if saved is not None and saved != now:
            diffs = [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                     if saved.get(k) != now.get(k)]
            raise UsageError(f"{job.label} was probed with other settings than this call's:\n  "
                             + "\n  ".join(diffs) + "\nrun with the same --probe-epochs, or choose another --out")


def is_probed(job: Job, settings: dict) -> bool:
    data = read_results(job.run_dir)
    return (data.get("protocols", {}).get("linear") == settings
            and all(row.get("linear_top1") is not None and "linear_settings" not in row for row in data["subnets"]))


def job_progress(job: Job, probe_epochs: int) -> dict:
    """Where a job stands, for ``reproduce --json`` with work left: from its small files (no checkpoint read)."""
    pretrained = is_pretrained(job)
    try:
        timing = read_timing(job.run_dir)
    except UsageError:  # unreadable: the call that trains this run next says so; a progress report need not
        timing = None
    return {"run": job.label, "pretrained": pretrained, "steps_trained": timing and timing.step,
            "pretrain_seconds": timing and round(timing.pretrain_seconds, 3),
            "probed": pretrained and is_probed(job, probe_settings(job.cfg, probe_epochs))}


def probe_job(job: Job, budget: Budget, epochs: int) -> bool:
    """Linear probe of a pretrained job into its results.json (``linear_top1``), as ``slimssl linear RUN
    --epochs EPOCHS`` does it (the same function; data decoded in memory, from the decoded-image cache after the
    first job); True once stored."""
    settings = probe_settings(job.cfg, epochs)
    if is_probed(job, settings):
        return True
    if not budget.allows():
        return False
    device = pick_device(job.cfg.train.device)
    synchronize(device)
    start = time.perf_counter()
    rows = linear_probe(job.run_dir, epochs=epochs, device=device, loader="memory")
    synchronize(device)
    seconds = time.perf_counter() - start
    # after the results: a call killed in between runs no probe again, so it is never counted twice
    timing = read_timing(job.run_dir)
    timing.probe_seconds += seconds
    write_timing(job.run_dir, timing)
    budget.used()
    log.info("%s: linear probe %s", job.label, ", ".join(f"{r['subnet']}={r['linear_top1']:.2f}" for r in rows))
    return True



def restart_if_checkpoint_lost(job: Job) -> None:
    """A job that is not finished (pretrained and probed) but whose ``last.pt`` is gone starts again.

    That happens when a reproduction travels between machines without its checkpoints (they are large;
    the finished runs' results are all the report needs). The lost run's times, logs and partial results
    are removed, so that they are not counted twice, and its config.yaml too: it starts with the settings of
    this call (called before the saved settings are compared)."""
    if not job.run_dir.is_dir() or checkpoint_path(job.run_dir).is_file():
        return
    if is_pretrained(job) and "linear" in read_results(job.run_dir).get("protocols", {}):
        return  # finished: never removed, whatever this call asks (check_saved_probes refuses other settings)
    lost = remove_run_files(job.run_dir, (TIMING, *RUN_FILES, CONFIG))
    if lost:
        log.warning("%s: not finished and has no checkpoint (not carried here, or never written): started again "
                    "(removed %s)", job.label, ", ".join(lost))


def remove_killed_writes(jobs: list[Job], out: Path) -> None:
    """The temporary files that a call killed while writing left (a checkpoint's: its whole size), in the runs'
    folders and the report's: a reproduction is the only writer there, one call at a time."""
    from . import REPORT_JSON, REPORT_MD

    folders = [(out, (REPORT_JSON, REPORT_MD)), *((folder, ()) for job in jobs
                                                   for folder in (job.run_dir, job.run_dir / CHECKPOINTS))]
    for folder, of in folders:
        for name in remove_temporaries(folder, of=of):
            log.info("%s: removed %s, left by a write that was killed midway", folder, name)


def require_labelled_splits(jobs: list[Job]) -> None:
    """Refuse, before any pretraining, data that the final evaluation could not use: a folder or .zip without
    class sub-folders (registered images without labels), or without a test split (the comparison evaluates
    by kNN and linear probe)."""
    for source in dict.fromkeys(job.cfg.data.source for job in jobs):
        if source in BUILTIN:
            continue
        for split in ("train", "test"):
            try:  # images registered in Python, or files
                labels = (registered_split(source, split) if registered_name(source) is not None
                          else list_labelled_files(source, split)).labels
            except DataError as e:
                raise UsageError(f"cannot use --data {source!r}: {e}") from None
            if labels is None:
                raise UsageError(f"the {split} split of {source!r} has no labels (no class sub-folders, or none "
                                 "registered): the reproduction evaluates every network by kNN and linear probe, "
                                 "so it needs a labelled dataset")


def run_jobs(jobs: list[Job], budget: Budget, probe_epochs: int) -> int:
    """Pretrain and probe the jobs in order while the budget lasts; the number of jobs done."""
    done = 0
    for job in jobs:
        if not (pretrain_job(job, budget) and probe_job(job, budget, probe_epochs)):
            break
        done += 1
    return done

