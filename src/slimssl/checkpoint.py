"""Versioned training checkpoints that carry their architecture config and menu.

A checkpoint is a dict saved with ``torch.save`` that holds only tensors and plain Python data, so it loads
with ``weights_only=True``: ``format``/``version`` identify it, ``saved_by`` names the slimssl that wrote it,
``config`` is the resolved config (as plain data) it was trained with, ``menu`` the canonical names of its
desired sub-networks, ``model`` the state of the whole SSL model (the backbone under ``backbone.``), plus
optimiser and progress state. Also the supernet a command opens: a checkpoint's, or a random one of a config.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch

from .atomic import atomic_write, write_failure
from .config import Config, config_differences, config_from_dict
from .devices import DeviceError
from .errors import SlimsslError, UsageError, short_repr
from .layout import CHECKPOINTS, EXPORT_CONFIG, EXPORT_WEIGHTS, LAST, checkpoint_path, is_export_dir
from .seeds import callers_random_state_kept, keeps_random_state

log = logging.getLogger("slimssl")

if TYPE_CHECKING:
    from .models.resnet import SlimResNet

FORMAT = "slimssl-checkpoint"
# Raised when the payload changes so that an older slimssl would misread it (loading refuses a newer version);
# a key that an older slimssl can ignore needs no new version. Each payload names the slimssl that saved it.
VERSION = 1
BACKBONE_PREFIX = "backbone."
REQUIRED_KEYS = ("config", "menu", "model")


class CheckpointError(SlimsslError):
    """A file that is not a usable slimssl checkpoint, or one that cannot be written (a full disk); says what
    was found and what was expected."""


def _earlier_checkpoint_hint(damaged: Path) -> str:
    """For a run's damaged last.pt: the latest epoch checkpoint the run kept, to continue from instead."""
    if damaged.parent.name != CHECKPOINTS or damaged.name != LAST:
        return ""
    others = sorted(damaged.parent.glob("epoch_*.pt"))
    if not others:
        return ""
    return (f". The run keeps an earlier checkpoint, {others[-1].name}: to continue from it, copy it over "
            f"{damaged.name} (keep the damaged file elsewhere)")


def _failed_checksum(path: Path) -> str | None:
    """The first entry of a torch.save archive whose bytes no longer match the CRC-32 written with it, or None:
    torch.load does not check them, so a flipped bit would otherwise load as a changed weight. An archive saved
    without checksums (torch's ``serialization.config.save.compute_crc32 = False``: every CRC is 0) is not
    checked. One more read of the file, at the speed of the disk cache."""
    if not zipfile.is_zipfile(path):  # torch's legacy format, which torch.load reads: no checksums to check
        return None
    with zipfile.ZipFile(path) as archive:
        if not any(info.CRC for info in archive.infolist()):
            return None
        return archive.testzip()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then renamed over
    ``path``, so a crash or a full disk mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from . import __version__

    data = {"format": FORMAT, "version": VERSION, **payload, "saved_by": f"slimssl {__version__}"}
    try:
        with atomic_write(path, "wb", fsync=True) as f:
            torch.save(data, f)
    except (OSError, RuntimeError) as e:
        cause = write_failure(e)  # named with the file, not as torch words it
        if cause is None:
            raise
        raise CheckpointError(f"cannot write the checkpoint {path}: {cause.strerror or cause}; the checkpoint "
                              "written before it (if any) is kept") from e
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); best effort where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def peek_checkpoint(path: str | Path) -> dict | None:
    """What a checkpoint file holds, its tensors mapped rather than read and nothing checked (``format`` says
    whose it is); None for a file torch cannot read as a mapping (missing, unreadable, another kind)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a missing or unreadable file: no checkpoint to look into
        return None
    return data if isinstance(data, dict) else None


def checkpoint_epoch(path: str | Path) -> float | None:
    """The epoch a checkpoint file was saved at, reading none of its tensors (None where it cannot say)."""
    try:
        return float((peek_checkpoint(path) or {})["epoch"])
    except (KeyError, TypeError, ValueError):  # no epoch to compare with
        return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; the returned dict has ``config`` as a :class:`Config`."""
    path = _checkpoint_file(Path(path))
    if isinstance(map_location, str):  # checked here so that a bad device is not blamed on the file
        try:
            torch.device(map_location)
        except RuntimeError:
            raise DeviceError(f"map_location {map_location!r} is not a device; expected e.g. 'cpu', 'cuda' "
                              "or 'cuda:1'") from None
    try:
        # weights_only: checkpoints hold only tensors and plain data, so a file from elsewhere cannot run code
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise _unreadable(path, e) from None
    damaged = _failed_checksum(path)
    if damaged:
        raise CheckpointError(f"{path} is damaged: its entry {damaged} no longer matches the checksum it was saved "
                              "with (a byte changed on the disk or in a copy); expected a checkpoint as it was written"
                              + _earlier_checkpoint_hint(path))
    _check_payload(path, data)
    data["config"] = config_from_dict(data["config"], f"{path} (stored config)", stored=True)
    method = data["config"].method
    if method.registered() is None:
        log.info("%s was trained with method %r, which is not registered here: its backbone loads (evaluation, "
                 "export); training it on needs the method (docs/extending.md)", path, method.name)
    return data


