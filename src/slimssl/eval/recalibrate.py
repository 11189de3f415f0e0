"""Evaluating sub-networks of a shared-BatchNorm supernet: the shared running statistics belong to no width in
particular, so each sub-network is evaluated on a copy whose statistics were re-estimated for it on a fixed
sample of train batches (a private-BatchNorm supernet has every menu entry's statistics and is used as is)."""

from __future__ import annotations

import copy
import logging
from typing import Iterator, Sequence

import torch
from torch import nn

from ..data.augment import eval_transform
from ..data.eval_images import EvalImages, as_eval_images
from ..nn.layers import recalibrate_bn
from ..nn.spec import SubnetSpec
from . import recalibration_batches

log = logging.getLogger("slimssl")


def calibration_order(num_images: int, num_batches: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """The indices of the fixed random sample that recalibration reads, batch after batch."""
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return perm[:num_batches * batch_size]


def calibration_batches(images: EvalImages | torch.Tensor, num_batches: int, batch_size: int, resolution: int,
                        mean, std, device, seed: int = 0) -> Iterator[torch.Tensor]:
    """``num_batches`` eval-transformed batches of a fixed random sample of ``images`` (a dataset, in memory
    or streamed, or a uint8 tensor)."""
    images = as_eval_images(images)
    for batch in images.batches(batch_size, calibration_order(len(images), num_batches, batch_size, seed)):
        yield eval_transform(batch.to(device), resolution, mean, std)


def subnet_models(supernet, specs: Sequence[SubnetSpec], train_images: EvalImages | torch.Tensor, *,
                  recalibrate_batches: int | None, batch_size: int, resolution: int, mean, std,
                  device="cpu", seed: int = 0) -> dict[str, nn.Module]:
    """The model to evaluate each sub-network with: the supernet itself, or (recalibrating) a copy whose
    BatchNorm statistics were re-estimated for that sub-network on ``recalibrate_batches`` train batches
    (``train_images``: the train split, in memory or streamed, or a uint8 tensor)."""
    n = recalibration_batches(recalibrate_batches, supernet.slim_state.private_bn)
    if n == 0:
        return {spec.name: supernet for spec in specs}
    train_images = as_eval_images(train_images)
    # The sample is decoded once for all sub-networks; its batches are those calibration_batches reads.
    sample = as_eval_images(train_images.take(calibration_order(len(train_images), n, batch_size, seed)))
    models = {}
    for spec in specs:
        model = copy.deepcopy(supernet)
        recalibrate_bn(model, spec, (eval_transform(batch.to(device), resolution, mean, std)
                                     for batch in sample.batches(batch_size)))
        models[spec.name] = model.eval()
        log.info("recalibrated BatchNorm of %s on %d batches", spec.name, n)
    return models
