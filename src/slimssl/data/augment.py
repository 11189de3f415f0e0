"""Batched two-view SSL augmentation in pure PyTorch.

All randomness comes from an explicit ``torch.Generator`` and the number of
draws never depends on the data, so the output is a pure function of
``(images, generator state)``: exact resumption, identical draws in every
process. Everything is tensor ops on the batch's device with no per-sample
Python loop and no host synchronisation (.item(), data-dependent masking).

The ops follow torchvision's definitions (RandomResizedCrop, ColorJitter in a
random order, RandomGrayscale, GaussianBlur, RandomSolarize), but work in
float32 in [0, 1] without rounding to uint8 between ops.

A view is two stages: geometry (``geometric_view``: resized crop and flip)
and colour (``colour_view``). The streaming loader crops in its workers at
full decoded resolution and runs only ``photometric_view`` (flip + colour)
batched on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from ..config import IMAGENET_MEAN, IMAGENET_STD, ConfigError
from .decode import center_offsets, resized_size
from .recipes import RECIPE_VIEWS, RECIPES, ViewRecipe  # noqa: F401  (ViewRecipe, RECIPES: importable here too)
_CROP_TRIES = 10  # candidate boxes per sample, as torchvision's RandomResizedCrop
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def recipe(name: str, resolution: int, crop_scale: tuple[float, float] | None = None,
           flip_p: float | None = None, blur: bool | None = None,
           changes: Sequence[Mapping[str, Any]] = (), interpolation: str = "bilinear") -> tuple[ViewRecipe, ViewRecipe]:
    """The two view recipes of a method, with ``crop_scale`` and ``flip_p`` in place of the recipe's when given
    (``data.crop_scale``, ``data.flip_p``), blur as the recipe has it or none where ``blur`` says
    (``data.blur``), and then ``changes`` (``data.views``: one mapping of ViewRecipe fields for both views, or
    one per view); the crops are resized with ``interpolation`` (``data.crop_interpolation``).

    ``byol``/``mocov3``: asymmetric (view 1 always blurred, view 2 blurred 10% and solarized 20%), jitter
    (0.4, 0.4, 0.2, 0.1), crop scale (0.08, 1). ``mocov2``: symmetric, jitter (0.4, 0.4, 0.4, 0.1), blur 50%,
    crop scale (0.2, 1) as MoCo v2's ``aug_plus``. By default blur is disabled at ``resolution <= 64``
    (CIFAR-like), as is usual for small images where a ~10% kernel is a 1-3 px box.
    """
    if name not in RECIPE_VIEWS:
        raise ConfigError(f"unknown augmentation recipe {name!r}; known: {', '.join(RECIPES)}")
    views = RECIPE_VIEWS[name]
    if not (resolution > 64 if blur is None else blur):
        views = tuple(replace(v, blur_p=0.0) for v in views)
    if crop_scale is not None:
        views = tuple(replace(v, crop_scale=tuple(crop_scale)) for v in views)
    if flip_p is not None:
        views = tuple(replace(v, flip_p=flip_p) for v in views)
    views = tuple(replace(v, interpolation=interpolation) for v in views)
    if len(changes) > 2:
        raise ConfigError(f"data.views holds {len(changes)} entries; expected one (both views) or two (each view)")
    per_view = list(changes) * 2 if len(changes) == 1 else list(changes) or [{}, {}]
    return tuple(replace(v, **{k: tuple(x) if isinstance(x, list) else x for k, x in change.items()})
                 for v, change in zip(views, per_view))


class TwoViewAugment:
    """uint8 [B,3,H,W] -> two normalised float32 views [B,3,size,size]."""

    def __init__(self, views: tuple[ViewRecipe, ViewRecipe], size: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.views = views
        self.size = size
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = _to_float(images)
        x = _shrink_for_crop(x, self.size)
        one, two = (augment_view(x, view, self.size, generator) for view in self.views)
        return normalize(one, self.mean, self.std), normalize(two, self.mean, self.std)

    def photometric(self, first: torch.Tensor, second: torch.Tensor,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The second stage only, for views cropped and resized elsewhere (the streaming loader's
        workers): uint8 [B,3,size,size] per view -> two normalised float32 views."""
        one, two = (photometric_view(_to_float(x), view, generator) for x, view in zip((first, second), self.views))
        return normalize(one, self.mean, self.std), normalize(two, self.mean, self.std)