def trained_step(data: dict) -> int | None:
    """The step a loaded checkpoint was saved at (None for a random initialisation, which has no train state)."""
    return (data.get("train_state") or {}).get("step")


def _checkpoint_file(path: Path) -> Path:
    """The checkpoint file of ``path``: the file itself, or a run directory's ``checkpoints/last.pt``."""
    if path.is_dir():
        if not checkpoint_path(path).is_file():
            _refuse_export_folder(path)
            hint = f"; the run directory is {path.parent}" if path.name == CHECKPOINTS and (path / LAST).is_file() \
                else ""
            raise CheckpointError(f"{path} is a folder without checkpoints/last.pt; expected a checkpoint file "
                                  f"(e.g. RUN/checkpoints/last.pt) or a run directory{hint}")
        path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix in (".safetensors", ".json", ".onnx", ".pt2") and is_export_dir(path.parent):  # an export's file
        raise CheckpointError(f"{path} is a file of the exported sub-network {path.parent}: give that folder (the "
                              "evaluations and profile take it; slimssl.load_exported loads it)")
    return path


def _check_payload(path: Path, data: Any) -> None:
    """Refuse what torch.load read from ``path`` unless it is a slimssl checkpoint of a version read here."""
    tensors_alone = isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values())
    if tensors_alone and "format" not in data:
        raise CheckpointError(f"{path} holds a plain state_dict (tensors by name, without the config slimssl records "
                              "with them): not a slimssl checkpoint; expected a checkpoint file (e.g. "
                              "RUN/checkpoints/last.pt), a run directory or an exported sub-network's folder")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} is not a slimssl checkpoint (found format {short_repr(found)}, expected "
                              f"{FORMAT!r})")
    if not isinstance(data.get("version", 0), int):
        raise CheckpointError(f"{path} has checkpoint format version {short_repr(data['version'])}; expected an "
                              "integer")
    if data.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {data['version']}; this slimssl reads "
                              f"versions up to {VERSION}: upgrade slimssl")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise CheckpointError(f"{path} is an incomplete slimssl checkpoint: it lacks {missing} "
                              f"(found keys {sorted(data)}, expected at least {list(REQUIRED_KEYS)})")
    for key in ("config", "model"):
        if not isinstance(data[key], dict):
            raise CheckpointError(f"{path} holds a {key} of type {type(data[key]).__name__}, expected a mapping")


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """Why torch.load could not read ``path``, in a line: a pickle of objects, a file cut short or of another
    kind, or torch's own detail without its page of advice."""
    # torch >= 2.4 | 2.3 | a blocked module (os.system: the very case of a file made to run code)
    found = re.search(r"Unsupported (?:global: GLOBAL|class) (\S+)|unsupported GLOBAL (\S+) whose module",
                      str(error), re.IGNORECASE)
    if isinstance(error, pickle.UnpicklingError) and found:  # a pickle of objects: say so, not torch's advice
        return CheckpointError(
            f"{path} is not a slimssl checkpoint: it holds objects of {found.group(1) or found.group(2)}, and "
            "slimssl checkpoints hold only tensors and plain data. Loading such a file can run its code: open it "
            "with torch.load(weights_only=False) yourself only if you trust where it came from")
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))  # torch's detail, without its advice
    detail = unpickler.group(1).strip() if unpickler else (str(error).splitlines() or [""])[0]
    detail = f"{type(error).__name__}: {detail}"
    if _readable(path) and not zipfile.is_zipfile(path):  # torch's words for this vary, some with a page of advice
        detail = ("not a complete zip archive, as torch.save writes: the file is cut short or damaged"
                  if _starts_as_zip(path) else "not a zip archive, as torch.save writes: another kind of file")
    return CheckpointError(f"{path} is not a readable slimssl checkpoint ({detail}); expected a checkpoint file "
                           "(e.g. RUN/checkpoints/last.pt) or a run directory" + _earlier_checkpoint_hint(path))


