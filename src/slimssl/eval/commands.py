"""CLI subcommands of the evaluation protocols (knn, linear, finetune, recalibrate, report).

Each command is a thin layer over :mod:`slimssl.eval` and :mod:`slimssl.report`. Run on a checkpoint that
lives in a run directory (``RUN`` or ``RUN/checkpoints/X.pt``), knn/linear/finetune merge their values
into ``RUN/results.json`` (per sub-network) unless ``--no-save`` is given. The data is decoded in memory or
streamed from its files (``--loader``, default the checkpoint config's ``data.loader``): see
``data/eval_images.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..cli_args import emit, fraction, nonnegative_int, output_file, positive_float, positive_int
from ..errors import UsageError
from . import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR

log = logging.getLogger("slimssl")


# ---- shared helpers ----------------------------------------------------------------------------------

def _crop_ratio(args: argparse.Namespace, cfg) -> float:
    """The evaluation images' centre crop ratio: ``--crop-ratio``, else the checkpoint config's."""
    return args.crop_ratio if args.crop_ratio is not None else cfg.eval.crop_ratio


def _train_crop(args: argparse.Namespace, cfg) -> str:
    """The random crop of fine-tuning and of the augmented probe: ``--train-crop``, else the config's."""
    return args.train_crop or cfg.eval.train_crop


def _loader(args: argparse.Namespace, cfg, source: str) -> tuple[str, int, bool, float]:
    """(loader, workers, skip_unreadable, crop_ratio) of the evaluation data: ``--loader``/``--workers``/
    ``--skip-unreadable``/``--crop-ratio``, else the checkpoint config's ``data.*`` and ``eval.crop_ratio``.
    A built-in dataset is decoded in memory:
    asked to stream it, this is an error; a streaming config falls back to memory for it, with a log line."""
    from ..data.files import BUILTIN
    from ..data.views import default_workers

    loader = args.loader or cfg.data.loader
    if loader == "stream" and source in BUILTIN:
        if args.loader == "stream":
            raise UsageError(f"--loader stream reads an ImageFolder folder or .zip, and {source!r} is a built-in "
                             "dataset, decoded in memory: use --loader memory (or pass a folder with --data)")
        log.info("data %r is a built-in dataset: decoded in memory (the checkpoint's data.loader stream reads "
                 "folders and .zip files only)", source)
        loader = "memory"
    workers = args.workers if args.workers is not None else cfg.data.workers
    workers = default_workers() if workers is None else workers
    return loader, workers, args.skip_unreadable or cfg.data.skip_unreadable, _crop_ratio(args, cfg)


def _load_split(source: str, split: str, cfg, loader: str = "memory", workers: int = 0,
                skip_unreadable: bool = False, crop_ratio: float = 1.0, device=None):
    """``split`` of ``source`` at the config's resolution (each image's centre ``crop_ratio``), decoded in
    memory or streamed (``loader``)."""
    from ..data.eval_images import load_eval_split

    try:
        ds = load_eval_split(source, split, loader=loader, resolution=cfg.data.resolution, workers=workers,
                             skip_unreadable=skip_unreadable, fake_size=cfg.data.fake_size,
                             seed=cfg.train.seed,  # fake data as trained
                             pin_memory=device is not None and device.type == "cuda", crop_ratio=crop_ratio)
    except ValueError as e:  # DataError: names the path and what was expected
        raise UsageError(f"cannot load the {split} split of {source!r}: {e}") from None
    if ds.labels is None:
        raise UsageError(f"the {split} split of {source!r} has no labels (a folder without class sub-folders); "
                         "evaluation needs a labelled dataset: pass one with --data")
    return ds


def _load_model(args: argparse.Namespace):
    """Supernet (eval mode, on the device), its config and the device."""
    from ..checkpoint import load_supernet
    from ..devices import pick_device

    supernet, cfg = load_supernet(args.checkpoint)
    device = pick_device(args.device)
    return supernet.to(device).eval(), cfg, device


def _load_data(args: argparse.Namespace, cfg, device):
    """The data source and its train/test splits (in memory or streamed, see ``_loader``)."""
    from ..data.datasets import check_same_classes

    source = args.data or cfg.data.source
    options = _loader(args, cfg, source)
    train, test = (_load_split(source, split, cfg, *options, device=device) for split in ("train", "test"))
    check_same_classes(train, test, source)
    loader, workers, _, crop_ratio = options
    how = f"streamed by {workers} loader worker(s)" if loader == "stream" else "decoded in memory"
    how += f", centre crop ratio {crop_ratio:g}" if crop_ratio != 1 else ""
    log.info("data %s (%s): %d train, %d test images", source, how, len(train), len(test))
    return source, train, test


