"""Image datasets as in-memory uint8 tensors.

Every source (a built-in name, a dataset registered in Python: ``registry.py``, an ImageFolder tree, or a
``.zip`` of one: ``files.py``) is
decoded once (``decode.py``) into an ``ImageDataset`` holding ``uint8 [N, 3, H, W]`` images.
Augmentation then runs batched on the tensor (see ``augment.py``), so there is
no per-sample ``Dataset.__getitem__`` on the training path.

Decoded folder/zip trees are cached under ``$SLIMSSL_CACHE`` (default
``~/.cache/slimssl/decoded``) keyed by the file list with sizes and mtimes,
so a second load of an unchanged tree is a single file read. The cache holds at most
``$SLIMSSL_CACHE_GB`` (default 20) and drops the least recently used splits past it; 0 turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write
from .decode import decode_error, decode_resized, resize_center_crop, resize_side
from .files import (SKIP_HINT, SPLITS, DataError, FileTree, check_source_and_resolution, existing_path, list_split,
                    scan_tree, split_prefix)
from .registry import registered_name, registered_split

log = logging.getLogger("slimssl")

_CACHE_VERSION = 3  # bump when the decoded output for the same files changes
_CHUNK = 256  # files per thread-pool task: amortises the executor overhead


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8 [N, 3, H, W], CPU
    labels: torch.Tensor | None  # int64 [N]; None when unlabelled
    classes: list[str] | None
    name: str
    split: str = "train"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    # The evaluation interface, shared with the streamed ``StreamedImages`` (eval_images.py).

    @property
    def resolution(self) -> int:
        """The side the images were decoded at (their width)."""
        return int(self.images.shape[-1])

    def batches(self, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """uint8 [B, 3, H, W] batches of ``indices`` (default: all images), in that order."""
        if indices is None:
            yield from (batch for batch in self.images.split(batch_size) if len(batch))
            return
        for chunk in torch.as_tensor(indices, dtype=torch.int64).split(batch_size):
            if len(chunk):
                yield self.images[chunk]

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """The images at ``indices`` as one uint8 tensor (a copy)."""
        return self.images[torch.as_tensor(indices, dtype=torch.int64)]


def check_same_classes(train, test, source: str) -> None:
    """A labelled train/test pair must name the same classes in the same order, or every label of the test
    split means another class than in the train split and accuracies are meaningless."""
    if train.classes and test.classes and list(train.classes) != list(test.classes):
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        detail = (f"only in train: {', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}"
                  if only_train or only_test else "the same names in another order")
        raise DataError(f"{source}: the train and test splits have different classes ({detail}); expected the "
                        "same class folders in both")


def load_dataset(
    source: str,
    split: str = "train",
    *,
    resolution: int | None = None,
    skip_unreadable: bool = False,
    fake_size: int = 256,
    seed: int = 0,
    crop_ratio: float = 1.0,
) -> ImageDataset:
    """Load ``source`` (a built-in or registered name, or a path) as an in-memory dataset.

    Each image's shorter side is resized to ``resolution / crop_ratio``, and its centre ``resolution`` square
    kept (``resize_center_crop``): ratio 1 for training, the evaluation's ratio (``eval.crop_ratio``, ImageNet's
    0.875) for evaluation. ``fake`` images are random pixels made at ``resolution``, whatever the ratio.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {source!r}; expected one of {SPLITS}")
    check_source_and_resolution(source, resolution)
    if not 0 < crop_ratio <= 1 or (crop_ratio != 1 and resolution is None):
        raise DataError(f"crop_ratio must be in (0, 1], and 1 without a resolution; got {crop_ratio!r} at "
                        f"resolution {resolution!r}")
    if source == "digits":
        return _load_digits(split, resolution, crop_ratio)
    if source in ("cifar10", "cifar100"):
        return _load_cifar(source, split, resolution, crop_ratio)
    if source == "fake":
        return _load_fake(split, resolution or 32, fake_size, seed)
    if registered_name(source) is not None:
        return _load_registered(source, split, resolution, crop_ratio)
    return _load_tree(existing_path(source), split, resolution, skip_unreadable, crop_ratio)


# ----------------------------------------------------------------- built-ins