def _source_hint(config: Path) -> str:
    """Where an export's supernet is: its checkpoint, as its config.json records it, with its sub-network."""
    try:
        recorded = json.loads(config.read_text(encoding="utf-8"))
        source, subnet = recorded["source"], recorded["subnet"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return ""
    if not isinstance(source, str) or not isinstance(subnet, str) or not Path(source).is_file():
        return ""
    return f". It was exported from {source}, whose supernet holds it as {subnet}"


def _refuse_export_folder(path: Path) -> None:
    """An exported sub-network (or the folder of several) is a plain model, not a checkpoint: say so."""
    from .export.files import exported_subnets

    if (path / EXPORT_CONFIG).is_file() or (path / EXPORT_WEIGHTS).is_file():
        raise CheckpointError(f"{path} is an exported sub-network (a plain ResNet), not a checkpoint: load it with "
                              f"slimssl.load_exported({str(path)!r}); a supernet is loaded from its run directory or "
                              "checkpoint file" + _source_hint(path / EXPORT_CONFIG))
    names = exported_subnets(path)
    if names:
        raise CheckpointError(f"{path} holds exported sub-networks ({', '.join(names)}), not a checkpoint: load one "
                              f"with slimssl.load_exported({str(path / names[0])!r}), or evaluate one with "
                              f"slimssl knn {path / names[0]} --data DATA (linear, finetune too; profile needs no "
                              "--data); a supernet is loaded from its run directory or checkpoint file")


def _starts_as_zip(path) -> bool:
    """Whether the file begins as a zip archive does (a checkpoint cut short), unlike a YAML or JSON file."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _readable(path) -> bool:
    """Whether the file opens (is_zipfile says False for a file it cannot open, e.g. without permission)."""
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def check_menu(checkpoint_menu: list[str], config: Config, source: str) -> None:
    """Refuse to combine a checkpoint with a config whose desired sub-networks differ."""
    expected = config.subnet_menu().names
    if list(checkpoint_menu) != expected:
        raise CheckpointError(f"checkpoint {source} was trained with menu {list(checkpoint_menu)}, "
                              f"but the config asks for menu {expected}")


def first_mismatch(error: RuntimeError) -> str:
    """The first missing, unexpected or misshapen key of a ``load_state_dict`` error (torch lists them all,
    one per line after a header)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The supernet backbone's entries of a whole-model state dict."""
    return {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}


class OpenedSupernet(NamedTuple):
    supernet: SlimResNet  # in eval mode, on the CPU
    cfg: Config
    recalibrated: dict | None  # the checkpoint's record of ``slimssl recalibrate``
    trained: dict  # how far the checkpoint was trained ({} for a random initialisation)


def open_checkpoint(path: str | Path, config: Config | None = None) -> OpenedSupernet:
    """The supernet of a checkpoint or run directory with the config it was trained with, its recalibration
    record and how far it was trained (``trained_steps``, ``trained_epochs`` of the run's
    ``pretraining_epochs``). With ``config``, its architecture must match the checkpoint's."""
    data = load_checkpoint(path)
    trained = {k: v for k, v in (("trained_steps", trained_step(data)), ("trained_epochs", data.get("epoch")))
               if v is not None}
    if "trained_epochs" in trained:  # the run's length: what an evaluation or export of a run stopped early says
        trained["pretraining_epochs"] = data["config"].train.epochs
    return OpenedSupernet(supernet_of(data, path, config).eval(), data["config"], data.get("recalibrated"), trained)


def open_supernet(checkpoint: str | Path | None, config: Config | dict | str | Path | None = None,
                  overrides: Sequence[str] = ()) -> OpenedSupernet:
    """The supernet of ``checkpoint``, or a new random one of ``config`` (with ``overrides``; its weights drawn
    from ``train.seed``) when ``checkpoint`` is None, with its config. A checkpoint keeps the config it was
    trained with (its resolution, mean and std are what its exports record): ``config`` is only checked against
    its architecture."""
    from .models.build import as_config, build_supernet

    if checkpoint is None:
        if config is None:
            raise UsageError("give a checkpoint (or run directory), or a config to export a random initialisation of")
        cfg = as_config(config, list(overrides))
        with callers_random_state_kept():  # the same weights at every call, the caller's stream untouched
            torch.manual_seed(cfg.train.seed)
            return OpenedSupernet(build_supernet(cfg).eval(), cfg, None, {})
    return open_checkpoint(checkpoint, None if config is None and not overrides else as_config(config, list(overrides)))


def export_source(checkpoint: str | Path | None, config: Config | dict | str | Path | None,
                  overrides: Sequence[str] = ()) -> str:
    """What a model (an export, a classifier) comes from, the same from any working directory however it is
    typed: the checkpoint file's absolute path (a run directory stands for its checkpoints/last.pt), or the
    config of a random initialisation (a file's absolute path, the name of a shipped config, or a config
    object's name, and the overrides: another architecture is another source)."""
    from .config import find_config
    from .layout import checkpoint_file

    if checkpoint is not None:
        return str(checkpoint_file(checkpoint).resolve())
    changed = f" with {' '.join(sorted(overrides))}" if overrides else ""  # in any order: one source
    if isinstance(config, (str, Path)):
        file = Path(config)
        return (f"random init of {file.resolve() if file.is_file() else f'shipped config {find_config(file).name}'}"
                + changed)
    name = config.name if isinstance(config, Config) else (config or {}).get("name", "run")
    return f"random init of config {name!r}{changed}"


def pretraining_unfinished(trained: dict) -> bool:
    """Whether :func:`open_checkpoint`'s ``trained`` is of a run stopped before its last epoch."""
    return "trained_epochs" in trained and trained["trained_epochs"] < trained["pretraining_epochs"]


@keeps_random_state
def load_supernet(path: str | os.PathLike, config: Config | dict | str | Path | None = None
                  ) -> tuple[SlimResNet, Config]:
    """The trained backbone supernet of a checkpoint or run directory (eval mode, on the CPU) and its config.

    With ``config`` (a Config, a dict of sections, or a YAML path or shipped name), its menu and architecture
    must match the checkpoint's, and it is the config returned: its other settings (evaluation, data) are the
    caller's to choose.
    """
    from .models.build import as_config

    wanted = None if config is None else as_config(config)
    opened = open_checkpoint(path, wanted)
    return opened.supernet, opened.cfg if wanted is None else wanted


def supernet_of(data: dict, path: str | Path, config: Config | dict | str | Path | None = None):
    """The backbone supernet that a loaded checkpoint (``load_checkpoint``'s dict, read from ``path``) holds.
    With ``config``, its menu and architecture must match the checkpoint's."""
    from .models.build import as_config, build_supernet
    from .models.fit import weights_misfit

    if config is not None:
        config = as_config(config)  # a Config, a dict of sections, or a YAML path or name
        check_menu(data["menu"], config, str(path))
        diffs = config_differences(data["config"], config, prefixes=("model.",), labels=("checkpoint", "config"))
        if diffs:
            raise CheckpointError(f"checkpoint {path} holds another architecture than the config asks for:\n  "
                                  + "\n  ".join(diffs))
    state = backbone_state(data["model"])
    misfit = weights_misfit(lambda: build_supernet(data["config"]), data["config"].model.full_depths, state)
    if misfit:  # found before the network is allocated: a hand-edited config could ask for any size
        raise CheckpointError(f"{path}: the stored weights do not fit the stored config ({misfit})")
    model = build_supernet(data["config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # weights that do not fit the stored config: a damaged or hand-edited file
        raise CheckpointError(f"{path}: the stored weights do not fit the stored config ({first_mismatch(e)})") \
            from None
    chosen = (data.get("recalibrated") or {}).get("subnet")
    if chosen:  # written by slimssl recalibrate: the statistics are that sub-network's
        model.mark_bn_estimated(chosen)
    untrained = model.untrained_entries() if trained_step(data) else []
    if untrained:
        log.warning("%s: %s never trained (their private BatchNorm saw no batch: not joined yet after a slow start, "
                    "or never drawn by a sandwich with slim.num_random 0), so their numbers and exports are of "
                    "networks as initialised", path, ", ".join(untrained))
    return model
