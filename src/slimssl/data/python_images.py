"""Images and labels given in Python (arrays, tensors, lists of images, map-style datasets), read into the
uint8 ``[N, 3, H, W]`` tensors (lists of ``[3, H, W]`` for images of several sizes) and int64 labels that
``registry.register_dataset`` keeps."""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import numpy as np
import torch
from PIL import Image

from .decode import to_rgb
from ..errors import DataError


Images = Union[torch.Tensor, list]  # uint8 [N, 3, H, W], or a list of uint8 [3, H, W] of several sizes


def read_split(data, what: str) -> tuple[Images, list | torch.Tensor | None]:
    """The images (uint8, a copy) and the labels as given (integers or names), of one split."""
    pair = _as_pair(data)
    if pair is not None:
        images, labels = pair
        images = _as_images(images, what) if _is_array(images) else _read_items(images, what)[0]
    elif _is_array(data):
        images, labels = _as_images(data, what), None
    elif isinstance(data, (str, bytes, os.PathLike)):
        raise DataError(f"{what}: expected images in memory, got the path {str(data)!r}; a folder or .zip of "
                        "images is a data source itself (data.source, --data)")
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        images, labels = _read_items(data, what)
    else:
        raise DataError(f"{what}: expected (images, labels), images, or a map-style dataset of (image, label) "
                        f"items; got {type(data).__name__}")
    if labels is not None:
        labels = _label_values(labels, len(images), what)
    return images, labels


def _as_pair(data) -> tuple[Any, Any] | None:
    """``(images, labels)`` when ``data`` is such a pair (images: an array, or a list of images), else None: a
    list of two images is no pair."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        return None
    images, labels = data
    if _is_array(images) and images.ndim >= 3:  # a batch: its labels are counted later, to say if they are not N
        return (images, labels) if _labels_like(labels) else None
    listed = isinstance(images, (list, tuple)) and len(images) > 0 and _is_one_image(images[0])
    return (images, labels) if listed and _labels_like(labels, len(images)) else None


def _labels_like(labels, count: int | None = None) -> bool:
    """Whether ``labels`` can be labels (of ``count`` images): None, or values that are no images."""
    if labels is None:
        return True
    if _is_array(labels):
        return (count is None or len(labels) == count) and (labels.ndim == 1 or (labels.ndim == 2
                                                                               and labels.shape[1] == 1))
    return isinstance(labels, (list, tuple)) and (count is None or len(labels) == count) and not any(
        _is_one_image(label) or isinstance(label, (list, tuple)) for label in labels)


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _is_one_image(x) -> bool:
    return isinstance(x, Image.Image) or (_is_array(x) and x.ndim in (2, 3))


def _as_images(images, what: str) -> torch.Tensor:
    """uint8 [N, 3, H, W], not sharing memory with ``images``, from any of the layouts ``register_dataset`` takes."""
    copied = False
    if isinstance(images, torch.Tensor):
        x, channels_last = images.detach().cpu(), False
    else:
        array = np.asarray(images)
        if array.dtype == object:
            raise DataError(f"{what}: expected images of one size and type, got a NumPy array of objects (shape "
                            f"{array.shape})")
        copied = not array.flags.writeable or any(stride < 0 for stride in array.strides)  # torch takes neither
        x, channels_last = torch.from_numpy(array.copy() if copied else array), True
    given = x.untyped_storage().data_ptr()
    if x.ndim == 3:  # grey [N, H, W], unless it is one colour image: [H, W, C] (NumPy), [C, H, W] (torch)
        channels, sides = (x.shape[-1], x.shape[:2]) if channels_last else (x.shape[0], x.shape[1:])
        if channels in (3, 4) and min(sides) > 4:
            layout = "[N, H, W, C]" if channels_last else "[N, C, H, W]; grey images as [N, 1, H, W]"
            raise DataError(f"{what}: shape {tuple(x.shape)} looks like one image; expected a batch {layout}")
        x = x.unsqueeze(1)
    if x.ndim != 4 or not len(x):
        raise DataError(f"{what}: expected images as [N, H, W, C], [N, C, H, W] or [N, H, W] with N > 0, got shape "
                        f"{tuple(x.shape)}")
    first, last = x.shape[1] in (1, 3, 4), x.shape[-1] in (1, 3, 4)
    if last and (channels_last or not first):
        x = x.permute(0, 3, 1, 2)
    elif not first:
        raise DataError(f"{what}: expected 1, 3 or 4 channels, first or last, got shape {tuple(x.shape)}")
    x = _as_uint8(x[:, :3], what)  # RGBA: the alpha dropped, as PIL's convert("RGB") does
    x = x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()
    return x.clone() if x.untyped_storage().data_ptr() == given and not copied else x


def _as_uint8(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.uint16:  # 16-bit pixels, scaled as decode.to_rgb scales PIL's
        return (x.to(torch.float32) / 257.0).round().to(torch.uint8)
    if x.dtype == torch.bool or x.is_complex():
        raise DataError(f"{what}: expected uint8 images or floats in [0, 1], got {x.dtype}")
    if x.is_floating_point():
        x = x.float()
        low, high = x.min().item(), x.max().item()
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 1:
            raise DataError(f"{what}: float images must be finite, in [0, 1] and not normalised (training normalises "
                            f"them with data.mean and data.std), got values from {low:g} to {high:g}")
        return (x * 255).round().to(torch.uint8)
    wide = x.to(torch.int64)
    low, high = wide.min().item(), wide.max().item()
    if low < 0 or high > 255:
        raise DataError(f"{what}: integer images must be in [0, 255] (or uint16), got values from {low} to {high}")
    return wide.to(torch.uint8)


def _read_items(dataset, what: str) -> tuple[Images, list | None]:
    """The images and labels of a map-style dataset, item by item: the images stacked, or (of several sizes, as
    photos are) listed, each resized where the split is loaded, as a folder's images are."""
    images, labels, labelled = [], [], None
    for i in range(len(dataset)):
        image, label = _image_and_label(dataset[i], f"{what}, item {i}")
        if labelled is None:
            labelled = label is not None
        elif (label is not None) != labelled:
            raise DataError(f"{what}: item {i} {'has no' if label is None else 'has a'} label, unlike item 0")
        if isinstance(image, Image.Image):
            pixels = torch.from_numpy(to_rgb(image)).permute(2, 0, 1)
        else:  # a batch of one image
            one = image.unsqueeze(0) if isinstance(image, torch.Tensor) else np.asarray(image)[None]
            pixels = _as_images(one, f"{what}, item {i}")[0]
        images.append(pixels)
        if label is not None:
            labels.append(label)
    if not images:
        raise DataError(f"{what}: the dataset is empty")
    one_size = all(image.shape == images[0].shape for image in images)
    return torch.stack(images) if one_size else [image.contiguous() for image in images], labels if labelled else None


