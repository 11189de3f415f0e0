"""The ``slimssl`` command line. Results go to stdout (one JSON document with --json); logs to stderr."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import os
import re
import signal
import sys
import time

from . import __version__
from .cli_args import OutputClosed
from .wording import command_line, did_you_mean
from .errors import SlimsslError, UsageError, storage_error
from .launch import torchrun_processes

log = logging.getLogger("slimssl")


EXIT_CODES = """exit codes:
  0    done
  1    export --verify found a difference over its tolerance; stdout closed early (| head); an unexpected
       error (a bug), with its traceback; a process of a multi-process run stopped by another's failure
  2    bad input or a failed run: the error names what was wrong (argparse's usage errors too)
  3    pretrain (or reproduce) stopped by SIGTERM, SIGINT or SIGUSR1 after saving: the same run continues it;
       reproduce exits 3 for every stop signal (the same command continues)
  4    reproduce --time-budget ran out with work left: run the same command again
  130  Ctrl-C, SIGTERM or SIGUSR1 outside a training loop: the command stopped; nothing it had
       saved is lost. Or a second stop signal during training, which stops at once: the steps since the last
       checkpoint are lost

environment:
  SLIMSSL_DATA          where cifar10/cifar100 are downloaded (default ~/.cache/slimssl/data)
  SLIMSSL_CACHE         the decoded-image cache (default ~/.cache/slimssl/decoded)
  SLIMSSL_CACHE_GB      its size limit in GiB, least recently used splits dropped past it (default 20; 0: off)
  SLIMSSL_DIST_TIMEOUT  seconds a torchrun process waits for the others (default 1800)
  SLIMSSL_DIST_BACKEND  torch.distributed backend (default cpu:gloo,cuda:nccl with CUDA, else gloo)
  SLIMSSL_MAX_IMAGE_PIXELS  Pillow's size guard against decompression bombs: pixels, or none (default Pillow's)"""


# the commands that handle the stop signals themselves (a saved stop, exit 3)
OWN_STOP_SIGNALS = ("pretrain", "reproduce")


@contextlib.contextmanager
def _stop_signals_as_ctrl_c():
    """SIGTERM (a scheduler's stop, ``kill``) and SIGUSR1 (a scheduler's notice) end any other command as Ctrl-C
    does: one line and exit 130, not a silent death with exit 143 or 138. (Outside the main thread, where Python
    takes no handler, they are left alone.)"""
    from .train.signals import stop_signals_handled_by

    def handle(signum, frame):
        raise KeyboardInterrupt("" if signum == signal.SIGINT else signal.Signals(signum).name)

    with stop_signals_handled_by(handle):
        yield


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors also say when a flag of several values took a path meant as the command's
    positional argument (``knn --subnet 0.5 RUN``): argparse's own words blame something else."""

    given: list[str] = []  # the words being parsed (main)

    def error(self, message: str):
        super().error(message + _command_hint(self, message) + _swallowed_path_hint(self, self.given))


def _command_hint(parser: argparse.ArgumentParser, message: str) -> str:
    """`` (did you mean knn?)`` for a misspelt command."""
    typed = re.match(r"argument COMMAND: invalid choice: '([^']*)'", message)
    return did_you_mean(typed.group(1), getattr(parser, "commands", None) or {}) if typed else ""


