"""Backbone features of a dataset for sub-networks (eval mode, no augmentation)."""

from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import torch
from torch import nn

from ..data.augment import eval_transform
from ..data.eval_images import EvalImages, as_eval_images
from ..nn.modes import eval_mode
from ..errors import DataError
from ..nn.spec import SubnetSpec

log = logging.getLogger("slimssl")

PROGRESS_SECONDS = 60.0  # a pass over ImageNet takes minutes: a line each minute says how far it is


@torch.no_grad()
def extract_subnet_features(models: Mapping[str, nn.Module] | nn.Module, specs: Sequence[SubnetSpec],
                            images: EvalImages | torch.Tensor, *, resolution: int, mean, std, batch_size: int = 256,
                            device: torch.device | str = "cpu", indices: torch.Tensor | None = None,
                            store: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Pooled features of every sub-network in ``specs`` for ``images`` (a dataset, in memory or streamed, or
    a uint8 tensor [N,3,H,W]), in order, as float32 on ``store`` (default: ``device``, where they are computed),
    keyed by the sub-network's name; of the images at ``indices`` alone, in that order, when given.

    One pass over the images serves every sub-network, so a streamed split is decoded once, not once per
    sub-network. ``models`` is the supernet, or the model that evaluates each sub-network by name (e.g.
    BatchNorm-recalibrated copies)."""
    by_name = models if isinstance(models, Mapping) else {spec.name: models for spec in specs}
    distinct = {id(m): m for m in by_name.values()}
    images = as_eval_images(images)
    # written into one tensor per sub-network, not concatenated from batches: at ImageNet scale (1.28M x 2048
    # floats, 10 GB each) a concatenation would need twice the memory at its end
    out: dict[str, torch.Tensor] = {}
    store = device if store is None else store
    done, size = 0, len(images) if indices is None else len(indices)
    said = time.monotonic()
    with eval_mode(*distinct.values()):
        for batch in images.batches(batch_size, indices):
            x = eval_transform(batch.to(device, non_blocking=True), resolution, mean, std)
            for spec in specs:
                features = by_name[spec.name](x, subnet=spec).float()
                if spec.name not in out:
                    out[spec.name] = features.new_empty((size, features.shape[1]), device=store)
                out[spec.name][done:done + len(features)] = features  # (to host memory: a copy waited for)
            done += len(x)
            if time.monotonic() - said >= PROGRESS_SECONDS and done < size:
                said = time.monotonic()
                split = getattr(images, "split", None)
                log.info("features%s: %s of %s images (%d%%)", f" of the {split} split" if split else "",
                         f"{done:,}", f"{size:,}", 100 * done // size)
    if done == 0:
        raise DataError("cannot extract features of an empty dataset")
    return {spec.name: out[spec.name][:done] for spec in specs}
