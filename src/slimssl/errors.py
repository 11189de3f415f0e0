"""The base of every error slimssl raises for bad input, kept free of torch so the command line can
catch it (and answer ``--help``) without importing torch.

A module defines its own subclass next to the code that raises it (``ConfigError``, ``CheckpointError``, ...);
the kinds that several modules raise (``DataError``, ``InputError``, ``ExportError``, ...) are defined here.
The command line prints any :class:`SlimsslError` as one line naming what was wrong and exits with status 2;
anything else is a bug and keeps its traceback, except a file that the machine refuses (:func:`storage_error`).
"""

import errno
import reprlib

# a full disk, a quota, a read-only or forbidden place: the machine's state, not a bug
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# a path the machine cannot use as given: a name too long, a file where a folder goes, a link loop, a link to
# nothing where a folder is made
PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EEXIST})


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother = 80, 80


def short_repr(value) -> str:
    """``repr(value)`` cut short: a message that quotes what a file holds stays a line, whatever the file (a YAML
    or pickle whose lists share one another holds billions of values to print)."""
    return _SHORT.repr(value)


class SlimsslError(ValueError):
    """Input that cannot be used; the message names what was wrong and what was expected."""


class UsageError(SlimsslError):
    """Command line arguments that do not fit together."""


class ExtensionError(SlimsslError):
    """A method or loss-weighting rule (built in, or of one's own: docs/extending.md) that is not registered, or
    whose declaration or outputs break slimssl's contract. Defined here rather than beside one module: methods/,
    the heads it declares (models/) and slim/weights.py all check that contract."""


class DataError(SlimsslError):
    """Bad dataset input: the message names the path and what was expected."""


class MissingSplitError(DataError):
    """The data has no folder for the split asked for (pretraining needs none; evaluation needs a test split)."""


class UnreadableImageError(DataError):
    """An image file that cannot be decoded (``data.skip_unreadable`` skips or replaces such files)."""


class InputError(SlimsslError):
    """An input the network cannot take (nn/ and models/ check it); says what was expected and what came."""


class ExportError(SlimsslError):
    """An exported model folder, or a graph beside it, that cannot be written or loaded; says which file and why.
    Defined here: export/files.py (the weights) and export/graphs.py (ONNX, torch.export) both raise it."""


class StorageError(SlimsslError):
    """A file the machine would not let be written or read: a full disk, a quota, a read-only or forbidden
    place."""


def storage_error(error: BaseException, again: str = "") -> StorageError | None:
    """``error`` as a :class:`StorageError` when it is an OSError of the machine's state (not a bug), else None.
    ``again``: the command that continues the work once the cause is fixed, where it differs from the one run."""
    if not isinstance(error, OSError):
        return None
    where = f"{error.filename}: " if error.filename else ""
    then = f"continue with: {again}" if again else "run the command again"
    if error.errno in PATH_ERRNOS and error.filename:
        return StorageError(f"{where}{error.strerror or error}; choose another path, then {then} (what was saved "
                            "before is kept)")
    if error.errno not in STORAGE_ERRNOS:
        return None
    return StorageError(f"{where}{error.strerror or error}; free space, or fix the place's permissions, then {then} "
                        "(what was saved before is kept)")