def _load_digits(split: str, resolution: int | None, crop_ratio: float) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    labels = raw.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    idx = train_idx if split == "train" else test_idx
    grey = torch.from_numpy(raw.images[idx]).float().unsqueeze(1) * (255.0 / 16.0)
    size = resolution or 32
    side = resize_side(size, crop_ratio)
    grey = F.interpolate(grey, size=(side, side), mode="bilinear", align_corners=False)
    grey = resize_center_crop(grey.round().clamp(0, 255).to(torch.uint8), size, crop_ratio)  # the centre crop
    images = grey.expand(-1, 3, -1, -1).contiguous()
    return ImageDataset(
        images, torch.from_numpy(labels[idx]), [str(i) for i in range(10)], "digits", split
    )


def data_root() -> str:
    """Where torchvision datasets are downloaded to."""
    return os.path.expanduser(os.environ.get("SLIMSSL_DATA", "~/.cache/slimssl/data"))


def _load_cifar(name: str, split: str, resolution: int | None, crop_ratio: float) -> ImageDataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = data_root()
    try:
        ds = cls(root, train=split == "train", download=True)
    except Exception as exc:  # no network, bad archive, unwritable root, ...
        raise DataError(
            f"could not load or download {name} under {root} ({exc}); set $SLIMSSL_DATA, "
            f"or pass the path to an ImageFolder tree (or .zip) instead of {name!r}"
        ) from exc
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    if resolution is not None:
        images = resize_center_crop(images, resolution, crop_ratio)  # a no-op at 32 px, ratio 1
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageDataset(images, labels, list(ds.classes), name, split)


def _load_fake(split: str, resolution: int, size: int, seed: int) -> ImageDataset:
    # A different stream for the held-out split so train and test differ.
    gen = torch.Generator().manual_seed(seed + (0 if split == "train" else 1_000_003))
    images = torch.randint(0, 256, (size, 3, resolution, resolution), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (size,), dtype=torch.int64, generator=gen)
    return ImageDataset(images, labels, [str(i) for i in range(10)], "fake", split)


def _load_registered(source: str, split: str, resolution: int | None, crop_ratio: float) -> ImageDataset:
    images, labels, classes = registered_split(source, split)
    name = registered_name(source)
    if resolution is not None:
        images = resize_center_crop(images, resolution, crop_ratio)  # the same images when they fit already
    elif images.shape[-1] != images.shape[-2]:
        raise DataError(f"dataset {name!r}: its {split} images are {tuple(images.shape[-2:])} pixels; set "
                        "data.resolution to resize them and keep their centre square")
    return ImageDataset(images, labels, classes, name, split)


# ------------------------------------------------------------ folder and zip


def _load_tree(path: str, split: str, resolution: int | None, skip_unreadable: bool,
               crop_ratio: float) -> ImageDataset:
    tree = scan_tree(path)
    prefix = split_prefix(tree, split)
    paths, labels, classes = list_split(tree, prefix)
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    _check_fits_in_memory(path, split, len(paths), resolution)
    key = _cache_key(tree, split, resolution, crop_ratio, skip_unreadable, paths)

    cached = _cache_load(key)
    if cached is None:
        images, kept, skipped = _decode_all(tree, paths, resolution, skip_unreadable, crop_ratio)
        cached = {"images": images, "kept": kept, "skipped": skipped}
        _cache_save(key, cached)
    else:
        log.info("%s: split %r read from the decoded-image cache (%s)", path, split, cache_dir())
    images, kept, skipped = cached["images"], cached["kept"], cached["skipped"]
    if skipped:
        log.warning("%s: skipped %d unreadable files (%s%s)", path, len(skipped),
                    ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
    label_t = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)[kept]
    return ImageDataset(images, label_t, classes, name, split)


def physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the system does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits_in_memory(path: str, split: str, count: int, resolution: int | None) -> None:
    """Refuse a split that cannot be held decoded on this machine, before decoding it for hours to end in an
    out-of-memory kill (ImageNet with the memory loader). Decoding holds every image, then the stacked tensor:
    twice the split's decoded size. Under torchrun each process on the machine holds its own copy."""
    total = physical_memory()
    if resolution is None or not total:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    size = count * 3 * resolution * resolution
    needed = max(2, processes) * size
    if needed > total:
        held = f"{processes} processes each holding them" if processes > 1 else "while decoding"
        raise DataError(f"{path}: the {count:,} images of split {split!r}, decoded in memory at {resolution} px "
                        f"({size / 2**30:.1f} GiB), need about {needed / 2**30:.1f} GiB with {held}, more than this "
                        f"machine's {total / 2**30:.1f} GiB; stream them instead (--set data.loader=stream to "
                        "pretrain, --loader stream for the evaluation commands)")


