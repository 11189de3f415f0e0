"""``slimssl export``: a run's sub-networks (all, some, or the one a budget picks) as plain models, read
from a CHECKPOINT, or from a --config's random initial supernet; and ``slimssl import-backbone``: a ResNet
trained elsewhere saved as such a model, for slimssl's evaluations."""

from __future__ import annotations

import argparse
import logging

from ..cli_args import (SUBNET_SPELLINGS, add_config, check_model_source, data_source, device_name, emit, fraction,
                        nonnegative_float, nonnegative_int, output_dir, positive_count, positive_float, positive_int)
from ..errors import UsageError
from . import FORMATS

log = logging.getLogger("slimssl")

DEFAULT_TOLERANCE = 1e-5  # export --verify


def cmd_export(args: argparse.Namespace) -> int:
    budget = args.max_macs is not None or args.max_params is not None
    if bool(args.subnet) + bool(args.all) + budget != 1:
        raise UsageError("give exactly one of --subnet NAME [NAME ...], --all, or a budget (--max-macs and/or "
                         "--max-params)")
    if args.metric and not budget:
        raise UsageError("--metric ranks the sub-networks that fit a budget: add --max-macs or --max-params")
    if args.random_init and args.recalibrate_bn:
        raise UsageError("--recalibrate-bn re-estimates a trained checkpoint's BatchNorm statistics; --random-init "
                         "exports the initial ones: drop one of them")
    if args.random_init and budget:
        raise UsageError("a budget picks by the accuracies a run measured; --random-init exports the initial "
                         "weights, which have none: use --subnet or --all")
    check_model_source(args)
    unused = []  # said, rather than taken silently as if they had done something
    if args.tolerance is not None and not args.verify:
        unused.append("--tolerance")
    if args.resolution is not None and args.format == "safetensors" and not args.verify:  # a graph is traced at it
        unused.append("--resolution")
    if unused:
        log.warning("%s: not used without --verify", " and ".join(unused))
    from ..eval.commands import data_keywords  # torch: after the checks, so that a mistake is said at once
    from .run import export_run
    from ..report.table import markdown_table

    picked = None
    if budget:
        from ..budget import pick_subnet

        picked = pick_subnet(args.checkpoint, max_macs=args.max_macs, max_params=args.max_params,
                             metric=args.metric)
    subnets = [picked["subnet"]] if picked else "all" if args.all else args.subnet
    rows = export_run(args.checkpoint, args.out, subnets, config=args.config,
                      overrides=args.set or (), fmt=args.format, overwrite=args.overwrite, verify=args.verify,
                      resolution=args.resolution, recalibrate_bn=args.recalibrate_bn, device=args.device,
                      eval_batch_size=args.eval_batch_size, **data_keywords(args))
    if picked:  # what it costs, and the accuracy it was picked by
        metric = picked["picked_by"]
        rows = [{**{key: picked.get(key) for key in ("subnet", "params", "macs", metric, "picked_by")}, **row}
                for row in rows]
    emit(args, rows, markdown_table(rows))
    worst = max((v for r in rows for k, v in r.items() if k.endswith("max_rel_diff")), default=0.0)
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if worst > tolerance:
        log.error("export differs from the supernet by %.3g (relative to its largest output), more than "
                  "--tolerance %g", worst, tolerance)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..eval import DEFAULT_RECALIBRATE_BATCHES
    from ..eval.commands import add_loader_args  # export reads train batches as the evaluation commands do

    p = sub.add_parser("export", help="export sub-networks as plain models (safetensors + JSON; ONNX or "
                                      "torch.export too)")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file or run directory")
    add_config(p, checkpoint=True)
    p.add_argument("--random-init", action="store_true", help="export a randomly initialised supernet of --config")
    p.add_argument("--subnet", action="extend", nargs="+", metavar="SUBNET",
                   help=f"sub-network(s) to export ({SUBNET_SPELLINGS}; several may follow)")
    p.add_argument("--all", action="store_true", help="export every sub-network of the menu")
    p.add_argument("--max-macs", type=positive_count, metavar="N",
                   help="export the most accurate sub-network of the run (its results.json) whose backbone takes at "
                        "most N MACs, e.g. 300M or 1.5G")
    p.add_argument("--max-params", type=positive_count, metavar="N",
                   help="... at most N parameters, e.g. 5M (with --max-macs: both)")
    p.add_argument("--metric", help="the accuracy a budget ranks by, e.g. finetune_10pct_top1 (default: linear_top1 "
                   "or knn_top1, whichever was measured for more of the sub-networks that fit)")
    p.add_argument("--out", required=True, type=output_dir, help="output folder (one sub-folder per sub-network)")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="onnx: the safetensors files and an ONNX graph (needs onnx and onnxruntime: the onnx extra); "
                        "pt2: ... and a torch.export program, model.pt2, which runs with torch alone")
    p.add_argument("--overwrite", action="store_true", help="replace exports in --out that came from another "
                   "checkpoint or config (an export of the same one is always replaced)")
    p.add_argument("--verify", action="store_true", help="compare each export with the supernet's sub-network "
                   "(with shared BatchNorm: the re-estimated copy it was exported from)")
    p.add_argument("--tolerance", type=nonnegative_float,
                   help="--verify fails above this max difference, relative to the largest output where that is "
                   f"above 1 (absolute below; default {DEFAULT_TOLERANCE:g})")
    p.add_argument("--resolution", type=positive_int,
                   help="input size for --verify, and the graph's tracing size (the graph takes other sizes too; "
                        "default: the config's)")
    p.add_argument("--recalibrate-bn", type=nonnegative_int, metavar="N",
                   help="shared BatchNorm: re-estimate each sub-network's statistics on N train batches before "
                        "exporting it, as evaluation does, so that the export is the model evaluation measured "
                        f"(default: {DEFAULT_RECALIBRATE_BATCHES} when the checkpoint's BatchNorm is shared, else 0; "
                        "0: export the statistics as stored)")
    p.add_argument("--data", type=data_source,
                   help="dataset name or path of --recalibrate-bn's train batches (default: the checkpoint "
                        "config's data.source)")
    add_loader_args(p)
    p.add_argument("--device", type=device_name, metavar="DEVICE", default="auto",
                   help="where --recalibrate-bn runs: auto (the default: a CUDA GPU when there is one), cpu, cuda or "
                        "cuda:N; the export is written from the CPU")
    p.add_argument("--eval-batch-size", type=positive_int,
                   help="--recalibrate-bn's batch size (default: config eval.batch_size, as evaluation)")
    p.add_argument("--json", action="store_true", help="print the table's rows as JSON on stdout")
    p.set_defaults(func=cmd_export)