def _setup(args: argparse.Namespace):
    """Supernet, config, device, data source and its train/test splits."""
    supernet, cfg, device = _load_model(args)
    return (supernet, cfg, device, *_load_data(args, cfg, device))


def _cost_rows(supernet, resolution: int) -> dict[str, dict]:
    """subnet, width, depths, params, macs of every menu entry (backbone only, at ``resolution``)."""
    from ..report.profile import profile_supernet

    rows = profile_supernet(supernet, resolution, latency=False)
    return {r["subnet"]: r for r in rows}


def _save(args: argparse.Namespace, values: dict[str, dict], protocol: str, settings: dict, cfg) -> Path | None:
    """Merge ``values`` into the run directory's results.json when the checkpoint is in one."""
    from .results import merge_results, run_dir_of

    run_dir = None if args.no_save else run_dir_of(args.checkpoint)
    if run_dir is None:
        return None
    path = merge_results(run_dir, values, protocol=protocol, settings=settings,
                         defaults={"run": run_dir.name, "config": cfg.model_dump(mode="json"),
                                   "resolution": cfg.data.resolution})
    log.info("merged %s results into %s", protocol, path)
    return path


def _add_loader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loader", choices=["memory", "stream"],
                   help="memory: decode each split once into a uint8 tensor; stream: loader workers decode each "
                        "batch from the files of a folder or .zip too large for memory (same images, same results; "
                        "built-in datasets are in memory only). Default: the checkpoint config's data.loader")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip (memory) or replace (stream) image files that cannot be decoded instead of stopping "
                        "(default: the checkpoint config's data.skip_unreadable)")
    p.add_argument("--crop-ratio", type=fraction, metavar="R",
                   help="evaluate each image's centre R (of its shorter side), resized to the run's resolution: "
                        "resize to resolution / R, then centre crop (default: the config's eval.crop_ratio; "
                        "ImageNet recipes 0.875, others 1)")
    p.add_argument("--workers", type=nonnegative_int, metavar="N",
                   help="--loader stream: decoding worker processes (default: the config's data.workers, "
                        "else the CPU count, at most 8)")


