"""One width of a slimmable ResNet in SlimCLR's layout, renamed and cut to torchvision's layout, so that
``import_backbone`` imports it as it imports any ResNet (``slimssl import-backbone CKPT --width 0.5``).

SlimCLR's slimmable ResNet (its ``s_resnet``) holds each convolution at full width, every width running its
leading channels (``overlap_weight``, SlimCLR's default: a checkpoint trained without it slices the middle widths
elsewhere, which nothing in the file shows, so it would import wrong), and one BatchNorm per width:
``bn1.bn.<i>``, ``i`` counting the widths from the widest. Its blocks are numbered in one sequence,
``features.<k>``, each stage's first block holding the ``shortcut`` (a 1x1 convolution and its BatchNorms) that
changes the channels or the size. The width's channels are read from its BatchNorms, so no channel rule is
assumed.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..errors import ExportError

BLOCK = re.compile(r"features\.(\d+)\.(.+)")
CONVS = ("conv1", "conv2", "conv3")


def slimmable_prefixes(entries: Mapping[str, torch.Tensor]) -> list[str]:
    """The prefixes under which ``entries`` hold a slimmable ResNet in SlimCLR's layout."""
    return sorted(key[:-len("features.0.conv1.weight")] for key in entries
                  if key.endswith("features.0.conv1.weight")
                  and f"{key[:-len('features.0.conv1.weight')]}bn1.bn.0.weight" in entries)


def widths_of(entries: Mapping[str, torch.Tensor], prefix: str) -> list[float]:
    """The widths of the slimmable ResNet under ``prefix``, widest first: each stem BatchNorm's channels over
    the widest's."""
    channels = []
    while f"{prefix}bn1.bn.{len(channels)}.weight" in entries:
        channels.append(entries[f"{prefix}bn1.bn.{len(channels)}.weight"].shape[0])
    return [c / max(channels) for c in channels]


def one_width(entries: Mapping[str, torch.Tensor], width: float, where: str) -> dict[str, torch.Tensor]:
    """``entries`` with every slimmable ResNet in them replaced by its sub-network at ``width``, in torchvision's
    names under the same prefix; the other entries as they are."""
    prefixes = slimmable_prefixes(entries)
    out = {key: value for key, value in entries.items() if not key.startswith(tuple(prefixes))}
    for prefix in prefixes:
        widths = widths_of(entries, prefix)
        index = next((i for i, w in enumerate(widths) if abs(w - width) < 1e-6), None)
        if index is None:
            raise ExportError(f"{where}: the slimmable ResNet under {prefix!r} has the widths "
                              f"{', '.join(f'{w:g}' for w in widths)}; width {width:g} is none of them")
        own = {key[len(prefix):]: value for key, value in entries.items() if key.startswith(prefix)}
        out.update({prefix + key: value for key, value in _renamed(own, index, where).items()})
    return out


def _renamed(own: dict[str, torch.Tensor], index: int, where: str) -> dict[str, torch.Tensor]:
    """One slimmable ResNet's entries (without their prefix) as the torchvision ResNet of its width ``index``."""
    def norm(name: str) -> dict[str, torch.Tensor]:  # the BatchNorm of this width, by its torchvision name
        return {f"{name}.{part}": own[f"{name}.bn.{index}.{part}"]
                for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                if f"{name}.bn.{index}.{part}" in own}

    def channels(name: str) -> int:
        key = f"{name}.bn.{index}.weight" if f"{name}.bn.{index}.weight" in own else f"{name}.bn.{index}.running_mean"
        if key not in own:
            raise ExportError(f"{where}: {name} has no BatchNorm for width index {index}")
        return own[key].shape[0]

    stem = channels("bn1")
    state = {"conv1.weight": own["conv1.weight"][:stem], **_named(norm("bn1"), "bn1", "bn1")}
    blocks = sorted({int(m.group(1)) for m in map(BLOCK.fullmatch, own) if m})
    stage, position, width_in = 0, 0, stem
    for k in blocks:
        block = f"features.{k}"
        if f"{block}.shortcut.0.weight" in own:  # a stage's first block
            stage, position = stage + 1, 0
        elif stage == 0:  # SlimCLR's CIFAR ResNet: its first stage keeps the stem's channels and size
            raise ExportError(f"{where}: the first block of its slimmable ResNet has no shortcut, as in SlimCLR's "
                              "CIFAR ResNet (s_resnet_cifar), whose stages are not torchvision's; only its ImageNet "
                              "ResNets (s_resnet) can be imported")
        name, previous = f"layer{stage}.{position}", width_in
        for conv, bn in zip(CONVS, ("bn1", "bn2", "bn3")):
            if f"{block}.{conv}.weight" not in own:
                continue
            out = channels(f"{block}.{bn}")
            state[f"{name}.{conv}.weight"] = own[f"{block}.{conv}.weight"][:out, :previous]
            state.update(_named(norm(f"{block}.{bn}"), f"{block}.{bn}", f"{name}.{bn}"))
            previous = out
        if f"{block}.shortcut.0.weight" in own:
            out = channels(f"{block}.shortcut.1")
            state[f"{name}.downsample.0.weight"] = own[f"{block}.shortcut.0.weight"][:out, :width_in]
            state.update(_named(norm(f"{block}.shortcut.1"), f"{block}.shortcut.1", f"{name}.downsample.1"))
        width_in, position = previous, position + 1
    heads = {key: value for key, value in own.items() if not (key.startswith(("conv1.", "bn1.", "features.")))}
    return {**state, **heads}  # (fc and the like are left out by the import, which says so)


def _named(entries: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {new + key[len(old):]: value.clone() for key, value in entries.items()}
