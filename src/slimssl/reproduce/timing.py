"""The seconds a reproduction's runs cost (``RUN/timing.json``), and the Trainer that counts them."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .. import __version__
from ..atomic import write_json_atomic
from ..devices import synchronize
from ..errors import UsageError
from ..layout import LAST
from ..train.loop import Trainer

log = logging.getLogger("slimssl")

TIMING = "timing.json"


@dataclass
class JobTiming:
    """Seconds a job has cost so far, accumulated over calls (``RUN/timing.json``)."""

    pretrain_seconds: float = 0.0  # training steps only: the number the comparison uses
    eval_seconds: float = 0.0  # kNN and profiling done during pretraining
    checkpoint_seconds: float = 0.0  # writing checkpoints
    setup_seconds: float = 0.0  # building the trainer: data, model, resuming (once per call)
    probe_seconds: float = 0.0  # the linear probe
    step: int = 0  # the training step the times above reach
    chunks: int = 0
    devices: list[str] = field(default_factory=list)
    software: list[str] = field(default_factory=list)  # slimssl, torch (CUDA) and Python of the calls that trained
    steps_not_timed: int = 0  # trained by a call that stopped after saving them and before writing their seconds
    first_step_seconds: float = 0.0  # each call's first step (start-up: kernels chosen, memory grown), included above
    calls: int = 0  # the calls whose steps are counted above (each paid a first step)

    def note_call(self, device: str, software: str) -> None:
        """Record the device and software of a call that trains the run (each once)."""
        if device not in self.devices:
            self.devices.append(device)
        if software not in self.software:
            self.software.append(software)

    def align_to(self, step: int, label: str) -> None:
        """Make the times count up to ``step``, the checkpoint's, where they reach another step."""
        if self.step < step:
            self.steps_not_timed += step - self.step
            log.warning("%s: timing.json reached step %d, the checkpoint step %d: the seconds of the steps in "
                        "between (a call stopped after saving them) are not counted", label, self.step, step)
            self.step = step  # reached, those steps counted as not timed
        elif self.step > step:  # written by an older slimssl after a call killed mid-chunk
            kept = step / self.step
            log.warning("%s: timing.json reached step %d, the checkpoint only %d: those steps are trained again, "
                        "so the pretraining seconds so far are scaled by %.3f to count them once", label, self.step,
                        step, kept)
            self.pretrain_seconds *= kept
            self.step = step


def read_timing(run_dir: Path) -> JobTiming:
    path = run_dir / TIMING
    if not path.is_file():
        return JobTiming()
    known = JobTiming.__dataclass_fields__
    try:
        return JobTiming(**{k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k in known})
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise UsageError(f"{path} is not a readable timing record ({e}); delete {run_dir} to pretrain that run "
                         "again, or choose another --out") from None


def write_timing(run_dir: Path, timing: JobTiming) -> None:
    write_json_atomic(run_dir / TIMING, asdict(timing))


def software_name() -> str:
    """What this process trains with, as timing.json records it."""
    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda and torch.cuda.is_available() else ""
    return f"slimssl {__version__}, torch {torch.__version__}{cuda}, Python {platform.python_version()}"


class TimedTrainer(Trainer):
    """A Trainer that times its evaluation (kNN, the final profile) and checkpoint writing apart, so what
    remains of its wall time is training steps, and adds them to ``timing`` (``RUN/timing.json``) right
    after each ``last.pt``: the seconds counted are those of the steps saved, so a call killed at any moment
    loses only the seconds of steps the next call trains again."""

    def __init__(self, *args, timing: JobTiming | None = None, **kwargs):
        self.apart = {"eval": 0.0, "checkpoint": 0.0}
        self._timing_apart = False
        self._first_step: float | None = None  # its seconds, until counted (None: not taken yet in this call)
        self.timing = timing if timing is not None else JobTiming()
        super().__init__(*args, **kwargs)
        synchronize(self.device)  # the resumed state is in place: the clock of the first count starts here
        self._mark, self._apart_at_mark = time.perf_counter(), dict(self.apart)

    @contextlib.contextmanager
    def _timed_apart(self, kind: str) -> Iterator[None]:
        if self._timing_apart:  # finish() runs knn(): count it once
            yield
            return
        self._timing_apart = True
        synchronize(self.device)  # the training work queued so far belongs to training
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.apart[kind] += time.perf_counter() - start
            self._timing_apart = False

    def _count(self) -> None:
        """Add the seconds since the last count to ``timing``, up to the step ``last.pt`` holds, and write it."""
        synchronize(self.device)
        now = time.perf_counter()
        apart = {k: self.apart[k] - self._apart_at_mark[k] for k in self.apart}
        self.timing.pretrain_seconds += now - self._mark - sum(apart.values())
        self.timing.eval_seconds += apart["eval"]
        self.timing.checkpoint_seconds += apart["checkpoint"]
        self.timing.step = self.last_saved_step if self.last_saved_step is not None else self.timing.step
        if self._first_step:  # counted once; the later steps of the call are not timed apart
            self.timing.first_step_seconds += self._first_step
            self.timing.calls += 1
            self._first_step = 0.0
        write_timing(self.run_dir, self.timing)
        # the next interval starts after this write: its milliseconds are bookkeeping, not pretraining
        self._mark, self._apart_at_mark = time.perf_counter(), dict(self.apart)

    def train_step(self, step: int):
        """The first step of a call is timed on its own as well (still pretraining time): how much of a run's time
        is start-up shows in the report, and a run split over more calls pays it more often."""
        if self._first_step is not None:
            return super().train_step(step)
        synchronize(self.device)
        start = time.perf_counter()
        result = super().train_step(step)
        synchronize(self.device)
        self._first_step = time.perf_counter() - start
        return result

    def knn(self) -> dict[str, float]:
        with self._timed_apart("eval"):
            return super().knn()

    def finish(self) -> dict:
        with self._timed_apart("eval"):
            results = super().finish()
        self._count()
        return results

    def save(self, name: str = LAST, any_rank: bool = False):
        with self._timed_apart("checkpoint"):
            saved = super().save(name, any_rank)
        if name == LAST:
            self._count()
        return saved
