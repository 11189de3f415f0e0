"""The evaluation protocols of a pretrained run, from Python: ``slimssl.knn``, ``slimssl.linear_probe`` and
``slimssl.finetune``, each the same as its command (``slimssl knn`` / ``linear`` / ``finetune``).

Each takes a checkpoint file or a run directory and returns one row per result, the rows the command
prints with ``--json``: the sub-network, its params and MACs, and the measured values. Run on a checkpoint
inside a run directory, the values are merged into ``RUN/results.json`` with the protocol's settings, unless
``save=False``.

The keywords every protocol shares say where the images come from and how they are read:

* ``data``: a dataset name or path (default: the checkpoint config's ``data.source``);
* ``loader`` (``"memory"`` or ``"stream"``), ``workers``, ``skip_unreadable``: how the splits are decoded
  (default: the config's ``data.*``; see ``data/eval_images.py``);
* ``crop_ratio``: the centre crop of the evaluation images (default: the config's ``eval.crop_ratio``);
* ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``), ``eval_batch_size``
  (default: ``eval.batch_size``) and ``recalibrate_bn`` (train batches to re-estimate each sub-network's
  BatchNorm statistics on; default 20 for shared BatchNorm, else 0).
"""

from __future__ import annotations

import json
import logging
import os
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..wording import named
from ..errors import UsageError
from ..launch import warn_of_repeated_work
from . import (DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR, check_milestones, check_train_crop, linear_settings,
               recalibration_batches)
from ..layout import FINETUNE, RESULTS
from .inputs import DataOptions, check_flags, check_numbers, gives_back_device, in_memory, load_model, saves_results
from ..ambient import apart_from_caller
from ..seeds import keeps_random_state

if TYPE_CHECKING:
    import torch
    from typing_extensions import Unpack  # typing's from Python 3.11

    from ..config import Config
    from ..models.resnet import SlimResNet
    from ..nn.spec import Subnets
    from .inputs import DataKeywords

log = logging.getLogger("slimssl")


def cost_rows(supernet, resolution: int, specs=None) -> dict[str, dict]:
    """subnet, width, depths, params, macs of every sub-network of ``specs`` (default: the menu; backbone
    only, at ``resolution``)."""
    from ..report.profile import profile_supernet

    return {r["subnet"]: r for r in profile_supernet(supernet, resolution, latency=False, specs=specs)}


def save_values(checkpoint, values: dict[str, dict], protocol: str, settings: dict, cfg, save: bool,
                epoch: float | None) -> Path | None:
    """Merge ``values`` into the run directory's results.json when the checkpoint is in one and ``save``.
    A checkpoint trained for ``epoch`` of the run's epochs, before pretraining finished, marks the protocol
    ``unfinished`` there (``mark_unfinished``), so that a report does not read its numbers as the run's final
    ones."""
    from ..data.registry import absolute_source
    from .results import merge_results, results_header, run_dir_of, same_data

    run_dir = run_dir_of(checkpoint) if save and saves_results(checkpoint) else None
    if run_dir is None:
        return None
    given = settings.get("data")
    if same_data(given, cfg.data.source):  # spelt as the run's: a report compares the names
        settings = {**settings, "data": cfg.data.source}
    else:
        log.warning("%s numbers measured on %s, not on the run's own data %s (data.source), replace its %s results "
                    "in %s; --no-save (save=False) keeps other data's numbers out of it", protocol, given,
                    cfg.data.source, protocol, run_dir / RESULTS)
        settings = {**settings, "data": absolute_source(given)}  # one spelling of a folder or .zip
    path = merge_results(run_dir, values, protocol=protocol, settings=settings,
                         defaults=results_header(run_dir, cfg), trained=(epoch, cfg.train.epochs))
    log.info("merged %s results into %s", protocol, path)
    return path


# ---- the protocols -----------------------------------------------------------------------------------

