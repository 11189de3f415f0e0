"""Evaluating an exported sub-network by the protocols of a checkpoint (``slimssl knn EXPORT --data DATA``).

The export is rebuilt as a supernet whose only menu entry is that sub-network, under its own name: a supernet
of the geometry it was cut from (base width and channel divisor), with shared BatchNorm holding the exported
statistics, marked as estimated for it, so that evaluation uses them as exported (as the export's users
will), not re-estimated. Only the entry's leading slices of the weights are filled, which is all it reads.
Like a checkpoint, it is evaluated in float32, whatever dtype it was exported in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import Config, config_from_dict
from ..errors import ExportError
from ..export.files import load_exported
from ..layout import EXPORT_CONFIG
from ..models.arch import subnet_channels
from ..models.plain import PlainResNet
from ..models.resnet import SlimResNet
from ..nn.layers import SlimBatchNorm
from ..nn.spec import SubnetSpec

log = logging.getLogger("slimssl")

ARCH_OF_BLOCK = {"basic": "resnet18", "bottleneck": "resnet50"}  # (the depths are given: any arch of the block)
MIN_EVALUATED_WIDTH = 1 / 64  # narrower than any slimmable network's menu; a config.json saying so is edited


def supernet_of_export(folder: str | Path, data: str | None = None) -> tuple[SlimResNet, Config]:
    """The exported sub-network in ``folder`` as a supernet of one entry (eval mode), and its config: the
    export's inputs (resolution, crop ratio, mean, std) and ``data``, which an export does not record (None: the
    config's default, for uses that read no data, such as profiling)."""
    plain = load_exported(folder)
    info = plain.metadata
    unrecorded = [k for k in ("resolution", "mean", "std") if k not in info]
    if unrecorded:  # slimssl.export_subnet without config=: the inputs it expects are not known
        log.warning("%s/%s records no %s: evaluated with the config's default (%s)", folder, EXPORT_CONFIG,
                    ", ".join(unrecorded), ", ".join(f"{k} {getattr(Config().data, k)}" for k in unrecorded))
    spec = _spec_of(plain, folder)
    base, divisor = _geometry(plain, spec, folder)
    cfg = config_from_dict({
        "name": f"{spec.name} (exported)",
        "model": {"arch": ARCH_OF_BLOCK[plain.config.block], "depths": list(spec.depths), "base_width": base,
                  "stem": plain.config.stem, "bn": "shared", "channel_divisor": divisor},
        # a config's menu holds the full network (a pretraining's target); the supernet's is the export alone
        "menu": {"widths": sorted({1.0, spec.width}, reverse=True)},
        "data": {**({"source": data} if data is not None else {}),
                 **{k: info[k] for k in ("resolution", "mean", "std") if k in info}},
        "eval": {k: info[k] for k in ("crop_ratio",) if k in info},
    }, f"the exported sub-network {folder}")
    supernet = SlimResNet(plain.config.block, spec.depths, base, plain.config.stem, menu=[spec], bn="shared",
                          channel_divisor=divisor)
    _load_plain(supernet, spec, plain)
    supernet.mark_bn_estimated(spec)  # evaluated with the statistics it was exported with
    supernet.slim_state.active = spec  # a forward without subnet= runs the export, not untrained full width
    supernet.menu_only = (f"{folder} is an export of {spec.name} alone, whose weights are all it holds (another "
                          "width would run on untrained ones); evaluate or profile the run it was exported from")
    return supernet.eval(), cfg


def _spec_of(plain: PlainResNet, folder) -> SubnetSpec:
    """The sub-network the export was cut as: its recorded name, else its full width."""
    depths = plain.config.depths
    name = plain.metadata.get("subnet")
    try:
        spec = SubnetSpec.parse(name, depths) if isinstance(name, str) else SubnetSpec(1.0, depths)
    except ValueError as e:
        raise ExportError(f"{folder}/{EXPORT_CONFIG} names its sub-network {name!r}, which is not a sub-network's name "
                          f"({e})") from None
    if tuple(spec.depths) != tuple(depths):
        raise ExportError(f"{folder}/{EXPORT_CONFIG} names its sub-network {name!r}, whose depths are not the "
                          f"architecture's {list(depths)}")
    if spec.width < MIN_EVALUATED_WIDTH:  # the supernet built around it would be 1 / width**2 times its size
        raise ExportError(f"{folder}/{EXPORT_CONFIG} names its sub-network {name!r}, of width {spec.width:g}: "
                          f"evaluating it as a sub-network would build a supernet about {1 / spec.width ** 2:,.0f} "
                          f"times its size; exports of width {MIN_EVALUATED_WIDTH:g} and more are evaluated "
                          "(evaluate the run it was exported from)")
    return spec


def supernet_geometry(plain: PlainResNet, spec: SubnetSpec) -> tuple[int, int] | None:
    """A base width and a channel divisor whose supernet has ``spec`` of exactly ``plain``'s channels: those it
    records it was cut from (``cut_from``), else (an export written before it recorded them, or a network
    imported from elsewhere) found by search; None where no supernet has them (a wide ResNet's bottlenecks)."""
    wanted = plain.config
    channels = (wanted.stem_channels, tuple(wanted.mid_channels), tuple(wanted.out_channels))

    def fits(base: int, divisor: int) -> bool:
        return subnet_channels(wanted.block, base, spec.width, divisor, len(spec.depths)) == channels

    recorded = plain.metadata.get("cut_from")
    if isinstance(recorded, dict):
        base, divisor = recorded.get("base_width"), recorded.get("channel_divisor")
        if all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (base, divisor)) \
                and fits(base, divisor):
            return base, divisor
    # Rounded by a divisor, a channel count is a multiple of it, or the whole layer where rounding up would pass
    # that. So either the divisor divides the stem's channels, the stem being base * width rounded (never below
    # 90% of it, which bounds the base), or the stem is the whole base and the divisor divides another layer's.
    stem, counts = wanted.stem_channels, {count for stage in channels[1:] for count in stage}
    for divisor in _divisors_of(stem):
        for base in range(stem, int((stem + divisor) / (0.9 * spec.width)) + 2):
            if fits(base, divisor):
                return base, divisor
    for divisor in sorted({d for count in counts for d in _divisors_of(count)}):
        if fits(stem, divisor):
            return stem, divisor
    return None


def _geometry(plain: PlainResNet, spec: SubnetSpec, folder) -> tuple[int, int]:
    found = supernet_geometry(plain, spec)
    if found is None:
        wanted = plain.config
        raise ExportError(f"{folder} has channels {wanted.stem_channels}, {list(wanted.mid_channels)}, "
                          f"{list(wanted.out_channels)}, which no supernet's {spec.name} has: it cannot be evaluated "
                          "as one (evaluate the run it was exported from)")
    return found


def _divisors_of(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@torch.no_grad()
def _load_plain(supernet: SlimResNet, spec: SubnetSpec, plain: PlainResNet) -> None:
    """Write ``plain``'s weights and BatchNorm state into ``spec``'s leading slices of ``supernet``: the inverse
    of ``SlimResNet.export`` (a classifier, which the supernet has not, is left out)."""
    modules = dict(supernet.named_modules())
    for key, value in plain.state_dict().items():
        owner, attr = key.rsplit(".", 1)
        if owner == "fc":
            continue
        layer = modules[owner]
        target = getattr(layer.norm_for(spec), attr) if isinstance(layer, SlimBatchNorm) else getattr(layer, attr)
        if target.dim() > 0:
            target = target[tuple(slice(0, n) for n in value.shape)]
        target.copy_(value)