def eval_transform(images: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """No augmentation: shorter side to ``size``, center crop, normalise."""
    x = _to_float(images)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        h, w = resized_size(h, w, size)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        top, left = center_offsets(h, w, size)
        x = x[..., top : top + size, left : left + size].clamp(0, 1)
    return normalize(x, mean, std)


def augment_view(x: torch.Tensor, view: ViewRecipe, size: int, generator: torch.Generator) -> torch.Tensor:
    """One augmented view of float [B,3,H,W] in [0,1], un-normalised, in [0,1]: both stages."""
    return colour_view(geometric_view(x, view, size, generator), view, generator)


def geometric_view(x: torch.Tensor, view: ViewRecipe, size: int, generator: torch.Generator) -> torch.Tensor:
    """Stage one: RandomResizedCrop to size x size and the horizontal flip, in one sampling pass."""
    b = x.shape[0]
    boxes = sample_crop_boxes(b, x.shape[-2], x.shape[-1], view.crop_scale, view.crop_ratio, generator, x.device)
    flip = _coin(b, view.flip_p, generator, x.device)
    return _resized_crop(x, boxes, flip, size, view.interpolation)


def photometric_view(x: torch.Tensor, view: ViewRecipe, generator: torch.Generator) -> torch.Tensor:
    """Stage two for views already cropped and resized elsewhere: the flip, then the colour ops.

    Draws in the order ``augment_view`` draws after its crop boxes (flip first, then the colour ops): the same
    order of draws within a view, not the same stream, since the boxes were drawn elsewhere.
    """
    flip = _coin(x.shape[0], view.flip_p, generator, x.device)
    return colour_view(_maybe(x, flip, x.flip(-1)), view, generator)


def colour_view(x: torch.Tensor, view: ViewRecipe, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarize, each with per-sample parameters."""
    b = x.shape[0]
    x = _maybe(x, _coin(b, view.jitter_p, generator, x.device), _color_jitter(x, view, generator))
    x = _maybe(x, _coin(b, view.grayscale_p, generator, x.device), _grayscale(x))
    x = _random_blur(x, view, generator)
    x = _maybe(x, _coin(b, view.solarize_p, generator, x.device), solarize(x))
    return x


# ---------------------------------------------------------------- randomness


@dataclass(frozen=True)
class BatchRows:
    """A generator that draws for a batch of ``total`` samples and keeps the rows ``start, start + b``.

    Passed wherever a ``torch.Generator`` goes, it augments a shard of a larger batch exactly as those
    rows of the whole batch would be augmented: a process of a distributed run augments its part of the
    global batch as a single process would (drawing random numbers for the whole batch is cheap; the
    image work stays per shard).
    """

    generator: torch.Generator
    start: int
    total: int

    @property
    def device(self) -> torch.device:
        return self.generator.device


def _rand(shape, generator: torch.Generator | BatchRows, device, batch_dim: int = 0) -> torch.Tensor:
    """Uniform [0,1) drawn on the generator's device, then moved to ``device``.

    A generator on the batch's device avoids the copy. ``batch_dim``: the dimension that runs over samples.
    """
    if isinstance(generator, BatchRows):
        full = list(shape)
        b, full[batch_dim] = full[batch_dim], generator.total
        u = torch.rand(full, generator=generator.generator, device=generator.device)
        u = u.narrow(batch_dim, generator.start, b)
    else:
        u = torch.rand(shape, generator=generator, device=generator.device)
    return u.to(device, non_blocking=True)


def _uniform(shape, low: float, high: float, generator, device) -> torch.Tensor:
    return low + (high - low) * _rand(shape, generator, device)


def _coin(b: int, p: float, generator, device) -> torch.Tensor:
    """Bool [B]: True with probability p. Always draws, so the stream is recipe-independent."""
    return _rand((b,), generator, device) < p


def _maybe(x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), y, x)


# ----------------------------------------------------------------- geometry


def sample_crop_boxes(b: int, height: int, width: int, scale, ratio, generator, device) -> torch.Tensor:
    """torchvision RandomResizedCrop boxes, vectorised: float [B, 4] = (top, left, h, w).

    Draws ``_CROP_TRIES`` candidates per sample and keeps the first that fits;
    if none fits, falls back to torchvision's ratio-clamped center crop.
    """
    return crop_boxes_from_uniforms(crop_box_uniforms(b, generator, device), height, width, scale, ratio)


def crop_box_uniforms(b: int, generator, device) -> torch.Tensor:
    """The draws behind ``b`` samples' crop boxes: uniform [4, b, tries] (area, aspect, top, left)."""
    return _rand((4, b, _CROP_TRIES), generator, device, batch_dim=1)


def crop_boxes_from_uniforms(u: torch.Tensor, height: int, width: int, scale, ratio) -> torch.Tensor:
    """``sample_crop_boxes`` from its draws ``u`` [4, B, tries]: float [B, 4] = (top, left, h, w).

    A sample's box depends on its own draws only: the streaming loader's workers draw a sample's views
    one after the other and compute their boxes in one pass, where each small op costs more than its
    arithmetic.
    """
    u_area, u_aspect, u_top, u_left = u.unbind(0)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_aspect)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # first True (0 if none)
    # one gather for all four values of the chosen candidates (fewer small ops, same values)
    picked = torch.stack([h, w, u_top, u_left]).gather(2, first.expand(4, -1, -1))
    h, w, u_top, u_left = picked[..., 0].unbind(0)
    # torch.randint(0, H - h + 1) as floor(u * (H - h + 1))
    top = (u_top * (height - h + 1)).floor()
    left = (u_left * (width - w + 1)).floor()
    # Scalar fallbacks: no host->device copy (which would synchronise on CUDA).
    any_fit = fits.any(dim=1)
    columns = zip((top, left, h, w), _center_box(height, width, ratio))
    return torch.stack([torch.where(any_fit, col, fb) for col, fb in columns], dim=1)


def _center_box(height: int, width: int, ratio) -> tuple[float, float, float, float]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return float((height - h) // 2), float((width - w) // 2), float(h), float(w)


def _resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                  interpolation: str = "bilinear") -> torch.Tensor:
    """Crop each box and resize it to size x size, bilinearly or bicubically (mirrored where ``flip``)."""
    height, width = x.shape[-2:]
    top, left, h, w = boxes.unbind(1)
    # Normalised coordinates (align_corners=False): pixel edges span [-1, 1].
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    sx = torch.where(flip, -w / width, w / width)
    sy = h / height
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out if interpolation == "bilinear" else out.clamp(0, 1)  # a cubic overshoots at edges


def _shrink_for_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased pre-shrink of inputs much larger than ``size``.

    grid_sample does not antialias, so downscaling a large crop would alias;
    capping the shorter side at 2 x size keeps crops within ~2x of the output.
    """
    h, w = x.shape[-2:]
    if min(h, w) <= 2 * size:
        return x
    scale = 2 * size / min(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


# -------------------------------------------------------------------- colour


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return _gray(x).expand_as(x)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _color_jitter(x: torch.Tensor, view: ViewRecipe, generator) -> torch.Tensor:
    """ColorJitter for every sample, its four ops in a random per-sample order."""
    b, dev = x.shape[0], x.device
    u = _rand((b, 4), generator, dev).view(b, 4, 1, 1, 1)
    spans = [(max(0.0, 1 - s), 1 + s) for s in (view.brightness, view.contrast, view.saturation)]
    spans.append((-view.hue, view.hue))
    factors = [lo + (hi - lo) * u[:, i] for i, (lo, hi) in enumerate(spans)]
    order = _rand((b, 4), generator, dev).argsort(dim=1)  # uniform random permutation
    # Hue (the costly op) runs once: the cheap ops ordered before it, hue, then the rest.
    hue_step = (order == 3).int().argmax(dim=1, keepdim=True)
    steps = torch.arange(4, device=dev)
    x = _cheap_jitter_steps(x, order, factors, hue_step > steps, range(0, 3))
    if view.hue > 0:  # a recipe constant, not data
        x = adjust_hue(x, factors[3])
    return _cheap_jitter_steps(x, order, factors, hue_step < steps, range(1, 4))


def _cheap_jitter_steps(x, order: torch.Tensor, factors, active: torch.Tensor, steps) -> torch.Tensor:
    """At each step apply brightness, contrast or saturation where ``order`` picks them, all three as one blend
    ``f * x + (1 - f) * other`` per sample, ``other`` being 0 (brightness), the grey mean (contrast) or the grey
    image (saturation): one pass per step instead of three.

    An inactive sample gets factor 1, which is exactly the identity, so no masking of whole images is needed.
    """
    for step in steps:
        op = order[:, step].view(-1, 1, 1, 1)
        on = active[:, step].view(-1, 1, 1, 1)
        factor = torch.ones_like(factors[0])
        for op_id in range(3):
            factor = torch.where(on & (op == op_id), factors[op_id], factor)
        gray = _gray(x)
        other = torch.where(op == 1, gray.mean(dim=(1, 2, 3), keepdim=True), torch.where(op == 2, gray, 0.0))
        x = _blend(x, other, factor)
    return x


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """float RGB [B,3,H,W] in [0,1] -> HSV, hue in [0,1) (torchvision's formulas)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    flat = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    s = chroma / torch.where(flat, ones, maxc)
    div = torch.where(flat, ones, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    is_b = ~is_r & ~is_g
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB via the closed form c_n = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6."""
    h6, s, v = 6.0 * x[:, :1], x[:, 1:2], x[:, 2:]
    k = torch.remainder(torch.cat([h6 + 5.0, h6 + 3.0, h6 + 1.0], dim=1), 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, [B,1,1,1])."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, :1] + shift, 1.0)
    return hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


# ---------------------------------------------------------------------- blur


def blur_kernel_size(size: int) -> int:
    """~10% of the image side, odd, at least 3 (BYOL: 23 at 224)."""
    k = int(0.1 * size)
    return max(3, k + 1 - k % 2)


def _random_blur(x: torch.Tensor, view: ViewRecipe, generator) -> torch.Tensor:
    b = x.shape[0]
    apply = _coin(b, view.blur_p, generator, x.device)
    sigma = _uniform((b,), *view.blur_sigma, generator, x.device)
    if view.blur_p <= 0:  # a recipe constant, not data: skip the conv but keep the draws
        return x
    return _maybe(x, apply, gaussian_blur(x, sigma, blur_kernel_size(x.shape[-1])))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Separable per-sample Gaussian blur (sigma [B]) as depthwise convs, reflect padding."""
    b, c, h, w = x.shape
    offsets = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    weights = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    pad = k // 2
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), weights.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), weights.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


# ------------------------------------------------------------------- helpers


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x - mean) / std`` per channel of float [B, C, H, W].

    Python scalars per channel: a device tensor of constants would need a synchronising copy."""
    return torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(mean, std))], dim=1)
