"""Backbone features of a dataset for one sub-network (eval mode, no augmentation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.augment import eval_transform


@torch.no_grad()
def extract_features(supernet, subnet, images: torch.Tensor, *, resolution: int, mean, std,
                     batch_size: int = 256, device: torch.device | str = "cpu", normalize: bool = False) -> torch.Tensor:
    """Pooled features of ``subnet`` for uint8 ``images`` [N,3,H,W]; returned on ``device`` as float32."""
    was_training = supernet.training
    supernet.eval()
    out = []
    try:
        with supernet.subnet(subnet):
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].to(device, non_blocking=True)
                x = eval_transform(batch, resolution, mean, std)
                out.append(supernet(x).float())
    finally:
        supernet.train(was_training)
    feats = torch.cat(out)
    return F.normalize(feats, dim=1) if normalize else feats
