"""Semi-supervised fine-tuning of one exported sub-network on a class-balanced labelled subset.

Protocol (fixed, so that numbers compare across runs): the sub-network is exported as a plain ResNet
(``supernet.export``), gets a linear classifier, and every weight is fine-tuned on a class-balanced 1% or 10%
subset of the train split (drawn from a fixed seed; the indices are saved with the results); top-1/top-5 on the full test split.

Recipes (after SimCLR's semi-supervised protocol, scaled down for small data): SGD with Nesterov
momentum 0.9, no weight decay, lr 0.05 x batch/256 with a per-step cosine schedule, batch 256 (or the
whole subset when smaller), a random crop (``crop``: ``pad``, CIFAR's padding of size/8, or ImageNet's
RandomResizedCrop, ``resized`` of the evaluation image or ``whole`` of the whole picture; see ``eval/linear.py``)
+ horizontal flip, BatchNorm in train mode.

* ``label_fraction <= 0.05`` (the 1% recipe): 60 epochs;
* larger fractions (the 10% recipe): 30 epochs;
* at least 100 optimiser steps either way, since a 1% subset of a small dataset is one batch per epoch
  (a default only: epochs given explicitly are run as given).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Generator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ..data.eval_images import EvalImages, as_eval_images
from ..nn.modes import eval_mode
from ..devices import to_device_async
from ..errors import DataError, UsageError
from . import (FEW_LABELS, FINETUNE_BATCH_SIZE, FINETUNE_EPOCHS, FINETUNE_EPOCHS_FEW_LABELS, FINETUNE_LR,
               FINETUNE_MIN_STEPS, check_train_crop)
from .supervised import (augment_batch, check_crop_source, cosine_schedule, output_classes, require_labels,
                         topk_accuracy, training_images)
from .recalibrate import subnet_models

log = logging.getLogger("slimssl")


@dataclass(frozen=True)
class FinetuneRecipe:
    epochs: int
    lr: float = FINETUNE_LR   # at batch FINETUNE_BATCH_SIZE; scaled linearly with the actual batch
    batch_size: int = FINETUNE_BATCH_SIZE
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    crop: str = "pad"         # the training crop: pad (CIFAR), resized or whole (ImageNet), see augment_batch
    min_steps: int = FINETUNE_MIN_STEPS


def default_recipe(label_fraction: float) -> FinetuneRecipe:
    """The 1% recipe for fractions up to 5%, the 10% recipe above (see the module docstring)."""
    return FinetuneRecipe(FINETUNE_EPOCHS_FEW_LABELS if label_fraction <= FEW_LABELS else FINETUNE_EPOCHS)


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-balanced subset: ``round(fraction * N / C)`` examples of every class (at
    least 1, at most the smallest class), drawn from ``seed`` (the same seed gives the same subset)."""
    if not 0.0 < float(fraction) <= 1.0:
        raise UsageError(f"label fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels).long().cpu()
    if labels.numel() == 0:
        raise DataError("cannot draw a labelled subset from an empty dataset")
    classes = torch.unique(labels)
    smallest = min(int((labels == c).sum()) for c in classes)
    per_class = max(1, round(float(fraction) * len(labels) / len(classes)))
    if round(float(fraction) * len(labels) / len(classes)) < 1:  # the subset is larger than the fraction asked
        log.warning("label fraction %g of %d images in %d classes is less than one image per class: one of each "
                    "class is used (%d images, %.3g of the split)", fraction, len(labels), len(classes),
                    len(classes), len(classes) / len(labels))
    if per_class > smallest:  # every class gets as many as the smallest has: fewer labels than asked
        log.warning("label fraction %g asks for %d examples per class; the smallest class has %d, so %d of each "
                    "class are used (%d images, %.3g of the split)", fraction, per_class, smallest, smallest,
                    smallest * len(classes), smallest * len(classes) / len(labels))
        per_class = smallest
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in classes.tolist():
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


@torch.no_grad()
def evaluate_classifier(model: nn.Module, images: EvalImages | torch.Tensor, labels: torch.Tensor, *,
                        resolution: int, mean, std, batch_size: int = 256, device="cpu") -> tuple[float, float]:
    """Top-1/top-5 (percent) of a classifier on ``images`` (a dataset, in memory or streamed, or a uint8
    tensor), eval mode, no augmentation."""
    logits = []
    with eval_mode(model):
        for batch in as_eval_images(images).batches(batch_size):
            x = eval_transform(batch.to(device), resolution, mean, std)
            logits.append(model(x).float())
    top1, top5 = topk_accuracy(torch.cat(logits), labels)
    return top1, top5


def finetune_subnet(supernet, subnet, train, test, *, label_fraction: float, seed: int = 0,
                    epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
                    resolution: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu",
                    recalibrate_batches: int | None = None, eval_batch_size: int = 256,
                    min_steps: int | None = None, train_crop: str | None = None,
                    save_model: str | Path | None = None, checkpoint_source: str | None = None,
                    crop_ratio: float | None = None, indices: torch.Tensor | None = None,
                    subset_file: dict | None = None) -> dict:
    """Fine-tune the exported ``subnet`` on a balanced ``label_fraction`` of ``train``, or on the images at
    ``indices`` (a subset given, ``label_fraction`` their share of the split; ``subset_file``: what the result
    records of the file that listed them); evaluate on ``test``.

    ``train`` and ``test`` are labelled datasets, in memory or streamed (``data/eval_images.py``); of a streamed
    train split only the labelled subset is decoded, and held in memory while training.
    Returns a dict with the settings, ``top1``/``top5`` (percent) and ``indices`` (the labelled subset).
    ``save_model``: a folder to write the fine-tuned classifier to, as an export (``slimssl.load_exported``),
    whose config.json records ``checkpoint_source`` (the checkpoint's path) as an export's ``source``, and the
    images' preprocessing as an export's: ``resolution``, ``mean``, ``std`` and, when given, ``crop_ratio``
    (what ``train`` and ``test`` were decoded at).
    The supernet is not modified (the export is a copy; shared BatchNorm is recalibrated on a copy).
    """
    require_labels("fine-tuning", train, test)
    device = torch.device(device)
    spec = supernet.resolve(subnet)
    resolution = resolution or train.resolution
    recipe = _recipe(label_fraction, epochs=epochs, lr=lr, batch_size=batch_size, min_steps=min_steps,
                     crop=train_crop)
    check_crop_source(recipe.crop, train)
    if indices is None:
        indices = balanced_subset(train.labels, label_fraction, seed)
    if len(indices) < 2:  # BatchNorm trains on batches of two images or more
        given = ("the subset file lists 1 image" if subset_file else
                 f"label fraction {label_fraction:g} of the {len(train.labels)} train images gives 1 labelled image")
        raise UsageError(f"{given}; fine-tuning needs 2 at least: "
                         + ("list more images" if subset_file else "raise the label fraction"))

    source = subnet_models(supernet, [spec], train, recalibrate_batches=recalibrate_batches,
                           batch_size=eval_batch_size, resolution=resolution, mean=mean, std=std,
                           device=device, seed=seed)[spec.name]
    gen = torch.Generator().manual_seed(seed)  # the classifier's initialisation, the batches' order, the crops
    model = _classifier(source.export(spec), output_classes(train, test), gen).to(device)
    log.info("fine-tuning %s on %d labelled images (%g of the train split, seed %d)", spec.name, len(indices),
             label_fraction, seed)
    schedule = _fine_tune(model, train, indices, recipe, resolution=resolution, mean=mean, std=std,
                          generator=gen, device=device)

    top1, top5 = evaluate_classifier(model, test, test.labels, resolution=resolution, mean=mean, std=std,
                                     batch_size=eval_batch_size, device=device)
    n = len(indices)
    result = {"subnet": spec.name, "label_fraction": float(label_fraction), "seed": int(seed),
              "num_labelled": n, "per_class": n // max(1, len(torch.unique(train.labels[indices]))),
              "recipe": {**asdict(recipe), **schedule}, "top1": top1, "top5": top5,
              **({"subset_file": subset_file} if subset_file else {})}
    if save_model is not None:
        from ..export.files import classifier_metadata, save_exported

        save_exported(model, save_model, {**result, **classifier_metadata(train, supernet, checkpoint_source,
                                                                          resolution, mean, std, crop_ratio)})
        log.info("saved the fine-tuned %s to %s", spec.name, save_model)
    return {**result, "indices": indices.tolist()}


def _recipe(label_fraction: float, **given) -> FinetuneRecipe:
    """The default recipe of ``label_fraction`` with the settings ``given`` (those not None), checked."""
    if given["epochs"] is not None and given["min_steps"] is None:
        given["min_steps"] = 1  # epochs asked for are run as asked: the floor of 100 steps belongs to the default
    recipe = replace(default_recipe(label_fraction), **{k: v for k, v in given.items() if v is not None})
    check_train_crop(recipe.crop, default_allowed=False)
    if recipe.epochs < 1 or recipe.batch_size < 1 or recipe.lr <= 0:
        raise UsageError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {recipe}")
    return recipe


def _classifier(backbone: nn.Module, num_classes: int, generator: torch.Generator) -> nn.Module:
    """The exported backbone with a new linear classifier: N(0, 0.01) weights, zero bias."""
    backbone.fc = nn.Linear(backbone.feature_dim, num_classes)  # its config's num_classes follows
    nn.init.normal_(backbone.fc.weight, std=0.01, generator=generator)
    nn.init.zeros_(backbone.fc.bias)
    return backbone


def _fine_tune(model: nn.Module, train: EvalImages, indices: torch.Tensor, recipe: FinetuneRecipe, *,
               resolution: int, mean, std, generator: torch.Generator, device: torch.device) -> dict:
    """Train every weight of ``model`` on the train images at ``indices`` with ``recipe``; returns the schedule it
    ran (steps, batch, base_lr)."""
    n = len(indices)
    batch = min(recipe.batch_size, n)
    steps_per_epoch = max(1, n // batch)  # drop the last partial batch: BatchNorm sees full batches
    total = max(recipe.epochs * steps_per_epoch, recipe.min_steps)
    base_lr = recipe.lr * batch / FINETUNE_BATCH_SIZE  # the batch recipe.lr is given at
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    schedule = cosine_schedule(optimizer, total)
    log.info("fine-tuning: %d step%s of batch %d, lr %g", total, "" if total == 1 else "s", batch, base_lr)
    labels = train.labels[indices].to(device)
    model.train()
    steps = _labelled_batches(train, indices, batch, total, recipe.crop, generator)
    for step, (idx, images) in enumerate(steps):
        x = augment_batch(to_device_async(images, device), resolution, mean, std, generator, recipe.crop)
        loss = F.cross_entropy(model(x), labels[to_device_async(idx, device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step == 0 or (step + 1) % max(1, total // 5) == 0:
            log.info("fine-tune step %d/%d: loss %.4f", step + 1, total, loss.item())
    return {"steps": total, "batch": batch, "base_lr": base_lr}


def _labelled_batches(train: EvalImages, indices: torch.Tensor, batch: int, total: int, crop: str,
                      generator: torch.Generator) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """(positions in ``indices``, their uint8 images) of each of the ``total`` steps: batches of a new order of
    the subset every epoch, the last partial one dropped. The subset is decoded once and held in memory, or
    (``crop`` ``whole``) cropped from its whole pictures at every step by the split's loader."""
    def positions() -> Generator[torch.Tensor, None, None]:
        perm, cursor = torch.randperm(len(indices), generator=generator), 0
        for _ in range(total):
            if cursor + batch > len(indices):
                perm, cursor = torch.randperm(len(indices), generator=generator), 0
            yield perm[cursor:cursor + batch]
            cursor += batch

    if crop != "whole":
        images = train.take(indices)  # the subset only is decoded
        yield from ((idx, images[idx]) for idx in positions())  # drawn step by step, between the crops' draws
        return
    steps = list(positions())
    crops = training_images(train, batch, indices[torch.cat(steps)], crop, generator)
    with contextlib.closing(crops):  # closing: stop the loader workers
        yield from zip(steps, crops)


def fraction_tag(label_fraction: float) -> str:
    """A label fraction in names and results.json keys: 0.01 -> ``1pct``, 0.1 -> ``10pct``, 0.005 -> ``0p5pct``."""
    pct = f"{float(label_fraction) * 100:.4f}".rstrip("0").rstrip(".").replace(".", "p")
    return f"{pct}pct"
