"""Evaluating sub-networks of a shared-BatchNorm supernet: the shared running statistics belong to no width in
particular, so each sub-network is evaluated on a copy whose statistics were re-estimated for it on a fixed
sample of train batches (a private-BatchNorm supernet has every menu entry's statistics and is used as is)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..wording import named
from ..atomic import remove_temporaries
from ..ambient import apart_from_caller, first_time
from ..seeds import keeps_random_state
from ..data.augment import eval_transform
from ..data.eval_images import EvalImages, as_eval_images
from ..nn.slimmable import recalibrate_bn
from ..errors import UsageError
from ..launch import warn_of_repeated_work
from ..nn.spec import SubnetLike, SubnetSpec
from . import DEFAULT_RECALIBRATE_BATCHES, recalibration_batches

log = logging.getLogger("slimssl")


def calibration_order(num_images: int, num_batches: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """The indices of the fixed random sample that recalibration reads, batch after batch: whole batches only
    (a dataset of fewer images than one batch gives one smaller batch), since the statistics average the
    batches with equal weight and a short last batch would count as much as a full one."""
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    whole = max(1, min(num_batches, num_images // batch_size))
    return perm[:whole * batch_size]


def recalibration_images(images: EvalImages | torch.Tensor, num_batches: int, batch_size: int, resolution: int,
                         mean, std, device, seed: int = 0) -> Iterator[torch.Tensor]:
    """``num_batches`` eval-transformed batches of a fixed random sample of ``images`` (a dataset, in memory
    or streamed, or a uint8 tensor)."""
    images = as_eval_images(images)
    for batch in images.batches(batch_size, calibration_order(len(images), num_batches, batch_size, seed)):
        yield eval_transform(batch.to(device), resolution, mean, std)


def batches_read(asked: int, num_images: int, batch_size: int) -> int:
    """The batches recalibration reads of the ``asked`` ones: as many whole batches as the train split holds
    (at least one), said in a warning when fewer (once a call, not at every kNN of a run)."""
    n = recalibration_batches(asked, False, num_images, batch_size)
    if n < asked and first_time(("recalibration", n, asked, batch_size, num_images)):
        log.warning("BatchNorm recalibration reads %d batch(es) of %d, not %d: the train split holds %d images",
                    n, batch_size, asked, num_images)
    return n


def subnet_models(supernet, specs: Sequence[SubnetSpec], train_images: EvalImages | torch.Tensor, *,
                  recalibrate_batches: int | None, batch_size: int, resolution: int, mean, std,
                  device="cpu", seed: int = 0) -> dict[str, nn.Module]:
    """The model to evaluate each sub-network with: the supernet itself, or (recalibrating) a copy whose
    BatchNorm statistics were re-estimated for that sub-network on ``recalibrate_batches`` train batches
    (``train_images``: the train split, in memory or streamed, or a uint8 tensor)."""
    asked = recalibration_batches(recalibrate_batches, supernet.slim_state.private_bn)
    if asked == 0:
        guessed = [spec.name for spec in specs if not supernet.bn_statistics_estimated(spec)]
        if guessed:  # shared statistics of no width in particular: numbers may be near chance
            log.warning("%s evaluated with shared BatchNorm statistics that were not estimated for them "
                        "(recalibrate_bn 0): their numbers may be far off; recalibrate them (the default) or give a "
                        "checkpoint of `slimssl recalibrate`", ", ".join(guessed))
        return {spec.name: supernet for spec in specs}
    models = {}
    for spec in stored_estimates(supernet, specs):  # as export keeps them: the export is the model measured
        log.info("%s: evaluated with the BatchNorm statistics estimated for it that it holds (a checkpoint of "
                 "slimssl recalibrate, or an export), not re-estimating them", spec.name)
        models[spec.name] = supernet
    specs = [spec for spec in specs if spec.name not in models]
    if not specs:
        return models
    train_images = as_eval_images(train_images)
    n = batches_read(asked, len(train_images), batch_size)
    # The sample is decoded once for all sub-networks; its batches are those recalibration_images reads.
    sample = as_eval_images(train_images.take(calibration_order(len(train_images), n, batch_size, seed)))
    for spec in specs:
        model = copy.deepcopy(supernet)
        recalibrate_bn(model, spec, (eval_transform(batch.to(device), resolution, mean, std)
                                     for batch in sample.batches(batch_size)))
        models[spec.name] = model.eval()
        log.info("recalibrated BatchNorm of %s on %d batches", spec.name, n)
    return models


def stored_estimates(supernet, specs: Sequence[SubnetSpec]) -> list[SubnetSpec]:
    """The sub-networks of ``specs`` whose shared BatchNorm statistics the supernet holds as estimated for them:
    a checkpoint written by ``slimssl recalibrate`` (estimated on the batches its user chose), used as they are."""
    if supernet.slim_state.private_bn or supernet.slim_state.bn_estimated is None:
        return []
    return [spec for spec in specs if supernet.bn_statistics_estimated(spec)]


@apart_from_caller()
@keeps_random_state
def recalibrate_checkpoint(checkpoint: str | os.PathLike, subnet: SubnetLike, out: str | Path, *,
                           batches: int = DEFAULT_RECALIBRATE_BATCHES, seed: int = 0,
                           device: str | torch.device = "auto", eval_batch_size: int | None = None,
                           **data) -> dict:
    """Re-estimate ``subnet``'s BatchNorm statistics on ``batches`` train batches and write the checkpoint with
    them to ``out`` (a new ``.pt`` file), as ``slimssl recalibrate`` does; returns subnet, batches, batch_size
    and out, and batches_read: fewer than asked where the train split holds fewer. Meant for a shared-BatchNorm
    supernet, whose stored statistics belong to no width in particular:
    ``slimssl export`` and the evaluations then use the new checkpoint's statistics for that sub-network.

    ``checkpoint`` is a checkpoint file or run directory; it is never written. The batches are a fixed random
    sample (``seed``) of the train split, read as :func:`slimssl.knn` reads it (``data``, ``loader``,
    ``workers``, ``skip_unreadable``, ``crop_ratio``); ``eval_batch_size`` defaults to ``eval.batch_size``."""
    from ..checkpoint import BACKBONE_PREFIX, load_checkpoint, save_checkpoint, supernet_of
    from ..devices import pick_device
    from .inputs import DataOptions, check_numbers

    check_numbers(batches=batches, eval_batch_size=eval_batch_size, seed=seed)
    options = DataOptions.of(data, recalibrate_checkpoint)
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise UsageError(f"expected a checkpoint file or run directory (str, Path or PretrainRun), got "
                         f"{type(checkpoint).__name__}")
    warn_of_repeated_work("slimssl.recalibrate_checkpoint()")
    out = _new_checkpoint_file(out, checkpoint)
    saved = load_checkpoint(checkpoint)
    cfg = saved["config"]
    supernet = supernet_of(saved, checkpoint)
    torch_device = pick_device(device, setting="device (--device)")
    supernet.to(torch_device)
    spec = supernet.resolve(subnet)  # checked before the data is decoded
    train = options.load_split(cfg, "train", torch_device)
    batch_size = eval_batch_size or cfg.eval.batch_size
    read = batches_read(batches, len(train), batch_size)
    images = min(read * batch_size, len(train))  # one batch of them all where the split holds less than a batch
    recalibrate_bn(supernet, spec, recalibration_images(train, batches, batch_size, cfg.data.resolution,
                                                       cfg.data.mean, cfg.data.std, torch_device, seed))
    state = dict(saved["model"])
    state.update({BACKBONE_PREFIX + k: v.cpu() for k, v in supernet.state_dict().items()})
    payload = {k: v for k, v in saved.items() if k not in ("format", "version")}  # written as this slimssl's
    source = options.source(cfg)
    payload.update(config=cfg.model_dump(mode="json"), model=state,
                   recalibrated={"subnet": spec.name, "batches": batches, "batches_read": read, "batch_size": batch_size,
                                 "data": source})
    for name in remove_temporaries(out.parent, of=(out.name,)):  # of a save of ``out`` killed midway: its size
        log.info("removed %s, left by a save that was killed midway", name)
    path = save_checkpoint(out, payload)
    # debug, not info: the command prints this itself, and an API caller has the returned row
    log.debug("recalibrated BatchNorm of %s on %d batches of %s; wrote %s", spec.name, read, source, path)
    return {"subnet": spec.name, "batches": batches, "batches_read": read, "batch_size": batch_size,
            "images_read": images, "out": str(path)}


def _is_checkpoints_folder(folder: Path) -> bool:
    """Whether ``folder`` is a run's checkpoints folder, as the file system sees it: on macOS' (case-insensitive)
    ``RUN/Checkpoints`` is ``RUN/checkpoints``, on Linux's it is another folder."""
    from ..layout import CHECKPOINTS

    if folder.name == CHECKPOINTS:
        return True
    spelt = folder.parent / CHECKPOINTS
    return folder.name.lower() == CHECKPOINTS and folder.exists() and spelt.exists() and os.path.samefile(folder, spelt)


