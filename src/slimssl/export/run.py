"""Take a run's sub-networks out as plain models, as ``slimssl export`` does: one folder per sub-network, with
the preprocessing recorded beside the weights, and shared BatchNorm statistics re-estimated as evaluation does.
``files.py`` writes and reads the files; this module decides what goes into them."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import export_source, open_supernet, pretraining_unfinished
from ..config import Config
from ..errors import DataError, UsageError
from ..launch import warn_of_repeated_work
from ..models.resnet import SlimResNet
from ..nn.spec import SubnetSpec, Subnets
from ..seeds import keeps_random_state
from .files import (check_export_folder, check_format, export_differences, export_subnet, load_exported,
                    preprocessing, refuse_run_folder)
from .graphs import GRAPHS

log = logging.getLogger("slimssl")


@keeps_random_state
def export_run(checkpoint: str | os.PathLike | None, out: str | Path, subnets: Subnets = "all", *,
               config: Config | dict | str | Path | None = None, overrides: Sequence[str] = (),
               fmt: str = "safetensors", overwrite: bool = False, verify: bool = False,
               resolution: int | None = None, recalibrate_bn: int | None = None, device: str | torch.device = "auto",
               eval_batch_size: int | None = None, **data) -> list[dict]:
    """Export ``subnets`` (names or widths, or ``"all"`` of the menu) of ``checkpoint`` (a checkpoint file or
    run directory) into ``out/<subnet name>/``, as ``slimssl export`` does; returns one row per sub-network
    (subnet, path, and with ``verify`` the largest absolute and relative differences from the supernet's
    sub-network, ``max_abs_diff`` and ``max_rel_diff``, and the graph's as ``onnx_...`` or ``pt2_...``).

    Each ``config.json`` records the preprocessing (resolution, mean, std) and the BatchNorm statistics'
    origin. With shared BatchNorm each sub-network's statistics are re-estimated first on ``recalibrate_bn``
    train batches (default: evaluation's; 0 exports them as stored), read as the evaluation functions read
    them: ``data``, ``loader``, ``workers``, ``skip_unreadable`` and ``crop_ratio`` as in :func:`slimssl.knn`.
    With ``checkpoint=None``, a random initialisation of ``config`` (a recipe, with ``overrides``) is exported;
    with a checkpoint, ``config`` is only checked against its architecture.
    ``fmt="onnx"`` adds an ONNX graph traced at ``resolution`` (default: the config's), which takes any size;
    ``fmt="pt2"`` a torch.export program, which runs with torch alone (see :func:`slimssl.export_subnet`).
    """
    from ..eval import recalibration_batches
    from ..eval.inputs import DataOptions, check_numbers

    check_numbers(resolution=resolution, recalibrate_bn=recalibrate_bn, eval_batch_size=eval_batch_size)
    options = DataOptions.of(data, export_run)
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise UsageError(f"export_run takes a checkpoint file or run directory (str, Path or PretrainRun), got "
                         f"{type(checkpoint).__name__}: to export a supernet in memory, call "
                         "slimssl.export_subnet(supernet, subnet, out_dir, config=its_config)")
    check_format(fmt)
    if checkpoint is None and recalibrate_bn:
        raise UsageError("recalibrate_bn re-estimates a trained checkpoint's BatchNorm statistics; a random "
                         "initialisation is exported with its initial ones")
    warn_of_repeated_work("slimssl.export_run()")
    supernet, cfg, recalibrated, trained = open_supernet(checkpoint, config, overrides)
    if pretraining_unfinished(trained):
        log.warning("%s was saved at epoch %.2f of the run's %d: pretraining has not finished, and the exports are "
                    "the network as it was then (config.json records trained_epochs and pretraining_epochs)",
                    checkpoint, trained["trained_epochs"], trained["pretraining_epochs"])
    specs = supernet.resolve_many(subnets)
    source = export_source(checkpoint, config, overrides)
    refuse_run_folder(out)
    options.refuse_output_in_data(cfg, out, "the exports' folders", "exports")
    for spec in specs:  # every folder is checked before anything is written
        check_export_folder(Path(out) / spec.name, source, overwrite)
    batches = 0 if checkpoint is None else recalibration_batches(recalibrate_bn, supernet.slim_state.private_bn)
    if batches == 0:
        _warn_of_unread_data(options, eval_batch_size, "a random initialisation" if checkpoint is None else
                             "private BatchNorm statistics" if supernet.slim_state.private_bn else "recalibrate_bn 0")
    models, statistics = _models_to_export(supernet, cfg, specs, batches, recalibrated, checkpoint=checkpoint,
                                           options=options, device=device, eval_batch_size=eval_batch_size)
    resolution = resolution or cfg.data.resolution
    rows = []
    for spec in specs:
        model = models[spec.name]
        # the statistics are those asked for (re-estimated, or as stored with a word from _models_to_export)
        folder = export_subnet(model, spec, out, fmt=fmt, resolution=resolution, overwrite=overwrite,
                               metadata={"source": source, **trained,
                                         **preprocessing(cfg, options.resolved_crop_ratio(cfg)), "bn": cfg.model.bn,
                                         "bn_recalibration": statistics[spec.name]}, check_bn_statistics=False)
        row = {"subnet": spec.name, "path": str(folder.absolute())}  # from any working directory
        if verify:  # the files as written, read back: safetensors, and the graph when exported
            row["max_abs_diff"], row["max_rel_diff"] = export_differences(model, spec, load_exported(folder),
                                                                          resolution)
            if fmt in GRAPHS:
                row[f"{fmt}_max_abs_diff"], row[f"{fmt}_max_rel_diff"] = export_differences(
                    model, spec, folder / GRAPHS[fmt], resolution)
        rows.append(row)
        log.info("exported %s to %s", spec.name, folder)
    return rows


def _warn_of_unread_data(options, eval_batch_size: int | None, why: str) -> None:
    """The options of the data that re-estimates BatchNorm statistics, given to an export that reads none."""
    given = [name for name, value in vars(options).items()
             if value is not None and value is not False and name != "crop_ratio"]  # workers=0 is given
    given += ["eval_batch_size"] if eval_batch_size else []
    if given:
        log.warning("%s: not used, since the export reads no data (%s: nothing to re-estimate)", ", ".join(given),
                    why)


def _models_to_export(supernet: SlimResNet, cfg: Config, specs: list[SubnetSpec], batches: int,
                      recalibrated: dict | None, *, checkpoint, options, device: str, eval_batch_size: int | None
                      ) -> tuple[dict, dict]:
    """Per sub-network: the model to export it from, and what config.json records of a re-estimation of its
    BatchNorm statistics on ``batches`` train batches (None: as stored). Evaluation re-estimates a shared-BN
    supernet's statistics for each sub-network first (eval/recalibrate.py), so the export does the same, on the
    same train batches: the exported model is the one evaluation measured. Private BatchNorm (``batches`` 0)
    and a random initialisation are exported as they are, without reading any data."""
    models, statistics = {s.name: supernet for s in specs}, {s.name: None for s in specs}
    if batches == 0:
        if checkpoint is not None:
            _warn_of_unestimated_statistics(supernet, specs, recalibrated)
        return models, statistics
    chosen = (recalibrated or {}).get("subnet")
    if chosen in models:  # the user estimated these with slimssl recalibrate: exported as they are
        how = ", ".join(f"{k} {v}" for k, v in recalibrated.items() if k != "subnet")
        log.info("%s: exporting the BatchNorm statistics that slimssl recalibrate stored in %s (%s), not "
                 "re-estimating them", chosen, checkpoint, how)
        statistics[chosen] = {**recalibrated, "by": "slimssl recalibrate"}
    others = [s for s in specs if s.name != chosen]
    if others:
        copies, record = _recalibrated_copies(supernet, cfg, others, batches, options, device, eval_batch_size)
        models.update(copies)
        statistics.update({name: record for name in copies})
    else:
        _warn_of_unread_data(options, eval_batch_size, "the statistics slimssl recalibrate stored")
    return models, statistics


def _recalibrated_copies(supernet: SlimResNet, cfg: Config, specs: list[SubnetSpec], batches: int, options,
                         device: str, eval_batch_size: int | None) -> tuple[dict, dict]:
    """Copies of the supernet (on the CPU) whose BatchNorm statistics were re-estimated for each of ``specs``
    on ``batches`` train batches, the sample and transform of evaluation; and the record of it."""
    from ..devices import pick_device
    from ..eval.recalibrate import subnet_models

    torch_device = pick_device(device, setting="device (--device)")
    try:
        train = options.load_split(cfg, "train", torch_device)
    except DataError as e:  # exporting where the data is not: say why it is read, and how to do without
        raise DataError(f"{e}. The export re-estimates shared BatchNorm statistics on train batches, as evaluation "
                         "does: point --data (data=) at the dataset, or export the statistics as stored with "
                         "--recalibrate-bn 0 (recalibrate_bn=0)") from None
    batch_size = eval_batch_size or cfg.eval.batch_size
    models = subnet_models(supernet.to(torch_device), specs, train, recalibrate_batches=batches,
                           batch_size=batch_size, resolution=cfg.data.resolution, mean=cfg.data.mean,
                           std=cfg.data.std, device=torch_device)  # the default seed, as the evaluations use
    supernet.cpu()
    record = {**options.settings(cfg), "batches": batches, "batch_size": batch_size, "seed": 0}
    return {name: model.cpu() for name, model in models.items()}, record


def _warn_of_unestimated_statistics(supernet: SlimResNet, specs: list[SubnetSpec], recalibrated: dict | None) -> None:
    """With shared BatchNorm any width runs, but only the menu's trained the shared statistics: exported with
    the statistics as stored, a width outside the menu gets those (unless slimssl recalibrate estimated them)."""
    if supernet.slim_state.private_bn:
        return
    chosen = (recalibrated or {}).get("subnet")
    for name in (s.name for s in specs if s not in supernet.menu and s.name != chosen):
        log.warning("%s is not in the menu: exported without re-estimation, its BatchNorm statistics are the shared "
                    "ones, estimated on the menu's widths; leave --recalibrate-bn (recalibrate_bn) out to "
                    "re-estimate them on train batches as evaluation does", name)
