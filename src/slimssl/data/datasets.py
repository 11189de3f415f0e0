"""Image datasets as in-memory uint8 tensors.

Every source (a built-in name, a dataset registered in Python: ``registry.py``, an ImageFolder tree, or a
``.zip`` of one: ``files.py``) is
decoded once (``decode.py``) into an ``ImageDataset`` holding ``uint8 [N, 3, H, W]`` images.
Augmentation then runs batched on the tensor (see ``augment.py``), so there is
no per-sample ``Dataset.__getitem__`` on the training path.

Decoded folder/zip trees are cached (``decoded_cache.py``), so a second load of an unchanged tree is a single
file read.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import decoded_cache
from .decode import decode_error, decode_resized, open_image, resize_center_crop, resize_side
from ..errors import DataError, UnreadableImageError
from ..launch import processes_on_this_machine, usable_cpus
from .files import (BUILTIN, IMAGE_EXTENSIONS, SKIP_HINT, SPLITS, FileTree, check_source_and_resolution,
                    existing_path, list_split, scan_tree, split_prefix)
from .registry import registered_name, registered_split

log = logging.getLogger("slimssl")

_CHUNK = 256  # files per thread-pool task: amortises the executor overhead
LARGE_PHOTOS = 1.5  # training photos whose shorter side is this many times data.resolution lose much to memory


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
    if isinstance(images, list):  # of several sizes: each resized and centre-cropped alone
        if resolution is None:
            raise DataError(f"dataset {name!r}: its {split} images are of several sizes; set data.resolution to "
                            "resize each and keep its centre square")
        images = torch.cat([resize_center_crop(image[None], resolution, crop_ratio) for image in images])
    elif resolution is not None:
        images = resize_center_crop(images, resolution, crop_ratio)  # the same images when they fit already
    elif images.shape[-1] != images.shape[-2]:
        raise DataError(f"dataset {name!r}: its {split} images are {tuple(images.shape[-2:])} pixels; set "
                        "data.resolution to resize them and keep their centre square")
    return ImageDataset(images, labels, classes, name, split)


# ------------------------------------------------------------ folder and zip


def warn_of_shrunk_photos(source: str, resolution: int, sample: int = 16) -> None:
    """Say, before pretraining on a folder or .zip decoded in memory (train/loop.py), that its photos are much
    larger than ``resolution``: each is kept as its centre square at that resolution, so the random crops never
    see the border, and a small crop has fewer pixels than the same crop of the photo (the streaming loader
    crops the photos themselves, as torchvision's RandomResizedCrop). Reads the headers of ``sample`` train
    images, picked through the listing the load made (no second listing, which would log its notes again)."""
    if source in BUILTIN or registered_name(source) is not None:
        return
    tree = scan_tree(existing_path(source))
    prefix = split_prefix(tree, "train")
    names = list(tree.files)  # in the scan's order: a stride through it meets every part of the split
    picked = [name for name in names[::max(1, len(names) // (4 * sample))]
              if name.startswith(prefix) and name.lower().endswith(IMAGE_EXTENSIONS)][:sample]
    sides = []
    for rel in picked:
        try:
            sides.append(min(open_image(tree.read(rel)).size))
        except Exception:  # an unreadable file: the decoding reports it
            continue
    side = int(np.median(sides)) if sides else 0
    if side >= LARGE_PHOTOS * resolution:
        log.warning("%s: the training photos are about %d px on their shorter side, and data.loader: memory keeps "
                    "each as its centre square at data.resolution %d px: the random crops never see the border, "
                    "and each has %.1f times fewer pixels a side than the same crop of the photo. data.loader: "
                    "stream crops the photos themselves (--set data.loader=stream)",
                    source, side, resolution, side / resolution)


def _load_tree(path: str, split: str, resolution: int | None, skip_unreadable: bool,
               crop_ratio: float) -> ImageDataset:
    tree = scan_tree(path)
    prefix = split_prefix(tree, split)
    paths, labels, classes = list_split(tree, prefix)
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    _check_fits_in_memory(path, split, len(paths), resolution)
    decoded_bytes = len(paths) * 3 * resolution * resolution if resolution else None
    key = decoded_cache.entry_key(tree, split, resolution, crop_ratio, skip_unreadable, paths) \
        if decoded_cache.may_hold(decoded_bytes) else None

    cached = None if key is None else _checked_entry(decoded_cache.load(key), len(paths), resolution, key)
    if cached is None:
        images, kept, skipped = _decode_all(tree, paths, resolution, skip_unreadable, crop_ratio)
        cached = {"images": images, "kept": kept, "skipped": skipped}
        if key is not None:
            decoded_cache.save(key, cached)
    else:
        log.info("%s: split %r read from the decoded-image cache (%s)", path, split, decoded_cache.cache_dir())
    images, kept, skipped = cached["images"], cached["kept"], cached["skipped"]
    if skipped:
        log.warning("%s: skipped %d unreadable files (%s%s)", path, len(skipped),
                    ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
    label_t = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)[kept]
    return ImageDataset(images, label_t, classes, name, split)


def _checked_entry(payload, count: int, resolution: int | None, key: str) -> dict | None:
    """A decoded-image cache entry of a split of ``count`` files, or None (decoded again) when it holds anything
    else than what ``_load_tree`` saves: a file damaged, or replaced by hand, in the cache folder."""
    if payload is None:
        return None
    images, kept, skipped = (payload.get(k) for k in ("images", "kept", "skipped")) if isinstance(payload, dict) \
        else (None, None, None)
    valid = (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
             and images.shape[1] == 3 and (resolution is None or tuple(images.shape[2:]) == (resolution, resolution))
             and isinstance(kept, torch.Tensor) and kept.dtype == torch.int64 and kept.dim() == 1  # as _decode_all
             and len(kept) == len(images) and len(kept) > 0 and int(kept[0]) >= 0 and int(kept[-1]) < count
             and bool((kept[1:] > kept[:-1]).all())  # the files' indices, in order
             and isinstance(skipped, list) and all(isinstance(p, str) for p in skipped)
             and len(kept) + len(skipped) == count)
    if not valid:
        log.warning("ignoring decoded-image cache entry %s: it does not hold the %d images of this split as slimssl "
                    "saves them (damaged, or replaced); decoding them again", key, count)
        return None
    return payload


def physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the system does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits_in_memory(path: str, split: str, count: int, resolution: int | None) -> None:
    """Refuse a split that cannot be held decoded on this machine, before decoding it for hours to end in an
    out-of-memory kill (ImageNet with the memory loader). Decoding holds every image, then the stacked tensor:
    about 2.5 times the split's decoded size (2.45 measured at 224 px: the decoded images, the stacked tensor and
    the allocator's slack). Under torchrun each process on the machine decodes its own copy, at the same time."""
    total = physical_memory()
    if resolution is None or not total:
        return
    processes = processes_on_this_machine()
    size = count * 3 * resolution * resolution
    needed = int(2.5 * processes * size)  # torchrun's processes decode at the same time
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
    workers = min(len(chunks), 2 * usable_cpus(), 32)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = pool.map(lambda c: _decode_chunk(tree, c, resolution, crop_ratio), chunks)
        results = [r for chunk in decoded for r in chunk]

    kept = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
    skipped = [paths[i] for i, r in enumerate(results) if not isinstance(r, torch.Tensor)]
    if skipped and not skip_unreadable:
        first = results[paths.index(skipped[0])]
        raise UnreadableImageError(
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
