"""A config against other runs and processes: what differs between two, whether it fits a number of
processes, and a sub-network's config as a network of its own."""

from __future__ import annotations

from typing import Any

from pydantic_core import to_jsonable_python

from ..nn.spec import SubnetSpec
from ..wording import counted
from .load import config_from_dict
from .schema import Config, ConfigError, backbone_channels, group_size_hint


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


# Settings a run may be continued with differently without mixing anything, the machine's or the job's rather
# than the run's: data.workers (unset: the CPUs the process may use) changes only how fast the streaming loader
# decodes, train.save_every_minutes only when last.pt is written (a job script may add it to a run it continues).
MACHINE_DEPENDENT = frozenset({"data.workers", "train.save_every_minutes"})


def _resolved(cfg: Config) -> dict:
    """``cfg`` as compared: a method's options with their defaults (an option given its default is no change)."""
    data = cfg.model_dump(mode="json")
    method = cfg.method.registered()
    if method is not None:  # (as model_dump writes them: a tuple as a list)
        data["method"]["options"] = {**to_jsonable_python(method.default_options), **data["method"]["options"]}
    return data


def config_differences(saved: Config, now: Config, prefixes: tuple[str, ...] = ("",),
                       ignore: frozenset[str] = frozenset(), labels: tuple[str, str] = ("saved", "now")) -> list[str]:
    """``key: saved X, now Y`` for every setting that differs, as dotted keys (``train.epochs``), among the
    keys that start with one of ``prefixes`` and are not in ``ignore``; ``labels`` name the two sides."""
    a, b = _flatten(_resolved(saved)), _flatten(_resolved(now))
    keys = sorted(k for k in (set(a) | set(b)) - ignore if k.startswith(prefixes))
    return [f"{k}: {labels[0]} {a.get(k)!r}, {labels[1]} {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_processes(cfg: Config, world: int, source: str) -> None:
    """Refuse, before any work starts, a total batch that cannot be split evenly over ``world`` processes and
    ``train.micro_batches``, and BatchNorm groups that do not fit the batch each forward pass gets."""
    batch = cfg.train.batch_size
    first = 1 if cfg.train.sync_bn else 2  # samples per process: BatchNorm needs two, synchronised or not
    if world > 1 and (batch < world or batch % world):
        counts = [str(n) for n in range(1, batch + 1) if batch % n == 0 and batch // n >= first]
        counts = counts if len(counts) <= 8 else [*counts[:8], "..."]
        raise ConfigError(f"invalid config {source}:\n  train.batch_size: {batch} is the total batch over all "
                          f"processes, so it must be a multiple of the number of processes {world} "
                          f"(allowed: {', '.join(str(k * world) for k in range(first, first + 3))}, ...; a resumed run "
                          f"changes its batch only at an epoch's end), or run on a number of processes that divides "
                          f"it ({', '.join(counts)})")
    per_process, group = batch // world, cfg.model.bn_group_size
    if per_process < first:  # BatchNorm of one sample fails in the first step
        raise ConfigError(f"invalid config {source}:\n  train.batch_size: {batch} over {world} processes leaves "
                          f"each one sample, and each process's BatchNorm needs two: use at least {2 * world} "
                          f"(allowed: {2 * world}, {3 * world}, {4 * world}, ...), or train.sync_bn: true (on GPUs)")
    # a part of one sample needs SyncBatchNorm's statistics from the other processes: on one process it is plain
    per_pass = _micro_batch(cfg, per_process, first if world > 1 else 2, source,
                            f"train.batch_size {batch} over {counted(world, 'process')}")
    parts = cfg.train.micro_batches
    part = f"micro-batch {per_pass}" if parts > 1 else f"batch {per_process}"
    if group and per_pass % group:
        fewer = [str(k) for k in range(1, parts) if per_process % k == 0 and per_process // k % group == 0]
        raise ConfigError(f"invalid config {source}:\n  model.bn_group_size {group} must divide the per-process "
                          f"{part} (train.batch_size {batch} over {counted(world, 'process')}"
                          + (f" in {parts} train.micro_batches" if parts > 1 else "")
                          + f"; {group_size_hint(per_pass, cfg.method.shuffle_bn)}"
                          + (f"; or train.micro_batches {' or '.join(fewer[-2:])}, which keeps the groups" if fewer
                             else "") + ")")
    if cfg.method.shuffle_bn and world * per_pass // (group or per_pass) < 2:
        how = (f"set model.bn_group_size to a size smaller than the per-process {part} that divides it "
               f"({group_size_hint(per_pass, True)}), or run on several processes")
        raise ConfigError(f"invalid config {source}:\n  method.shuffle_bn needs the batch normalised in several "
                          f"groups, but this run's passes have one BatchNorm group each: {how}"
                          + (f", or lower train.micro_batches {parts}" if parts > 1 else ""))


def _micro_batch(cfg: Config, per_process: int, first: int, source: str, split: str) -> int:
    """The samples of one forward pass per process: ``per_process`` in ``train.micro_batches`` equal parts of at
    least ``first`` samples (BatchNorm's minimum); refused otherwise, with the counts that fit (and keep
    ``model.bn_group_size``'s groups)."""
    parts, group = cfg.train.micro_batches, cfg.model.bn_group_size
    if per_process % parts == 0 and per_process // parts >= first:
        return per_process // parts
    fits = [str(n) for n in range(1, per_process + 1) if per_process % n == 0 and per_process // n >= first
            and not (group and per_process // n % group)]
    raise ConfigError(f"invalid config {source}:\n  train.micro_batches: {parts} parts of the per-process batch "
                      f"{per_process} ({split}) must be equal, and of at least {counted(first, 'sample')} for "
                      f"BatchNorm{f' groups of {group}' if group else ''}: use one of {', '.join(fits[:8])}"
                      f"{', ...' if len(fits) > 8 else ''}")


def standalone_config(cfg: Config, spec: SubnetSpec) -> Config:
    """``spec`` of ``cfg``'s supernet as a network of its own: the same method, data, optimiser and schedule,
    a menu of one, and no slimming settings (no slow start, distillation or loss re-weighting). Pretraining it
    is what "the same network trained alone" means in the papers' comparisons and in the one-by-one baseline.
    """
    from ..nn.channels import scaled_channels

    data = cfg.model_dump(mode="json")
    div = cfg.model.channel_divisor
    base = scaled_channels(cfg.model.base_width, spec.width, div)
    sliced = backbone_channels(cfg.model, spec.width)
    alone = backbone_channels(cfg.model.model_copy(update={"base_width": base}), 1.0)
    if sliced != alone:  # a config states only base_width: stage i of a network of its own has base_width * 2**i
        raise ConfigError(f"{spec.name} of {cfg.name} has {sliced} channels (stem, then each stage's inner and output "
                          f"channels), which no network of its own has (base_width {base} gives {alone}), so it "
                          "cannot be pretrained alone for comparison; choose model.base_width and "
                          "model.channel_divisor so that each width scales every layer alike (with channel_divisor "
                          "1, a base_width that each width times makes a whole number)")
    data["name"] = f"{cfg.name}-alone-{spec.name}"
    data["model"]["base_width"] = base
    data["model"]["depths"] = list(spec.depths)
    data["menu"] = {"widths": [1.0]}
    data["slim"] = {}
    method = cfg.method.registered()
    read = None if method is None else vars(method).get("settings_read")
    for key in ("proj_hidden", "pred_hidden"):  # the heads' hidden layers are slimmed with the backbone
        if read is None or key in read:  # (MoCo v2 has no predictor: its pred_hidden stays as set)
            data["method"][key] = scaled_channels(getattr(cfg.method, key), spec.width, div)
    return config_from_dict(data, f"{cfg.name} as a standalone {spec.name}")
