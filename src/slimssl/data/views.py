"""Where a training step's two augmented views come from.

A view source is called with the step number and returns this process's two views, already on the
training device. It is a pure function of (seed, step): a resumed run sees exactly the batches the
uninterrupted run would have seen, and every process of a distributed run takes its own rows of one
global batch.

``InMemoryViews`` holds the decoded uint8 images (on the GPU when they fit, otherwise in host memory, each
batch copied through pinned memory) and augments each batch with the batched tensor ops of ``augment.py``,
so no image is decoded or augmented on the CPU during training. ``StreamingViews`` (``stream.py``,
``data.loader: stream``) is for datasets that do not fit: loader workers decode and crop, the colour stage
runs batched on the device.
Both follow the same batch order and the same per-step device generator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from ..devices import to_device_async
from ..launch import processes_on_this_machine, usable_cpus
from ..seeds import derived_generator
from .augment import BatchRows, TwoViewAugment, recipe

if TYPE_CHECKING:
    from ..config import Config
    from .datasets import ImageDataset


class ViewSource(Protocol):
    """What the Trainer needs from a source of views (``InMemoryViews``, ``StreamingViews``)."""

    steps_per_epoch: int
    sharding: BatchSharding  # which images each process takes at each step

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def batch_indices(self, step: int) -> torch.Tensor: ...

    def close(self) -> None: ...


GPU_SHARE = 0.25  # keep the decoded images on the GPU when they take at most this share of its free memory


class BatchSharding:
    """Which samples a process takes at each step, and their random rows, the same for every view source.

    Each epoch is a permutation from (seed, epoch), cut into global batches; a process takes its rank's
    slice. A step's augmentation is seeded by (seed, step) only and drawn for the whole global batch, of which
    a process keeps its rows: a sample gets the same views whatever the number of processes.
    """

    def __init__(self, num_images: int, global_batch: int, rank: int, world: int, seed: int,
                 index_device: torch.device | str = "cpu"):
        self.num_images, self.global_batch, self.seed = num_images, global_batch, seed
        self.batch = global_batch // world
        self.first_row = rank * self.batch  # this process's first row in the global batch
        self.steps_per_epoch = num_images // global_batch
        self.index_device = index_device  # where the indices are used (the images' device)
        self._perm_epoch, self._perm = None, None

    def indices(self, step: int) -> torch.Tensor:
        """This process's sample indices at ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:  # one permutation per epoch, moved once to where it is used
            perm = epoch_permutation(self.seed, epoch, self.num_images)
            self._perm, self._perm_epoch = to_device_async(perm, torch.device(self.index_device)), epoch
        start = i * self.global_batch + self.first_row
        return self._perm[start:start + self.batch]

    def rows(self, step: int, device: torch.device) -> BatchRows:
        """The random draws of ``step``'s augmentation for this process's rows, generated on ``device``."""
        return BatchRows(step_generator(self.seed, step, device), self.first_row, self.global_batch)


class InMemoryViews:
    """Views from images decoded once into a uint8 tensor [N, 3, H, W], augmented batched on the device."""

    def __init__(self, images: torch.Tensor, augment: TwoViewAugment, *, global_batch: int, rank: int,
                 world: int, seed: int, device: torch.device, channels_last: bool = False):
        self.augment, self.device = augment, device
        self.channels_last = channels_last and device.type == "cuda"
        self.images = place_images(images, device)
        self.sharding = BatchSharding(len(images), global_batch, rank, world, seed, self.images.device)
        self.steps_per_epoch = self.sharding.steps_per_epoch

    def batch_indices(self, step: int) -> torch.Tensor:
        return self.sharding.indices(step)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = to_device_async(self.images[self.sharding.indices(step)], self.device)
        views = self.augment(images, self.sharding.rows(step, self.device))
        return to_channels_last(views) if self.channels_last else views

    def close(self) -> None:
        """Nothing to release (the streaming source's workers need this)."""


def two_view_augment(cfg: Config) -> TwoViewAugment:
    """The run's augmentation: the recipe of ``data.augment`` (default: the method's), with ``data.crop_scale``,
    ``data.flip_p``, ``data.blur`` and ``data.views`` in place of the recipe's when set, and the crops resized
    as ``data.crop_interpolation`` says."""
    views = recipe(cfg.view_recipe(), cfg.data.resolution, cfg.data.crop_scale, cfg.data.flip_p, cfg.data.blur,
                   [change.model_dump(exclude_none=True) for change in cfg.data.views], cfg.data.crop_interpolation)
    return TwoViewAugment(views, cfg.data.resolution, cfg.data.mean, cfg.data.std)


def build_view_source(cfg: Config, augment: TwoViewAugment, train_data: ImageDataset | None, *, rank: int,
                      world: int, device: torch.device) -> ViewSource:
    """The view source ``data.loader`` asks for: ``memory`` augments ``train_data`` (decoded by the caller),
    ``stream`` reads ``data.source`` (an ImageFolder folder or .zip) with ``data.workers`` loader workers."""
    common = dict(global_batch=cfg.train.batch_size, rank=rank, world=world, seed=cfg.train.seed, device=device,
                  channels_last=cfg.train.channels_last)
    if cfg.data.loader == "stream":
        from .stream import StreamingViews  # late: stream.py imports this module's helpers

        workers = default_workers() if cfg.data.workers is None else cfg.data.workers
        return StreamingViews(cfg.data.source, augment, workers=workers, skip_unreadable=cfg.data.skip_unreadable,
                              **common)
    return InMemoryViews(train_data.images, augment, **common)


def epoch_permutation(seed: int, epoch: int, num_images: int) -> torch.Tensor:
    """The order of the images in ``epoch`` (CPU int64): the same for every process and every source."""
    return torch.randperm(num_images, generator=derived_generator(seed, "epoch_order", epoch))


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of a step's on-device augmentation, from (seed, step) only."""
    return derived_generator(seed, "step_views", step, device=device)


def to_channels_last(views: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(v.contiguous(memory_format=torch.channels_last) for v in views)


def place_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The decoded uint8 images on the GPU when they fit comfortably, so batches never cross PCIe;
    otherwise they stay in host memory, and each batch is gathered there and copied through pinned memory
    (a batch gathered from a pinned tensor is not pinned itself, so pinning the whole set would not help)."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    return images.to(device) if images.numel() < GPU_SHARE * free else images


def default_workers() -> int:
    """Loader workers when ``data.workers`` is unset: the CPUs this process may use, shared by the training
    processes of this machine (torchrun's ``LOCAL_WORLD_SIZE``), at most 8 and at least 1 (not saved in the run's
    config, so a run resumed on another machine uses that machine's). Eight processes on a 16-core node get 2
    each, not 8: 64 workers would fight over the cores that decode."""
    return max(1, min(8, usable_cpus() // processes_on_this_machine()))
