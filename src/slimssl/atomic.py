"""Files written whole or not at all: checkpoints, results.json and other JSON files, the decoded-image cache.

The content goes to a temporary file in the target's folder, which is then renamed over the target, so a
crash or a full disk mid-write leaves the previous file intact and readers never see a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once (at import, one thread)
    os.umask(mask)
    return mask


_UMASK = _read_umask()

# Windows refuses to rename over a file that another process holds open for a moment (`slimssl knn` reading
# last.pt while pretraining goes on, a virus scanner): the rename is tried again for a few seconds
REPLACE_RETRIES = 10 if sys.platform == "win32" else 0


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """A file object whose content replaces ``path`` when the block ends without an exception (``fsync``:
    flushed to the disk first; text is UTF-8 on every platform). The file gets the permissions ``open`` would give
    it, or those of the file it replaces: the temporary file's own (0600) would hide a run's results from the other
    users of a shared machine, and a file a user made private (0600) stays private. A symlink at ``path`` is
    replaced by the file, not written through."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _mode_of(path))
        _replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # write() names no file: this one
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """A temporary file's name in ``path``'s folder, for a writer that takes a file name rather than a file
    object (``safetensors.torch.save_file``): its content replaces ``path`` when the block ends without an
    exception, with :func:`atomic_write`'s permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _mode_of(path))
        _replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_failure(error: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None when ``error`` is no such failure. torch.save reports one (a full
    disk, a quota) as a RuntimeError ("[enforce fail at inline_container.cc] unexpected pos") with the OSError
    only as its context."""
    if isinstance(error, OSError):
        return error
    cause = error.__context__
    return cause if isinstance(error, RuntimeError) and isinstance(cause, OSError) else None


def _mode_of(path: Path) -> int:
    """The permissions of the file at ``path`` (not of what a symlink there points to), else ``open``'s."""
    try:
        info = os.lstat(path)
    except OSError:
        return 0o666 & ~_UMASK
    return info.st_mode & 0o777 if stat.S_ISREG(info.st_mode) else 0o666 & ~_UMASK


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is the temporary file of an :func:`atomic_write` (left behind only by a killed process)."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


# A temporary file of a small file (JSON, YAML) this many seconds old is a killed write's: writing one takes
# milliseconds. For folders where another process may be writing such a file right now.
STALE_SECONDS = 60


def remove_temporaries(folder: Path, of: tuple[str, ...] = (), older_than: float = 0) -> list[str]:
    """Remove the temporary files that killed writes left in ``folder`` (``of``: only those of files of these
    names); returns their names. Only for files that no other process writes now, or, with ``older_than``
    (seconds; :data:`STALE_SECONDS`), for temporary files that old, which no write in progress still has."""
    removed = []
    now = time.time()
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if is_temporary(path) and (not of or path.name.startswith(tuple(f".{name}." for name in of))):
            with contextlib.suppress(OSError):  # gone meanwhile (another cleaner), or not ours to remove
                if older_than and now - path.stat().st_mtime < older_than:
                    continue
                path.unlink()
                removed.append(path.name)
    return removed


def _replace(tmp: str, path: Path) -> None:
    for attempt in range(REPLACE_RETRIES + 1):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            if attempt == REPLACE_RETRIES:
                raise
            time.sleep(0.1 * (attempt + 1))  # 5.5 s in all: a 180 MiB checkpoint is read in about one


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON through a temporary file and a rename: a crash mid-write keeps the old file."""
    with atomic_write(path, "w") as f:
        f.write(json_text(data))
    return path


def json_text(data: Any) -> str:
    """``data`` as indented JSON; NumPy and torch scalars (a setting passed as ``np.int64(5)``) as numbers."""
    return json.dumps(data, indent=2, default=_plain_scalar) + "\n"


def _plain_scalar(value: Any) -> Any:
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a NumPy scalar, a 0-d array or tensor
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON serializable")
