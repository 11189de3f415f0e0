"""A labelled subset given as a file (``slimssl finetune --subset-file``), instead of one drawn from a seed.

The standard semi-supervised ImageNet subsets (SimCLR's ``1percent.txt`` and ``10percent.txt``) list the
train split's files by name, one per line (``n01440764_10026.JPEG``). A line may also be a path relative to
the dataset's folder or to the split's (``n01440764/n01440764_10026.JPEG``), or, for any dataset, an index of
the train split in its listing order (the ``indices`` a fine-tuning result saves). Names need the split's
files: a folder or .zip read by the streaming loader.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable

import torch

from ..errors import DataError, UsageError

log = logging.getLogger("slimssl")


def read_subset_file(path: str | os.PathLike) -> tuple[list[str], dict]:
    """The entries of a subset file (blank lines and ``#`` comments left out, repeats once) and what the results
    record of it: its name, the SHA-256 of its bytes and its number of entries."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the subset file {str(path)!r}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the subset file {str(path)!r} is not UTF-8 text; expected one file name or index per "
                         "line") from None
    lines = [line.strip() for line in text.splitlines()]
    entries = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not entries:
        raise UsageError(f"the subset file {str(path)!r} lists no images; expected one file name or index per line")
    return entries, {"name": path.name, "sha256": hashlib.sha256(raw).hexdigest(), "entries": len(entries)}


def subset_indices(entries: list[str], train, source: str) -> torch.Tensor:
    """Sorted indices into ``train`` (a split in memory or streamed) of the subset's ``entries``: all integers
    (indices), or all names and paths of its files. An entry that names no file, or names several, is an error."""
    if all(entry.isdigit() for entry in entries):
        indices = torch.tensor([int(entry) for entry in entries], dtype=torch.int64)
        outside = indices[indices >= len(train)]
        if len(outside):
            raise DataError(f"the subset file's index {int(outside[0])} is outside the {len(train)} images of the "
                            f"train split of {source!r}")
        return indices.sort().values
    files = getattr(train, "files", None)
    if files is None:
        raise UsageError(f"the subset file names files, and the train split of {source!r} is decoded in memory, "
                         "which keeps no file names: read it with the streaming loader (--loader stream, for a "
                         "folder or .zip), or give the subset as indices, one per line")
    found = _match(entries, (files.relative(i) for i in range(len(train))))
    missing = [entry for entry, where in found.items() if not where]
    if missing:
        raise DataError(f"{len(missing)} of the subset file's {len(entries)} entries name no file of the train split "
                        f"of {source!r} (e.g. {', '.join(repr(m) for m in missing[:3])}): is it this dataset's list?")
    ambiguous = [entry for entry, where in found.items() if len(where) > 1]
    if ambiguous:
        raise DataError(f"the subset file's {ambiguous[0]!r} names {len(found[ambiguous[0]])} files of the train split "
                        f"of {source!r}; give its path relative to the dataset's folder instead")
    return torch.tensor(sorted(where[0] for where in found.values()), dtype=torch.int64)


def _match(entries: list[str], paths: Iterable[str]) -> dict[str, list[int]]:
    """Each entry's indices among ``paths`` (relative, with /): those whose path is the entry or ends in /entry.
    Only the tails the entries can match are looked up: ImageNet's 1.28M paths are read once, not stored."""
    wanted = {entry.replace("\\", "/").strip("/"): entry for entry in entries}
    depths = sorted({key.count("/") + 1 for key in wanted})
    found: dict[str, list[int]] = {entry: [] for entry in entries}
    for index, path in enumerate(paths):
        parts = path.split("/")
        for depth in depths:  # the name, class/name, split/class/name
            entry = wanted.get("/".join(parts[-depth:])) if depth <= len(parts) else None
            if entry is not None:
                found[entry].append(index)
    return found
