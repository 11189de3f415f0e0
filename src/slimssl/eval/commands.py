"""CLI subcommands of the evaluation protocols (knn, linear, finetune, recalibrate) and of embed.

Each command is a thin layer over :mod:`slimssl.eval` (knn, linear and finetune over their Python functions in
``evaluate.py``). Run on a checkpoint that
lives in a run directory (``RUN`` or ``RUN/checkpoints/X.pt``), knn/linear/finetune merge their values
into ``RUN/results.json`` (per sub-network) unless ``--no-save`` is given. The data is decoded in memory or
streamed from its files (``--loader``, default the checkpoint config's ``data.loader``): see
``data/eval_images.py``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli_args import (SUBNET_SPELLINGS, data_source, device_name, emit, fraction, label_fraction, nonnegative_int,
                        output_dir, output_file, positive_float, positive_int, seed_int)
from ..errors import UsageError
from . import (DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_RECALIBRATE_BATCHES, FEW_LABELS,
               FINETUNE_BATCH_SIZE, FINETUNE_EPOCHS, FINETUNE_EPOCHS_FEW_LABELS, FINETUNE_LR, FINETUNE_MIN_STEPS,
               PROBE_LR_DROP, TRAIN_CROPS)

log = logging.getLogger("slimssl")


# ---- shared helpers ----------------------------------------------------------------------------------

def data_keywords(args: argparse.Namespace) -> dict:
    """The data flags as the keywords of the protocols in ``evaluate.py`` (``DataOptions``, ``inputs.py``)."""
    return dict(data=args.data, loader=args.loader, workers=args.workers, skip_unreadable=args.skip_unreadable,
                crop_ratio=args.crop_ratio)


def _common_keywords(args: argparse.Namespace) -> dict:
    """The flags every protocol command shares, as the keywords of its function in ``evaluate.py``."""
    return dict(device=args.device, eval_batch_size=args.eval_batch_size, recalibrate_bn=args.recalibrate_bn,
                save=not args.no_save, **data_keywords(args))


def add_loader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loader", choices=["memory", "stream"],
                   help="memory: decode each split once into a uint8 tensor; stream: loader workers decode each "
                        "batch from the files of a folder or .zip too large for memory (same images, same results; "
                        "built-in datasets are in memory only). Default: the checkpoint config's data.loader")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out the image files that cannot be decoded instead of stopping (with either loader; "
                        "default: the checkpoint config's data.skip_unreadable)")
    p.add_argument("--crop-ratio", type=fraction, metavar="R",
                   help="evaluate each image's centre R (of its shorter side), resized to the run's resolution: "
                        "resize to resolution / R, then centre crop (default: the config's eval.crop_ratio; "
                        "ImageNet recipes 0.875, others 1)")
    p.add_argument("--workers", type=nonnegative_int, metavar="N",
                   help="--loader stream: decoding worker processes (default: the config's data.workers, "
                        "else the CPUs this process may use, 1 to 8)")


def _add_train_crop_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-crop", choices=TRAIN_CROPS,
                   help="the training images' random crop: pad (CIFAR: pad by 1/8 of the size, crop the size), "
                        "resized (ImageNet: RandomResizedCrop, 8-100%% of the area, of the evaluation image) or whole "
                        "(the same of the whole picture, as the papers: --loader stream only); default: the config's "
                        "eval.train_crop (ImageNet recipes whole, others pad)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint file or run directory, or an exported sub-network's folder "
                   "(evaluated as exported, on --data; its results are printed, not saved)")
    _add_image_args(p)
    p.add_argument("--no-save", action="store_true", help="do not merge the results into RUN/results.json")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    """Where the images come from, how they are read, and where the networks run: the protocols' and embed's."""
    p.add_argument("--data", type=data_source,
                   help="dataset name or path (default: the checkpoint config's data.source; needed for an export)")
    add_loader_args(p)
    p.add_argument("--device", type=device_name, metavar="DEVICE", default="auto",
                   help="auto (the default: a CUDA GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--eval-batch-size", type=positive_int, help="batch of the feature extraction (default: config eval.batch_size)")
    p.add_argument("--recalibrate-bn", type=nonnegative_int, metavar="N",
                   help="re-estimate each sub-network's BatchNorm statistics on N train batches before evaluating "
                        f"(default: {DEFAULT_RECALIBRATE_BATCHES} when the supernet's BatchNorm is shared, else 0); "
                        "the sub-network of a checkpoint of slimssl recalibrate keeps the statistics stored for it")


# ---- knn, linear, finetune ---------------------------------------------------------------------------

def cmd_knn(args: argparse.Namespace) -> int:
    from ..report.table import markdown_table
    from .evaluate import knn

    rows = knn(args.checkpoint, k=args.k, temperature=args.temperature, subnets=args.subnet,
               **_common_keywords(args))
    emit(args, rows, markdown_table(rows, ["subnet", "params", "macs", "knn_top1"]))
    return 0


def cmd_linear(args: argparse.Namespace) -> int:
    from ..report.table import markdown_table
    from .evaluate import linear_probe

    rows = linear_probe(args.checkpoint, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                        augment=args.augment, train_crop=args.train_crop, distill=args.distill,
                        shared_head=args.shared_head, raw_features=args.raw_features, milestones=args.milestones,
                        subnets=args.subnet, save_models=args.save_models, **_common_keywords(args))
    metrics = [k for k in rows[0] if k.startswith("linear")]
    emit(args, rows, markdown_table(rows, ["subnet", "params", "macs", *metrics]))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..report.table import markdown_table
    from .evaluate import finetune
    from ..layout import is_export_dir

    # an export has one sub-network: fine-tuned without --all
    if args.subnet and args.all or not (args.subnet or args.all or is_export_dir(args.checkpoint)):
        raise UsageError("give exactly one of --subnet NAME [NAME ...] or --all")
    if not (args.label_fraction or args.subset_file):
        raise UsageError("give --label-fraction F [F ...] (a class-balanced subset drawn from --seed) or --subset-file "
                         "FILE (the images it lists)")
    rows = finetune(args.checkpoint, args.subnet or "all", args.label_fraction, subset_file=args.subset_file,
                    epochs=args.epochs,
                    lr=args.lr, batch_size=args.batch_size, seed=args.seed, train_crop=args.train_crop,
                    out=args.out, save_models=args.save_models, **_common_keywords(args))
    shown = [{**row, "label_fraction": f"{row['label_fraction']:g}"} for row in rows]  # 0.0001, not 0.00
    emit(args, rows, markdown_table(shown, ["subnet", "params", "macs", "label_fraction", "num_labelled",
                                            "top1", "top5"]))
    return 0


# ---- recalibrate -------------------------------------------------------------------------------------

def cmd_recalibrate(args: argparse.Namespace) -> int:
    from .recalibrate import recalibrate_checkpoint

    row = recalibrate_checkpoint(args.checkpoint, args.subnet, args.out, batches=args.batches, seed=args.seed,
                                 device=args.device, eval_batch_size=args.eval_batch_size, **data_keywords(args))
    emit(args, row, f"recalibrated the BatchNorm statistics of {row['subnet']} on {row['batches_read']} batch(es) "
                    f"of {row['batch_size']} ({row['images_read']} images) -> {row['out']}")
    return 0


# ---- embed -------------------------------------------------------------------------------------------

def cmd_embed(args: argparse.Namespace) -> int:
    from ..report.table import markdown_table
    from .embed import embed, paths_file

    result = embed(args.checkpoint, args.subnet or "all", split=args.split, out=args.out, device=args.device,
                   eval_batch_size=args.eval_batch_size, recalibrate_bn=args.recalibrate_bn, **data_keywords(args))
    settings = result["settings"]
    rows = [{"subnet": name, "images": settings["images"], "dims": dims} for name, dims in settings["subnets"].items()]
    doc = {**settings, "out": str(args.out.absolute()),
           "paths_file": str(paths_file(args.out).absolute()) if result["paths"] is not None else None}
    emit(args, doc, markdown_table(rows, ["subnet", "images", "dims"]))
    return 0


# ---- parser ------------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to the ``slimssl`` parser."""
    p = sub.add_parser("knn", help="weighted kNN top-1 of every sub-network (train split = bank, test = queries)")
    _add_eval_args(p)
    p.add_argument("--k", type=positive_int,
                   help="neighbours (default: config eval.knn_k; for an export, which records none, its default)")
    p.add_argument("--temperature", type=positive_float,
                   help="vote temperature (default: config eval.knn_temperature; for an export, its default)")
    p.add_argument("--subnet", action="extend", nargs="+", metavar="SUBNET",
                   help=f"evaluate these instead of the menu ({SUBNET_SPELLINGS}; with shared BatchNorm any "
                        "width and depth, its statistics re-estimated first)")
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("linear", help="switchable linear probe: one head per sub-network on the frozen backbone")
    _add_eval_args(p)
    p.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                   help=f"epochs of the heads' training (default {DEFAULT_EPOCHS})")
    p.add_argument("--lr", type=positive_float, default=DEFAULT_LR,
                   help=f"SGD lr, along a cosine to 0 unless --milestones (default {DEFAULT_LR}, for standardised "
                        "features)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"the heads' batch size (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--seed", type=seed_int, default=0, help="the heads' initialisation and the training order")
    p.add_argument("--augment", action="store_true",
                   help="random crop (--train-crop) + flip, the backbone runs every step (default: cached features)")
    _add_train_crop_arg(p)
    p.add_argument("--distill", action="store_true",
                   help="SlimCLR: sub-width heads learn 0.5 CE + 0.5 soft CE to the full-width head")
    p.add_argument("--shared-head", action="store_true", help="one slimmable head shared by all sub-networks")
    p.add_argument("--raw-features", action="store_true",
                   help="the features as the backbone gives them, not standardised, as in the papers' probes, "
                        "which need the papers' lr and batch size too (docs/recipes.md gives SlimCLR's)")
    p.add_argument("--milestones", type=positive_int, nargs="+", metavar="EPOCH",
                   help=f"multiply the lr by {PROBE_LR_DROP:g} from each of these epochs on, instead of the cosine")
    p.add_argument("--subnet", action="extend", nargs="+", metavar="SUBNET",
                   help=f"probe these instead of the menu ({SUBNET_SPELLINGS}; with shared BatchNorm any width "
                        "and depth, its statistics re-estimated first; with --distill the widest teaches)")
    p.add_argument("--save-models", type=output_dir, metavar="DIR",
                   help="also write each sub-network with its head, a classifier of images, to "
                        "DIR/<subnet>_<protocol>_seed<S>/, as an export (safetensors + config.json with its classes; "
                        "load with slimssl.load_exported)")
    p.set_defaults(func=cmd_linear)

    p = sub.add_parser("finetune",
                       help="fine-tune sub-networks of a run (or an export), each on a labelled subset "
                            "(class-balanced, or listed in a file)")
    _add_eval_args(p)
    p.add_argument("--subnet", action="extend", nargs="+", metavar="SUBNET",
                   help=f"{SUBNET_SPELLINGS}; several may follow (each is fine-tuned in turn, on the same decoded "
                        "data)")
    p.add_argument("--all", action="store_true", help="every sub-network of the menu")
    p.add_argument("--label-fraction", type=label_fraction, action="extend", nargs="+", metavar="F",
                   help="e.g. 0.01 or 0.1; several may follow (every sub-network is fine-tuned on each)")
    p.add_argument("--subset-file", type=Path, metavar="FILE",
                   help="instead of --label-fraction: the labelled subset, one train file per line, by name "
                        "(SimCLR's ImageNet 1percent.txt, 10percent.txt) or path, or by index; names need a folder or "
                        ".zip, which is then streamed. Results are named list-<FILE's stem>")
    p.add_argument("--epochs", type=positive_int,
                   help=f"default: {FINETUNE_EPOCHS_FEW_LABELS} for fractions <= {FEW_LABELS * 100:g}%%, else "
                        f"{FINETUNE_EPOCHS}, and at least {FINETUNE_MIN_STEPS} steps (given, it is exact)")
    p.add_argument("--lr", type=positive_float,
                   help=f"lr at batch {FINETUNE_BATCH_SIZE}, scaled with the batch (default {FINETUNE_LR:g})")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"default {FINETUNE_BATCH_SIZE} (or the whole subset when smaller)")
    p.add_argument("--seed", type=seed_int, default=0, help="draws the labelled subset and the training order")
    _add_train_crop_arg(p)
    p.add_argument("--out", type=output_file(".json"),
                   help="JSON file for the result and the labelled indices, when there is one result (default: "
                        "RUN/finetune/<subnet>_<pct>pct_seed<S>.json, or finetune_<subnet>_<pct>pct_seed<S>.json "
                        "beside a checkpoint that is not a run's last; none with --no-save)")
    p.add_argument("--save-models", type=output_dir, metavar="DIR",
                   help="also write each fine-tuned classifier to DIR/<subnet>_<pct>pct_seed<S>/, as an export "
                        "(safetensors + config.json with its classes; load with slimssl.load_exported)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("embed", help="save the backbone features of a split's images for sub-networks (safetensors)")
    p.add_argument("checkpoint", help="a checkpoint file or run directory, or an exported sub-network's folder (then "
                   "give --data)")
    p.add_argument("--out", required=True, type=output_file(".safetensors"), metavar="FILE.safetensors",
                   help="the features, one [images, dims] float32 tensor per sub-network, and the labels when the "
                        "split has them; the files' paths, one per row, go to OUT's name with .images.txt")
    p.add_argument("--subnet", action="extend", nargs="+", metavar="SUBNET",
                   help=f"these instead of the menu ({SUBNET_SPELLINGS})")
    p.add_argument("--split", choices=["train", "test"], default="test",
                   help="the split to embed (default %(default)s; a folder of images alone is one train split)")
    _add_image_args(p)
    p.add_argument("--json", action="store_true", help="print the settings and the files written as JSON")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("recalibrate", help="re-estimate a sub-network's BatchNorm statistics into a new checkpoint")
    p.add_argument("checkpoint", help="a checkpoint file or run directory")
    p.add_argument("--subnet", required=True, help=SUBNET_SPELLINGS)
    p.add_argument("--batches", type=positive_int, default=DEFAULT_RECALIBRATE_BATCHES,
                   help="train batches to average the statistics over (default %(default)s)")
    p.add_argument("--out", required=True, type=output_file(".pt", ".pth"),
                   help="the new checkpoint file (.pt or .pth), outside any run's checkpoints folder (an existing "
                   "file only where recalibrate wrote it)")
    p.add_argument("--data", type=data_source,
                   help="dataset name or path (default: the checkpoint config's data.source)")
    add_loader_args(p)
    p.add_argument("--device", type=device_name, metavar="DEVICE", default="auto",
                   help="auto (the default: a CUDA GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--eval-batch-size", type=positive_int, help="default: config eval.batch_size")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the order of the calibration batches")
    p.add_argument("--json", action="store_true", help="print the sub-network, the batches and the new file as JSON")
    p.set_defaults(func=cmd_recalibrate)