def _add_train_crop_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-crop", choices=["pad", "resized"],
                   help="the training images' random crop: pad (CIFAR: pad by 1/8 of the size, crop the size) or "
                        "resized (ImageNet: RandomResizedCrop, 8-100%% of the area); default: the config's "
                        "eval.train_crop (ImageNet recipes resized, others pad)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint file or run directory")
    p.add_argument("--data", help="dataset name or path (default: the checkpoint config's data.source)")
    _add_loader_args(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--eval-batch-size", type=positive_int, help="batch of the feature extraction (default: config eval.batch_size)")
    p.add_argument("--recalibrate-bn", type=nonnegative_int, metavar="N",
                   help="re-estimate each sub-network's BatchNorm statistics on N train batches before evaluating "
                        "(default: 20 when the supernet's BatchNorm is shared, else 0)")
    p.add_argument("--no-save", action="store_true", help="do not merge the results into RUN/results.json")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


# ---- knn ---------------------------------------------------------------------------------------------

def cmd_knn(args: argparse.Namespace) -> int:
    from ..report.table import markdown_table
    from .knn import knn_eval_subnets
    from .linear import resolve_recalibration, subnet_models

    supernet, cfg, device, source, train, test = _setup(args)
    k = args.k or cfg.eval.knn_k
    temperature = args.temperature or cfg.eval.knn_temperature
    bs = args.eval_batch_size or cfg.eval.batch_size
    res, mean, std = cfg.data.resolution, cfg.data.mean, cfg.data.std
    models = subnet_models(supernet, list(supernet.menu), train, recalibrate_batches=args.recalibrate_bn,
                           batch_size=bs, resolution=res, mean=mean, std=std, device=device)
    accs = knn_eval_subnets(supernet, train, test, k=k, temperature=temperature, resolution=res, mean=mean, std=std,
                            batch_size=bs, device=device, models=models)
    for name, acc in accs.items():
        log.info("kNN %s: top-1 %.2f", name, acc)
    costs = _cost_rows(supernet, res)
    rows = [{**costs[n], "knn_top1": a} for n, a in accs.items()]
    settings = {"data": source, "k": k, "temperature": temperature, "bank": "train", "queries": "test",
                "recalibrate_bn": resolve_recalibration(supernet, args.recalibrate_bn), "resolution": res,
                "crop_ratio": _crop_ratio(args, cfg)}
    _save(args, {r["subnet"]: r for r in rows}, "knn", settings, cfg)
    emit(args, rows, markdown_table(rows, ["subnet", "params", "macs", "knn_top1"]))
    return 0


# ---- linear ------------------------------------------------------------------------------------------

def cmd_linear(args: argparse.Namespace) -> int:
    from ..report.table import markdown_table
    from .linear import linear_probe_subnets, resolve_recalibration

    supernet, cfg, device, source, train, test = _setup(args)
    bs = args.eval_batch_size or cfg.eval.batch_size
    results = linear_probe_subnets(
        supernet, train, test, resolution=cfg.data.resolution, mean=cfg.data.mean, std=cfg.data.std,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, distill=args.distill,
        shared_head=args.shared_head, augment=args.augment, train_crop=_train_crop(args, cfg), device=device,
        seed=args.seed,
        feature_batch_size=bs, recalibrate_batches=args.recalibrate_bn)
    protocol = "linear" + ("_shared" if args.shared_head else "") + ("_distill" if args.distill else "") \
        + ("_aug" if args.augment else "")
    costs = _cost_rows(supernet, cfg.data.resolution)
    rows = [{**costs[n], f"{protocol}_top1": r["top1"], f"{protocol}_top5": r["top5"]} for n, r in results.items()]
    settings = {"data": source, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "optimizer": "sgd momentum 0.9, cosine, no weight decay", "standardized_features": True,
                "distill": args.distill, "shared_head": args.shared_head, "augment": args.augment,
                "train_crop": _train_crop(args, cfg) if args.augment else None, "seed": args.seed,
                "recalibrate_bn": resolve_recalibration(supernet, args.recalibrate_bn),
                "resolution": cfg.data.resolution, "crop_ratio": _crop_ratio(args, cfg)}
    _save(args, {r["subnet"]: r for r in rows}, protocol, settings, cfg)
    emit(args, rows, markdown_table(rows, ["subnet", "params", "macs", f"{protocol}_top1", f"{protocol}_top5"]))
    return 0


# ---- finetune ----------------------------------------------------------------------------------------

def _finetune_targets(args: argparse.Namespace, supernet) -> list[tuple]:
    """(sub-network, label fraction) of every fine-tuning asked for, sub-network by sub-network, in order and
    without repeats; the sub-networks (``--subnet``, or ``--all``: the menu) are checked before any data is
    decoded."""
    if bool(args.subnet) == bool(args.all):
        raise UsageError("give exactly one of --subnet NAME [NAME ...] or --all")
    specs = list(supernet.menu) if args.all else list(dict.fromkeys(supernet.resolve(t) for t in args.subnet))
    fractions = list(dict.fromkeys(args.label_fraction))
    jobs = [(spec, f) for spec in specs for f in fractions]
    if args.out and len(jobs) > 1:
        raise UsageError(f"--out names one JSON file, but {len(specs)} sub-network(s) x {len(fractions)} label "
                         f"fraction(s) give {len(jobs)} results: drop --out (each result goes to "
                         "RUN/finetune/<subnet>_<pct>pct_seed<S>.json) or ask for one of each")
    return jobs


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..report.table import markdown_table
    from .finetune import finetune_subnet, fraction_key
    from .results import run_dir_of

    supernet, cfg, device = _load_model(args)
    jobs = _finetune_targets(args, supernet)  # an impossible sub-network fails before any data is decoded
    source, train, test = _load_data(args, cfg, device)
    bs = args.eval_batch_size or cfg.eval.batch_size
    costs = _cost_rows(supernet, cfg.data.resolution)
    run_dir = None if args.no_save else run_dir_of(args.checkpoint)

    def finetune(spec, label_fraction: float) -> dict:
        """One result: written to its JSON file and merged into the run before the next one starts, so a
        failure later keeps what was measured."""
        result = finetune_subnet(supernet, spec, train, test, label_fraction=label_fraction, seed=args.seed,
                                 epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 resolution=cfg.data.resolution, mean=cfg.data.mean, std=cfg.data.std,
                                 device=device, recalibrate_batches=args.recalibrate_bn, eval_batch_size=bs,
                                 train_crop=_train_crop(args, cfg))
        key = fraction_key(label_fraction)
        stem = f"{spec.name}_{key.removeprefix('finetune_').removesuffix('_top1')}_seed{args.seed}.json"
        if args.out:
            out = Path(args.out)
        elif args.no_save:  # --no-save writes nothing beside the checkpoint; --out still names a file to write
            out = None
        else:
            out = (run_dir / "finetune" / stem) if run_dir else \
                Path(args.checkpoint).resolve().parent / f"finetune_{stem}"
        cost = costs.get(spec.name, {"subnet": spec.name})  # a sub-network outside the menu has no profile row
        row = {**cost, **{k: v for k, v in result.items() if k != "subnet"}, "data": source,
               "indices_file": str(out) if out else None}
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(row, indent=2) + "\n")
            log.info("saved the fine-tuning result and the labelled indices to %s", out)
        values = {spec.name: {**{k: v for k, v in cost.items() if k != "subnet"},
                              key: result["top1"], key.replace("_top1", "_top5"): result["top5"]}}
        settings = {"data": source, "label_fraction": label_fraction, "seed": args.seed,
                    "recipe": result["recipe"], "indices_file": row["indices_file"],
                    "resolution": cfg.data.resolution, "crop_ratio": _crop_ratio(args, cfg)}
        _save(args, values, key.removesuffix("_top1"), settings, cfg)
        return row

    rows = []
    for i, (spec, label_fraction) in enumerate(jobs):
        if len(jobs) > 1:
            log.info("fine-tuning %d of %d: %s on %g of the labels", i + 1, len(jobs), spec.name, label_fraction)
        rows.append(finetune(spec, label_fraction))
    emit(args, rows, markdown_table(rows, ["subnet", "params", "macs", "label_fraction", "num_labelled",
                                           "top1", "top5"]))
    return 0