@apart_from_caller()
@keeps_random_state
@gives_back_device
def knn(checkpoint: str | os.PathLike | SlimResNet, subnets: Subnets = "all", *, k: int | None = None,
        temperature: float | None = None, device: str | torch.device = "auto", eval_batch_size: int | None = None,
        recalibrate_bn: int | None = None, save: bool = True, config: Config | dict | str | Path | None = None,
        **data: Unpack[DataKeywords]) -> list[dict]:
    """Weighted kNN top-1 of every sub-network: the train split is the bank, the test split the queries; ``k``
    and ``temperature`` default to the config's ``eval.knn_k`` and ``eval.knn_temperature``. ``subnets``: the
    sub-networks to evaluate (a name or width, or a list of them), or ``"all"``, the menu; with shared BatchNorm
    any width can run.

    ``checkpoint`` is a checkpoint file or run directory, whose results.json the results are merged into
    (``save``), or a supernet in memory with its ``config`` (nothing saved).

    ``data``, ``loader``, ``workers``, ``skip_unreadable`` and ``crop_ratio`` say where and how the images
    are read (module docstring). Returns one row per sub-network: subnet, width, depths, params, macs,
    knn_top1 (percent)."""
    check_numbers(k=k, temperature=temperature, eval_batch_size=eval_batch_size, recalibrate_bn=recalibrate_bn)
    check_flags(save=save)
    from .knn import knn_of_subnets, knn_settings

    options = DataOptions.of(data, knn)
    warn_of_repeated_work("slimssl.knn()")
    supernet, cfg, torch_device, epoch = load_model(checkpoint, device, config, options.data)
    specs = supernet.resolve_many(subnets)  # checked before the data is decoded
    train, test = options.load_splits(cfg, torch_device)
    k = k if k is not None else cfg.eval.knn_k
    if k > len(train.labels):  # every query votes with the whole bank: record the k that was used
        log.warning("kNN k=%d is more than the %d images of the train split (the bank): k=%d is used",
                    k, len(train.labels), len(train.labels))
        k = len(train.labels)
    temperature = temperature if temperature is not None else cfg.eval.knn_temperature
    accs = knn_of_subnets(supernet, cfg, train, test, torch_device, specs=specs, k=k, temperature=temperature,
                          batch_size=eval_batch_size, recalibrate_batches=recalibrate_bn)
    for name, acc in accs.items():
        log.info("kNN %s: top-1 %.2f", name, acc)
    costs = cost_rows(supernet, cfg.data.resolution, specs)
    rows = [{**costs[n], "knn_top1": a} for n, a in accs.items()]
    settings = knn_settings(cfg, options, k, temperature,
                            recalibration_batches(recalibrate_bn, supernet.slim_state.private_bn))
    save_values(checkpoint, {r["subnet"]: r for r in rows}, "knn", settings, cfg, save, epoch)
    return rows


