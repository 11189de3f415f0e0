"""The lock that lets one process at a time train in a run directory."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

from ..errors import UsageError
from ..layout import TRAINING_LOCK

log = logging.getLogger("slimssl")


class TrainingLock:
    """The lock of the one process that trains in ``folder`` (taken here, or a UsageError when another process
    holds it; ``release()`` it when done, or take it with ``with``): two processes training one run (a job
    submitted twice, or the workers that a torchrun launcher killed by SIGKILL leaves behind) would write one
    checkpoint and one log over each other.

    A POSIX record lock (``lockf``) of ``.train.lock``: it belongs to the process, so the operating system lets
    go of it the moment the process ends, however it ends (a killed run leaves no stale lock), and its
    data-loader workers, forked from it, do not hold it on. Where there is none to take (Windows, a file system
    without locks), training goes on unguarded, with a word.

    A record lock is the process's: a second one in the same process would be granted, and closing any file of
    ``.train.lock`` would drop it. So the locks this process holds are also kept in ``_HELD``, which a second
    lock (another thread, a call within a call) is refused by, before any file is opened."""

    def __init__(self, folder: Path):
        self._file = None
        self._key = _lock_key(folder)
        with _HELD_GUARD:
            if self._key in _HELD:
                raise UsageError(_busy(folder))
            _HELD.add(self._key)
        try:
            self._take(folder)
        except BaseException:
            self._forget()
            raise

    def _take(self, folder: Path) -> None:
        try:
            import fcntl
        except ImportError:  # Windows
            log.warning("no lockf on this platform (Windows): %s is not guarded against a second training process; "
                        "start one at a time", folder)
            return
        file = open(folder / TRAINING_LOCK, "a")  # noqa: SIM115 - held open until release()
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            file.close()
            if e.errno in (errno.EACCES, errno.EAGAIN):  # held
                raise UsageError(_busy(folder)) from None
            log.warning("cannot lock %s (%s): a second process training there would not be refused",
                        folder / TRAINING_LOCK, e)  # a file system without locks
            return
        self._file = file

    def __enter__(self) -> "TrainingLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing lets go of the lock
            self._file = None
        self._forget()

    def _forget(self) -> None:
        with _HELD_GUARD:
            _HELD.discard(self._key)
        self._key = None


_HELD: set[str] = set()  # the folders whose lock this process holds
_HELD_GUARD = threading.Lock()


def _lock_key(folder: Path) -> str:
    return os.path.realpath(folder / TRAINING_LOCK)


def _busy(folder: Path) -> str:
    return (f"another process (or another call in this one) is training in {folder} now (it holds {TRAINING_LOCK} "
            "there): wait for it to end, or stop it first. Workers of a torchrun launcher that was killed with SIGKILL "
            "train on: stop them too")


def refuse_if_training(run_dir: Path) -> None:
    """Refuse to prepare a run in ``run_dir`` while a process (this one too) trains there: its files are not
    leftovers to remove."""
    if (run_dir / TRAINING_LOCK).is_file():
        TrainingLock(run_dir).release()
