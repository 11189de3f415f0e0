"""Two views per step from image files decoded by loader workers (``data.loader: stream``).

For datasets that do not fit in memory decoded (ImageNet at 224 px is ~190 GB as uint8). Each step, a
torch DataLoader's worker processes decode the step's files with PIL (JPEGs much larger than needed at
1/2, 1/4 or 1/8 scale via ``Image.draft``) and cut both views' RandomResizedCrop at the decoded
resolution, so small crops keep their detail. The uint8 crops are collated, pinned, copied to the device,
and the flip and colour ops run there batched (``TwoViewAugment.photometric``).

Determinism matches ``InMemoryViews``: the same per-epoch order from (seed, epoch), the same sharding of
a global batch over processes, crop boxes from a generator seeded by (seed, step, global row) and the
device stage from (seed, step). A step's views do not depend on the number of workers or processes, and
a resumed run sees the batches an uninterrupted run would have.
"""

from __future__ import annotations

import atexit
import io
import logging
import math
import os
import signal
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .augment import BatchRows, TwoViewAugment, ViewRecipe, sample_crop_boxes
from .datasets import BUILTIN, DataError, _list_split, _scan_zip, _split_prefix, _to_rgb, scan_tree
from .views import epoch_permutation, step_generator, to_channels_last

log = logging.getLogger("slimssl")

MAX_REPLACEMENT_TRIES = 100  # unreadable files in a row before a skipped file counts as a broken dataset
SampleKey = tuple[int, int, int]  # (file index, step, row in the global batch)
_OPEN: weakref.WeakSet = weakref.WeakSet()  # live sources, whose workers must be joined at exit