def _image_and_label(item, what: str) -> tuple[Any, Any]:
    if isinstance(item, Mapping):  # Hugging Face datasets' rows
        image = item.get("image", item.get("img"))
        if image is None:
            raise DataError(f"{what}: a dict item needs an 'image' (or 'img') key, got {sorted(item)}")
        return image, item.get("label")
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise DataError(f"{what}: expected an (image, label) pair, got {len(item)} values")
        return item
    return item, None


def _label_values(labels, count: int, what: str) -> torch.Tensor | list[str]:
    """Integer labels as int64, or names as strings; one per image."""
    if isinstance(labels, torch.Tensor):
        values = labels.detach().cpu().numpy()
    elif isinstance(labels, (list, tuple)):  # a torchvision dataset's targets may be 0-d tensors
        values = np.asarray([int(v) if isinstance(v, torch.Tensor) else v for v in labels])
    else:
        values = np.asarray(labels)
    if values.ndim > 1 and values.size == count:  # [N, 1]
        values = values.reshape(-1)
    if values.ndim != 1 or len(values) != count:
        raise DataError(f"{what}: expected {count} labels (one per image), got shape {values.shape}")
    if values.dtype.kind in "UO" and all(isinstance(v, str) for v in values):
        return [str(v) for v in values]
    if values.dtype.kind not in "iu" or (count and values.min() < 0):
        raise DataError(f"{what}: expected {count} labels, integers from 0 or class names, got {values.dtype}"
                        + (f" from {values.min()}" if count and values.dtype.kind in "iu" else ""))
    return torch.from_numpy(values.astype(np.int64))


def class_names(name: str, raw: dict, given: dict, classes) -> list[str] | None:
    """The names of the labels, the same for every split: ``classes``, the datasets' own (which must agree),
    the sorted label names, or "0", "1", ..."""
    labelled = [labels for _, labels in raw.values() if labels is not None]
    if classes is not None:
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(
                classes):
            raise DataError(f"dataset {name!r}: classes must be a list of distinct names, got {classes!r}")
        classes = list(classes)
    else:
        own = {split: _names(given[split]) for split in raw if _names(given[split]) is not None}
        if len({tuple(names) for names in own.values()}) > 1:
            listed = "; ".join(f"{split}: {', '.join(names)}" for split, names in own.items())
            raise DataError(f"dataset {name!r}: its splits name their classes differently ({listed}), so a label "
                            "would mean another class in each; expected the same classes in the same order")
        classes = next(iter(own.values()), None)
    if not labelled:
        return classes
    named = [labels for labels in labelled if isinstance(labels, list)]
    if named and classes is None:
        classes = sorted({label for labels in named for label in labels})
    count = max((int(labels.max()) + 1 for labels in labelled if isinstance(labels, torch.Tensor) and len(labels)),
                default=0)
    classes = classes if classes is not None else [str(i) for i in range(count)]
    if count > len(classes):
        raise DataError(f"dataset {name!r}: label {count - 1} but {len(classes)} class names; expected labels 0 to "
                        f"{len(classes) - 1}")
    return classes


def label_indices(labels, classes: list[str], what: str) -> torch.Tensor:
    """The labels as int64 indices into ``classes`` (names looked up; integers as they are)."""
    if isinstance(labels, torch.Tensor):
        return labels
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{what}: labels {unknown[:5]} are not among the classes {classes[:10]}")
    return torch.tensor([index[label] for label in labels], dtype=torch.int64)


def _names(data) -> list[str] | None:
    names = getattr(data, "classes", None)  # torchvision's datasets name their classes so
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None
