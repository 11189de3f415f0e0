"""Two views per step from image files decoded by loader workers (``data.loader: stream``).

For datasets that do not fit in memory decoded (ImageNet at 224 px is ~190 GB as uint8). Each step, a
torch DataLoader's worker processes decode the step's files (JPEGs with torchvision's libjpeg-turbo op, or
with PIL at 1/2, 1/4 or 1/8 scale via ``Image.draft`` when much larger than needed; other formats with PIL)
and cut both views' RandomResizedCrop at the decoded resolution, so small crops keep their detail. The
uint8 crops, channels last, are collated, pinned, copied to the device, transposed there, and the flip and
colour ops run there batched (``TwoViewAugment.photometric``).

Determinism matches ``InMemoryViews``: the same per-epoch order from (seed, epoch), the same sharding of
a global batch over processes, crop boxes from a generator seeded by (seed, step, global row) and the
device stage from (seed, step). A step's views do not depend on the number of workers or processes, and
a resumed run sees the batches an uninterrupted run would have.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import signal
import threading
import weakref
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..seeds import derived_generator
from .augment import (TwoViewAugment, ViewRecipe, crop_box_uniforms, crop_boxes_from_uniforms,
                      sample_crop_boxes)
from .decode import decode_error, decode_pixels
from ..errors import DataError, UnreadableImageError
from .files import SKIP_HINT, FileListDataset, list_labelled_files
from ..train.signals import STOP_SIGNALS
from .views import BatchSharding, to_channels_last

log = logging.getLogger("slimssl")

MAX_REPLACEMENT_TRIES = 100  # unreadable files in a row before a skipped file counts as a broken dataset
SampleKey = tuple[int, int, int]  # (file index, step, row in the global batch)
_OPEN: weakref.WeakSet = weakref.WeakSet()  # live sources, whose workers must be joined at exit


class StreamingViews:
    """The ``InMemoryViews`` interface over an ImageFolder folder or .zip that is never held decoded."""

    def __init__(self, source: str, augment: TwoViewAugment, *, global_batch: int, rank: int, world: int,
                 seed: int, device: torch.device, workers: int, skip_unreadable: bool = False,
                 channels_last: bool = False, split: str = "train"):
        self.augment, self.seed, self.device, self.workers = augment, seed, device, workers
        self.channels_last = channels_last and device.type == "cuda"
        files = list_labelled_files(source, split)  # labels are not needed to pretrain
        if len(files.paths) < global_batch:
            raise DataError(f"dataset {source!r} has {len(files.paths)} images, fewer than train.batch_size "
                            f"{global_batch}")
        self.sharding = BatchSharding(len(files.paths), global_batch, rank, world, seed)  # the in-memory source's rule
        self.steps_per_epoch = self.sharding.steps_per_epoch
        self.files = CropDataset(files.root, files.paths, augment.views, augment.size, seed, skip_unreadable,
                                 files.read, files.members)
        self.unreadable: dict[str, str] = {}  # path -> error, of the files replaced so far (skip_unreadable)
        self._plan = StepBatches(self.batch_indices, first_row=self.sharding.first_row)
        self._loader: DataLoader | None = None
        self._batches = None
        self._next_step: int | None = None
        _OPEN.add(self)

    def batch_indices(self, step: int) -> torch.Tensor:
        return self.sharding.indices(step)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # uint8 [B, 2, r, r, 3] -> [B, 2, 3, r, r]: the transpose costs a worker ~0.3 ms an image, the GPU nothing
        crops = self._crops(step).to(self.device, non_blocking=True).permute(0, 1, 4, 2, 3).contiguous()
        views = self.augment.photometric(crops[:, 0], crops[:, 1], self.sharding.rows(step, self.device))
        return to_channels_last(views) if self.channels_last else views

    def close(self) -> None:
        """Stop the loader workers; a later call starts them again."""
        stop_workers(getattr(self, "_batches", None))
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
        if crops is None:  # data.skip_unreadable, but a sample found no readable file to take its place
            self.close()
            tries = min(MAX_REPLACEMENT_TRIES, len(self.files))
            raise DataError(f"{self.files.root}: no readable image among {tries} files in a row from "
                            f"{unreadable[0][0]}; is the dataset intact?")
        return crops

    def _restart(self, step: int) -> None:
        self._plan.start = step
        if self._loader is None:
            self._loader = self._build_loader()
        # persistent workers: iter() restarts the sampler at ``step`` and discards what was prefetched
        with stop_signals_blocked():  # the first iter() starts the workers
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
                raise UnreadableImageError(f"cannot decode {path} ({error}); to replace unreadable files by other "
                                           f"images set data.skip_unreadable: true ({SKIP_HINT})")
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


def stop_workers(batches) -> None:
    """Join the workers of a DataLoader's iterator now, not at garbage collection. A worker that dies as it is
    stopped loses nothing, since its batches were all taken or are not wanted: it is said, not raised (one
    started by spawn, macOS' and Windows' default, may abort as it exits, or when stopped while it was starting:
    about once in 70 stops on torch 2.4 and 2.11; torch's SIGCHLD handler raises that in the parent)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:  # no workers (num_workers 0), or none started
        return
    try:
        shutdown()
    except RuntimeError as e:
        if not str(e).startswith("DataLoader worker"):
            raise
        log.warning("%s, as the loader was stopping it: nothing is lost", str(e).rstrip(". "))


def ignore_stop_signals(worker_id: int) -> None:
    """Workers outlive a stop signal sent to the whole process group (Ctrl-C, a cluster's preemption or its
    notice), so the training process can finish its step and save; they still exit with it (DataLoader watches
    it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # see stop_signals_blocked: a signal held back so far is dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold the stop signals back while loader workers start, then deliver them to this process.

    A worker inherits the mask (fork, or spawn's fork and exec), so a stop signal that arrives before its
    ``ignore_stop_signals`` ran waits instead of killing it, and is then dropped. The mask holds back this thread
    only, and Ctrl-C goes to any thread that does not block it (tqdm's monitor, TensorBoard's writer, the caller's
    own): its handler, which Python runs in the main thread wherever that is, would raise KeyboardInterrupt inside
    the loader's set-up, with workers started and no iterator to stop them. So the handlers wait too."""
    held: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
        for sig in STOP_SIGNALS:
            handlers[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one held back by the mask arrives now, and is held
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):  # each once, to the handler that was there (after the block's work)
            signal.raise_signal(signum)


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


# ------------------------------------------------------------ what a worker does


class CropDataset(FileListDataset):
    """Sample key -> (step, uint8 [2, size, size, 3] crops or None, unreadable files met)."""

    def __init__(self, root: str, paths: list[str], views: tuple[ViewRecipe, ViewRecipe], size: int, seed: int,
                 skip_unreadable: bool, read: Callable[[str], bytes] | None = None,
                 members: np.ndarray | None = None):
        super().__init__(root, paths, read, members)
        self.views, self.size, self.seed, self.skip_unreadable = views, size, seed, skip_unreadable
        self.min_side = full_detail_side(size, views)

    def __getitem__(self, key: SampleKey) -> tuple[int, torch.Tensor | None, list[tuple[str, str]]]:
        index, step, row = key
        unreadable = []
        for offset in range(min(MAX_REPLACEMENT_TRIES, len(self.paths))):
            at = (index + offset) % len(self.paths)
            try:
                image = decode_pixels(self.read_at(at), self.min_side)
            except Exception as exc:  # any decoder failure means "unreadable file"
                unreadable.append((self.path(at), decode_error(exc)))
                if not self.skip_unreadable:
                    return step, None, unreadable
                continue  # deterministic replacement: the next file in listing order
            return step, crop_pair(image, self.views, self.size, sample_generator(self.seed, step, row)), unreadable
        return step, None, unreadable  # no readable file among the tries: the training process says so


def collate_crops(samples: list) -> tuple[int, torch.Tensor | None, list[tuple[str, str]]]:
    """One step's samples -> (step, uint8 [B, 2, r, r, 3] or None when a file failed, unreadable files)."""
    unreadable = [u for _, _, found in samples for u in found]
    if any(crops is None for _, crops, _ in samples):
        return samples[0][0], None, unreadable
    return samples[0][0], torch.stack([crops for _, crops, _ in samples]), unreadable


# ---------------------------------------------------------------- crop


def full_detail_side(size: int, views: tuple[ViewRecipe, ...]) -> int:
    """The shorter image side at which the smallest possible crop still spans ``size`` pixels: decoding
    at least this much loses nothing, so JPEGs larger than it may be decoded at reduced scale."""
    shrink = min(math.sqrt(v.crop_scale[0] * min(v.crop_ratio[0], 1 / v.crop_ratio[1])) for v in views)
    return math.ceil(size / shrink)


def sample_generator(seed: int, step: int, row: int) -> torch.Generator:
    """A CPU generator for one sample's crop boxes, from (seed, step, row of the global batch): the same
    in whichever worker and process the sample is cut."""
    return derived_generator(seed, "sample_crop", step, row)


def crop_pair(image: torch.Tensor, views: tuple[ViewRecipe, ViewRecipe], size: int,
              generator: torch.Generator) -> torch.Tensor:
    """Both views' RandomResizedCrop of uint8 [3, H, W] -> uint8 [2, size, size, 3] (channels last: the
    device transposes the collated batch, where that is free)."""
    height, width = image.shape[-2:]
    return torch.stack([resized_crop(image, box, size, view.interpolation)
                        for view, box in zip(views, view_boxes(height, width, views, generator))])


def view_boxes(height: int, width: int, views: tuple[ViewRecipe, ...],
               generator: torch.Generator) -> list[tuple[int, int, int, int]]:
    """Each view's (top, left, h, w): ``sample_crop_boxes(1, ...)`` for one view after the other from
    ``generator``, and the same boxes. Views with the same crop parameters share one pass over their
    draws, which halves the small tensor ops that dominate this cost."""
    first = views[0]
    if all((v.crop_scale, v.crop_ratio) == (first.crop_scale, first.crop_ratio) for v in views):
        draws = torch.cat([crop_box_uniforms(1, generator, "cpu") for _ in views], dim=1)  # [4, views, tries]
        boxes = crop_boxes_from_uniforms(draws, height, width, first.crop_scale, first.crop_ratio)
    else:
        boxes = torch.cat([sample_crop_boxes(1, height, width, v.crop_scale, v.crop_ratio, generator, "cpu")
                           for v in views])
    return [(int(top), int(left), int(h), int(w)) for top, left, h, w in boxes.tolist()]


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int,
                 interpolation: str = "bilinear") -> torch.Tensor:
    """The box of uint8 [3, H, W], resized to uint8 [size, size, 3]: cropped, then antialiased bilinear (or
    bicubic), as torchvision's RandomResizedCrop on tensors (bilinear: within 2 levels of PIL's resize of the
    crop)."""
    top, left, h, w = box
    # contiguous channels-last uint8 is what torch's vectorised antialiased kernel reads (~2.5x PIL's speed)
    patch = image[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(patch, size=(size, size), mode=interpolation, align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0)
