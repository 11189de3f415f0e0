"""Evaluation images: a labelled split held decoded in memory, or streamed from its files.

The evaluation protocols (kNN, linear probe, fine-tuning, BatchNorm recalibration) read a split through
the small ``EvalImages`` interface: its length, labels and resolution, uint8 batches in a given order, and
the images at given indices. ``ImageDataset`` (datasets.py) is the in-memory implementation.
``StreamedImages`` holds only the file list and labels of an ImageFolder folder or .zip, and torch
DataLoader worker processes decode each batch, so a split too large for memory (ImageNet) can be evaluated
(``--loader stream``).

A streamed image is decoded exactly as ``load_dataset`` decodes it (``decode_resized``: the same decoder,
shorter side resized to ``resolution / crop_ratio`` with antialiasing, centre ``resolution`` crop), so both
loaders give the same pixels and the same numbers. Unlike the training stream, JPEGs are decoded at full
scale: a reduced-scale draft would change the pixels.

A streamed split also gives random crops of each whole picture (``random_crops``: the ``whole`` training crop
of fine-tuning and of the augmented linear probe, torchvision's RandomResizedCrop and flip as the papers'
ImageNet protocols take them), which an in-memory split cannot: it keeps only each image's centre crop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Generator, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import ImageDataset, load_dataset
from .decode import decode_error, decode_pixels, decode_resized
from ..errors import DataError, UnreadableImageError
from .files import SKIP_HINT, FileListDataset, PackedPaths, check_source_and_resolution, list_labelled_files
from .recipes import ViewRecipe
from ..seeds import derived_generator
from .stream import (full_detail_side, ignore_stop_signals, resized_crop, stop_signals_blocked, stop_workers,
                     view_boxes)

log = logging.getLogger("slimssl")

LOADERS = ("memory", "stream")
TAKE_BATCH = 64  # files per worker task when fetching a set of indices
# the ``whole`` training crop: torchvision's RandomResizedCrop defaults, and a flip
WHOLE_CROP = ViewRecipe(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5)
Failure = tuple[int, str]  # (file index, error) of a file that could not be decoded


class EvalImages(Protocol):
    """What the evaluation protocols read from a split (``ImageDataset``, ``StreamedImages``)."""

    name: str
    split: str
    classes: list[str] | None
    labels: torch.Tensor | None  # int64 [N]; None when unlabelled

    def __len__(self) -> int: ...

    @property
    def resolution(self) -> int: ...

    def batches(self, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[torch.Tensor]: ...

    def take(self, indices: torch.Tensor) -> torch.Tensor: ...


def as_eval_images(images: torch.Tensor | EvalImages) -> EvalImages:
    """A bare uint8 tensor [N, 3, H, W] (a sample taken from a split, or a user's images) as unlabelled
    in-memory images; a dataset as it is."""
    if isinstance(images, torch.Tensor):
        return ImageDataset(images, None, None, "images")
    return images


def load_eval_split(source: str, split: str, *, loader: str, resolution: int, workers: int = 0,
                    skip_unreadable: bool = False, fake_size: int = 256, seed: int = 0,
                    pin_memory: bool = False, crop_ratio: float = 1.0) -> EvalImages:
    """``split`` of ``source`` decoded in memory (``loader="memory"``) or streamed (``"stream"``): each image's
    centre ``crop_ratio`` (of its shorter side) at ``resolution``, see ``load_dataset``."""
    if loader == "stream":
        return StreamedImages(source, split, resolution=resolution, workers=workers,
                              skip_unreadable=skip_unreadable, pin_memory=pin_memory, crop_ratio=crop_ratio)
    if loader == "memory":
        return load_dataset(source, split, resolution=resolution, skip_unreadable=skip_unreadable,
                            fake_size=fake_size, seed=seed, crop_ratio=crop_ratio)
    raise DataError(f"unknown loader {loader!r}; expected one of {LOADERS}")


class StreamedImages:
    """One split of an ImageFolder folder or .zip that is never held decoded: the ``EvalImages`` interface,
    with ``workers`` loader processes decoding each batch (0: in this process)."""

    def __init__(self, source: str, split: str = "test", *, resolution: int, workers: int = 0,
                 skip_unreadable: bool = False, pin_memory: bool = False, crop_ratio: float = 1.0):
        check_source_and_resolution(source, resolution)
        if workers < 0 or not 0 < crop_ratio <= 1:
            raise DataError(f"need resolution >= 1, workers >= 0 and 0 < crop_ratio <= 1, got {resolution}, "
                            f"{workers} and {crop_ratio}")
        files = list_labelled_files(source, split)
        self.root, self.split, self.classes = files.root, split, files.classes
        self.name = os.path.splitext(os.path.basename(files.root.rstrip("/")))[0]
        self.labels = None if files.labels is None else torch.as_tensor(files.labels, dtype=torch.int64)
        self.workers, self.pin_memory = workers, pin_memory
        self.files = DecodedFiles(files.root, files.paths, resolution, files.read, crop_ratio, files.members)
        if skip_unreadable:
            self.drop(self.find_unreadable())

    def __len__(self) -> int:
        return len(self.files)

    @property
    def resolution(self) -> int:
        return self.files.resolution

    def batches(self, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """uint8 [B, 3, R, R] batches of ``indices`` (default: every file), in that order; a DataError naming
        the file when one cannot be decoded."""
        with contextlib.closing(self._decoded(_batches_of(self._order(indices), batch_size))) as decoded:
            for images, failed in decoded:
                if failed:
                    self._refuse(failed)
                yield images

    def _refuse(self, failed: list[Failure]) -> None:
        index, error = failed[0]
        raise UnreadableImageError(f"cannot decode {self.files.path(index)} ({error}); to skip unreadable files "
                                   f"set data.skip_unreadable: true ({SKIP_HINT}, or StreamedImages(..., "
                                   "skip_unreadable=True) in Python)")

    def random_crops(self, batch_size: int, indices: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
        """uint8 [B, 3, R, R] batches of the images at ``indices``, in that order: each a RandomResizedCrop
        (:data:`WHOLE_CROP`) of the whole decoded picture, resized to the resolution, and flipped with probability
        1/2. The draws of the n-th image come from (``seed``, n) alone: the same crops with any number of workers."""
        order = self._order(indices)
        keyed = ([(i, start + n) for n, i in enumerate(batch)]  # made batch by batch: a fine-tuning's millions
                 for start, batch in zip(range(0, len(order), batch_size), _batches_of(order, batch_size)))
        with contextlib.closing(self._decoded(keyed, WholeCrops(self.files, seed))) as decoded:
            for images, failed in decoded:
                if failed:
                    self._refuse(failed)
                yield images

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """The images at ``indices`` as one uint8 tensor [len(indices), 3, R, R], filled batch by batch (a list of
        batches concatenated would hold them twice: 39 GB for ImageNet's 10% fine-tuning subset at 224 px)."""
        out = torch.empty((len(self._order(indices)), 3, self.resolution, self.resolution), dtype=torch.uint8)
        done = 0
        for images in self.batches(TAKE_BATCH, indices):
            out[done:done + len(images)] = images
            done += len(images)
        return out[:done]

    # ---- decoding ----------------------------------------------------------------------------------------

    def _order(self, indices: torch.Tensor | None) -> torch.Tensor:
        if indices is None:
            return torch.arange(len(self))
        order = torch.as_tensor(indices, dtype=torch.int64).flatten()
        if len(order) and (order.min() < 0 or order.max() >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} images of {self.root}")
        return order

    def _decoded(self, batches: Iterable[list],
                 dataset: Dataset | None = None) -> Generator[tuple[torch.Tensor | None, list[Failure]], None, None]:
        """(images or None when a file failed, failures) per batch of keys (file indices, or the keys of
        ``dataset``: default the files decoded as ``load_dataset`` does), decoded by the workers."""
        # An explicit generator: a loader must not draw its worker seeds from the global RNG, which the
        # in-memory path leaves untouched. Workers leave stop signals to this process, as training's do: a
        # pretraining's kNN must not print its stop warning once per worker, nor lose a worker to a SIGTERM
        loader = DataLoader(self.files if dataset is None else dataset, batch_sampler=batches,
                            num_workers=self.workers, collate_fn=collate_decoded, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals)
        decoded = None
        try:
            with stop_signals_blocked():  # the first iter() starts the workers; a signal held meanwhile comes
                decoded = iter(loader)  # after it, when there is an iterator to stop them with
            yield from decoded
        finally:  # a caller that stops early too
            if decoded is not None:
                stop_workers(decoded)

    def find_unreadable(self, indices: torch.Tensor | None = None) -> list[int]:
        """The indices of the files that cannot be decoded, among ``indices`` (default: all), each decoded once."""
        order = torch.arange(len(self)) if indices is None else indices
        return [index for _, found in self._decoded(_batches_of(order, TAKE_BATCH)) for index, _ in found]

    def drop(self, unreadable: Iterable[int]) -> None:
        """Leave out the files at the indices ``unreadable`` (:meth:`find_unreadable`), with their labels: the
        files ``load_dataset`` skips with ``skip_unreadable``, so both loaders evaluate the same images."""
        bad = set(unreadable)
        if not bad:
            return
        if len(bad) == len(self):
            raise DataError(f"{self.root}: none of the {len(self)} image files of split {self.split!r} could be "
                            "decoded")
        paths = [self.files.path(index) for index in sorted(bad)]
        keep = torch.tensor([i for i in range(len(self)) if i not in bad], dtype=torch.int64)
        self.files = self.files.subset(keep)
        self.labels = None if self.labels is None else self.labels[keep]
        log.warning("%s: skipped %d unreadable files (%s%s)", self.root, len(paths), ", ".join(paths[:5]),
                    ", ..." if len(paths) > 5 else "")


class DecodedFiles(FileListDataset):
    """File index -> (index, uint8 [3, R, R] or None, error or None), decoded as ``load_dataset`` does."""

    def __init__(self, root: str, paths: list[str] | PackedPaths, resolution: int,
                 read: Callable[[str], bytes] | None = None, crop_ratio: float = 1.0,
                 members: np.ndarray | None = None):
        super().__init__(root, paths, read, members)
        self.resolution, self.crop_ratio = resolution, crop_ratio

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, decode_resized(self.read_at(index), self.resolution, self.crop_ratio), None
        except Exception as exc:  # any decoder failure means "unreadable file"
            return index, None, decode_error(exc)

    def subset(self, keep: torch.Tensor) -> DecodedFiles:
        keep = keep.numpy()
        return DecodedFiles(self.root, self.paths[keep], self.resolution, self._read, self.crop_ratio,
                            self.subset_members(keep))


class WholeCrops(Dataset):
    """(file index, n) -> (index, uint8 [3, R, R] or None, error or None): a random crop of the whole decoded
    picture, drawn from (seed, n) (``StreamedImages.random_crops``)."""

    def __init__(self, files: DecodedFiles, seed: int):
        self.files, self.seed = files, seed
        # JPEGs much larger than needed are decoded at reduced DCT scale, keeping the detail of the smallest crop
        self.min_side = full_detail_side(files.resolution, (WHOLE_CROP,))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, torch.Tensor | None, str | None]:
        index, n = key
        try:
            image = decode_pixels(self.files.read_at(index), self.min_side)
        except Exception as exc:  # any decoder failure means "unreadable file"
            return index, None, decode_error(exc)
        generator = derived_generator(self.seed, "whole_crop", n)
        box = view_boxes(image.shape[-2], image.shape[-1], (WHOLE_CROP,), generator)[0]
        crop = resized_crop(image, box, self.files.resolution).permute(2, 0, 1)  # [3, R, R]
        flip = torch.rand((), generator=generator) < WHOLE_CROP.flip_p
        return index, (crop.flip(-1) if flip else crop).contiguous(), None


def _batches_of(order: torch.Tensor, batch_size: int) -> Iterator[list[int]]:
    """The file indices of ``order`` in lists of ``batch_size``, made as the loader asks for them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (batch.tolist() for batch in torch.as_tensor(order).split(batch_size) if len(batch))  # none of nothing


def collate_decoded(samples: list) -> tuple[torch.Tensor | None, list[Failure]]:
    """One batch's samples -> (uint8 [B, 3, R, R], or None when a file failed; the failures)."""
    failed = [(index, error) for index, image, error in samples if image is None]
    if failed:
        return None, failed
    return torch.stack([image for _, image, _ in samples]), []
