"""A ResNet trained elsewhere, saved as an export: a torchvision model, or the backbone inside another library's
checkpoint (MoCo, solo-learn, lightly, ...). slimssl's protocols then measure it as they measure an exported
sub-network (``slimssl knn FOLDER --data DATA``, ``linear``, ``finetune``, ``profile``): the network trained
alone that a slimmable run is compared with, or a published model to check the protocols against.

The architecture is read from the weights' names (torchvision's layout) and shapes: the stem from ``conv1``
(7x7: ImageNet's, with its max-pool; 3x3: the CIFAR one, padded by 1), the block from whether ``layer1.0.conv3``
exists, the channels and depths stage by stage. A checkpoint file is read with ``weights_only=True``, so nothing
in it runs; the objects of its own that it holds beside the tensors are read as inert placeholders.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from numbers import Real
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..config.schema import IMAGENET_MEAN, IMAGENET_STD
from ..checkpoint import FORMAT as CHECKPOINT_FORMAT
from ..errors import ExportError
from ..eval.exported import supernet_geometry
from ..layout import EXPORT_CONFIG
from ..models.fit import stored_depths, weights_misfit
from ..models.plain import PlainResNet, PlainResNetConfig
from ..nn.spec import SubnetSpec
from ..wording import on_command_line
from .files import input_preprocessing, refuse_run_folder, save_exported
from .slimclr import one_width, slimmable_prefixes, widths_of

log = logging.getLogger("slimssl")

STEM_KEY = "conv1.weight"
BACKBONE_KEY = re.compile(r"(conv1|bn1|layer\d+)\.")  # a torchvision ResNet's names; fc and any head are left out
# nn.Sequential(*resnet.children())[:-1], as lightly's examples build a backbone: its children's indices
SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
# the inputs recorded when none are given, by stem: torchvision's ImageNet evaluation, and CIFAR's whole image
DEFAULT_INPUTS = {"imagenet": (224, 0.875), "cifar": (32, 1.0)}


def import_backbone(weights: str | os.PathLike | Mapping | nn.Module, folder: str | os.PathLike, *,
                    prefix: str | None = None, resolution: int | None = None, crop_ratio: float | None = None,
                    mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD,
                    overwrite: bool = False, width: float | None = None) -> Path:
    """Save the ResNet backbone of ``weights`` into ``folder`` as an export (:func:`slimssl.load_exported` loads
    it) and return the folder.

    ``weights`` is a checkpoint file (``.pt``, ``.pth``, ``.ckpt``, ``.safetensors``), a state dict, or a
    model (a torchvision ResNet). The backbone's entries are found wherever they are nested (``state_dict``,
    ``model``, ...) and whatever their names start with (``module.encoder_q.``, ``backbone.``), in torchvision's
    names or as ``nn.Sequential(*resnet.children())[:-1]`` numbers them; where a checkpoint holds several (MoCo's
    query and key encoders, an online and a momentum network), ``prefix`` says which, e.g.
    ``"state_dict.module.encoder_q."``. What is not the backbone (``fc``, a projector, prototypes) is left out.
    The network must be one that slimssl's evaluations can rebuild as a slimmable ResNet's sub-network:
    torchvision's resnet18 to resnet152, or narrower and shallower ones of the same pattern; a wide ResNet or a
    ResNeXt is refused. A model given is checked for strides, paddings and dilations other than slimssl's.
    A slimmable ResNet in SlimCLR's layout (its released checkpoints) is imported one ``width`` at a time
    (``export/slimclr.py``): its leading channels and the BatchNorm statistics of that width.

    ``resolution``, ``crop_ratio``, ``mean`` and ``std`` are the inputs the network expects, recorded for
    evaluation (default: 224 px and 0.875 with ImageNet's stem, 32 px and 1 with the CIFAR one; ImageNet's
    mean and std). An export of another source in ``folder`` is replaced only with ``overwrite``."""
    _check_inputs(resolution, crop_ratio, mean, std)
    refuse_run_folder(folder)
    source = str(Path(weights).resolve()) if isinstance(weights, (str, os.PathLike)) else None
    where = source or "the weights given"
    given = _read(weights) if source else weights.state_dict() if isinstance(weights, nn.Module) else weights
    if isinstance(given, Mapping) and given.get("format") == CHECKPOINT_FORMAT:
        raise ExportError(f"{where} is a slimssl checkpoint: take its sub-networks out with slimssl export "
                          "CHECKPOINT --all --out DIR (slimssl.export_run), which keeps their BatchNorm statistics")
    entries = _one_width_if_slimmable(_torchvision_names(_flat_tensors(given)), width, where)
    prefix = _backbone_prefix(entries, prefix, where)
    state, left_out = _backbone_state(entries, prefix)
    config = plain_config(state, prefix)
    model = PlainResNet(config)
    for key, value in model.state_dict().items():  # older checkpoints have no BatchNorm step counts
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    misfit = weights_misfit(lambda: PlainResNet(config), config.depths, state)
    if misfit:
        raise ExportError(f"the entries under {prefix!r} of {where} are not a ResNet in torchvision's layout with "
                          f"the {config.block} blocks and channels their shapes suggest: {misfit}")
    if supernet_geometry(model, SubnetSpec(1.0, config.depths)) is None:
        raise ExportError(f"{where}: the ResNet under {prefix!r} has channels {config.stem_channels}, "
                          f"{list(config.mid_channels)}, {list(config.out_channels)}, which slimssl's evaluations "
                          "cannot rebuild: they run a network as a slimmable ResNet's sub-network, whose bottlenecks "
                          "are a quarter as wide inside as out, stage widths doubling (torchvision's resnet18 to "
                          "resnet152 are; wide_resnet50_2 is not)")
    if isinstance(weights, nn.Module):
        _refuse_other_convolutions(weights, model, prefix)
    model.load_state_dict(state)
    default_resolution, default_crop = DEFAULT_INPUTS[config.stem]
    resolution, crop_ratio = resolution or default_resolution, crop_ratio or default_crop
    if not overwrite:
        _refuse_other_prefix(Path(folder), source, prefix)
    metadata = {**input_preprocessing(resolution, mean, std, crop_ratio), "source": source,
                "source_prefix": prefix, **({"source_width": width} if width is not None else {})}
    folder = save_exported(model.eval(), folder, metadata, overwrite=overwrite)
    params = sum(p.numel() for p in model.parameters())
    log.info("imported a %s ResNet (%s stem, depths %s, %s features, %s params) from %r of %s into %s, for inputs of "
             "%d px (crop ratio %g)%s", config.block, config.stem, list(config.depths), config.feature_dim,
             f"{params:,}", prefix, where, folder, resolution, crop_ratio,
             f"; left out {', '.join(sorted(left_out))}" if left_out else "")
    if config.stem == "cifar":
        log.info("the 3x3 stem is run with padding 1, as slimssl's CIFAR ResNets (solo-learn's pad by 2: their "
                 "networks compute other features here)")
    return folder


def _one_width_if_slimmable(entries: dict[str, torch.Tensor], width: float | None, where: str) -> dict:
    """``entries`` with a slimmable ResNet (SlimCLR's layout) cut to ``width``; ``width`` refused without one."""
    slimmable = slimmable_prefixes(entries)
    if not slimmable:
        if width is not None:
            raise ExportError(f"width= (--width) picks one width of a slimmable ResNet in SlimCLR's layout, and "
                              f"{where} holds none (a plain ResNet is imported whole: leave width out)")
        return entries
    if width is None:
        widths = ", ".join(f"{w:g}" for w in widths_of(entries, slimmable[0]))
        raise ExportError(f"{where} holds a slimmable ResNet in SlimCLR's layout (under {_listed(slimmable)}), whose "
                          f"widths {widths} are networks of their own: import one with width= (--width), once for "
                          "each width you want")
    if not isinstance(width, Real) or isinstance(width, bool) or not width > 0:
        raise ExportError(f"width must be a positive number (one of the checkpoint's widths), got {width!r}")
    return one_width(entries, float(width), where)


def _backbone_state(entries: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The backbone's entries under ``prefix``, named as in the ResNet, and the names of the other parts there
    (``fc``, a projector), which are left out."""
    state, left_out = {}, set()
    for key, value in entries.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            if BACKBONE_KEY.match(name):
                state[name] = value
            else:
                left_out.add(name.split(".")[0])
    return state, left_out


def plain_config(state: Mapping[str, torch.Tensor], prefix: str = "") -> PlainResNetConfig:
    """The architecture of a torchvision-layout ResNet's state dict (without ``fc``), read from its shapes."""
    if STEM_KEY not in state:
        raise ExportError(f"{prefix}{STEM_KEY} is missing; expected a ResNet in torchvision's layout")
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
        grouped = [s for s in range(1, len(depths) + 1) if state[f"layer{s}.0.conv2.weight"].shape[1] != mid[s - 1]]
    except KeyError as e:
        raise ExportError(f"{prefix}{e.args[0]} is missing: the entries under {prefix!r} are not a ResNet of "
                          f"{block} blocks in torchvision's layout") from None
    if grouped:
        raise ExportError(f"{prefix}layer{grouped[0]}.0.conv2.weight has the shape "
                          f"{list(state[f'layer{grouped[0]}.0.conv2.weight'].shape)}: a grouped convolution (a "
                          "ResNeXt), which slimssl's ResNets do not have")
    return PlainResNetConfig(block, "imagenet" if kernel == (7, 7) else "cifar", int(stem.shape[0]), mid, out, depths)


def _refuse_other_convolutions(given: nn.Module, model: PlainResNet, prefix: str) -> None:
    """A model given says what its weights cannot: a stem padded by 2 (solo-learn's CIFAR ResNets), a dilated
    stage, a max-pool of its own. Each of slimssl's convolutions and its max-pool is compared with the model's of
    the same name, where it has one."""
    theirs = dict(given.named_modules())
    for name, ours in model.named_modules():
        other = theirs.get(f"{prefix}{name}")
        if isinstance(ours, nn.Conv2d) and isinstance(other, nn.Conv2d):
            differs = [f"{attr} {getattr(other, attr)} (slimssl's: {getattr(ours, attr)})"
                       for attr in ("stride", "padding", "dilation", "groups")
                       if getattr(other, attr) != getattr(ours, attr)]
        elif name == "maxpool" and other is not None and type(other) is not type(ours):
            differs = [f"a {type(other).__name__} (slimssl's: {type(ours).__name__})"]
        else:
            continue
        if differs:
            raise ExportError(f"the model's {prefix}{name} has {', '.join(differs)}: slimssl's ResNet would compute "
                              "other features from its weights")


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
        return isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)

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
        loaded = _with_placeholders(path)
        if loaded is None:
            raise ExportError(f"{path} holds a Python object ({found.group(1)}) besides tensors and plain data, "
                              "which torch loads only by running code from the file. If you trust the file, load it "
                              "yourself (torch.load(path, weights_only=False)) and give slimssl.import_backbone what "
                              "it holds: a model, or a state dict such as its ['state_dict']") from None
        return loaded
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ExportError(f"{path} is not a readable PyTorch checkpoint ({e})") from None


class _Placeholder:
    """What an object of a checkpoint's own classes (a Lightning checkpoint's hyper-parameters: an argparse
    Namespace, an omegaconf config) is read as: nothing of it is kept or run, as the import needs its tensors
    alone."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _with_placeholders(path: Path) -> Mapping | None:
    """The checkpoint at ``path`` read by torch's weights-only loader, with every class or function it names that
    torch does not allow standing for a :class:`_Placeholder`; None where this torch cannot (before 2.6, or a
    file in the legacy format)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(type(name.rpartition(".")[2], (_Placeholder,), {"__module__": name.rpartition(".")[0]}), name)
                     for name in names]
        with torch.serialization.safe_globals(stand_ins):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure leaves the refusal that names the object
        return None
    log.info("%s: read the Python objects it holds besides tensors (%s) as empty placeholders, running nothing "
             "from the file; only its tensors are imported", path, ", ".join(names))
    return loaded


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


