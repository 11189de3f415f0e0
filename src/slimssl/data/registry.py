"""Datasets given in Python (arrays, tensors or a map-style dataset), used by name like a built-in one.

``slimssl.register_dataset("mine", train=(images, labels), test=...)`` keeps the splits in this process as
uint8 ``[N, 3, H, W]`` tensors, and every place that takes a dataset name (``data.source``, ``data=`` of the
evaluations) then finds them: ``load_dataset`` resizes and crops them as it does a folder's images. A run
records the name only, so the process that resumes or evaluates it registers the same data first.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from .decode import to_rgb
from .files import BUILTIN, DataError, MissingSplitError

log = logging.getLogger("slimssl")

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # no dot or slash: never read as a file


class Split(NamedTuple):
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor | None  # int64 [N]
    classes: list[str] | None


_REGISTERED: dict[str, dict[str, Split]] = {}


def register_dataset(name: str, train: Any, test: Any = None, *, val: Any = None,
                     classes: list[str] | None = None) -> None:
    """Make ``train`` (and ``test``, ``val``) known as the dataset ``name`` in this process; each split is:

    * ``(images, labels)``: images as one array or tensor, ``[N, H, W, 3]``, ``[N, 3, H, W]``, ``[N, 1, H, W]``
      or ``[N, H, W]`` (grey), uint8 or float in [0, 1]; labels: N integers, or None;
    * ``images`` alone (unlabelled: pretraining only);
    * a map-style dataset (e.g. a torchvision dataset without transform, or with ``ToTensor()``) whose items are
      ``(image, label)`` or an image, each a PIL image or an array/tensor as above; read once, here.

    Images are un-normalised (``data.mean``/``data.std`` normalise them) and of one size. The splits are
    copied; registering a name again replaces it. ``classes`` names the labels (default: the dataset's
    ``classes`` attribute, else ``"0"``, ``"1"``, ...)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in BUILTIN:
        raise DataError(f"a registered dataset's name must be letters, digits, '_' or '-' (no '.' or '/', which "
                        f"would read as a file), and not a built-in name ({', '.join(BUILTIN)}); got {name!r}")
    given = {"train": train, "test": test, "val": val}
    splits = {split: _as_split(data, f"{name!r} {split} split") for split, data in given.items() if data is not None}
    labelled = [s for s in splits.values() if s.labels is not None]
    if classes is None:
        classes = next((_names(data) for data in given.values() if _names(data) is not None), None)
    if labelled:
        count = max(int(s.labels.max()) + 1 if len(s.labels) else 0 for s in labelled)
        classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(count)]
        if count > len(classes):
            raise DataError(f"dataset {name!r}: label {count - 1} but {len(classes)} class names; expected labels "
                            f"0 to {len(classes) - 1}")
    splits = {split: s._replace(classes=classes if s.labels is not None else None) for split, s in splits.items()}
    if name in _REGISTERED:
        log.info("dataset %r registered again: its splits are replaced", name)
    _REGISTERED[name] = splits


def unregister_dataset(name: str) -> None:
    """Forget the dataset ``name`` (and free its memory); an error when it is not registered."""
    if _REGISTERED.pop(name, None) is None:
        raise DataError(f"no dataset {name!r} is registered; registered: {', '.join(_REGISTERED) or 'none'}")


def is_registered(source) -> bool:
    return isinstance(source, str) and source in _REGISTERED


def in_memory_only(source) -> bool:
    """Whether ``source`` names a dataset that has no files: a built-in or a registered one."""
    return source in BUILTIN or is_registered(source)


def registered_split(name: str, split: str) -> Split:
    """The images, labels and classes of ``split`` of the registered dataset ``name`` (not copied)."""
    splits = _REGISTERED[name]
    if split not in splits:
        raise MissingSplitError(f"dataset {name!r} was registered without a {split} split (it has "
                                f"{', '.join(splits)}); pass {split}= to slimssl.register_dataset")
    return splits[split]