# ---- recalibrate -------------------------------------------------------------------------------------

def cmd_recalibrate(args: argparse.Namespace) -> int:
    from ..checkpoint import BACKBONE_PREFIX, load_checkpoint, save_checkpoint, supernet_of
    from ..devices import pick_device
    from ..nn.layers import recalibrate_bn
    from .linear import calibration_batches

    source_file = Path(args.checkpoint)
    source_file = source_file / "checkpoints" / "last.pt" if source_file.is_dir() else source_file
    if args.out.exists() and args.out.resolve() == source_file.resolve():
        raise UsageError(f"--out {args.out} is the checkpoint being read; write the recalibrated one to a new file "
                         "(a run's last.pt is what --resume continues from)")
    data = load_checkpoint(args.checkpoint)
    cfg = data["config"]
    supernet = supernet_of(data, args.checkpoint)
    device = pick_device(args.device)
    supernet.to(device)
    spec = supernet.resolve(args.subnet)
    source = args.data or cfg.data.source
    train = _load_split(source, "train", cfg, *_loader(args, cfg, source), device=device)
    bs = args.eval_batch_size or cfg.eval.batch_size
    recalibrate_bn(supernet, spec, calibration_batches(train, args.batches, bs, cfg.data.resolution,
                                                       cfg.data.mean, cfg.data.std, device, args.seed))
    state = dict(data["model"])
    state.update({BACKBONE_PREFIX + k: v.cpu() for k, v in supernet.state_dict().items()})
    payload = {k: v for k, v in data.items() if k not in ("format", "version")}
    payload.update(config=cfg.model_dump(mode="json"), model=state,
                   recalibrated={"subnet": spec.name, "batches": args.batches, "batch_size": bs, "data": source})
    path = save_checkpoint(args.out, payload)
    row = {"subnet": spec.name, "batches": args.batches, "batch_size": bs, "out": str(path)}
    log.info("recalibrated BatchNorm of %s on %d batches of %s; wrote %s", spec.name, args.batches, source, path)
    emit(args, row, f"recalibrated {spec.name} -> {path}")
    return 0


# ---- report ------------------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from ..report.plot import plot_accuracy_vs_macs, plot_grad_norms
    from ..report.report import grad_norm_series, load_runs, report_markdown

    results = load_runs(args.run_dirs)
    if args.plot:
        plot_accuracy_vs_macs(results, args.metric, args.plot, join_singles=args.join_singles)
        log.info("wrote %s (%s against MACs)", args.plot, args.metric)
    status = 0
    if args.plot_grad:
        series = {r["run"]: grad_norm_series(d) for r, d in zip(results, args.run_dirs)}
        if any(series.values()):
            plot_grad_norms(series, args.plot_grad)
            log.info("wrote %s (gradient norms)", args.plot_grad)
        else:
            log.error("--plot-grad: no record with 'grad_norm' in metrics.jsonl of %s; the diagnostic is logged "
                      "during pretraining only when gradient norms are recorded", ", ".join(map(str, args.run_dirs)))
            status = 1
    emit(args, results, report_markdown(results))
    return status


