"""A ResNet trained elsewhere, saved as an export: a torchvision model, or the backbone inside another library's
checkpoint (MoCo, solo-learn, lightly, ...). slimssl's protocols then measure it as they measure an exported
sub-network (``slimssl knn FOLDER --data DATA``, ``linear``, ``finetune``, ``profile``): the network trained
alone that a slimmable run is compared with, or a published model to check the protocols against.

The architecture is read from the weights' names (torchvision's layout) and shapes: the stem from ``conv1``
(7x7: ImageNet's, with its max-pool; 3x3: the CIFAR one, padded by 1), the block from whether ``layer1.0.conv3``
exists, the channels and depths stage by stage. A checkpoint file is read with ``weights_only=True``, so nothing
in it runs.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from numbers import Real
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..config.schema import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ExportError
from ..layout import EXPORT_CONFIG
from ..models.fit import stored_depths, weights_misfit
from ..models.plain import PlainResNet, PlainResNetConfig
from ..wording import on_command_line
from .files import input_preprocessing, save_exported

log = logging.getLogger("slimssl")

STEM_KEY = "conv1.weight"
HEAD = "fc."  # a classifier, or MoCo's projector, which the backbone's export leaves out
# the inputs recorded when none are given, by stem: torchvision's ImageNet evaluation, and CIFAR's whole image
DEFAULT_INPUTS = {"imagenet": (224, 0.875), "cifar": (32, 1.0)}


def import_backbone(weights: str | os.PathLike | Mapping | nn.Module, folder: str | os.PathLike, *,
                    prefix: str | None = None, resolution: int | None = None, crop_ratio: float | None = None,
                    mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD,
                    overwrite: bool = False) -> Path:
    """Save the ResNet backbone of ``weights`` into ``folder`` as an export (:func:`slimssl.load_exported` loads
    it) and return the folder.

    ``weights`` is a checkpoint file (``.pt``, ``.pth``, ``.ckpt``, ``.safetensors``), a state dict, or a
    model (a torchvision ResNet). The backbone's entries are found wherever they are nested (``state_dict``,
    ``model``, ...) and whatever their names start with (``module.encoder_q.``, ``backbone.``); where a checkpoint
    holds several (MoCo's query and key encoders, an online and a momentum network), ``prefix`` says which, e.g.
    ``"state_dict.module.encoder_q."``. The ``fc`` entries (a classifier, or a projector) are left out.

    ``resolution``, ``crop_ratio``, ``mean`` and ``std`` are the inputs the network expects, recorded for
    evaluation (default: 224 px and 0.875 with ImageNet's stem, 32 px and 1 with the CIFAR one; ImageNet's
    mean and std). An export of another source in ``folder`` is replaced only with ``overwrite``."""
    _check_inputs(resolution, crop_ratio, mean, std)
    source = str(Path(weights).resolve()) if isinstance(weights, (str, os.PathLike)) else None
    entries = _flat_tensors(_read(weights) if source else weights.state_dict() if isinstance(weights, nn.Module)
                            else weights)
    prefix = _backbone_prefix(entries, prefix, source or "the weights given")
    state = {key[len(prefix):]: value for key, value in entries.items() if key.startswith(prefix)}
    head = [key for key in state if key.startswith(HEAD)]
    for key in head:
        del state[key]
    config = plain_config(state, prefix)
    model = PlainResNet(config)
    for key, value in model.state_dict().items():  # older checkpoints have no BatchNorm step counts
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    misfit = weights_misfit(lambda: PlainResNet(config), config.depths, state)
    if misfit:
        raise ExportError(f"the entries under {prefix!r} of {source or 'the weights given'} are not a ResNet in "
                          f"torchvision's layout with the {config.block} blocks and channels their shapes suggest: "
                          f"{misfit}")
    model.load_state_dict(state)
    default_resolution, default_crop = DEFAULT_INPUTS[config.stem]
    resolution, crop_ratio = resolution or default_resolution, crop_ratio or default_crop
    if not overwrite:
        _refuse_other_prefix(Path(folder), source, prefix)
    metadata = {**input_preprocessing(resolution, mean, std, crop_ratio), "source": source,
                "source_prefix": prefix}
    folder = save_exported(model.eval(), folder, metadata, overwrite=overwrite)
    params = sum(p.numel() for p in model.parameters())
    log.info("imported a %s ResNet (%s stem, depths %s, %s features, %s params) from %r of %s into %s, for inputs of "
             "%d px (crop ratio %g)%s", config.block, config.stem, list(config.depths), config.feature_dim,
             f"{params:,}", prefix, source or "the weights given", folder, resolution, crop_ratio,
             f"; left out {len(head)} fc entries" if head else "")
    return folder


def plain_config(state: Mapping[str, torch.Tensor], prefix: str = "") -> PlainResNetConfig:
    """The architecture of a torchvision-layout ResNet's state dict (without ``fc``), read from its shapes."""
    stem = state[STEM_KEY]
    kernel = tuple(stem.shape[2:]) if stem.dim() == 4 else None
    if stem.dim() != 4 or stem.shape[1] != 3 or kernel not in ((7, 7), (3, 3)):
        raise ExportError(f"{prefix}{STEM_KEY} has the shape {list(stem.shape)}; expected a ResNet's stem: "
                          "[channels, 3, 7, 7] (ImageNet's) or [channels, 3, 3, 3] (CIFAR's)")
    depths = stored_depths(state)
    if not depths or 0 in depths:
        raise ExportError(f"the entries under {prefix!r} hold no residual stages layer1, layer2, ... (found "
                          f"{list(depths)} blocks a stage); expected a ResNet in torchvision's layout")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    last = "conv3" if block == "bottleneck" else "conv2"
    try:
        mid = tuple(state[f"layer{s}.0.conv1.weight"].shape[0] for s in range(1, len(depths) + 1))
        out = tuple(state[f"layer{s}.0.{last}.weight"].shape[0] for s in range(1, len(depths) + 1))
    except KeyError as e:
        raise ExportError(f"{prefix}{e.args[0]} is missing: the entries under {prefix!r} are not a ResNet of "
                          f"{block} blocks in torchvision's layout") from None
    return PlainResNetConfig(block, "imagenet" if kernel == (7, 7) else "cifar", int(stem.shape[0]), mid, out, depths)


def _refuse_other_prefix(folder: Path, source: str | None, prefix: str) -> None:
    """An import of the file's other ResNet (MoCo's key encoder after its query encoder) is another network:
    replaced only with ``overwrite``, as an export of another source is."""
    try:
        earlier = json.loads((folder / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # none there, or not an export: save_exported decides
    if isinstance(earlier, dict) and source is not None and earlier.get("source") == source \
            and earlier.get("source_prefix", prefix) != prefix:
        raise ExportError(f"{folder} holds the ResNet under {earlier['source_prefix']!r} of {source}, not the one "
                          f"under {prefix!r}; choose another folder, or replace it with "
                          f"{'--overwrite' if on_command_line() else 'overwrite=True'}")


def _check_inputs(resolution, crop_ratio, mean, std) -> None:
    def number(value) -> bool:
        return isinstance(value, Real) and not isinstance(value, bool) and value == value  # not NaN

    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ExportError(f"resolution must be a whole number of pixels >= 1, got {resolution!r}")
    if crop_ratio is not None and not (number(crop_ratio) and 0 < crop_ratio <= 1):
        raise ExportError(f"crop_ratio must be a number in (0, 1], got {crop_ratio!r}")
    for name, values, least in (("mean", mean, None), ("std", std, 0)):
        if not (isinstance(values, (tuple, list)) and len(values) == 3 and all(number(v) for v in values)
                and (least is None or all(v > least for v in values))):
            raise ExportError(f"{name} must be 3 numbers, one per RGB channel{' (each > 0)' if least == 0 else ''}, "
                              f"got {values!r}")


def _read(path: str | os.PathLike) -> Mapping:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}; expected a checkpoint file "
                          "(.pt, .pth, .ckpt or .safetensors) that holds a ResNet's weights")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ExportError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # an object torch refuses to rebuild
        if not found:
            raise ExportError(f"{path} is not a readable PyTorch checkpoint (cut short, damaged, or another kind of "
                              "file)") from None
        raise ExportError(f"{path} holds a Python object ({found.group(1)}) besides tensors and plain data, which "
                          "torch loads only by running code from the file. If you trust the file, load it yourself "
                          "(torch.load(path, weights_only=False)) and give slimssl.import_backbone its state dict "
                          "(import_backbone(torch.load(...)['state_dict'], folder))") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ExportError(f"{path} is not a readable PyTorch checkpoint ({e})") from None


def _flat_tensors(tree, into: dict | None = None, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of nested dicts, named by its keys joined with dots (``state_dict.module.conv1.weight``)."""
    into = {} if into is None else into
    if not isinstance(tree, Mapping):
        raise ExportError("expected a state dict (a mapping of names to tensors) or a model, got "
                          f"{type(tree).__name__}")
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            into[f"{path}{key}"] = value
        elif isinstance(value, Mapping):
            _flat_tensors(value, into, f"{path}{key}.")
    return into


def _backbone_prefix(entries: Mapping[str, torch.Tensor], prefix: str | None, where: str) -> str:
    """What the backbone's entries start with: ``prefix``, checked, or the one ResNet found."""
    found = sorted(key[:-len(STEM_KEY)] for key in entries
                   if key.endswith(STEM_KEY) and f"{key[:-len(STEM_KEY)]}layer1.0.conv1.weight" in entries)
    if prefix is not None:
        if prefix not in found:
            raise ExportError(f"{where} has no ResNet under the prefix {prefix!r} (no {prefix}{STEM_KEY} beside "
                              f"{prefix}layer1.0.conv1.weight); " + (f"it has one under {_listed(found)}" if found
                                                                     else "it holds no ResNet"))
        return prefix
    if not found:
        raise ExportError(f"{where} holds no ResNet in torchvision's layout: no entry ends with {STEM_KEY} beside "
                          f"layer1.0.conv1.weight (of {len(entries)} tensors"
                          + (f", e.g. {next(iter(entries))!r})" if entries else ")"))
    if len(found) > 1:
        raise ExportError(f"{where} holds {len(found)} ResNets, under {_listed(found)}: say which to import with "
                          "prefix= (--prefix), e.g. a MoCo query encoder or BYOL's online network")
    return found[0]


def _listed(prefixes: list[str]) -> str:
    return ", ".join(repr(p) for p in prefixes)
