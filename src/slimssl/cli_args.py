"""Argument types of the command line: argparse rejects a bad number or output path with one line, naming
the flag and what was expected, before any work starts (and before torch is imported). Also ``emit``, the
one way a command prints its result, ``add_overrides``, the one ``--set`` flag, and the CHECKPOINT or --config
that export and profile read."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable

from .errors import UsageError
from .launch import DEVICE_PATTERN, DEVICES, SEED_RANGE, unsupported_device_hint
from .wording import escaped_controls

# how the commands' --subnet takes a sub-network (nn/spec.py: SubnetSpec.coerce)
SUBNET_SPELLINGS = "a name such as w0p5_d2-2-2-2, a width such as 0.5 (at full depth), or 0.5:2,2,2,2"


def _number(kind: type, accept: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "an integer > 0")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
batch_int = _number(int, lambda v: v >= 2, "an integer >= 2 (BatchNorm needs two images a batch)")
seed_int = _number(int, lambda v: SEED_RANGE[0] <= v < SEED_RANGE[1], "an integer that fits 64 bits")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
label_fraction = _number(float, lambda v: 0 < v <= 1, "a fraction of the labels in (0, 1], such as 0.1 for 10%")


def positive_count(text: str) -> float:
    """A positive count of MACs or parameters such as 300M, 1.5G, 11k or 2e6 (``budget.parse_count``)."""
    from .budget import parse_count

    try:
        return parse_count(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_name(text: str) -> str:
    """``--device``: a device name slimssl accepts (``launch.DEVICE_PATTERN``), checked as the command line is
    read; whether this machine has it is checked when the command starts."""
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"expected {DEVICES}, got {text!r}{unsupported_device_hint(text)}")
    return text


def output_file(*suffixes: str) -> Callable[[str], Path]:
    """A file to write: one of ``suffixes`` (so that it cannot name a checkpoint or a run's config by
    mistake), and not an existing directory."""

    @_path_checked
    def parse(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"expected a {' or '.join(suffixes)} file, got {text!r}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a {' or '.join(suffixes)} file")
        _check_writable(path.parent, text)
        return path

    parse.__name__ = "output file"
    return parse


def data_source(text: str) -> str:
    """--data: a dataset name or path, never empty (an unset shell variable would fall back to the config's
    dataset, which for the CIFAR recipes is a download)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a dataset name or path, got an empty string (an unset variable?)")
    return text


def _path_checked(parse: Callable[[str], Path]) -> Callable[[str], Path]:
    """A path that the machine refuses to look at (a name too long, a link loop) is said as the option's error,
    not a traceback."""

    @functools.wraps(parse)
    def checked(text: str) -> Path:
        try:
            return parse(text)
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot use {text!r}: {e.strerror or e}") from e
    return checked


@_path_checked
def output_dir(text: str) -> Path:
    """A folder to write into: it may exist, but must not be a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty string (an unset variable?)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder (existing or new)")
    _check_writable(path, text)
    return path


def _link_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _check_writable(folder: Path, text: str) -> None:
    """``folder`` exists and is writable, or can be made: its nearest existing ancestor is a writable folder
    (found now rather than by a crash after the work is done)."""
    ancestor = folder.absolute()
    while not ancestor.exists():
        if ancestor.is_symlink():  # a link to nothing, or to itself: nothing can be made where it is
            target = os.readlink(ancestor)
            why = "a loop of links" if _link_loop(ancestor) else "which does not exist"
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(ancestor)!r} is a link to {target!r}, "
                                             f"{why}")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no permission to write in {str(ancestor)!r}")


class OutputClosed(Exception):
    """Standard output's reader stopped early (``| head``): the command's output has nowhere to go."""


def write_out(text: str) -> None:
    """``text`` on standard output, flushed; :class:`OutputClosed` when its reader has gone (a broken pipe of
    anything else stays an error of that)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError as e:
        raise OutputClosed() from e


def emit(args: argparse.Namespace, doc, table: str) -> None:
    """A command's result on stdout: one JSON document with ``--json``, else the human-readable table, whose
    control characters other than its line breaks (from a file's text: a sub-network's name in a hand-edited
    results.json) are written as escapes, so that the terminal shows them rather than obeys them."""
    if getattr(args, "json", False):
        write_out(json.dumps(doc, indent=2) + "\n")
    else:
        write_out("\n".join(map(escaped_controls, table.split("\n"))) + "\n")


def add_overrides(p: argparse.ArgumentParser, what: str = "config values",
                  example: str = "train.epochs=5 optim.lr=0.1") -> None:
    """``--set KEY=VALUE [KEY=VALUE ...]``, repeatable: every word up to the next flag is an override."""
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"override {what}, e.g. --set {example} (repeatable)")


# ---- the model a command reads: a CHECKPOINT, or a --config ---------------------------------------------

def add_config(p: argparse.ArgumentParser, default: str = "", checkpoint: bool = False) -> None:
    """``--config`` and its ``--set``: the recipe a command reads (beside a CHECKPOINT, where ``checkpoint``)."""
    with_checkpoint = (" (with a checkpoint, only checked against its architecture: a checkpoint keeps the "
                       "config it was trained with)") if checkpoint else ""
    p.add_argument("--config", help=f"YAML recipe: a path or a shipped name such as 'demo'{default}{with_checkpoint}")
    add_overrides(p, "--config's values", "model.base_width=32 menu.widths=[1.0,0.5]")


def check_model_source(args: argparse.Namespace) -> None:
    """CHECKPOINT, or --config (with --random-init where the command has it): one model to read."""
    if args.set:  # a CHECKPOINT after --set is taken as an override: say that first
        from .config import check_assignment  # yaml and the schema: only when there is a --set to check

        for assignment in args.set:
            check_assignment(assignment)
    if args.checkpoint:
        if args.set and not args.config:
            raise UsageError("--set changes a --config file; a CHECKPOINT is read with the config saved in it")
        if getattr(args, "random_init", False):
            raise UsageError("--random-init exports a new supernet of --config; drop it to export the CHECKPOINT")
    elif not args.config:
        needs = " (with --random-init)" if hasattr(args, "random_init") else ""
        raise UsageError(f"give a CHECKPOINT, or --config FILE{needs}")
    elif getattr(args, "random_init", True) is False:
        raise UsageError("--config without a CHECKPOINT exports random weights: add --random-init to confirm")