# ------------------------------------------------------- decoding a split


def _decode_chunk(tree: FileTree, paths: list[str], resolution: int | None,
                  crop_ratio: float) -> list[torch.Tensor | str]:
    """Decode ``paths``; an unreadable file yields its error message instead."""
    out: list[torch.Tensor | str] = []
    for rel in paths:
        try:
            out.append(decode_resized(tree.read(rel), resolution, crop_ratio))
        except Exception as exc:  # any decoder failure means "unreadable file"
            out.append(decode_error(exc))
    return out


def _decode_all(tree: FileTree, paths: list[str], resolution: int | None, skip_unreadable: bool,
                crop_ratio: float):
    """Decode with a thread pool (decoders release the GIL); returns (images, kept idx, skipped)."""
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    workers = min(len(chunks), 2 * (os.cpu_count() or 1), 32)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = pool.map(lambda c: _decode_chunk(tree, c, resolution, crop_ratio), chunks)
        results = [r for chunk in decoded for r in chunk]

    kept = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
    skipped = [paths[i] for i, r in enumerate(results) if not isinstance(r, torch.Tensor)]
    if skipped and not skip_unreadable:
        first = results[paths.index(skipped[0])]
        raise DataError(
            f"cannot decode {os.path.join(tree.root, skipped[0])} ({first}); "
            f"{len(skipped)} unreadable file(s) in total; to skip them set data.skip_unreadable: true "
            f"({SKIP_HINT}, or load_dataset(..., skip_unreadable=True))"
        )
    if not kept:
        raise DataError(f"{tree.root}: none of the {len(paths)} image files could be decoded")
    _check_sizes(tree, paths, results, kept)
    images = torch.stack([results[i] for i in kept])
    return images, torch.as_tensor(kept, dtype=torch.int64), skipped


def _check_sizes(tree: FileTree, paths: list[str], results: list, kept: list[int]) -> None:
    first = kept[0]
    shape = results[first].shape
    for i in kept:
        if results[i].shape != shape:
            raise DataError(
                f"images differ in size: {os.path.join(tree.root, paths[first])} is "
                f"{shape[2]}x{shape[1]} but {os.path.join(tree.root, paths[i])} is "
                f"{results[i].shape[2]}x{results[i].shape[1]}; pass resolution=... to resize them"
            )


# -------------------------------------------------------------------- cache


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


def _cache_key(tree: FileTree, split: str, resolution, crop_ratio: float, skip_unreadable: bool,
               paths: list[str]) -> str:
    listing = [[p, *_file_version(tree, p)] for p in paths]
    if not os.path.isdir(tree.root):  # a zip: its own size/mtime too
        st = os.stat(tree.root)
        listing.append(["<zip>", st.st_size, st.st_mtime_ns])
    blob = json.dumps([_CACHE_VERSION, tree.root, split, resolution, crop_ratio, skip_unreadable, listing])
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


def _cache_load(key: str) -> dict | None:
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


def _cache_save(key: str, payload: dict) -> None:
    limit = cache_limit()
    if limit == 0:
        return
    size = payload["images"].numel()
    if size > limit:
        log.info("not caching %s of decoded images: more than the cache's limit of %s ($SLIMSSL_CACHE_GB)",
                 _size(size), _size(limit))
        return
    directory = cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, key + ".pt")
        with atomic_write(path) as f:  # readers never see a partial file
            torch.save(payload, f)
        _evict(directory, limit, keep=path)
    except OSError as exc:  # a read-only cache must not break loading
        log.warning("could not write decoded-image cache in %s (%s)", directory, exc)


_ENTRY = re.compile(r"[0-9a-f]{32}\.pt")  # the cache's own files: the folder may hold others, never touched
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.pt\..*\.tmp")  # atomic_write's, left by a killed write when stale
_STALE_PARTIAL_S = 3600


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