# ---- parser ------------------------------------------------------------------------------------------

PLOT_SUFFIXES = (".png", ".pdf", ".svg")  # formats matplotlib writes without extra packages


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to the ``slimssl`` parser."""
    p = sub.add_parser("knn", help="weighted kNN top-1 of every sub-network (train split = bank, test = queries)")
    _add_eval_args(p)
    p.add_argument("--k", type=positive_int, help="neighbours (default: config eval.knn_k)")
    p.add_argument("--temperature", type=positive_float, help="vote temperature (default: config eval.knn_temperature)")
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("linear", help="switchable linear probe: one head per sub-network on the frozen backbone")
    _add_eval_args(p)
    p.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS)
    p.add_argument("--lr", type=positive_float, default=DEFAULT_LR, help="SGD lr on standardised features (cosine to 0)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", action="store_true",
                   help="random crop (--train-crop) + flip, the backbone runs every step (default: cached features)")
    _add_train_crop_arg(p)
    p.add_argument("--distill", action="store_true",
                   help="SlimCLR: sub-width heads learn 0.5 CE + 0.5 soft CE to the full-width head")
    p.add_argument("--shared-head", action="store_true", help="one slimmable head shared by all sub-networks")
    p.set_defaults(func=cmd_linear)

    p = sub.add_parser("finetune", help="fine-tune exported sub-networks, each on a class-balanced labelled subset")
    _add_eval_args(p)
    p.add_argument("--subnet", action="extend", nargs="+", metavar="SUBNET",
                   help="canonical name, or a width such as 0.5; several may follow (each is fine-tuned in turn, "
                        "on the same decoded data)")
    p.add_argument("--all", action="store_true", help="every sub-network of the menu")
    p.add_argument("--label-fraction", type=fraction, required=True, action="extend", nargs="+", metavar="F",
                   help="e.g. 0.01 or 0.1; several may follow (every sub-network is fine-tuned on each)")
    p.add_argument("--epochs", type=positive_int, help="default: 60 for fractions <= 5%%, else 30 (at least 100 steps)")
    p.add_argument("--lr", type=positive_float, help="lr at batch 256, scaled with the batch (default 0.05)")
    p.add_argument("--batch-size", type=positive_int, help="default 256 (or the whole subset when smaller)")
    p.add_argument("--seed", type=int, default=0, help="draws the labelled subset and the training order")
    _add_train_crop_arg(p)
    p.add_argument("--out", type=output_file(".json"),
                   help="JSON file for the result and the labelled indices, when there is one result (default: "
                        "RUN/finetune/<subnet>_<pct>pct_seed<S>.json; none with --no-save)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("recalibrate", help="re-estimate a sub-network's BatchNorm statistics into a new checkpoint")
    p.add_argument("checkpoint", help="a checkpoint file or run directory")
    p.add_argument("--subnet", required=True, help="canonical name, or a width such as 0.5")
    p.add_argument("--batches", type=positive_int, default=20, help="train batches to average the statistics over")
    p.add_argument("--out", required=True, type=output_file(".pt"), help="the new checkpoint file (.pt)")
    p.add_argument("--data", help="dataset name or path (default: the checkpoint config's data.source)")
    _add_loader_args(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--eval-batch-size", type=positive_int, help="default: config eval.batch_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recalibrate)

    p = sub.add_parser("report", help="tables (and plots) of the results of one or more run directories")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--plot", type=output_file(*PLOT_SUFFIXES), metavar="FILE.png",
                   help="accuracy against MACs, one line per run (.png, .pdf or .svg)")
    p.add_argument("--metric", default="knn_top1",
                   help="what --plot draws: knn_top1, linear_top1, finetune_1pct_top1, ... (default knn_top1)")
    p.add_argument("--join-singles", metavar="LABEL",
                   help="draw runs with a single sub-network (pretrained one by one) as one line named LABEL")
    p.add_argument("--plot-grad", type=output_file(*PLOT_SUFFIXES), metavar="FILE.png",
                   help="gradient norms on shared/other weights per sub-network (from metrics.jsonl)")
    p.add_argument("--json", action="store_true", help="print the runs' results.json contents as one JSON list")
    p.set_defaults(func=cmd_report)