@apart_from_caller()
@keeps_random_state
@gives_back_device
def linear_probe(checkpoint: str | os.PathLike | SlimResNet, subnets: Subnets = "all", *,
                 epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH_SIZE,
                 seed: int = 0, augment: bool = False, train_crop: str | None = None, distill: bool = False,
                 shared_head: bool = False, raw_features: bool = False, milestones: Sequence[int] | None = None,
                 device: str | torch.device = "auto", eval_batch_size: int | None = None,
                 recalibrate_bn: int | None = None, save: bool = True, save_models: str | Path | None = None,
                 config: Config | dict | str | Path | None = None, **data: Unpack[DataKeywords]) -> list[dict]:
    """The switchable linear probe: one head per sub-network on the frozen backbone (``eval/linear.py``).
    ``subnets``: the sub-networks to probe, as knn's; with ``distill`` the widest of them teaches.
    ``raw_features``: the heads see the features as the backbone gives them, not standardised; ``milestones``:
    the lr drops tenfold at these epochs instead of following a cosine. With the papers' lr and batch size they
    give the papers' probes (docs/recipes.md has SlimCLR's); results.json records them with the protocol's
    settings.

    ``augment``: random crops (``train_crop``, default the config's ``eval.train_crop``: ``pad``, or a
    RandomResizedCrop of the evaluation image, ``resized``, or of the whole picture, ``whole``, which needs a
    streamed split) and flips, with the backbone run at every step, instead of cached features.
    ``save_models``: a folder that receives each sub-network with its head as a classifier of images, as an
    export, ``<subnet>_<protocol>_seed<S>/`` (``slimssl.load_exported``; its config.json names the classes and
    the accuracy). ``checkpoint``, ``config`` and the data keywords are knn's. Returns one row per sub-network:
    subnet, width, depths, params, macs, linear_top1, linear_top5 (percent), and model_path with ``save_models``;
    ``_shared``, ``_distill`` and ``_aug`` join the protocol's name (``linear_aug_top1``) for those options."""
    from .linear import train_linear_probe

    check_numbers(epochs=epochs, lr=lr, batch_size=batch_size, eval_batch_size=eval_batch_size,
                  recalibrate_bn=recalibrate_bn, seed=seed)
    check_flags(augment=augment, distill=distill, shared_head=shared_head, raw_features=raw_features, save=save)
    check_train_crop(train_crop)
    milestones = check_milestones(milestones, epochs)
    if train_crop is not None and not augment:  # it would change nothing: say so rather than record it
        raise UsageError(f"{named('--train-crop', 'train_crop')} {train_crop} is the crop of the augmented probe; it "
                         f"needs {named('--augment', 'augment=True')}: without it the probe trains on the cached "
                         "features of the centre crop")
    options = DataOptions.of(data, linear_probe)
    warn_of_repeated_work("slimssl.linear_probe()")
    supernet, cfg, torch_device, epoch = load_model(checkpoint, device, config, options.data)
    specs = supernet.resolve_many(subnets)  # checked before the data is decoded
    teacher = max(specs).name if distill else None  # the widest probed teaches the others
    if distill and teacher != supernet.menu.largest.name:
        log.warning("the distilled probe's teacher is the widest sub-network probed, %s, not the full network %s: "
                    "its own value is a plain probe, and the others learn from it (recorded as distill_teacher)",
                    teacher, supernet.menu.largest.name)
    train_crop = options.train_crop_of(cfg, train_crop) if augment else cfg.eval.train_crop  # unused unless augment
    protocol = "linear" + ("_shared" if shared_head else "") + ("_distill" if distill else "") \
        + ("_aug" if augment else "")
    model_source = _model_source(checkpoint)
    if save_models is not None:
        _refuse_classifier_folders(save_models, [probe_name(s.name, protocol, seed) for s in specs], model_source,
                                   options, cfg)
    train, test = options.load_splits(cfg, torch_device)
    probe = train_linear_probe(
        supernet, train, test, resolution=cfg.data.resolution, mean=cfg.data.mean, std=cfg.data.std,
        epochs=epochs, lr=lr, batch_size=batch_size, distill=distill, shared_head=shared_head, augment=augment,
        train_crop=train_crop, subnets=specs, device=torch_device, seed=seed, raw_features=raw_features,
        milestones=milestones, feature_batch_size=eval_batch_size or cfg.eval.batch_size,
        recalibrate_batches=recalibrate_bn)
    costs = cost_rows(supernet, cfg.data.resolution, specs)
    rows = [{**costs[n], f"{protocol}_top1": r["top1"], f"{protocol}_top5": r["top5"]}
            for n, r in probe.results.items()]
    settings = linear_settings(
        options.settings(cfg), epochs=epochs, lr=lr, batch_size=batch_size, distill=distill,
        shared_head=shared_head, augment=augment, train_crop=train_crop, seed=seed, raw_features=raw_features,
        milestones=milestones, teacher=None if teacher == supernet.menu.largest.name else teacher,
        recalibrate_bn=recalibration_batches(recalibrate_bn, supernet.slim_state.private_bn))
    save_values(checkpoint, {r["subnet"]: r for r in rows}, protocol, settings, cfg, save, epoch)
    classifiers = probe.classifiers() if save_models is not None else {}
    for row in rows if save_models is not None else []:
        row["model_path"] = str(_save_probe_classifier(
            classifiers[row["subnet"]], Path(save_models) / probe_name(row["subnet"], protocol, seed), row, protocol,
            settings, train, cfg, options, model_source, supernet).absolute())
    return rows


def probe_name(subnet: str, protocol: str, seed: int) -> str:
    """A probed sub-network's saved classifier's folder name (``linear --save-models``)."""
    return f"{subnet}_{protocol}_seed{seed}"


