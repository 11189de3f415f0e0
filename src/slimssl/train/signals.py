"""Stop signals: SIGTERM and SIGINT end a run cleanly (the step in flight finishes, a checkpoint is saved) and
give exit code 3, after which the same command continues the run."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from .pretrain import PretrainRun

log = logging.getLogger("slimssl")

EXIT_INTERRUPTED = 3  # documented: the run was stopped by SIGTERM/SIGINT after saving a checkpoint
# A SIGTERM again within this many seconds is the same request: a scheduler (Slurm's --signal without B:)
# signals every process of the job, and torchrun forwards the one it gets to its workers as well
SAME_REQUEST_SECONDS = 10.0


# The stop signal a SignalGuard took last, and when (time.monotonic()): what command_stop_signals knows of it
_last_request: tuple[int, float] | None = None


class Interrupted(RuntimeError):
    """Training stopped by a signal after saving a checkpoint."""

    run: PretrainRun | None = None  # slimssl.pretrain sets the PretrainRun of how far it got, for `pretrain --json`


@contextlib.contextmanager
def stop_signals_handled_by(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call ``handler(signum, frame)`` inside the block, and the earlier handlers come back
    after it. Outside the main thread, where Python allows no handlers, signals are left alone."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
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
    """Turns SIGTERM/SIGINT into a flag checked between steps, so the step in flight finishes."""

    def __init__(self):
        self.received: int | None = None
        self._received_at = 0.0
        self.finishing: str | None = None  # what a signal lets end instead of the step, when training is over
        self._handling = stop_signals_handled_by(self._handle)

    def __enter__(self):
        self._handling.__enter__()
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            since = time.monotonic() - self._received_at
            if signum == self.received == signal.SIGTERM and since < SAME_REQUEST_SECONDS:
                log.info("another SIGTERM %.1f s after the first: the same request (a scheduler signals every "
                         "process, and torchrun forwards it too), still saving", since)
                return
            raise KeyboardInterrupt(f"a second stop signal, {name}, stopped it at once")  # a person's way out
        global _last_request
        self.received, self._received_at = signum, time.monotonic()
        _last_request = (signum, self._received_at)
        if self.finishing:
            log.warning("received %s: the run is trained; %s first. A second %s stops at once (a resume finishes "
                        "it)%s", name, self.finishing, name, self._later(signum))
            return
        log.warning("received %s: finishing the current step (the first one, when training has not started yet), "
                    "then saving a checkpoint; several processes stop together at the next logged step "
                    "(train.log_every). A second %s stops at once, without saving%s", name, name, self._later(signum))

    @staticmethod
    def _later(signum: int) -> str:
        return f" (a SIGTERM {SAME_REQUEST_SECONDS:g} s or more later)" if signum == signal.SIGTERM else ""

    def __exit__(self, *exc):
        return self._handling.__exit__(*exc)


@contextlib.contextmanager
def command_stop_signals() -> Iterator[None]:
    """Stop signals around a whole command that trains (``slimssl pretrain``), outside its training loop's
    SignalGuard: there, before training (set-up) or after it (closing, the table), SIGTERM stops the command as
    Ctrl-C does (exit 130, and a start that saved nothing is cleaned up) instead of killing it. Once the loop took
    a stop signal and saved, the same SIGTERM repeated within SAME_REQUEST_SECONDS (every process of a job gets
    it) is ignored, so the command still exits 3 with its hint; any other repeat stops it at once."""
    global _last_request
    _last_request = None

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if _last_request is None:
            raise KeyboardInterrupt(f"{name} outside the training loop")
        first, at = _last_request
        since = time.monotonic() - at
        if signum == first == signal.SIGTERM and since < SAME_REQUEST_SECONDS:
            log.info("another SIGTERM %.1f s after the first: the same request; the run is saved and the command "
                     "is ending", since)
            return
        raise KeyboardInterrupt(f"a second stop signal, {name}, after the run was saved")

    with stop_signals_handled_by(handle):
        yield
