"""Stop signals: SIGTERM, SIGINT and SIGUSR1 end a run cleanly (the step in flight finishes, a checkpoint is
saved) and give exit code 3, after which the same command continues the run."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from .pretrain import PretrainRun

log = logging.getLogger("slimssl")

EXIT_INTERRUPTED = 3  # documented: the run was stopped by a stop signal after saving a checkpoint
# A SIGTERM again within this many seconds is the same request: a scheduler (Slurm's --signal without B:)
# signals every process of the job, and torchrun forwards the one it gets to its workers as well
SAME_REQUEST_SECONDS = 10.0
# A scheduler's notice that the job ends soon (Slurm's --signal=USR1@SECONDS, Lightning's requeue signal, SGE's
# -notify): its default action would kill the run without a checkpoint. Not on Windows
SIGUSR1 = getattr(signal, "SIGUSR1", None)
STOP_SIGNALS = tuple(sig for sig in (signal.SIGTERM, signal.SIGINT, SIGUSR1) if sig is not None)
SCHEDULER_SIGNALS = tuple(sig for sig in STOP_SIGNALS if sig != signal.SIGINT)  # a person's is SIGINT (Ctrl-C)


# What this process was asked and has done, for the handlers below: the stop signal taken last and when
# (time.monotonic()), and whether the training loop saved a stop (whichever process was signalled)
_last_request: tuple[int, float] | None = None
_stop_saved = False


def _take(signum: int) -> None:
    global _last_request
    _last_request = (signum, time.monotonic())


def _same_request(signum: int) -> str | None:
    """Why ``signum`` is the stop taken last asked again, not a second one, or None: that SIGTERM again within
    SAME_REQUEST_SECONDS (a scheduler signals every process of a job, and torchrun forwards it too), a SIGTERM
    or SIGUSR1 at any time after a SIGUSR1 (the scheduler's notice, then its stop at the time limit), or a SIGUSR1
    after a SIGTERM."""
    if _last_request is None:
        return None
    first, at = _last_request
    since, name = time.monotonic() - at, signal.Signals(signum).name
    if signum == first == signal.SIGTERM and since < SAME_REQUEST_SECONDS:
        return (f"another SIGTERM {since:.1f} s after the first: the same request (a scheduler signals every "
                "process, and torchrun forwards it too)")
    if first == SIGUSR1 and signum in SCHEDULER_SIGNALS:
        return f"{name} {since:.1f} s after SIGUSR1: the same request (a scheduler's notice, then its stop)"
    if first == signal.SIGTERM and signum == SIGUSR1:  # a notice after the stop: nothing new
        return f"SIGUSR1 {since:.1f} s after SIGTERM: the same request (a scheduler's notice, after its stop)"
    return None


def _second_stop(signum: int) -> str:
    """What stops at once, without waiting for the save, after ``signum`` (a person's way out)."""
    if signum == SIGUSR1:
        return "Ctrl-C (SIGINT)"
    if signum == signal.SIGTERM:
        return f"A second SIGTERM ({SAME_REQUEST_SECONDS:g} s or more later)"
    return f"A second {signal.Signals(signum).name}"


def mark_stop_saved() -> None:
    """The training loop stopped and saved (its Interrupted follows): a SIGTERM or SIGUSR1 from now on changes
    nothing."""
    global _stop_saved
    _stop_saved = True


class Interrupted(RuntimeError):
    """Training stopped by a signal after saving a checkpoint."""

    run: PretrainRun | None = None  # slimssl.pretrain sets the PretrainRun of how far it got, for `pretrain --json`


@contextlib.contextmanager
def stop_signals_handled_by(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """The stop signals call ``handler(signum, frame)`` inside the block, and the earlier handlers come back
    after it. Outside the main thread, where Python allows no handlers, signals are left alone."""
    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, earlier in previous.items():
            signal.signal(sig, earlier)


class SignalGuard:
    """Turns a stop signal into a flag checked between steps, so the step in flight finishes."""

    def __init__(self):
        self.received: int | None = None
        self.finishing: str | None = None  # what a signal lets end instead of the step, when training is over
        self.in_flight = "the current step"  # what a signal lets end before the checkpoint, while training
        self._handling = stop_signals_handled_by(self._handle)

    def __enter__(self):
        self._handling.__enter__()
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            same = _same_request(signum)
            if same:
                log.info("%s, still saving", same)
                return
            raise KeyboardInterrupt(f"a second stop signal, {name}, stopped it at once")  # a person's way out
        self.received = signum
        _take(signum)
        if self.finishing:
            log.warning("received %s: the run is trained; %s first. %s stops at once (a resume finishes it)",
                        name, self.finishing, _second_stop(signum))
            return
        log.warning("received %s: finishing %s, then saving a checkpoint; several processes stop together at the "
                    "next logged step (train.log_every). %s stops at once, without saving", name,
                    self.in_flight, _second_stop(signum))

    def __exit__(self, *exc):
        return self._handling.__exit__(*exc)


@contextlib.contextmanager
def command_stop_signals(ignore_sigterm_after_saved_stop: bool = False) -> Iterator[None]:
    """Stop signals around a whole command that trains (``slimssl pretrain``), outside its training loop's
    SignalGuard: there, before training (set-up) or after it (closing, the table), a stop signal stops the
    command as Ctrl-C does (exit 130, and a start that saved nothing is cleaned up) instead of killing it. The same
    request again (:func:`_same_request`) is ignored, and so is any SIGTERM or SIGUSR1 once the loop saved a stop
    (torchrun may end a process that stopped after another was signalled), so the command still exits 3 with its
    hint; any other repeat stops it at once. ``ignore_sigterm_after_saved_stop`` (a torchrun process): SIGTERM and
    SIGUSR1 stay ignored after the block once a stop was saved, until the process exits."""
    global _last_request, _stop_saved
    _last_request, _stop_saved = None, False

    def handle(signum, frame):
        name = signal.Signals(signum).name
        same = _same_request(signum)
        if same:
            log.info("%s, which the command is ending on", same)
            return
        if _stop_saved and signum in SCHEDULER_SIGNALS:
            log.info("%s after the run saved its stop: the command is ending", name)
            return
        first = _last_request is None
        _take(signum)  # a repeat of it while the command cleans up is the same request
        raise KeyboardInterrupt(f"{name} outside the training loop" if first else
                                f"a second stop signal, {name}, after the first")

    try:
        with stop_signals_handled_by(handle):
            yield
    finally:  # (a process that exits now: torchrun may SIGTERM a rank that saved its stop while it shuts down)
        if ignore_sigterm_after_saved_stop and _stop_saved:
            for sig in SCHEDULER_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
