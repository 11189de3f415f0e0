"""A labelled subset given as a file (``slimssl finetune --subset-file``), instead of one drawn from a seed.

The standard semi-supervised ImageNet subsets (SimCLR's ``1percent.txt`` and ``10percent.txt``) list the
train split's files by name, one per line (``n01440764_10026.JPEG``). A line may also be a path relative to
the dataset's folder or to the split's (``n01440764/n01440764_10026.JPEG``), or, for any dataset, an index of
the train split in its listing order (the ``indices`` a fine-tuning result saves); a file holds names or
indices, not both. Names need the split's files: a folder or .zip read by the streaming loader.
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

FORMS = ("one train image per line: its file name (n01440764_10026.JPEG), its path from the dataset's folder or "
         "from the split's (n01440764/n01440764_10026.JPEG), or, for the whole file, its index in the split")


def read_subset_file(path: str | os.PathLike) -> tuple[list[str], dict]:
    """The entries of a subset file (blank lines and ``#`` comments left out; paths with / whatever the file
    writes, without a leading ./; repeats once) and what the results record of it: its name, the SHA-256 of its
    bytes and its number of entries."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the subset file {str(path)!r}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the subset file {str(path)!r} is not UTF-8 text; expected {FORMS}") from None
    entries = list(dict.fromkeys(_normalised(line) for line in text.splitlines()
                                 if line.strip() and not line.strip().startswith("#")))
    if not entries:
        raise UsageError(f"the subset file {str(path)!r} lists no images; expected {FORMS}")
    return entries, {"name": path.name, "sha256": hashlib.sha256(raw).hexdigest(), "entries": len(entries)}


def _normalised(line: str) -> str:
    entry = line.strip().replace("\\", "/")
    while entry.startswith("./"):
        entry = entry[2:]
    return entry.strip("/")


def all_indices(entries: list[str]) -> bool:
    """Whether the entries are indices (ASCII digits), not names."""
    return all(entry.isascii() and entry.isdigit() for entry in entries)


def listed_share_name(share: float) -> float:
    """The label fraction that names a listed subset's protocol: its share of the split to 2 significant digits
    (SimCLR's 1percent.txt lists 0.99995% of ImageNet's train split: ``finetune_1pct``; 0.0095: ``0p95pct``)."""
    return float(f"{share:.2g}")


def subset_indices(entries: list[str], train, source: str) -> torch.Tensor:
    """Sorted indices into ``train`` (a split in memory or streamed) of the subset's ``entries``: all indices, or
    all names and paths of its files. An entry that names no file, or names several, is an error; two entries
    that name one file count it once (with a warning)."""
    if all_indices(entries):
        indices = torch.tensor([int(entry) for entry in entries], dtype=torch.int64)
        outside = indices[indices >= len(train)]
        if len(outside):
            raise DataError(f"the subset file's index {int(outside[0])} is outside the {len(train)} images of the "
                            f"train split of {source!r}")
        return _once(indices.tolist(), entries)
    files = getattr(train, "files", None)
    if files is None:
        raise UsageError(f"the subset file names files, and the train split of {source!r} is decoded in memory, "
                         "which keeps no file names: read it with the streaming loader (--loader stream, for a "
                         "folder or .zip), or give the subset as indices, one per line")
    found = _match(entries, (files.relative(i) for i in range(len(train))))
    missing = [entry for entry, where in found.items() if not where]
    if missing:
        raise DataError(f"{len(missing)} of the subset file's {len(entries)} entries name no file of the train split "
                        f"of {source!r} (e.g. {', '.join(repr(m) for m in missing[:3])}): is it this dataset's list? "
                        f"Expected {FORMS}")
    ambiguous = [entry for entry, where in found.items() if len(where) > 1]
    if ambiguous:
        raise DataError(f"the subset file's {ambiguous[0]!r} names {len(found[ambiguous[0]])} files of the train split "
                        f"of {source!r}; give its path relative to the dataset's folder instead")
    return _once([where[0] for where in found.values()], list(found))


def _once(indices: list[int], entries: list[str]) -> torch.Tensor:
    """``indices`` (one per entry) sorted, each once: two entries that name one file are said, not counted twice."""
    first: dict[int, str] = {}
    for index, entry in zip(indices, entries):
        if index in first:
            log.warning("the subset file's %r and %r name the same image (index %d): it is used once", first[index],
                        entry, index)
        first.setdefault(index, entry)
    return torch.tensor(sorted(first), dtype=torch.int64)


def _match(entries: list[str], paths: Iterable[str]) -> dict[str, list[int]]:
    """Each entry's indices among ``paths`` (relative, with /): those whose path is the entry or ends in /entry.
    Only the tails the entries can match are looked up: ImageNet's 1.28M paths are read once, not stored."""
    depths = sorted({entry.count("/") + 1 for entry in entries})
    found: dict[str, list[int]] = {entry: [] for entry in entries}
    for index, path in enumerate(paths):
        parts = path.split("/")
        for depth in depths:  # the name, class/name, split/class/name
            tail = "/".join(parts[-depth:]) if depth <= len(parts) else None
            if tail in found:
                found[tail].append(index)
    return found