def _refuse_classifier_folders(save_models: str | Path, names: Sequence[str], model_source: str | None, options,
                               cfg) -> None:
    """Before any work: the classifiers' folders are not inside the dataset, and none replaces a classifier of
    another checkpoint."""
    from ..export.files import check_export_folder

    options.refuse_output_in_data(cfg, save_models, "the classifiers' folders", "saved models")
    for name in names:
        check_export_folder(Path(save_models) / name, model_source, replace_hint="remove that folder to replace it")


def _save_probe_classifier(classifier, folder: Path, row: dict, protocol: str, settings: dict, train, cfg, options,
                           source: str | None, supernet) -> Path:
    """A probed sub-network with its head, as an export whose config.json says what it classifies and how well."""
    from ..export.files import classifier_metadata, save_exported

    metadata = {"subnet": row["subnet"], "protocol": protocol, "settings": settings,
                f"{protocol}_top1": row[f"{protocol}_top1"], f"{protocol}_top5": row[f"{protocol}_top5"],
                **classifier_metadata(train, supernet, source, cfg.data.resolution, cfg.data.mean, cfg.data.std,
                                      options.resolved_crop_ratio(cfg))}
    folder = save_exported(classifier, folder, metadata)
    log.info("saved %s with its %s head to %s", row["subnet"], protocol, folder)
    return folder