def _torchvision_names(entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``entries`` with each backbone built as ``nn.Sequential(*resnet.children())[:-1]`` (numbered children:
    ``backbone.0.weight`` for ``backbone.conv1.weight``) renamed as torchvision names a ResNet's parts."""
    numbered = {key[:-len("0.weight")] for key, value in entries.items()
                if key.endswith("0.weight") and (key == "0.weight" or key.endswith(".0.weight")) and value.dim() == 4
                and f"{key[:-len('0.weight')]}4.0.conv1.weight" in entries
                and f"{key[:-len('0.weight')]}{STEM_KEY}" not in entries}
    if not numbered:
        return entries
    renamed = {}
    for key, value in entries.items():
        prefix = next((p for p in numbered if key.startswith(p)), None)
        if prefix is not None:
            index, _, rest = key[len(prefix):].partition(".")
            key = f"{prefix}{SEQUENTIAL_NAMES.get(index, index)}.{rest}"
        renamed[key] = value
    return renamed


def _backbone_prefix(entries: Mapping[str, torch.Tensor], prefix: str | None, where: str) -> str:
    """What the backbone's entries start with: ``prefix``, checked, or the one ResNet found."""
    found = sorted(key[:-len(STEM_KEY)] for key in entries
                   if key.endswith(STEM_KEY) and f"{key[:-len(STEM_KEY)]}layer1.0.conv1.weight" in entries)
    if prefix is not None:
        if prefix and not prefix.endswith(".") and f"{prefix}." in found:  # --prefix module.encoder_q
            prefix += "."
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