def _swallowed_path_hint(parser: argparse.ArgumentParser, given: list[str]) -> str:
    """`` (--subnet took 'RUN' ...)`` when a word after a flag of several values is an existing path, else ''."""
    several = {option for action in parser._actions if action.nargs in ("+", "*") for option in action.option_strings}
    for at, word in enumerate(given):
        if word not in several:
            continue
        values = list(itertools.takewhile(lambda w: not w.startswith("-"), given[at + 1:]))
        taken = next((value for value in values if os.path.exists(value)), None)
        if taken is not None and word != "--set":  # --set says so itself, naming the KEY=VALUE it expects
            return (f" ({word} took {taken!r} as one of its values, as it takes every word up to the next flag: "
                    f"put {taken!r} before {word})")
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="slimssl",
        description="Slimmable self-supervised pretraining: pretrain one network, use every sub-network. "
                    "With --json a command prints one JSON document on stdout; logs go to stderr.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"slimssl {__version__}")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE before the command (repeatable): a module name, found in this folder "
                             "too, or a .py file; a method of your own registers itself there (docs/extending.md)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from .bench.command import register as register_bench
    from .eval.commands import register as register_eval
    from .export.command import register as register_export, register_import
    from .report.command import register as register_report
    from .reproduce.command import register as register_reproduce
    from .train.command import register as register_pretrain

    # listed in --help in this order: train (and its recipe), evaluate, measure, take out; then benchmarks
    register_pretrain(sub)
    register_eval(sub)
    register_report(sub)
    register_export(sub)
    register_import(sub)
    register_bench(sub)
    register_reproduce(sub)
    for action in sub._choices_actions:  # `slimssl COMMAND --help` opens with the line `slimssl --help` shows
        command = sub.choices[action.dest]
        command.description = command.description or action.help
        # no prefixes of options (`--epoch` for `--epochs`): a misremembered option is an error, and a prefix
        # that works today would change meaning when an option is added
        command.allow_abbrev = False
    parser.commands = sub.choices  # each command's parser, for its own usage line in an error (main)
    return parser


MULTI_PROCESS_COMMANDS = ("pretrain",)  # the others would evaluate, write and print once per process


def _refuse_several_processes(command: str) -> None:
    """Only pretraining is distributed; any other command started by torchrun on several processes is refused
    (by every process alike, before any work) rather than run N times over the same files."""
    world = torchrun_processes()
    if command not in MULTI_PROCESS_COMMANDS and world > 1:
        raise UsageError(f"slimssl {command} runs on one process, but torchrun started {world} (WORLD_SIZE): each "
                         "would do the same work and write the same files. Run it without torchrun (one GPU is "
                         "used; unset WORLD_SIZE and RANK if this is one process); only slimssl pretrain "
                         "trains on several processes")


def import_modules(names: list[str]) -> None:
    """``--import``: each a module name, looked for in the current folder too (as ``python -m`` does), or the
    path of a .py file, imported as its file name. An error inside it is reported as that module's."""
    import importlib
    import importlib.util
    from pathlib import Path

    for name in names:
        if name.endswith(".ipynb"):  # read as the dotted module name 'x.ipynb', it would be "no module named 'x'"
            raise UsageError(f"--import {name}: a notebook cannot be imported; save the cells that define your method "
                             "as a .py file (%%writefile my_method.py in the notebook) and give that file")
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise UsageError(f"--import {name}: no such file (expected a module name or a .py file)")
                other = _other_module_named(path.stem, path)
                if other:
                    raise UsageError(f"--import {name}: it would be imported as {path.stem!r}, which is already the "
                                     f"name of {other}, and would replace it for every later import; rename the file")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module  # as a module of that name, so that its classes can be found
                spec.loader.exec_module(module)
            else:
                if os.getcwd() not in sys.path and "" not in sys.path:
                    sys.path.insert(0, os.getcwd())
                importlib.import_module(name)
        except SlimsslError:  # e.g. register_method refusing a class: its own message says what is wrong
            raise
        except ModuleNotFoundError as e:
            if e.name != name:  # the module was found; something it imports was not
                raise UsageError(f"--import {name} failed: {e}") from e
            raise UsageError(f"--import {name}: {e} (expected a module importable from here, or a .py file)") from e
        except Exception as e:
            raise UsageError(f"--import {name} failed: {type(e).__name__}: {e}") from e


def _other_module_named(name: str, path) -> str | None:
    """Where a module called ``name`` other than the file ``path`` comes from (imported already, or findable:
    the standard library's ``copy``, an installed package), or None."""
    import importlib.util

    module = sys.modules.get(name)
    if module is None and name.isidentifier():
        try:
            module = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        if module is not None and module.origin is None:  # a namespace package: any folder of that name
            return None
    origin = getattr(module, "__file__", None) or getattr(module, "origin", None)
    if module is None or (origin and os.path.exists(origin) and os.path.samefile(origin, path)):
        return None
    return f"the module {name!r} ({origin if origin and os.path.exists(origin) else 'built into Python'})"