def _names(data) -> list[str] | None:
    names = getattr(data, "classes", None)  # torchvision's datasets name their classes so
    return list(names) if isinstance(names, (list, tuple)) and names else None


def _as_split(data, what: str) -> Split:
    if isinstance(data, tuple) and len(data) == 2 and _is_array(data[0]) and np.ndim(data[0]) >= 3:
        images, labels = data
    elif _is_array(data):
        images, labels = data, None
    elif isinstance(data, (str, bytes, os.PathLike)):
        raise DataError(f"{what}: expected images in memory, got the path {str(data)!r}; a folder or .zip of "
                        "images is a data source itself (data.source, --data)")
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        images, labels = _read_items(data, what)
    else:
        raise DataError(f"{what}: expected (images, labels), images, or a map-style dataset of (image, label) "
                        f"items; got {type(data).__name__}")
    images = _as_images(images, what)
    if labels is not None:
        labels = _as_labels(labels, len(images), what)
    return Split(images, labels, None)


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _as_images(images, what: str) -> torch.Tensor:
    """uint8 [N, 3, H, W], a copy, from any of the layouts ``register_dataset`` takes."""
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(np.array(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)  # grey [N, H, W]
    if x.ndim != 4 or not len(x):
        raise DataError(f"{what}: expected images as [N, H, W, 3], [N, 3, H, W] or [N, H, W] with N > 0, got shape "
                        f"{tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # channels last
    if x.shape[1] not in (1, 3):
        raise DataError(f"{what}: expected 1 or 3 channels, first or last, got shape {tuple(x.shape)}")
    x = _as_uint8(x, what)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous().clone()


def _as_uint8(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.bool or x.is_complex():
        raise DataError(f"{what}: expected uint8 images or floats in [0, 1], got {x.dtype}")
    low, high = x.min().item(), x.max().item()
    if x.is_floating_point():
        if low < 0 or high > 1:
            raise DataError(f"{what}: float images must be in [0, 1] and not normalised (training normalises them "
                            f"with data.mean and data.std), got values from {low:g} to {high:g}")
        return (x.float() * 255).round().to(torch.uint8)
    if low < 0 or high > 255:
        raise DataError(f"{what}: integer images must be in [0, 255], got values from {low} to {high}")
    return x.to(torch.uint8)


def _as_labels(labels, count: int, what: str) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels)).reshape(-1)
    if y.is_floating_point() or y.dtype == torch.bool or len(y) != count or (len(y) and int(y.min()) < 0):
        raise DataError(f"{what}: expected {count} labels, integers from 0 (one per image), got {len(y)} "
                        f"of {y.dtype}" + (f" from {int(y.min())}" if len(y) and not y.is_floating_point() else ""))
    return y.to(torch.int64).clone()


def _read_items(dataset, what: str) -> tuple[torch.Tensor, list[int] | None]:
    """The images (stacked) and labels of a map-style dataset, item by item: one size for all."""
    images, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        image, label = item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None)
        if i == 0:
            labelled = label is not None
        elif (label is not None) != labelled:
            raise DataError(f"{what}: item {i} {'has no' if label is None else 'has a'} label, unlike item 0")
        if isinstance(image, Image.Image):
            pixels = torch.from_numpy(to_rgb(image)).permute(2, 0, 1)
        else:  # a batch of one image
            one = image.unsqueeze(0) if isinstance(image, torch.Tensor) else np.asarray(image)[None]
            pixels = _as_images(one, f"{what}, item {i}")[0]
        if images and pixels.shape != images[0].shape:
            raise DataError(f"{what}: item {i} is {tuple(pixels.shape[1:])} pixels, item 0 "
                            f"{tuple(images[0].shape[1:])}; expected one size (resize them first, e.g. with "
                            "torchvision's Resize and CenterCrop)")
        images.append(pixels)
        if label is not None:
            labels.append(int(label))
    if not images:
        raise DataError(f"{what}: the dataset is empty")
    return torch.stack(images), labels or None