def cmd_import_backbone(args: argparse.Namespace) -> int:
    from .files import load_exported
    from .imported import import_backbone
    from ..report.table import markdown_table

    given = {k: tuple(v) for k, v in (("mean", args.mean), ("std", args.std)) if v is not None}
    folder = import_backbone(args.weights, args.out, prefix=args.prefix, resolution=args.resolution,
                             crop_ratio=args.crop_ratio, overwrite=args.overwrite, width=args.width, **given)
    model = load_exported(folder)
    arch, info = model.config, model.metadata
    row = {"path": str(folder), "block": arch.block, "stem": arch.stem, "depths": list(arch.depths),
           "features": arch.feature_dim, "params": sum(p.numel() for p in model.parameters()),
           **{k: info[k] for k in ("resolution", "crop_ratio", "source_prefix")},
           **({"source_width": info["source_width"]} if "source_width" in info else {})}
    emit(args, [row], markdown_table([row]))
    return 0


def register_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-backbone", help="save the ResNet of a checkpoint made elsewhere (torchvision, MoCo, "
                                               "solo-learn, ...) as an export, which knn, linear, finetune and "
                                               "profile evaluate")
    p.add_argument("weights", help="a checkpoint file (.pt, .pth, .ckpt, .safetensors) holding a ResNet in "
                                   "torchvision's layout, perhaps nested (state_dict, model) and prefixed")
    p.add_argument("--out", required=True, type=output_dir, help="the export's folder")
    p.add_argument("--prefix", help="what the backbone's entries start with, where the file holds several ResNets "
                                    "(e.g. state_dict.module.encoder_q.); the error lists them")
    p.add_argument("--resolution", type=positive_int,
                   help="the input size the network expects (default: 224 with ImageNet's 7x7 stem, 32 with a 3x3 one)")
    p.add_argument("--crop-ratio", type=fraction, metavar="R",
                   help="evaluation resizes to resolution / R, then centre-crops (default: 0.875 with ImageNet's stem, "
                        "1 with a 3x3 one)")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="per-channel mean the inputs are normalised with (default: ImageNet's)")
    p.add_argument("--std", type=positive_float, nargs=3, metavar=("R", "G", "B"),
                   help="per-channel standard deviation (default: ImageNet's)")
    p.add_argument("--width", type=positive_float,
                   help="for a slimmable checkpoint in SlimCLR's layout (its ImageNet ResNets, trained with its "
                        "default --overlap_weight 1): the width to import (the error lists them)")
    p.add_argument("--overwrite", action="store_true", help="replace an export of another source in --out")
    p.add_argument("--json", action="store_true", help="print the row as JSON on stdout")
    p.set_defaults(func=cmd_import_backbone)
