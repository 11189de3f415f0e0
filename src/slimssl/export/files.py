"""An export's files: writing, loading and verifying a plain model (safetensors weights plus a JSON config, and
optionally a graph that runs without slimssl: ONNX, or a torch.export program), and a classifier's metadata."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load, save

from .. import __version__
from ..atomic import atomic_write, remove_temporaries
from ..errors import ExportError
from ..layout import CHECKPOINTS, EXPORT_CONFIG, EXPORT_WEIGHTS, where_in_a_run
from ..models.fit import weights_misfit
from ..models.plain import PlainResNet, PlainResNetConfig
from ..models.resnet import SlimResNet
from ..nn.modes import eval_mode
from ..nn.spec import SubnetLike
from ..seeds import keeps_random_state
from ..wording import on_command_line, shell_quote
from . import FORMATS
from .graphs import (GRAPHS, ONNX, PROGRAM, export_onnx, export_program, program_input, require_onnx, run_onnx,
                     run_program)  # the graphs an export may add beside its weights

if TYPE_CHECKING:
    from ..config import Config

EXPORT_FORMAT = "slimssl-plain-resnet"

log = logging.getLogger("slimssl")


WEIGHTS_DIGEST = "weights_sha256"  # in config.json: the model.safetensors it was written with
# what save_exported keeps of a loaded model's metadata: its inputs and origin (how far its source was pretrained
# stays true however the model is trained after), not its classes, accuracy or BatchNorm statistics' origin
CARRIED = ("resolution", "crop_ratio", "mean", "std", "source", "subnet", "cut_from", "trained_steps",
           "trained_epochs", "pretraining_epochs")


@keeps_random_state
def export_subnet(supernet: SlimResNet, subnet: SubnetLike | None, out_dir: str | Path,
                  fmt: str = "safetensors", resolution: int | None = None, metadata: dict | None = None,
                  overwrite: bool = False, check_bn_statistics: bool = True,
                  config: Config | dict | str | os.PathLike | None = None) -> Path:
    """Write ``subnet`` of ``supernet`` to ``out_dir/<subnet name>/`` and return that folder.

    The weights and BatchNorm statistics are written as the supernet holds them, in its dtype. With shared
    BatchNorm (``model.bn: shared``) the statistics belong to no width in particular, and evaluation
    re-estimates each sub-network's first; to export the model evaluation measures, call
    ``slimssl.recalibrate_bn(supernet, subnet, batches)`` (on a copy of the supernet) with train batches
    before exporting, as ``slimssl export`` does. Without that, a warning says so (``check_bn_statistics``:
    False exports the statistics as stored without one). ``fmt="onnx"`` also writes a float32 ONNX graph
    traced at ``resolution`` whose batch, height and width are dynamic; ``fmt="pt2"`` a torch.export program
    (``model.pt2``, on the CPU in the weights' dtype) that takes any batch and any image of at least
    :func:`smallest_program_input` pixels a side (if ``resolution`` is smaller, images of that size alone).
    Both carry the config.json beside them.

    ``config`` (the supernet's Config, e.g. the one ``slimssl.load_supernet`` returns, or a recipe name or path)
    records the inputs the export expects in its config.json, as ``slimssl export`` does: ``resolution``,
    ``crop_ratio``, ``mean`` and ``std`` (``metadata`` wins where both give a key). A config of another
    architecture or menu than the supernet's is refused. ``resolution`` defaults to the one recorded so
    (``metadata["resolution"]``, or the config's ``data.resolution``), else 224; a pt2 program that would refuse
    the recorded size is an error.

    An export already there is replaced only when it came from the same ``metadata["source"]`` (exporting a
    run again) or with ``overwrite``; see :func:`check_export_folder`."""
    if isinstance(supernet, (str, os.PathLike)):  # it would fail deep inside, with a bare AttributeError
        raise ExportError(f"export_subnet takes a supernet in memory (a SlimResNet), got the path {str(supernet)!r}: "
                          "to export a checkpoint file or run directory, call slimssl.export_run(checkpoint, out, "
                          "subnets)")
    if config is not None:
        from ..models.build import as_config, check_config_is_the_supernets

        config = as_config(config)
        check_config_is_the_supernets(supernet, config)  # else its inputs would be recorded as this export's
        metadata = {**preprocessing(config), **(metadata or {})}
    recorded = (metadata or {}).get("resolution")  # the inputs the export says it expects
    for name, value in (("resolution", resolution), ("metadata's resolution", recorded)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ExportError(f"{name} must be a whole number of pixels >= 1, got {value!r}")
    resolution = resolution or recorded or 224  # the graph is traced at the size the export expects
    check_format(fmt)  # before anything is written
    spec = supernet.resolve(subnet)
    _refuse_file_name(Path(out_dir), "a folder, in which each sub-network gets a folder of its own")
    check_export_folder(Path(out_dir) / spec.name, (metadata or {}).get("source"), overwrite)
    if check_bn_statistics and not supernet.bn_statistics_estimated(spec):
        log.warning("%s is exported with shared BatchNorm statistics that were not estimated for it (they mix the "
                    "widths that trained last): call slimssl.recalibrate_bn(supernet, %r, batches) on train "
                    "batches first, or export a run with slimssl.export_run, which does", spec.name, spec.name)
    missing = [key for key in ("resolution", "mean", "std") if key not in (metadata or {})]
    if missing:  # evaluation would fall back to defaults, and a user would have to guess the inputs
        log.warning("%s's config.json records no %s of its inputs: pass config= (the supernet's config, as "
                    "slimssl.load_supernet returns it, or its recipe) to record them", spec.name, ", ".join(missing))
    plain = supernet.export(spec).eval()
    metadata = {**(metadata or {}), "subnet": spec.name, "cut_from": cut_from(supernet)}
    if fmt == "pt2":  # what model.pt2 takes, for a runtime that reads the config first
        metadata["pt2_input"] = takes = program_input(plain.config, resolution)
        if recorded is not None and (recorded != takes["size"] if "size" in takes else recorded < takes["min_size"]):
            raise ExportError(f"a program traced at {resolution} px takes {takes}, not the {recorded} px images "
                              f"its config.json says the export expects: trace it at {recorded} (resolution)")
    folder = _write_export(plain, Path(out_dir) / spec.name, metadata)
    _drop_earlier_graphs(folder, rewritten=GRAPHS.get(fmt))  # a failed trace leaves no graph of earlier weights
    config_json = json.loads((folder / EXPORT_CONFIG).read_text())
    if fmt == "onnx":  # ONNX runtimes expect float32 graphs on the CPU; the weights above keep the dtype
        export_onnx(plain.to("cpu", torch.float32), folder / ONNX, resolution, config_json)
    elif fmt == "pt2":
        export_program(plain.to("cpu"), folder / PROGRAM, resolution, config_json)
    return folder


def cut_from(supernet: SlimResNet) -> dict:
    """The supernet's geometry, which an export's channels alone may not tell (its config.json's ``cut_from``):
    slimssl knn/profile EXPORT rebuild the supernet from it."""
    return {"base_width": supernet.base_width, "channel_divisor": supernet.slim_state.divisor}


def preprocessing(cfg, crop_ratio: float | None = None) -> dict:
    """What an exported model's inputs must be, as its config.json records it: the shorter side resized to
    ``resolution / crop_ratio`` (default: evaluation's), the centre ``resolution`` square, normalised with
    ``mean`` and ``std``."""
    return input_preprocessing(cfg.data.resolution, cfg.data.mean, cfg.data.std, crop_ratio or cfg.eval.crop_ratio)


def classifier_metadata(train, supernet: SlimResNet, source: str | None, resolution: int, mean, std,
                        crop_ratio: float | None = None) -> dict:
    """What a classifier trained on a sub-network (fine-tuned, or a probe's head) records in its config.json:
    the classes of ``train``, its inputs, and where it came from (the checkpoint ``source``, the supernet)."""
    return {"classes": list(train.classes) if train.classes else None,
            **input_preprocessing(resolution, mean, std, crop_ratio), "source": source, "cut_from": cut_from(supernet)}


def input_preprocessing(resolution: int, mean, std, crop_ratio: float | None = None) -> dict:
    """:func:`preprocessing` from its parts (``crop_ratio`` None: not recorded)."""
    return {"resolution": resolution, **({} if crop_ratio is None else {"crop_ratio": crop_ratio}),
            "mean": list(mean), "std": list(std)}


def save_exported(model: PlainResNet, folder: str | Path, metadata: dict | None = None, *,
                  overwrite: bool = False) -> Path:
    """Write a plain ResNet into ``folder`` as ``config.json`` and ``model.safetensors``, for
    :func:`load_exported`: an export, or one fine-tuned with a classifier (``model.fc = nn.Linear(...)``; the
    config then records its classes). ``metadata`` (JSON data) is kept in config.json beside the keys
    load_exported reads, which it cannot replace, and over what the model was loaded with that still holds
    after training it further (``CARRIED``: its inputs, where it came from and how far that was pretrained). A
    ``model.onnx`` or ``model.pt2`` in ``folder`` (a graph of the weights there before) is removed: it would no
    longer match. An export of another source
    in ``folder`` is replaced only with ``overwrite`` (:func:`check_export_folder`); saving a loaded export back
    where it came from, after training it further, keeps its source and needs none."""
    _refuse_file_name(Path(folder), f"a folder, which gets {EXPORT_CONFIG} and {EXPORT_WEIGHTS}")
    source = (metadata or {}).get("source", getattr(model, "metadata", {}).get("source"))
    check_export_folder(folder, source, overwrite)
    folder = _write_export(model, Path(folder), metadata)
    _drop_earlier_graphs(folder)
    return folder


def _refuse_file_name(folder: Path, expected: str) -> None:
    """A new export folder named like a model file (``--out model.safetensors``) is a slip: refused."""
    if not folder.exists() and folder.suffix.lower() in (".safetensors", ".onnx", ".pt2", ".pt", ".pth", ".bin"):
        raise ExportError(f"{folder} is named like a file, and an export is written into {expected}: give a "
                          f"folder name (e.g. {folder.with_suffix('')})")


def refuse_run_folder(folder: str | Path) -> None:
    """``slimssl export --out`` that is a run directory or a folder inside one (its checkpoints/, say), whose
    files are that run's own: refused before any work."""
    where = where_in_a_run(folder)
    if where is not None:
        raise ExportError(f"{folder} is {where}, whose files are that run's own; export to a folder outside it")


def _write_export(model: PlainResNet, folder: Path, metadata: dict | None) -> Path:
    """config.json and model.safetensors of ``model`` in ``folder`` (save_exported without the graph)."""
    folder = Path(folder)
    carried = {k: v for k, v in getattr(model, "metadata", {}).items() if k in CARRIED}
    info = {**carried, **(metadata or {}), "format": EXPORT_FORMAT, "slimssl_version": __version__,
            "architecture": _architecture(model).to_dict()}
    try:  # checked before any folder is made
        json.dumps(info)
    except (TypeError, ValueError) as e:
        raise ExportError(f"metadata must be JSON data (str, numbers, lists, dicts): {e}") from None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # one key at most: safetensors may write several in any order, and an export of the same weights should
    # be the same file
    weights = save(state, metadata={"subnet": str(info["subnet"])} if "subnet" in info else None)
    # which weights file this config belongs to: the two files are replaced one after the other, and a kill
    # between the two leaves the new config beside the earlier weights, or none (load_exported checks it)
    info[WEIGHTS_DIGEST] = hashlib.sha256(weights).hexdigest()
    text = json.dumps(info, indent=2) + "\n"
    made = not folder.exists()  # removed again, left empty, when the export fails
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the folder, or one on the way to it, is a file
        raise ExportError(f"cannot export into {folder}: it, or a folder on the way to it, is a file") from None
    except OSError as e:  # no permission, a read-only or full disk: one error type for every bad output
        raise ExportError(f"cannot make the export folder {folder}: {e}") from None
    # of an export killed midway: a model's size
    for name in remove_temporaries(folder, of=(EXPORT_CONFIG, EXPORT_WEIGHTS, PROGRAM)):
        log.info("%s: removed %s, left by an export that was killed midway", folder, name)
    # Both files are written whole to temporary files, which then replace the earlier export's one after the
    # other: a failure while writing (a full disk, Ctrl-C) leaves the earlier export as it was, its config put
    # back when the weights could not follow it. The config goes first: a kill between the two renames leaves it
    # naming this source and the new weights' digest, so that loading refuses the folder (weights missing, or
    # not those) and the same export again replaces it. The files get the permissions open() would give them.
    try:
        earlier = (folder / EXPORT_CONFIG).read_bytes() if (folder / EXPORT_CONFIG).is_file() else None
    except OSError:  # unreadable: replaced if the export succeeds, left to chance if it fails
        earlier = False
    try:
        with atomic_write(folder / EXPORT_WEIGHTS) as weights_file, atomic_write(folder / EXPORT_CONFIG, "w") as config:
            weights_file.write(weights)
            config.write(text)
    except BaseException as e:
        if earlier is not False:
            _put_back_config(folder, earlier, text)
        if made:
            with contextlib.suppress(OSError):  # only if empty: an interrupted export leaves no empty folder
                folder.rmdir()
        if isinstance(e, OSError):
            raise ExportError(f"could not write the export into {folder}: {e}") from None
        raise
    return folder


def _put_back_config(folder: Path, earlier: bytes | None, written: str) -> None:
    """After a failed export: the earlier config.json where the new one (``written``) replaced it, none where there
    was none (best effort: the export's own error is the one to report)."""
    path = folder / EXPORT_CONFIG
    try:
        replaced = path.is_file() and path.read_text(encoding="utf-8", errors="replace") == written
        if replaced and path.read_bytes() != earlier:
            if earlier is None:
                path.unlink()
            else:
                with atomic_write(path) as config:
                    config.write(earlier)
    except OSError as e:
        log.warning("%s: could not put the earlier %s back after the failed export (%s)", folder, EXPORT_CONFIG, e)


def _drop_earlier_graphs(folder: Path, rewritten: str | None = None) -> None:
    """Remove the graphs (ONNX, torch.export) of an earlier export from ``folder``: they would no longer match
    the weights. Said for each, except the one the export writes again."""
    for fmt, name in GRAPHS.items():
        if (folder / name).is_file():
            (folder / name).unlink()
            if name != rewritten:
                log.info("%s: removed %s, made with the weights and config.json written before (exporting again "
                         "with --format %s, fmt=%r, makes it anew)", folder, name, fmt, fmt)


def _architecture(model: PlainResNet) -> PlainResNetConfig:
    """``model``'s config with the classifier it holds now (``fc`` may have been replaced since it was built)."""
    if not isinstance(model, PlainResNet):
        raise ExportError(f"expected a slimssl PlainResNet (an export, e.g. load_exported's), got {type(model).__name__}")
    fc = model.fc
    if isinstance(fc, nn.Identity):
        return replace(model.config, num_classes=0)
    if isinstance(fc, nn.Linear) and fc.bias is not None and fc.in_features == model.config.feature_dim:
        return replace(model.config, num_classes=fc.out_features)
    what = (f"nn.Linear({fc.in_features}, {fc.out_features}, bias={fc.bias is not None})"
            if isinstance(fc, nn.Linear) else type(fc).__name__)
    raise ExportError(f"model.fc is {what}; an exported model ends in nn.Identity (features) or "
                      f"nn.Linear({model.config.feature_dim}, classes) with a bias (a classifier)")


def check_export_folder(folder: str | Path, source: str | None, overwrite: bool = False,
                        replace_hint: str | None = None) -> None:
    """Refuse to replace an export in ``folder`` (an exported sub-network, or a fine-tuned classifier) that
    came from another source (another run, or a random initialisation): it may be the only copy of a trained
    network. Exports without a source (the Python API without ``metadata``) replace each other, as
    ``torch.save`` would. A file where the folder goes is refused whatever ``overwrite`` says."""
    folder = place = Path(folder)
    while not place.exists() and place != place.parent:  # the nearest part of the path that exists
        place = place.parent
    if place.exists() and not place.is_dir():
        raise ExportError(f"cannot export into {folder}: {place} is a file; choose another output folder")
    config = folder / EXPORT_CONFIG
    if overwrite:
        return
    replace_hint = replace_hint or f"replace it with {'--overwrite' if on_command_line() else 'overwrite=True'}"
    if not config.is_file():
        foreign = [name for name in (EXPORT_WEIGHTS, *GRAPHS.values()) if (folder / name).is_file()]
        if foreign:  # a model of the user's own, not written by slimssl: never replaced without being asked
            raise ExportError(f"{folder} holds {' and '.join(foreign)} without a slimssl {EXPORT_CONFIG}; choose "
                              f"another output folder, or {replace_hint}")
        return
    try:
        earlier = json.loads(config.read_text(encoding="utf-8")).get("source")
    except (ValueError, OSError, AttributeError, RecursionError):
        earlier = None
    if earlier != source and not _same_file(earlier, source):
        raise ExportError(f"{config.parent} already holds an export of {folder.name}"
                          + (f" from {earlier}" if earlier else "") + "; choose another output folder, or "
                          f"{replace_hint}")


def _same_file(a, b) -> bool:
    """Whether two recorded sources are one checkpoint file, however spelt (macOS ignores letter case)."""
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.samefile(a, b)
    except OSError:  # a random-init source, or a file that has gone
        return False


def check_format(fmt: str) -> None:
    """An export format slimssl writes, with what it needs installed."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()


@keeps_random_state
def load_exported(folder: str | Path, device: str | torch.device = "cpu") -> PlainResNet:
    """Load an exported sub-network folder as a plain ResNet in eval mode, in the dtype it was exported in, on
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, or ``auto``: a CUDA GPU when there is one)."""
    from ..devices import pick_device

    target = pick_device(device, setting="device")  # checked before anything is read
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"exported sub-network folder {folder} does not exist" if not folder.exists() else
                          f"{folder} is a file; expected an exported sub-network folder ({EXPORT_CONFIG} and "
                          f"{EXPORT_WEIGHTS})")
    config_path, weights_path = folder / EXPORT_CONFIG, folder / EXPORT_WEIGHTS
    if not config_path.is_file():
        _refuse_other_folder(folder)
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ExportError(f"{path} is missing; an exported sub-network folder holds {EXPORT_CONFIG} and "
                              f"{EXPORT_WEIGHTS}")
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
        if info.get("format") != EXPORT_FORMAT:  # another tool's config.json (a Hugging Face model's, ...)
            raise ValueError(f"its format is {info.get('format')!r}, expected {EXPORT_FORMAT!r}")
        arch = PlainResNetConfig.from_dict(info["architecture"])
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise _not_an_export_config(config_path, e) from None
    try:  # read whole (the digest needs the bytes, which load then parses): twice the file's size at the peak
        weights = weights_path.read_bytes()
    except OSError as e:
        raise ExportError(f"cannot read {weights_path}: {e}") from None
    digest = info.get(WEIGHTS_DIGEST)  # (exports before 2026-12-06 have none)
    if digest is not None and hashlib.sha256(weights).hexdigest() != digest:
        raise ExportError(f"{weights_path} is not the weights file {config_path} was written with (its sha256 "
                          "differs): an export stopped between its two files, or a file replaced by hand. Export or "
                          f"save it again (slimssl export, save_exported), or, for weights replaced on purpose, "
                          f"remove {WEIGHTS_DIGEST} from {EXPORT_CONFIG}")
    try:
        state = load(weights)
    except (SafetensorError, ValueError) as e:
        raise ExportError(f"{weights_path} is not a readable safetensors file ({e}); re-export it") from None
    try:  # on the meta device, before the network is allocated: an edited config.json could ask for any size
        misfit = weights_misfit(lambda: PlainResNet(arch), arch.depths, state)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:  # an architecture not buildable
        raise _not_an_export_config(config_path, e) from None
    if misfit:
        raise ExportError(f"{weights_path} does not match the architecture in {config_path}: {misfit}")
    model = PlainResNet(arch)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    try:
        model.to(dtype).load_state_dict(state, strict=True)  # as exported: a float64 export stays float64
    except RuntimeError as e:
        raise ExportError(f"{weights_path} does not match the architecture in {config_path}: {e}") from None
    # (the digest describes the file, not the model, which may be trained on: save_exported writes a new one)
    model.metadata = {k: v for k, v in info.items() if k not in ("format", "architecture", WEIGHTS_DIGEST)}
    return model.to(target).eval()


def _not_an_export_config(config_path: Path, error: Exception) -> ExportError:
    return ExportError(f"{config_path} is not an exported slimssl config ({type(error).__name__}: {error})")


def exported_subnets(folder: str | Path) -> list[str]:
    """The sub-network folders that an export's output folder (``slimssl export --out``) holds, by name."""
    try:
        return sorted(p.name for p in Path(folder).iterdir() if (p / EXPORT_CONFIG).is_file())
    except OSError:
        return []


def _refuse_other_folder(folder: Path) -> None:
    """Say what a folder without config.json is, when it is a run directory or an export's output folder."""
    if (folder / CHECKPOINTS).is_dir():
        raise ExportError(f"{folder} is a run directory, not an exported sub-network: load its supernet with "
                          f"slimssl.load_supernet({str(folder)!r}), or export sub-networks from it first "
                          f"(slimssl export {shell_quote(folder)} --all --out DIR) and load one of DIR's folders")
    names = exported_subnets(folder)
    if names:
        raise ExportError(f"{folder} holds exported sub-networks ({', '.join(names)}), one per folder; load one of "
                          f"them, e.g. slimssl.load_exported({str(folder / names[0])!r})")


@torch.no_grad()
@keeps_random_state
def verify_export(supernet: SlimResNet, subnet: SubnetLike, exported: PlainResNet | str | Path,
                  resolution: int, batch: int = 2, seed: int = 0) -> float:
    """Max abs difference between the supernet's sub-network (eval mode) and the exported model: a plain
    model, an export folder (its weights), or the path of an exported ``model.onnx`` (run with onnxruntime
    when it is installed, else with onnx's reference evaluator, slower) or ``model.pt2`` (loaded with
    ``torch.export.load``). Each model is fed the same random images in its own dtype and on its own device
    (the graphs on the CPU, the ONNX one in float32). A graph is loaded by onnxruntime or torch, which trust
    it (torch unpickles parts of a program): verify graphs you trust, such as those slimssl wrote."""
    return export_differences(supernet, subnet, exported, resolution, batch, seed)[0]


def export_differences(supernet: SlimResNet, subnet: SubnetLike, exported: PlainResNet | str | Path,
                       resolution: int, batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """:func:`verify_export`'s max abs difference, and the same relative to the largest output when that is
    above 1: features of a trained network reach the thousands, where float32 rounding alone is about 1e-4
    (the relative difference is what a tolerance can be set for)."""
    if not isinstance(exported, torch.nn.Module):
        path = Path(exported)
        if path.is_dir():  # an export folder, as export_subnet returns it: its safetensors weights
            exported = load_exported(path)
        elif not (path.is_file() and path.suffix in (".onnx", ".pt2")):
            raise ExportError(f"{path} is neither an export folder nor a graph (.onnx, .pt2); expected a "
                              f"PlainResNet, an export folder, or its {ONNX} or {PROGRAM}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen)  # drawn on the CPU: the same images anywhere
    with eval_mode(supernet):
        expected = supernet(_like(x, supernet), subnet=subnet)
    if isinstance(exported, torch.nn.Module):
        with eval_mode(exported):  # given back in its own mode: a model being fine-tuned trains on after this
            got = exported(_like(x, exported))
    else:
        got = (run_program if Path(exported).suffix == ".pt2" else run_onnx)(Path(exported), x)
    if got.shape != expected.shape:
        raise ExportError(f"the export gives outputs of shape {list(got.shape)}, the sub-network "
                          f"{supernet.resolve(subnet).name} {list(expected.shape)}: it is another network")
    difference = (expected.double() - got.to(expected.device).double()).abs().max().item()
    return difference, difference / max(1.0, expected.double().abs().max().item())


def _like(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``x`` in the dtype and on the device of ``model``'s weights."""
    weight = next(model.parameters())
    return x.to(weight.device, weight.dtype)