@apart_from_caller()
@keeps_random_state
@gives_back_device
def finetune(checkpoint: str | os.PathLike | SlimResNet, subnets: Subnets = "all",
             label_fractions: Sequence[float] | float | None = None, *, subset_file: str | os.PathLike | None = None,
             epochs: int | None = None,
             lr: float | None = None, batch_size: int | None = None, seed: int = 0, train_crop: str | None = None,
             out: str | Path | None = None, device: str | torch.device = "auto", eval_batch_size: int | None = None,
             recalibrate_bn: int | None = None, save: bool = True, save_models: str | Path | None = None,
             config: Config | dict | str | Path | None = None, **data: Unpack[DataKeywords]) -> list[dict]:
    """Fine-tune each of ``subnets`` (names or widths, or ``"all"``: the menu) on a class-balanced fraction of
    the train labels, for every one of ``label_fractions`` (``eval/finetune.py``; default 1% and 10%), or on the
    subset that ``subset_file`` lists (``eval/subsets.py``: e.g. SimCLR's ImageNet ``1percent.txt``; the result is
    named by the file, ``<subnet>_list-<file's stem>_seed<S>``, and its protocol by the subset's share of the split,
    ``finetune_1pct``; results.json records the file's name and SHA-256 with the protocol's settings).

    Each result, with its labelled indices, is written to ``out`` (one result only), else (``save``) to
    ``RUN/finetune/<subnet>_<pct>pct_seed<S>.json`` (``finetune_<subnet>_...json`` beside a checkpoint that is
    not a run's last: a loose one, or ``RUN/checkpoints/epoch_XXXX.pt``), and merged into the run before the
    next one starts, so a failure later keeps what was measured. ``save_models``: a folder that receives each
    fine-tuned classifier as an export, ``<subnet>_<pct>pct_seed<S>/`` (``slimssl.load_exported``; its
    config.json names the classes and the accuracy). The sub-networks are checked before any data is decoded.
    ``checkpoint``, ``config`` and the data keywords are knn's.
    Returns one row per result: subnet, width, depths, params, macs, label_fraction, seed, num_labelled,
    recipe, top1, top5 (percent), indices (the labelled subset), and model_path (the classifier's folder) with
    ``save_models``.
    """
    from .finetune import finetune_subnet, fraction_tag
    from .subsets import all_indices, listed_share_name, read_subset_file, subset_indices
    from ..atomic import write_json_atomic
    from .results import run_dir_of

    check_numbers(epochs=epochs, lr=lr, batch_size=batch_size, eval_batch_size=eval_batch_size,
                  recalibrate_bn=recalibrate_bn, seed=seed)
    check_flags(save=save)
    check_train_crop(train_crop)
    if subset_file is not None and label_fractions is not None:
        raise UsageError(f"give label fractions or a subset file, not both: the subset file is the labelled subset "
                         f"({named('--label-fraction', 'label_fractions')} draws one of a fraction)")
    entries, subset = read_subset_file(subset_file) if subset_file is not None else (None, None)
    options = DataOptions.of(data, finetune)
    warn_of_repeated_work("slimssl.finetune()")
    supernet, cfg, torch_device, epoch = load_model(checkpoint, device, config, options.data)
    save = save and saves_results(checkpoint)
    default = (0.01, 0.1)  # an invalid fraction (0, []) is refused by finetune_jobs, not replaced
    jobs = finetune_jobs(supernet, subnets, None if subset else default if label_fractions is None else label_fractions,
                         out)
    names = {(spec, f): finetuned_name(spec, f, seed, subset) for spec, f in jobs}
    model_source = _model_source(checkpoint)
    if save_models is not None:
        _refuse_classifier_folders(save_models, list(names.values()), model_source, options, cfg)
    if entries is not None and not all_indices(entries):
        options = options.with_file_names(cfg)  # the subset names files: a folder's split streamed keeps them
    train_crop = options.train_crop_of(cfg, train_crop)  # (whole needs a streamed split: decided above)
    train, test = options.load_splits(cfg, torch_device)
    listed = subset_indices(entries, train, options.source(cfg)) if entries is not None else None
    costs = cost_rows(supernet, cfg.data.resolution, list(dict.fromkeys(spec for spec, _ in jobs)))
    run_dir = run_dir_of(checkpoint) if save else None
    source = options.source(cfg)
    rows = []
    for i, (spec, label_fraction) in enumerate(jobs):
        name = names[spec, label_fraction]
        if listed is not None:  # the share of the split the file lists, which names the protocol
            label_fraction = len(listed) / len(train)
        if len(jobs) > 1:
            log.info("fine-tuning %d of %d: %s on %g of the labels", i + 1, len(jobs), spec.name, label_fraction)
        # results.json: finetune_1pct_top1, ...; a listed subset by its share to 2 digits (1percent.txt: 0.99995%)
        named_by = listed_share_name(label_fraction) if listed is not None else label_fraction
        protocol = f"finetune_{fraction_tag(named_by)}"
        model_path = Path(save_models) / name if save_models is not None else None
        result = finetune_subnet(supernet, spec, train, test, label_fraction=label_fraction, seed=seed,
                                 epochs=epochs, lr=lr, batch_size=batch_size, resolution=cfg.data.resolution,
                                 mean=cfg.data.mean, std=cfg.data.std, device=torch_device,
                                 recalibrate_batches=recalibrate_bn,
                                 eval_batch_size=eval_batch_size or cfg.eval.batch_size, train_crop=train_crop,
                                 save_model=model_path, indices=listed, subset_file=subset,
                                 checkpoint_source=model_source, crop_ratio=options.resolved_crop_ratio(cfg))
        path = _finetune_result_path(name, out, save, run_dir, checkpoint)
        cost = costs[spec.name]
        row = {**cost, **{k: v for k, v in result.items() if k != "subnet"}, "data": source,
               "indices_file": str(path.absolute()) if path else None}  # from any working directory
        if model_path is not None:  # the classifier's export folder, for slimssl.load_exported
            row["model_path"] = str(model_path.absolute())
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, row)  # a crash mid-write keeps an earlier result whole
            log.info("saved the fine-tuning result and the labelled indices to %s", path)
        # the indices file is the sub-network's own, not a setting the fine-tunings of one call share
        values = {spec.name: {**{k: v for k, v in cost.items() if k != "subnet"},
                              f"{protocol}_top1": result["top1"], f"{protocol}_top5": result["top5"],
                              f"{protocol}_indices_file": row["indices_file"]}}
        settings = {**options.settings(cfg), "label_fraction": label_fraction, "seed": seed,
                    "recipe": result["recipe"], **({"subset_file": subset} if subset else {})}
        save_values(checkpoint, values, protocol, settings, cfg, save, epoch)
        rows.append(row)
    return rows


