"""The cache of decoded splits, so that a second load of an unchanged folder or zip is a single file read.

An entry is one split decoded at one resolution and crop ratio, under ``$SLIMSSL_CACHE`` (default
``~/.cache/slimssl/decoded``). Its key covers the file list with each file's size and mtime, or a zip
member's size and CRC (and the zip's own size and mtime). The cache holds at most ``$SLIMSSL_CACHE_GB``
(default 20) and drops the least recently used entries past it; 0 turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time

import torch

from ..atomic import atomic_write, write_failure
from ..errors import DataError
from .files import FileTree

log = logging.getLogger("slimssl")

VERSION = 3  # bump when the decoded output for the same files changes


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("SLIMSSL_CACHE") or "~/.cache/slimssl/decoded")  # set empty: unset


DEFAULT_CACHE_GB = 20.0


def cache_limit() -> int:
    """The cache's size limit in bytes, from ``$SLIMSSL_CACHE_GB`` (GiB; 0 turns the cache off)."""
    text = os.environ.get("SLIMSSL_CACHE_GB", "").strip()
    try:
        gib = float(text) if text else DEFAULT_CACHE_GB
    except ValueError:
        gib = -1.0
    if not gib >= 0 or gib == float("inf"):  # also refuses nan
        raise DataError(f"$SLIMSSL_CACHE_GB is {text!r}; expected the decoded-image cache's size limit in GiB, "
                        "a finite number >= 0 (0 turns the cache off)")
    return int(gib * 2**30)


def may_hold(num_bytes: int | None) -> bool:
    """Whether decoded images of ``num_bytes`` (None: not known before decoding) can be cached: not with the
    cache off, nor more than its limit, which is said. Asked first, since an entry's key stats every file (8 s
    at ImageNet's 1.28M, longer on a network file system) for an entry that could never be written."""
    limit = cache_limit()
    if limit == 0:
        return False
    if num_bytes is not None and num_bytes > limit:
        log.info("not caching %s of decoded images: more than the cache's limit of %s ($SLIMSSL_CACHE_GB)",
                 _size(num_bytes), _size(limit))
        return False
    return True


def entry_key(tree: FileTree, split: str, resolution, crop_ratio: float, skip_unreadable: bool,
              paths: list[str]) -> str:
    """The entry of a split decoded with these settings from the files ``paths`` of ``tree``, as they are now."""
    listing = [[p, *_file_version(tree, p)] for p in paths]
    if not os.path.isdir(tree.root):  # a zip: its own size/mtime too
        st = os.stat(tree.root)
        listing.append(["<zip>", st.st_size, st.st_mtime_ns])
    blob = json.dumps([VERSION, tree.root, split, resolution, crop_ratio, skip_unreadable, listing])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _file_version(tree: FileTree, rel: str) -> tuple[int, int]:
    """What tells a file's content changed: a zip member's (size, crc), a file's (size, mtime)."""
    if tree.files[rel] is not None:
        return tree.files[rel]
    try:
        st = os.stat(os.path.join(tree.root, rel))
    except OSError:  # a dangling link: decoding reports it
        return 0, 0
    return st.st_size, st.st_mtime_ns


def load(key: str) -> dict | None:
    """The payload saved under ``key``, or None (not cached, unreadable, or the cache off)."""
    limit = cache_limit()
    if limit == 0:
        return None
    path = os.path.join(cache_dir(), key + ".pt")
    if not os.path.exists(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or from an incompatible version: decode again
        log.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None
    with contextlib.suppress(OSError):  # marks it recently used, for the eviction order
        os.utime(path)
        _evict(os.path.dirname(path), limit, keep=path)  # a limit lowered since: the cache shrinks to it
    return payload


def save(key: str, payload: dict) -> None:
    """Keep ``payload`` (its ``images`` a uint8 tensor) under ``key``, evicting others past the limit."""
    size = payload["images"].numel()
    if not may_hold(size):
        return
    limit, directory = cache_limit(), cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        # what eviction would give back counts as free: a cache that filled its own disk keeps turning over
        free = shutil.disk_usage(directory).free + _entries_bytes(directory)
        if size + _SPARE_BYTES > free:  # a home quota filled to the last byte fails more than this cache
            log.warning("not caching %s of decoded images in %s: its disk has %s free; $SLIMSSL_CACHE moves the "
                        "cache", _size(size), directory, _size(free))
            return
        path = os.path.join(directory, key + ".pt")
        with atomic_write(path) as f:  # readers never see a partial file
            torch.save(payload, f)
        _evict(directory, limit, keep=path)
    except (OSError, RuntimeError) as exc:  # a read-only or full cache must not break loading
        cause = write_failure(exc)
        if cause is None:
            raise
        log.warning("could not write decoded-image cache in %s (%s); $SLIMSSL_CACHE moves it, SLIMSSL_CACHE_GB=0 "
                    "turns it off", directory, cause)


_SPARE_BYTES = 2**30  # left free on the cache's disk after an entry is written
_ENTRY = re.compile(r"[0-9a-f]{32}\.pt")  # the cache's own files: the folder may hold others, never touched
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.pt\..*\.tmp")  # atomic_write's, left by a killed write when stale
_STALE_PARTIAL_S = 3600


def _entries_bytes(directory: str) -> int:
    """The bytes of the cache's own entries in ``directory``."""
    total = 0
    for name in os.listdir(directory):
        if _ENTRY.fullmatch(name):
            with contextlib.suppress(OSError):  # removed meanwhile by another process's eviction
                total += os.stat(os.path.join(directory, name)).st_size
    return total


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _evict(directory: str, limit: int, keep: str) -> None:
    """Delete the least recently used entries but ``keep`` until all take at most ``limit`` bytes, and partial
    writes older than an hour. An entry that cannot be deleted (another user's) is passed over."""
    entries, now = [], time.time()
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):  # another process may evict it first
            if _ENTRY.fullmatch(entry.name) and entry.path != keep:
                st = entry.stat()
                entries.append((st.st_mtime_ns, st.st_size, entry.path))
            elif _PARTIAL.fullmatch(entry.name) and now - entry.stat().st_mtime > _STALE_PARTIAL_S:
                os.remove(entry.path)
    total = os.path.getsize(keep) + sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        try:
            os.remove(path)
            log.debug("evicted %s from the decoded-image cache", path)
        except FileNotFoundError:  # evicted by another process
            pass
        except OSError:  # not ours to delete: it still counts
            continue
        total -= size
