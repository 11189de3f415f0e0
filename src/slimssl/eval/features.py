"""Backbone features of a dataset for one sub-network (eval mode, no augmentation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.augment import eval_transform
from ..data.eval_images import EvalImages, as_eval_images


@torch.no_grad()
def extract_features(supernet, subnet, images: EvalImages | torch.Tensor, *, resolution: int, mean, std,
                     batch_size: int = 256, device: torch.device | str = "cpu", normalize: bool = False) -> torch.Tensor:
    """Pooled features of ``subnet`` for ``images`` (a dataset, in memory or streamed, or a uint8 tensor
    [N,3,H,W]), in order; returned on ``device`` as float32."""
    was_training = supernet.training
    supernet.eval()
    out = []
    try:
        with supernet.subnet(subnet):
            for batch in as_eval_images(images).batches(batch_size):
                x = eval_transform(batch.to(device, non_blocking=True), resolution, mean, std)
                out.append(supernet(x).float())
    finally:
        supernet.train(was_training)
    if not out:
        raise ValueError("cannot extract features of an empty dataset")
    feats = torch.cat(out)
    return F.normalize(feats, dim=1) if normalize else feats