def _model_source(checkpoint) -> str | None:
    """What a fine-tuned classifier came from, as its config.json records it: the checkpoint file (for an export,
    the one it was exported from), or None for a supernet in memory."""
    from ..checkpoint import export_source
    from ..layout import EXPORT_CONFIG, is_export_dir

    if in_memory(checkpoint):
        return None
    if is_export_dir(checkpoint):
        return json.loads((Path(checkpoint) / EXPORT_CONFIG).read_text(encoding="utf-8")).get("source")
    return export_source(checkpoint, None)


def _finetune_result_path(name: str, out, save: bool, run_dir: Path | None, checkpoint) -> Path | None:
    """Where a fine-tuning's result and labelled indices are written: ``out``; else, with ``save``, the run's
    finetune/ folder, or beside a checkpoint that is not a run's last; else nowhere."""
    if out is not None:
        return Path(out)
    if not save:
        return None
    return run_dir / FINETUNE / f"{name}.json" if run_dir else Path(checkpoint).resolve().parent / f"finetune_{name}.json"


def finetuned_name(spec, label_fraction: float | None, seed: int, subset_file: dict | None = None) -> str:
    """A fine-tuning's name: its result file's stem and its saved classifier's folder; a subset file's stem in
    place of the label fraction for a subset it lists."""
    from .finetune import fraction_tag

    if subset_file is not None:  # list-: apart from the fractions' names (a file called 1pct.txt)
        return f"{spec.name}_list-{Path(subset_file['name']).stem}_seed{seed}"
    return f"{spec.name}_{fraction_tag(label_fraction)}_seed{seed}"


def finetune_jobs(supernet, subnets: Subnets, label_fractions: Sequence[float] | float | None,
                  out: str | Path | None = None) -> list[tuple]:
    """(sub-network, label fraction) of every fine-tuning asked for, sub-network by sub-network, in order and
    without repeats (``subnets="all"``: the menu); label fractions None: one fine-tuning each, on a subset file's
    images (its fraction None)."""
    from ..nn.spec import SubnetError

    try:
        specs = supernet.resolve_many(subnets)
    except SubnetError as e:  # finetune(run, 0.1): a label fraction given where the sub-networks go
        if not isinstance(subnets, Real) or isinstance(subnets, bool):
            raise
        raise SubnetError(f"{e}; the second argument of finetune() is the sub-network(s): to fine-tune on "
                          f"{subnets:g} of the labels, pass label_fractions={subnets:g}") from None
    if label_fractions is None:  # one fine-tuning per sub-network, on the subset a file lists
        fractions: list = [None]
    else:  # a single value (a string too: read letter by letter, "0.1" would be refused as '0', '.', '1')
        fractions = [label_fractions] if isinstance(label_fractions, (Real, str)) else list(label_fractions)
        if not fractions or not all(isinstance(f, Real) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions):
            percent = next((f for f in fractions if isinstance(f, Real) and not isinstance(f, bool) and 1 < f <= 100),
                           None)
            raise UsageError(f"label fractions must be numbers in (0, 1], got {fractions}"
                             + (f"; a fraction, not a percentage: {percent / 100:g} for {percent:g}%" if percent
                                else ""))
        fractions = list(dict.fromkeys(float(f) for f in fractions))
    jobs = [(spec, f) for spec in specs for f in fractions]
    if out is not None and len(jobs) > 1:
        raise UsageError(f"{named('--out', 'out')} names one JSON file, but {len(specs)} sub-network(s) x "
                         f"{len(fractions)} label fraction(s) give {len(jobs)} results: drop it (each result goes to "
                         "RUN/finetune/<subnet>_<pct>pct_seed<S>.json) or ask for one of each")
    if out is not None and Path(out).exists() and not _is_finetune_result(Path(out)):
        raise UsageError(f"{named('--out', 'out')} {out} exists and is not a fine-tuning result (results.json, a "
                         "config, ...): it would be overwritten; name a new file, or an earlier fine-tuning result to "
                         "replace")
    return jobs


def _is_finetune_result(path: Path) -> bool:
    """Whether ``path`` holds a fine-tuning result (which another fine-tuning may replace)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(content, dict) and {"indices", "label_fraction", "top1"} <= set(content)
