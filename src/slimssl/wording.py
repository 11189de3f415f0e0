"""How a message names what the user gave: a flag on the command line (``--data``), a keyword in Python
(``data=``), a path as the user's shell reads it in a command we suggest, and a file's text as a terminal shows
it. Free of torch, and of the command line's own code: the library's modules word their errors with it."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shlex
import sys
from contextvars import ContextVar
from typing import Iterator

# the command of the command line that runs (cli.main), so that messages name its flags (--set, --resume RUN)
# rather than the keywords of the Python functions (overrides=, resume=True) that the command calls; None in Python
_COMMAND: ContextVar[str | None] = ContextVar("slimssl_command", default=None)
# the commands whose flags become config overrides besides --set, with those flags
OVERRIDING_FLAGS = {"pretrain": "--data, --epochs, --batch-size, --device, --seed",
                    "reproduce": "--data, --epochs, --batch-size, --device", "bench": "--data, --device, --batch-size"}


def on_command_line() -> bool:
    return _COMMAND.get() is not None


def did_you_mean(word: str, known) -> str:
    """`` (did you mean knn?)``: the closest of ``known`` to a misspelt ``word`` (in any case), or '' when none is
    close."""
    by_lower = {name.lower(): name for name in sorted(known, reverse=True)}  # of two spellings, the first sorted
    close = difflib.get_close_matches(word.lower(), sorted(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""


def named(flag: str, keyword: str) -> str:
    """An option as the user gave it: its flag on the command line (``--data``), its keyword in Python
    (``data=``)."""
    return flag if on_command_line() else keyword


def overrides_named() -> str:
    """How a message names the overrides of the config: ``--set`` (and the command's flags that set keys) on the
    command line, ``overrides=`` in Python."""
    command = _COMMAND.get()
    if command is None:
        return "overrides="
    flags = OVERRIDING_FLAGS.get(command)
    return f"--set (or {flags})" if flags else "--set"


@contextlib.contextmanager
def command_line(command: str = "") -> Iterator[None]:
    """Within this block, messages are worded for the command line's ``command``."""
    token = _COMMAND.set(command)
    try:
        yield
    finally:
        _COMMAND.reset(token)


def shell_quote(path: str | os.PathLike) -> str:
    """``path`` quoted for a command line to copy: POSIX shells' single quotes, or on Windows double quotes
    around anything but plain names (cmd.exe takes single quotes as part of the path, and runs what follows
    an unquoted ``&``; PowerShell reads double quotes too, but expands a ``$`` inside them)."""
    text = str(path)
    if sys.platform != "win32":
        return shlex.quote(text)
    return text if re.fullmatch(r"[\w.:\\/-]+", text) else f'"{text}"'


def escaped_controls(text: str) -> str:
    """``text`` with its control characters (a terminal escape, a carriage return, a newline) written as Python
    escapes: text from a file that a terminal shows rather than obeys."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one: ``1 epoch``, ``2 epochs``, ``2 processes``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"
