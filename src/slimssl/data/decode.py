"""Image file bytes to uint8 pixels.

In memory and in evaluation (``decode_resized``) every image is decoded at full scale and resized the same
way, so both loaders see the same pixels. The training stream (``decode_pixels``) may decode a large JPEG
at a reduced DCT scale, never below what its smallest crop needs. JPEGs go through torchvision's
libjpeg-turbo op where it can, anything else (and anything it rejects) through PIL.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


# The formats of the files a dataset lists (files.IMAGE_EXTENSIONS), and GIF, which scraped datasets hold under
# a .jpg name. Pillow is not asked to guess among the others: a file named .jpg that holds PostScript would start
# Ghostscript, an outside program, to render it.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "PPM", "GIF")
RESIZE_CHUNK_BYTES = 2**28  # the float32 images resized at once: CIFAR-10's split at 224 px whole would take 30 GB


def open_image(data: bytes) -> Image.Image:
    """The PIL image of a file's bytes, lazily decoded; only :data:`IMAGE_FORMATS` are recognised."""
    return Image.open(io.BytesIO(data), formats=_readable_formats())


@functools.cache
def _readable_formats() -> tuple[str, ...]:
    """:data:`IMAGE_FORMATS` that this Pillow reads (one built without WebP has no such reader: Pillow would raise
    a KeyError for its name)."""
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit data: scale the full range down instead of clipping at 255.
        wide = np.asarray(img).astype(np.float32)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        wide = np.asarray(img, dtype=np.float32)
        scale = 255.0 if wide.size and wide.max() <= 1.0 else 1.0  # [0,1] floats or 0..255
        grey = np.clip(np.rint(wide * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    # Alpha and a transparent colour are dropped, as torchvision's ImageFolder does (PIL's convert("RGB")), so
    # that numbers compare with published pipelines.
    return np.array(img.convert("RGB"))  # a writable copy, as torch.from_numpy wants


def _jpeg_op():
    """torchvision's libjpeg-turbo op (~2x faster than PIL here) as (op, RGB mode), or None.

    Called as a raw op to skip the Python wrapper, which warns on every call
    that torchvision's decoders are deprecated; PIL remains the fallback.
    """
    try:
        from torchvision.io import ImageReadMode

        return torch.ops.image.decode_jpeg, ImageReadMode.RGB.value
    except (ImportError, AttributeError, RuntimeError):
        return None


_JPEG = _jpeg_op()


PIXEL_LIMIT_ENV = "SLIMSSL_MAX_IMAGE_PIXELS"


def _set_pixel_limit() -> None:
    """Pillow's guard against decompression bombs, as $SLIMSSL_MAX_IMAGE_PIXELS asks (pixels, or ``none``):
    set at import, so that loader workers started afresh (spawn, forkserver) have it too."""
    raw = os.environ.get(PIXEL_LIMIT_ENV, "").strip().lower()
    if not raw:
        return
    if raw == "none":
        Image.MAX_IMAGE_PIXELS = None
    elif raw.isdigit() and int(raw) > 0:
        Image.MAX_IMAGE_PIXELS = int(raw)
    else:
        logging.getLogger("slimssl").warning("$%s is %r; expected a number of pixels or none: Pillow's limit is "
                                             "kept", PIXEL_LIMIT_ENV, raw)


_set_pixel_limit()


def decode_error(exc: Exception) -> str:
    """A decoder's exception as the reason a file is unreadable, without the in-memory buffer PIL names
    (``cannot identify image file <_io.BytesIO object at 0x...>``): the caller names the file."""
    if isinstance(exc, Image.DecompressionBombError):  # a large image, not a damaged one: say how to allow it
        return (f"Pillow's guard against decompression bombs refuses an image this large ("
                f"{_BUFFER.sub('', str(exc)).strip().rstrip('.')}); to read it, set ${PIXEL_LIMIT_ENV}=none (or a "
                "larger number of pixels), or make the image smaller")
    return f"{type(exc).__name__}: {_BUFFER.sub('', str(exc)).strip()}"


_BUFFER = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def decode_full(data: bytes) -> torch.Tensor:
    """Bytes -> uint8 [3, H, W]; raises on truncated or non-image data."""
    size = _jpeg_size(data) if _JPEG is not None and data[:2] == b"\xff\xd8" else None
    if size is not None:  # (a JPEG whose size is not found goes to PIL, which checks it as it decodes)
        _refuse_bomb(size)  # torchvision's decoder has no guard of its own: Pillow's, as PIL applies it
        op, rgb = _JPEG
        try:
            return op(torch.frombuffer(bytearray(data), dtype=torch.uint8), rgb, False)
        except RuntimeError:
            pass  # let PIL decode it or produce the error
    with open_image(data) as img:
        img.load()
        return torch.from_numpy(to_rgb(img)).permute(2, 0, 1)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, read without decoding, walking the markers as libjpeg does
    (bytes between markers and fill bytes skipped; restart markers carry no length); None where no frame
    header comes before the scan."""
    at, end = 2, len(data)
    while at + 1 < end:
        marker = data[at + 1]
        if data[at] != 0xFF or marker == 0x00:  # not a marker (0xFF00 is a stuffed byte): skipped, as libjpeg does
            at += 1
            continue
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # a fill byte, RSTn, TEM: no length
            at += 1 if marker == 0xFF else 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # another start of image, its end, or the scan: no frame before it
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame (not DHT, JPG, DAC)
            if at + 9 > end:
                return None
            return int.from_bytes(data[at + 7:at + 9], "big"), int.from_bytes(data[at + 5:at + 7], "big")
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None


def _refuse_bomb(size: tuple[int, int]) -> None:
    """Pillow's guard against decompression bombs for a decoder other than Pillow's: an image of more than
    twice ``Image.MAX_IMAGE_PIXELS`` is refused as Pillow refuses it (``DecompressionBombError``)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > 2 * limit:
        raise Image.DecompressionBombError(f"{size[0]}x{size[1]} is {size[0] * size[1]} pixels, over twice "
                                           f"Pillow's limit of {limit}")


def decode_resized(data: bytes, resolution: int | None, crop_ratio: float = 1.0) -> torch.Tensor:
    """Bytes -> uint8 [3, R, R] as a decoded dataset holds it (``resize_center_crop`` to ``resolution``; the
    native size when None). Streamed evaluation decodes with this too, so both see the same pixels."""
    img = decode_full(data)
    return img if resolution is None else resize_center_crop(img[None], resolution, crop_ratio)[0]


def resize_side(resolution: int, crop_ratio: float = 1.0) -> int:
    """The shorter side an image is resized to before its centre ``resolution`` crop: ``resolution /
    crop_ratio``, rounded down (224 at ratio 0.875 -> 256, ImageNet's evaluation resize)."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
    return max(resolution, math.floor(resolution / crop_ratio + 1e-6))  # 1e-6: 224 / 0.875 is 256, not 255.99


def resize_center_crop(images: torch.Tensor, resolution: int, crop_ratio: float = 1.0) -> torch.Tensor:
    """Resize uint8 [N,3,H,W] so the shorter side is ``resize_side(resolution, crop_ratio)`` (antialiased
    bilinear), then centre crop ``resolution`` x ``resolution``: torchvision's ``Resize`` + ``CenterCrop``,
    with their sizes and offsets."""
    h, w = images.shape[-2:]
    side = resize_side(resolution, crop_ratio)
    if not len(images):
        return images.new_empty((0, images.shape[1], resolution, resolution))
    if min(h, w) != side:
        h, w = resized_size(h, w, side)
        resized = images.new_empty((*images.shape[:-2], h, w))
        # a few images at a time: their float copies, not the whole split's (each image is resized alone)
        chunk = max(1, RESIZE_CHUNK_BYTES // (4 * images.shape[1] * max(h * w, images[0, 0].numel())))
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk].float()
            resized[start:start + chunk] = F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False,
                                                         antialias=True).round().clamp(0, 255).to(torch.uint8)
        images = resized
    top, left = center_offsets(h, w, resolution)
    return images[..., top : top + resolution, left : left + resolution].contiguous()


def resized_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``side`` and the longer one rounded down, as torchvision's Resize."""
    if height <= width:
        return side, max(side, int(side * width / height))
    return max(side, int(side * height / width)), side


def center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centre ``size`` square, rounded as torchvision's CenterCrop."""
    return int(round((height - size) / 2)), int(round((width - size) / 2))


def decode_image(data: bytes, min_side: int) -> Image.Image:
    """Bytes -> an RGB PIL image; JPEGs at the smallest DCT scale that keeps both sides >= ``min_side``."""
    img = open_image(data)  # no ``with``: closing would discard the decoded pixels
    img.draft("RGB", (min_side, min_side))  # a no-op for other formats and for small JPEGs
    img.load()
    return img if img.mode == "RGB" else Image.fromarray(to_rgb(img))


def decode_pixels(data: bytes, min_side: int) -> torch.Tensor:
    """Bytes -> uint8 [3, H, W] (channels-last memory): the pixels of ``decode_image``.

    JPEGs that ``Image.draft`` would not shrink go through torchvision's libjpeg-turbo op: the same pixels,
    straight into a tensor, ~15% faster than PIL and the copy out of it. Anything it rejects goes to PIL,
    which decodes it or raises the error a corrupt file is reported with.
    """
    if _JPEG is not None and data[:2] == b"\xff\xd8" and not _draft_shrinks(data, min_side):
        op, rgb = _JPEG
        try:
            return op(torch.frombuffer(bytearray(data), dtype=torch.uint8), rgb, False)
        except RuntimeError:
            pass
    return torch.from_numpy(np.array(decode_image(data, min_side))).permute(2, 0, 1)  # a writable copy


def _draft_shrinks(data: bytes, min_side: int) -> bool:
    """Whether ``decode_image`` decodes this JPEG at reduced DCT scale (reads the header only; a JPEG over
    Pillow's size guard is refused here, as everywhere)."""
    with open_image(data) as img:
        full = img.size
        img.draft("RGB", (min_side, min_side))
        return img.size != full
