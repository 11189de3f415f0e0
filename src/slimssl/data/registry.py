"""Datasets given in Python (arrays, tensors or a map-style dataset), used by name like a built-in one.

``slimssl.register_dataset("mine", train=(images, labels), test=...)`` keeps the splits in this process as
uint8 ``[N, 3, H, W]`` tensors, and every place that takes a dataset name (``data.source``, ``data=`` of the
evaluations) then finds them: ``load_dataset`` resizes and crops them as it does a folder's images.

A run records them as ``registered:mine@<fingerprint>``, the fingerprint a hash of the images, labels and
classes. Whatever resumes or evaluates the run must register the same images first: a folder that bears the
name, or other images registered under it since, are refused rather than silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch

from ..wording import named
from ..errors import DataError, MissingSplitError
from .files import BUILTIN, SPLITS
from .python_images import class_names, label_indices, read_split

log = logging.getLogger("slimssl")

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # no dot, slash or colon: never read as a file
PREFIX = "registered:"  # how a run records a registered dataset: registered:NAME@FINGERPRINT


class Split(NamedTuple):
    images: torch.Tensor | list[torch.Tensor]  # uint8 [N, 3, H, W], or [3, H, W] each, of several sizes
    labels: torch.Tensor | None  # int64 [N]
    classes: list[str] | None


@dataclass(frozen=True)
class _Registered:
    splits: dict[str, Split]
    fingerprint: str


_REGISTERED: dict[str, _Registered] = {}


def register_dataset(name: str, train: Any, test: Any = None, *, val: Any = None,
                     classes: Sequence[str] | None = None) -> None:
    """Make ``train`` (and ``test``, ``val``) known as the dataset ``name`` in this process; each split is:

    * ``(images, labels)``: images as one array or tensor, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C: 1, 3, or 4
      whose alpha is dropped; when both read alike, channels last for NumPy and first for torch, as each
      library stores images) or grey ``[N, H, W]``; or a list of images as below. Labels: N integers, or N
      names (mapped to ``classes``, by default sorted), or None;
    * ``images`` alone (unlabelled: pretraining only);
    * a map-style dataset (e.g. a torchvision dataset without transform, or with ``ToTensor()``) whose items are
      ``(image, label)``, ``{"image" (or "img"): ..., "label": ...}`` or an image: a PIL image, or one
      array/tensor as above without N. It is read once, here.

    Pixels are uint8, 16-bit (scaled to 8 bits as PIL's 16-bit images are), or floats in [0, 1]: not normalised
    (``data.mean`` and ``data.std`` normalise them). Images of several sizes (a dataset's items, or a list) are
    each resized and centre-cropped where they are used, as a folder's images are. The splits are copied;
    registering a name again replaces it (runs that used the earlier images then refuse the new ones).
    ``classes`` names the labels (default: the datasets' ``classes`` attribute, else ``"0"``, ``"1"``, ...)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in BUILTIN:
        raise DataError(f"a registered dataset's name must be letters, digits, '_' or '-' (no '.', '/' or ':', "
                        f"which would read as a file), and not a built-in name ({', '.join(BUILTIN)}); got {name!r}")
    if train is None:  # refused here, not by the pretraining that would find no train split
        raise DataError(f"dataset {name!r}: train is required: (images, labels), images alone, or a map-style "
                        "dataset of (image, label) items")
    given = {"train": train, "test": test, "val": val}
    raw = {split: read_split(data, f"{name!r} {split} split") for split, data in given.items() if data is not None}
    classes = class_names(name, raw, given, classes)
    splits = {}
    for split, (images, labels) in raw.items():
        labels = None if labels is None else label_indices(labels, classes, f"{name!r} {split} split")
        splits[split] = Split(images, labels, None if labels is None else classes)
    if name in _REGISTERED:
        log.info("dataset %r registered again: its splits are replaced", name)
    elif os.path.exists(name):
        log.warning("%r is also a path here: as a dataset name it now means the images registered in Python", name)
    _REGISTERED[name] = _Registered(splits, _fingerprint(splits))


def unregister_dataset(name: str) -> None:
    """Forget the dataset ``name`` (and free its memory); an error when it is not registered."""
    if _REGISTERED.pop(name, None) is None:
        raise DataError(f"no dataset {name!r} is registered; registered: {', '.join(_REGISTERED) or 'none'}")


def registered_names() -> list[str]:
    """The datasets registered in this process, in the order they were registered."""
    return list(_REGISTERED)


def registered_name(source) -> str | None:
    """The registered dataset that ``source`` names (``registered:NAME@...``, or the NAME of a registered one),
    registered in this process or not; None for anything else."""
    if not isinstance(source, str):
        return None
    if source.startswith(PREFIX):
        return source[len(PREFIX):].split("@", 1)[0]
    return source if source in _REGISTERED else None


def in_memory_only(source) -> bool:
    """Whether ``source`` names a dataset that has no files: a built-in or a registered one."""
    return source in BUILTIN or registered_name(source) is not None


def recorded_source(source):
    """``source`` as a run records it: a registered dataset's name as ``registered:NAME@FP``, FP the fingerprint
    of the images registered now; anything else (a recorded fingerprint, a built-in name, a path) as it is."""
    name = registered_name(source)
    if name is None or name not in _REGISTERED or "@" in source:
        return source
    return f"{PREFIX}{name}@{_REGISTERED[name].fingerprint}"


def absolute_source(source: str) -> str:
    """``source`` as a run records it: a registered dataset's name with its fingerprint, an existing relative path
    made absolute (the same data from any working directory), and anything else as given (a built-in name; a
    missing path, for its error to name it as given)."""
    if registered_name(source) is not None:
        return recorded_source(source)
    if source in BUILTIN or os.path.isabs(source) or not os.path.exists(os.path.expanduser(source)):
        return source
    return os.path.abspath(os.path.expanduser(source))


def registered_split(source: str, split: str) -> Split:
    """The images, labels and classes of ``split`` of the registered dataset ``source`` names (not copied): the
    same images as the recorded fingerprint, if it has one."""
    name = registered_name(source)
    dataset = _REGISTERED.get(name)
    if dataset is None:
        raise DataError(f"{source!r} names images registered in Python, and no dataset {name!r} is registered in "
                        "this process; register the same images first: slimssl.register_dataset, or on the command "
                        "line slimssl --import FILE, a .py file that registers them")
    wanted = source.split("@", 1)[1] if source.startswith(PREFIX) and "@" in source else dataset.fingerprint
    if wanted != dataset.fingerprint:
        raise DataError(f"{source!r} names other images than the dataset {name!r} registered now (fingerprint "
                        f"{dataset.fingerprint}, of every split's images, labels and classes: a split added or "
                        f"changed since counts): register the images the run used, or give {name!r} as the data "
                        f"({named('--data', 'data=')}) to use these")
    if split not in dataset.splits:
        raise MissingSplitError(f"dataset {name!r} was registered without a {split} split (it has "
                                f"{', '.join(dataset.splits)}); pass {split}= to slimssl.register_dataset")
    return dataset.splits[split]


def _fingerprint(splits: dict[str, Split]) -> str:
    """A short hash of the splits' images, labels and classes: equal only for the same data."""
    digest = hashlib.sha1()
    for split in SPLITS:
        if split in splits:
            images, labels, classes = splits[split]
            listed = isinstance(images, list)  # images of several sizes: each one's size, then its pixels
            shapes = [list(image.shape) for image in images] if listed else list(images.shape)
            digest.update(json.dumps([split, shapes, classes]).encode())
            for block in images if listed else [images]:
                digest.update(memoryview(block.numpy()).cast("B"))
            if labels is not None:
                digest.update(memoryview(labels.numpy()).cast("B"))
    return digest.hexdigest()[:10]