GLOBAL_OPTIONS = ("--import", "-v", "--verbose", "--version")  # slimssl's own, before the command


def _unknown_option_hint(parser: argparse.ArgumentParser, command: str | None, unknown: str, after_command: bool) -> str:
    """Why ``unknown`` (the first argument no parser took) was not taken: an option given on the wrong side of
    the command, or a misspelt one (argparse takes no prefixes here), with the closest option's name."""
    option = unknown.split("=", 1)[0]
    own = set(parser.commands[command]._option_string_actions) if command else set()
    if not after_command and option in own:
        return f" (options of {command} go after the word {command})"
    if after_command and option in GLOBAL_OPTIONS:
        return f" ({option} is an option of slimssl itself: it goes before the command, slimssl {option} ... " \
               f"{command} ...)"
    if not option.startswith("-"):
        return ""
    if option == "--set" and after_command:  # the config flag of pretrain, export, ...: not a misspelt --subnet
        return (f" ({command} takes no --set: it evaluates with the config saved in the run; what it may change are "
                f"its flags, see slimssl {command} --help)")
    known = own if after_command else own | set(GLOBAL_OPTIONS)
    return did_you_mean(option, known)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # a command's time budget counts from here (reproduce --time-budget)
    parser = build_parser()
    _Parser.given = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the usage of the command they follow (argparse's parse_args shows slimssl's)
        given = sys.argv[1:] if argv is None else list(argv)
        after_command = args.command in given and unknown[0] in given and \
            given.index(unknown[0]) > given.index(args.command)
        hint = _unknown_option_hint(parser, args.command, unknown[0], after_command)
        (parser.commands[args.command] if after_command else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}{hint}")
    args.started = started
    if isinstance(sys.stdout, io.TextIOWrapper):  # redirected, it takes the locale's encoding (cp1252 on Windows):
        sys.stdout.reconfigure(errors="backslashreplace")  # a character it lacks is escaped, not a crash at the end
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(message)s")
    logging.getLogger("PIL").setLevel(logging.INFO)  # -v is for slimssl: PIL logs every chunk of every PNG
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        _refuse_several_processes(args.command)
        with command_line(args.command):  # an --import module's messages too
            import_modules(args.imports)
            with contextlib.nullcontext() if args.command in OWN_STOP_SIGNALS else _stop_signals_as_ctrl_c():
                return args.func(args)
    except OutputClosed:  # stdout piped into a reader that stopped early (e.g. | head): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1
    except (SlimsslError, OSError) as e:
        error = e if isinstance(e, SlimsslError) else storage_error(e)  # a full disk is no bug: no traceback
        if error is None:
            raise
        log.debug("where the error was raised:", exc_info=True)
        log.error("slimssl %s: error: %s", args.command, error)
        return 2
    except KeyboardInterrupt as e:  # a training loop saves and exits 3 itself; anywhere else, stop without a traceback
        log.debug("where it was stopped:", exc_info=True)
        log.error("slimssl %s: interrupted (%s); nothing it had saved is lost", args.command, str(e) or "Ctrl-C")
        return 130


def entry() -> None:
    """The ``slimssl`` script and ``python -m slimssl``: :func:`main` as the process's command, then its exit.

    A SIGTERM (or SIGUSR1) while Python exits (about a second once torch is loaded) would end the process by the
    signal (exit 143) instead of with the code the command chose: 3 after a stop it saved, which a job script
    resubmits on, or 0. Once the command has ended, such a signal exits at once with that code."""
    code = main()
    for stream in (sys.stdout, sys.stderr):  # os._exit below would drop what is still buffered
        with contextlib.suppress(Exception):
            stream.flush()
    from .train.signals import SCHEDULER_SIGNALS

    for stop in SCHEDULER_SIGNALS:  # a scheduler's stop, and its notice
        signal.signal(stop, lambda signum, frame: os._exit(code))
    sys.exit(code)


if __name__ == "__main__":
    entry()