class StreamingViews:
    """The ``InMemoryViews`` interface over an ImageFolder folder or .zip that is never held decoded."""

    def __init__(self, source: str, augment: TwoViewAugment, *, global_batch: int, rank: int, world: int,
                 seed: int, device: torch.device, workers: int, skip_unreadable: bool = False,
                 channels_last: bool = False, split: str = "train"):
        self.augment, self.global_batch, self.seed = augment, global_batch, seed
        self.batch, self.rank, self.device, self.workers = global_batch // world, rank, device, workers
        self.channels_last = channels_last and device.type == "cuda"
        root, paths, read = list_image_files(source, split)
        if len(paths) < global_batch:
            raise DataError(f"dataset {source!r} has {len(paths)} images, fewer than train.batch_size {global_batch}")
        self.num_images = len(paths)
        self.steps_per_epoch = self.num_images // global_batch
        self.files = CropDataset(root, paths, augment.views, augment.size, seed, skip_unreadable, read)
        self.unreadable: dict[str, str] = {}  # path -> error, of the files replaced so far (skip_unreadable)
        self._plan = StepBatches(self.batch_indices, first_row=rank * self.batch)
        self._loader: DataLoader | None = None
        self._batches = None
        self._next_step: int | None = None
        self._perm_epoch, self._perm = None, None
        _OPEN.add(self)

    def batch_indices(self, step: int) -> torch.Tensor:
        """This process's file indices at ``step``: the same rule (and result) as ``InMemoryViews``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.seed, epoch, self.num_images), epoch
        start = i * self.global_batch + self.rank * self.batch
        return self._perm[start:start + self.batch]

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        crops = self._crops(step).to(self.device, non_blocking=True)  # uint8 [B, 2, 3, r, r]
        gen = BatchRows(step_generator(self.seed, step, self.device), self.rank * self.batch, self.global_batch)
        views = self.augment.photometric(crops[:, 0], crops[:, 1], gen)
        return to_channels_last(views) if self.channels_last else views

    def close(self) -> None:
        """Stop the loader workers; a later call starts them again."""
        shutdown = getattr(getattr(self, "_batches", None), "_shutdown_workers", None)
        if shutdown is not None:  # multi-process iterator: join the workers now, not at garbage collection
            shutdown()
        self._loader, self._batches, self._next_step = None, None, None

    def __del__(self):
        self.close()

    # ---- the prefetching iterator --------------------------------------------------------------------

    def _crops(self, step: int) -> torch.Tensor:
        if self._batches is None or step != self._next_step:
            self._restart(step)  # a resume, or a caller that skips around: prefetched steps are stale
        got, crops, unreadable = next(self._batches)
        self._next_step = step + 1
        if got != step:
            raise RuntimeError(f"streaming loader returned the batch of step {got} for step {step}")
        self._note_unreadable(unreadable)
        return crops

    def _restart(self, step: int) -> None:
        self._plan.start = step
        if self._loader is None:
            self._loader = self._build_loader()
        # persistent workers: iter() restarts the sampler at ``step`` and discards what was prefetched
        self._batches = iter(self._loader)

    def _build_loader(self) -> DataLoader:
        pin = self.device.type == "cuda"
        extra = dict(persistent_workers=True, prefetch_factor=2) if self.workers > 0 else {}
        # An explicit generator: the loader's worker seeds must not draw from the global RNG (exact resume).
        return DataLoader(self.files, batch_sampler=self._plan, num_workers=self.workers, collate_fn=collate_crops,
                          pin_memory=pin, generator=torch.Generator().manual_seed(self.seed),
                          worker_init_fn=ignore_stop_signals, **extra)

    def _note_unreadable(self, unreadable: list[tuple[str, str]]) -> None:
        """Raise for an unreadable file, or log each replaced one once (``data.skip_unreadable``)."""
        for path, error in unreadable:
            if not self.files.skip_unreadable:
                self.close()
                raise DataError(f"cannot decode {path} ({error}); to replace unreadable files by other images "
                                f"set data.skip_unreadable: true (--set data.skip_unreadable=true)")
            if path not in self.unreadable:
                self.unreadable[path] = error
                log.warning("cannot decode %s (%s): replaced by the next readable image; %d unreadable file(s) "
                            "so far", path, error, len(self.unreadable))


@atexit.register  # registered after multiprocessing's exit handler, so it runs before it
def _close_at_exit() -> None:
    """Join the workers of sources nobody closed. Left to multiprocessing's exit handler they would get a
    SIGTERM, which they ignore, and the interpreter would wait for them forever."""
    for source in list(_OPEN):
        source.close()


def ignore_stop_signals(worker_id: int) -> None:
    """Workers outlive a SIGINT/SIGTERM sent to the whole process group (Ctrl-C, a cluster's preemption), so
    the training process can finish its step and save; they still exit with it (DataLoader watches it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StepBatches:
    """Batch sampler: per-step lists of sample keys from step ``start`` on, without end (the loader
    prefetches a few steps ahead; the caller decides when to stop)."""

    def __init__(self, indices: Callable[[int], torch.Tensor], first_row: int, start: int = 0):
        self.indices, self.first_row, self.start = indices, first_row, start

    def __iter__(self):
        step = self.start
        while True:
            yield [(i, step, self.first_row + row) for row, i in enumerate(self.indices(step).tolist())]
            step += 1


# ---------------------------------------------------------------- the files


@dataclass
class ImageFiles:
    """The image files of one split of an ImageFolder folder or .zip (nothing decoded)."""

    root: str  # absolute path of the folder or .zip
    paths: list[str]  # relative to ``root``, class by class, sorted
    labels: list[int] | None  # None for a folder without class sub-folders
    classes: list[str] | None
    read: Callable[[str], bytes]  # a reader of one path, for this process


def list_labelled_files(source: str, split: str = "train") -> ImageFiles:
    """The files, labels and classes of ``split`` of an ImageFolder folder or .zip, or a DataError."""
    if source in BUILTIN:
        raise DataError(f"data.loader: stream reads an ImageFolder folder or .zip, and {source!r} is a built-in "
                        f"dataset; use data.loader: memory (--set data.loader=memory) for it")
    root = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(root):
        raise DataError(f"{source!r} is neither a known dataset name ({', '.join(BUILTIN)}) "
                        f"nor an existing path (looked for {root})")
    tree = scan_tree(root)
    paths, labels, classes = _list_split(tree, _split_prefix(tree, split))
    return ImageFiles(root, paths, labels, classes, tree.read)


def list_image_files(source: str, split: str = "train") -> tuple[str, list[str], Callable[[str], bytes]]:
    """(root, image paths relative to it, a reader of one path) of an ImageFolder folder or .zip."""
    files = list_labelled_files(source, split)  # labels are not needed to pretrain
    return files.root, files.paths, files.read


def open_reader(root: str) -> Callable[[str], bytes]:
    """A reader of paths under ``root`` for this process: a .zip is reopened, because a zip handle
    inherited through fork shares its file offset with the parent and the other workers."""
    if not os.path.isdir(root):
        return _scan_zip(root).read

    def read(rel: str) -> bytes:
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()

    return read


class CropDataset(Dataset):
    """Sample key -> (step, uint8 [2, 3, size, size] crops or None, unreadable files met)."""

    def __init__(self, root: str, paths: list[str], views: tuple[ViewRecipe, ViewRecipe], size: int, seed: int,
                 skip_unreadable: bool, read: Callable[[str], bytes] | None = None):
        # One numpy bytes array, not a list of str: forked workers read it without touching refcounts, so
        # its pages stay shared instead of being copied into every worker (1.28M paths for ImageNet).
        self.root, self.paths, self.views, self.size = root, np.array([p.encode() for p in paths]), views, size
        self.seed, self.skip_unreadable = seed, skip_unreadable
        self.min_side = full_detail_side(size, views)
        self._read, self._read_pid = read, os.getpid()

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:  # spawned workers open their own reader
        return {**self.__dict__, "_read": None, "_read_pid": None}

    def __getitem__(self, key: SampleKey) -> tuple[int, torch.Tensor | None, list[tuple[str, str]]]:
        index, step, row = key
        unreadable = []
        for offset in range(min(MAX_REPLACEMENT_TRIES, len(self.paths))):
            rel = self.paths[(index + offset) % len(self.paths)].decode()
            try:
                image = decode_image(self.read(rel), self.min_side)
            except Exception as exc:  # any decoder failure means "unreadable file"
                unreadable.append((os.path.join(self.root, rel), f"{type(exc).__name__}: {exc}"))
                if not self.skip_unreadable:
                    return step, None, unreadable
                continue  # deterministic replacement: the next file in listing order
            return step, crop_pair(image, self.views, self.size, sample_generator(self.seed, step, row)), unreadable
        raise DataError(f"{self.root}: {len(unreadable)} unreadable files in a row from "
                        f"{unreadable[0][0]}; is the dataset intact?")

    def read(self, rel: str) -> bytes:
        if self._read_pid != os.getpid():
            self._read, self._read_pid = open_reader(self.root), os.getpid()
        return self._read(rel)


def collate_crops(samples: list) -> tuple[int, torch.Tensor | None, list[tuple[str, str]]]:
    """One step's samples -> (step, uint8 [B, 2, 3, r, r] or None when a file failed, unreadable files)."""
    unreadable = [u for _, _, found in samples for u in found]
    if any(crops is None for _, crops, _ in samples):
        return samples[0][0], None, unreadable
    return samples[0][0], torch.stack([crops for _, crops, _ in samples]), unreadable


# ------------------------------------------------------------ decode and crop


def full_detail_side(size: int, views: tuple[ViewRecipe, ...]) -> int:
    """The shorter image side at which the smallest possible crop still spans ``size`` pixels: decoding
    at least this much loses nothing, so JPEGs larger than it may be decoded at reduced scale."""
    shrink = min(math.sqrt(v.crop_scale[0] * min(v.crop_ratio[0], 1 / v.crop_ratio[1])) for v in views)
    return math.ceil(size / shrink)


def decode_image(data: bytes, min_side: int) -> Image.Image:
    """Bytes -> an RGB PIL image; JPEGs at the smallest DCT scale that keeps both sides >= ``min_side``."""
    img = Image.open(io.BytesIO(data))  # no ``with``: closing would discard the decoded pixels
    img.draft("RGB", (min_side, min_side))  # a no-op for other formats and for small JPEGs
    img.load()
    return img if img.mode == "RGB" else Image.fromarray(_to_rgb(img))


def sample_generator(seed: int, step: int, row: int) -> torch.Generator:
    """A CPU generator for one sample's crop boxes, from (seed, step, row of the global batch): the same
    in whichever worker and process the sample is cut."""
    state = np.random.SeedSequence([seed % 2**64, step, row]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def crop_pair(image: Image.Image, views: tuple[ViewRecipe, ViewRecipe], size: int,
              generator: torch.Generator) -> torch.Tensor:
    """Both views' RandomResizedCrop of one image -> uint8 [2, 3, size, size].

    Boxes as torchvision's RandomResizedCrop (``sample_crop_boxes``); PIL's box resize crops and scales
    in one antialiased pass, as torchvision does for PIL images.
    """
    width, height = image.size
    crops = []
    for view in views:
        box = sample_crop_boxes(1, height, width, view.crop_scale, view.crop_ratio, generator, "cpu")
        top, left, h, w = box[0].tolist()
        crop = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        crops.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
    return torch.stack(crops)
