"""What the linear probe and fine-tuning share when they train on labels: the training crops, the learning-rate
schedule, the number of outputs and the top-k accuracy."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..data.augment import ViewRecipe, eval_transform, geometric_view, normalize
from ..devices import to_device_async
from ..errors import DataError, UsageError
from . import check_train_crop


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Batched random crop of the original size from the zero-padded image, and a horizontal flip with
    probability 1/2 (the CIFAR recipe). ``x`` is float [B, C, H, W]; draws come from a CPU ``generator``."""
    b, c, h, w = x.shape
    tops = to_device_async(torch.randint(0, 2 * padding + 1, (b,), generator=generator), x.device)
    lefts = to_device_async(torch.randint(0, 2 * padding + 1, (b,), generator=generator), x.device)
    flips = to_device_async(torch.rand(b, generator=generator) < 0.5, x.device)
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
    rows = tops[:, None] + torch.arange(h, device=x.device)       # [B, H]
    cols = lefts[:, None] + torch.arange(w, device=x.device)      # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return x[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def augment_batch(images: torch.Tensor, resolution: int, mean, std, generator: torch.Generator,
                  crop: str = "pad") -> torch.Tensor:
    """uint8 [B,3,H,W] -> resized, randomly cropped (``crop``: ``pad`` or ``resized``) and flipped, normalised
    float. ``whole``: the images of :func:`training_images`, cropped and flipped already, are only normalised."""
    if crop == "whole":
        return eval_transform(images, resolution, mean, std)
    x = eval_transform(images, resolution, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    if crop == "pad":
        x = random_crop_flip(x, max(1, resolution // 8), generator)
    else:  # "resized": ViewRecipe's defaults, 8-100% of the area, aspect 3/4-4/3, flip 1/2
        check_train_crop(crop, default_allowed=False)
        x = geometric_view(x, ViewRecipe(), resolution, generator)
    return normalize(x, mean, std)


def training_images(train, batch_size: int, order: torch.Tensor, crop: str,
                    generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The uint8 batches of the train images at ``order`` that :func:`augment_batch` crops: the evaluation images,
    or (``crop`` ``whole``) random crops of the whole pictures, cut by the loader with draws from ``generator``
    (a split that keeps them: the callers refuse any other first, with :func:`check_crop_source`)."""
    if crop != "whole":
        return train.batches(batch_size, order)
    return train.random_crops(batch_size, order, seed=int(torch.randint(2**62, (), generator=generator)))


def check_crop_source(crop: str, train) -> None:
    """Refuse the ``whole`` crop of a split that has no whole pictures: one decoded in memory keeps each image's
    centre crop only."""
    if crop == "whole" and not hasattr(train, "random_crops"):
        raise UsageError(whole_needs_stream())


def whole_needs_stream() -> str:
    """Why the ``whole`` crop was refused, in the words of the command line or of Python."""
    from ..wording import on_command_line

    if on_command_line():
        return ("--train-crop whole crops each whole picture, which only a streamed train split keeps: add --loader "
                "stream (a folder or .zip), or take --train-crop resized, which crops the evaluation image (the centre "
                "crop a split decoded in memory keeps)")
    return ("train_crop 'whole' crops each whole picture, which only a streamed train split keeps: pass "
            "loader='stream' (a folder or .zip), or take train_crop='resized', which crops the evaluation image (the "
            "centre crop a split decoded in memory keeps)")


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The evaluations' learning rate: from the optimiser's down to 0 along a cosine, stepped once per step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))


def step_schedule(optimizer: torch.optim.Optimizer, milestones: Sequence[int], steps_per_epoch: int,
                  drop: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The papers' linear probes' learning rate: the optimiser's, times ``drop`` from the first step of each of the
    ``milestones`` epochs on; stepped once per step, as :func:`cosine_schedule`."""
    starts = [m * steps_per_epoch for m in milestones]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: drop ** sum(s >= start for start in starts))


def require_labels(protocol: str, *splits) -> None:
    """Refuse a split without labels (``protocol`` names what needs them), naming the split."""
    for images in splits:
        if images.labels is None:
            split = f"the {images.split} split" if getattr(images, "split", None) else "a split"
            raise DataError(f"{protocol} needs labels; {split} of dataset {images.name!r} has none (a folder "
                            "without class sub-folders, or images registered without labels)")


def output_classes(*datasets) -> int:
    """How many outputs a classifier of these splits needs: their class names, or their largest label."""
    counts = [len(d.classes) for d in datasets if getattr(d, "classes", None)]
    labelled = [int(d.labels.max()) + 1 for d in datasets if d.labels is not None and len(d.labels)]
    return max(counts + labelled)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent (k capped at the number of classes)."""
    labels = labels.to(logits.device)
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, : min(k, logits.shape[1])].any(1).float().mean().item() * 100.0 for k in ks]