def _new_checkpoint_file(out: str | Path, checkpoint: str | Path) -> Path:
    """``out`` as a file recalibrate may write: a ``.pt`` outside every run's checkpoints folder, and not the
    checkpoint it reads (a run's files are that run's own: its last.pt is what a resume continues from)."""
    from ..layout import CHECKPOINTS, checkpoint_file

    if not isinstance(out, (str, os.PathLike)):
        raise UsageError(f"out must be a path to a new .pt file, got {out!r}")
    out = Path(out)
    if out.suffix.lower() not in (".pt", ".pth") or out.is_dir():
        raise UsageError(f"{named('--out', 'out')} must name a .pt (or .pth) file, got {str(out)!r}")
    source_file = checkpoint_file(checkpoint)
    # the file itself, however its path is spelt: macOS' file system ignores letter case, which resolve() keeps
    if out.exists() and source_file.exists() and os.path.samefile(out, source_file):
        raise UsageError(f"{named('--out', 'out')} {out} is the checkpoint being read; write the recalibrated one to "
                         "a new file (a run's last.pt is what a resume continues from)")
    if _is_checkpoints_folder(out.resolve().parent):  # any run's: its last.pt, or an epoch it may be evaluated at
        raise UsageError(f"{named('--out', 'out')} {out} is in a run's {CHECKPOINTS} folder, whose files are that "
                         "run's own; write the recalibrated checkpoint outside it (e.g. recalibrated_w0p5.pt)")
    if out.exists() and not _written_by_recalibrate(out):  # replaced only where it is an earlier recalibration
        raise UsageError(f"{named('--out', 'out')} {out} exists and is not a checkpoint that recalibrate wrote; it "
                         "would be overwritten: choose a new file, or remove it first")
    return out


def _written_by_recalibrate(path: Path) -> bool:
    """Whether ``path`` is a checkpoint that recalibrate wrote (read without its tensors)."""
    from ..checkpoint import FORMAT, peek_checkpoint

    data = peek_checkpoint(path) or {}
    return data.get("format") == FORMAT and bool(data.get("recalibrated"))
