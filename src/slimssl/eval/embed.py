"""``slimssl embed``: the backbone features of a split for sub-networks, saved for use elsewhere (retrieval,
clustering, a probe of one's own).

The images are read as every evaluation reads them (shorter side to ``data.resolution / eval.crop_ratio``, the
centre square, the run's normalisation), so the features are those the kNN and the linear probe see. A folder
or .zip is streamed by default, so that each row can be named by its file: ``FILE.safetensors`` gets
``FILE.images.txt`` beside it, one path per row, relative to the dataset's root as slimssl found it (the folder
that holds ``train/`` and ``test/``, or the images of a folder of images alone; in a .zip, below its wrapper
folder), which the settings record as ``paths_root``. The names are written as the file system gives them (bytes
that are not UTF-8 as they are); a name holding a line break is refused, as it would break the listing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..ambient import apart_from_caller
from ..atomic import atomic_path
from ..data.registry import absolute_source
from ..errors import DataError, UsageError
from ..launch import warn_of_repeated_work
from ..seeds import keeps_random_state
from .features import extract_subnet_features
from .inputs import DataOptions, check_numbers, gives_back_device, load_model
from .recalibrate import subnet_models

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..config import Config
    from ..models.resnet import SlimResNet
    from ..nn.spec import Subnets
    from .inputs import DataKeywords

log = logging.getLogger("slimssl")

SPLITS = ("train", "test")
METADATA_KEY = "slimssl"  # the safetensors metadata entry that holds the embedding's settings, as JSON
LABELS = "labels"  # the tensor of the labels, beside one tensor of features per sub-network


def paths_file(out: str | os.PathLike) -> Path:
    """The file naming the rows of the features written to ``out``: ``FILE.safetensors`` -> ``FILE.images.txt``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.images.txt")


@apart_from_caller()
@keeps_random_state
@gives_back_device
def embed(checkpoint: str | os.PathLike | SlimResNet, subnets: Subnets = "all", *, split: str = "test",
          out: str | os.PathLike | None = None, device: str | torch.device = "auto",
          eval_batch_size: int | None = None, recalibrate_bn: int | None = None,
          config: Config | dict | str | Path | None = None, **data: Unpack[DataKeywords]) -> dict:
    """The pooled backbone features of every image of ``split`` (``"train"`` or ``"test"``) for each of
    ``subnets`` (as knn's), float32 on the CPU, in the split's order.

    A split without labels (a folder of images alone, whose one split is ``"train"``) is embedded too. A folder
    or .zip is streamed unless ``loader="memory"`` says otherwise, so that each row's file is known.
    ``out``: a ``.safetensors`` file that receives one tensor per sub-network (named by it), ``labels`` when the
    split has them, and the settings as JSON under the metadata key ``slimssl``; the files' paths go to
    ``paths_file(out)``. ``checkpoint``, ``config`` and the data keywords are knn's.

    Returns ``{"features": {subnet: [N, C] tensor}, "labels": [N] tensor or None, "classes": list or None,
    "paths": list of N paths (relative to the dataset's folder) or None, "settings": dict}``.
    """
    check_numbers(eval_batch_size=eval_batch_size, recalibrate_bn=recalibrate_bn)
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    out = _checked_out(out)
    options = DataOptions.of(data, embed)
    warn_of_repeated_work("slimssl.embed()")
    supernet, cfg, torch_device, _ = load_model(checkpoint, device, config, options.data)
    specs = supernet.resolve_many(subnets)  # checked before the data is decoded
    options = options.with_file_names(cfg)  # each row named by its file
    if options.loader == "memory":
        log.info("the split is decoded in memory: its rows are in the folder's listing order, without their paths "
                 "(loader 'stream' names them)")
    images = options.load_split(cfg, split, torch_device, labelled=False)
    batch = eval_batch_size or cfg.eval.batch_size
    common = dict(resolution=cfg.data.resolution, mean=cfg.data.mean, std=cfg.data.std, device=torch_device)
    train = images if split == "train" else _train_split_if_needed(options, cfg, supernet, recalibrate_bn,
                                                                   torch_device)
    files = getattr(images, "files", None)
    paths = [files.relative(i) for i in range(len(images))] if files is not None else None
    _refuse_line_breaks(paths, files)  # before the work, not after it
    models = subnet_models(supernet, specs, train, recalibrate_batches=recalibrate_bn, batch_size=batch, **common)
    features = extract_subnet_features(models, specs, images, batch_size=batch, store="cpu", **common)
    settings = {**options.settings(cfg), "data": absolute_source(options.source(cfg)), "split": split,
                "images": len(images), "paths_root": os.path.abspath(files.root) if files is not None else None,
                "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                "subnets": {name: int(f.shape[1]) for name, f in features.items()},
                "classes": list(images.classes) if getattr(images, "classes", None) else None}
    result = {"features": features, "labels": images.labels, "classes": settings["classes"], "paths": paths,
              "settings": settings}
    if out is not None:
        _write(out, result)
    return result


def _checked_out(out) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise UsageError(f"the features are written to a .safetensors file; got out {str(out)!r}")
    if out.is_dir():
        raise UsageError(f"out {str(out)!r} is a directory; expected a .safetensors file")
    if not out.parent.is_dir():
        raise UsageError(f"the folder of out {str(out)!r} does not exist")
    return out


def _train_split_if_needed(options: DataOptions, cfg, supernet, recalibrate_bn: int | None, device):
    """The train split when the sub-networks' BatchNorm statistics are to be re-estimated on it, else None."""
    from . import recalibration_batches

    if recalibration_batches(recalibrate_bn, supernet.slim_state.private_bn) == 0:
        return None
    return options.load_split(cfg, "train", device, labelled=False)  # statistics need no labels


def _refuse_line_breaks(paths: list[str] | None, files) -> None:
    """A file name with a line break would take two lines of the listing, and every row after it the wrong name."""
    broken = next((i for i, path in enumerate(paths or ()) if "\n" in path or "\r" in path), None)
    if broken is not None:
        raise DataError(f"{files.path(broken)!r} has a line break in its name, which the listing of the rows' files "
                        "(one per line) cannot hold: rename it, or embed the split with loader 'memory' (no listing)")


def _write(out: Path, result: dict) -> None:
    """The features (and labels) to ``out``, the rows' paths to ``paths_file(out)``; each file whole or not at
    all. The features go from the tensors to the file (``save_file``): building the file in memory first would
    need twice their size again, 50 GB for a ResNet-50 menu on ImageNet's train split."""
    from safetensors.torch import save_file

    tensors = {name: f.contiguous() for name, f in result["features"].items()}
    if result["labels"] is not None:
        tensors[LABELS] = result["labels"].to(torch.int64).cpu().contiguous()
    listing = paths_file(out)
    if result["paths"] is None:
        with atomic_path(out) as tmp:
            save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(result["settings"])})
        listing.unlink(missing_ok=True)  # an earlier embedding's names would not describe these rows
    else:  # both written before either replaces its file: a failure leaves the earlier pair as it was
        with atomic_path(listing) as names, atomic_path(out) as features:
            with open(names, "wb") as f:  # bytes: a name that is not UTF-8 is written as the file system has it
                f.writelines(os.fsencode(path) + b"\n" for path in result["paths"])
            save_file(tensors, features, metadata={METADATA_KEY: json.dumps(result["settings"])})
    log.info("saved the features of %d images to %s%s", result["settings"]["images"], out,
             f", their files' paths to {listing}" if result["paths"] is not None else "")
