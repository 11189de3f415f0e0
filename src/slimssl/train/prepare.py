"""Choosing a pretraining run's config and run directory: a new run, a resumed one, or either (auto-resume),
with the checks that keep one run's files from mixing with another's; and the config.yaml a run writes.
:func:`slimssl.train.pretrain.train_run` trains what :func:`prepare_run` chose."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import yaml

from ..atomic import atomic_write, is_temporary
from ..checkpoint import load_checkpoint
from ..wording import on_command_line, shell_quote
from ..config import (MACHINE_DEPENDENT, Config, check_overrides, config_differences, config_from_dict,
                      find_config, load_config)
from ..data.registry import absolute_source, in_memory_only
from ..errors import SlimsslError, UsageError
from ..layout import (CHECKPOINTS, CONFIG, LAST, METRICS, RESULTS, TENSORBOARD, TRAINING_LOCK, checkpoint_path,
                      where_in_a_run)
from ..models.build import as_config
from . import distributed as dist
from .lock import refuse_if_training
from .metrics import parse_record
from .optim import describe_lr

log = logging.getLogger("slimssl")

AUTO_RESUME = {True: "--auto-resume", False: "resume='auto'"}  # by whether the CLI or the API asked
RUN_FILES = (RESULTS, METRICS, TENSORBOARD)  # written by a run besides its checkpoints
# what train_run may write in a run directory: removed again, in this order, when a start fails before its first
# checkpoint (config.yaml after the logs: a kill midway leaves a start that --auto-resume recognises; the lock last)
RUN_OUTPUTS = (CHECKPOINTS, *RUN_FILES, CONFIG, TRAINING_LOCK)
# what a start killed before its first checkpoint leaves (the steps it logged, perhaps a checkpoint's unfinished
# temporary file); config.yaml, which marks the folder as this run's, goes last
FAILED_START = (METRICS, TENSORBOARD, CHECKPOINTS, CONFIG)


class PreparedRun(NamedTuple):
    """What :func:`train_run` needs: the config, the run directory, where the config came from (for
    messages), and whether the run continues from the checkpoint in ``run_dir``."""

    cfg: Config
    run_dir: Path
    source: str
    resume: bool


SHORTCUTS = {"data": "data.source", "epochs": "train.epochs", "batch_size": "train.batch_size",
             "device": "train.device", "seed": "train.seed"}  # pretrain's keywords (and flags) for config settings


def shortcut_overrides(**settings) -> list[str]:
    """The overrides of :data:`SHORTCUTS` given (not None), after which they go (an explicit keyword or flag wins
    over an override). The values are written as quoted YAML strings and numbers: a folder named ``data #1`` or
    ``2024`` stays that name."""
    import json
    from numbers import Real

    unknown = sorted(set(settings) - set(SHORTCUTS))
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)}; expected {', '.join(SHORTCUTS)}")
    return [f"{SHORTCUTS[name]}={value if isinstance(value, Real) else json.dumps(str(value), ensure_ascii=False)}"
            for name, value in settings.items() if value is not None]


def prepare_run(config: Config | dict | str | Path | None = None, out: str | Path | None = None, *,
                overrides: Sequence[str] = (), resume: bool | Literal["auto"] = False) -> PreparedRun:
    """The config and run directory of a new run, or of the run in ``out`` to resume.

    A new run gets ``out`` (default ``runs/<name>-<time>``), which must not hold another run. A resumed run
    (``resume=True``) takes the config saved in its checkpoint; ``overrides`` still apply (e.g. more epochs), and a
    ``config`` given must be the run's (the call that started it, made again).
    ``resume="auto"`` resumes the run in ``out`` if it has a checkpoint and starts it otherwise, so that one
    command (a job script submitted again and again) both starts and continues a run; ``config`` and
    ``overrides`` must then give the saved run's settings. A data source that is an existing path is stored
    absolute. Under the command line (``wording.on_command_line``), messages name its flags (``--resume
    RUN_DIR``) instead of this function's arguments (``resume=True``, ``out=``)."""

    check_overrides(overrides)
    if resume not in (True, False, "auto"):
        raise UsageError(f"resume must be True, False or 'auto', got {resume!r}")
    if resume == "auto":
        return _prepare_auto(config, out, list(overrides))
    if resume:
        return _prepare_resume(config, out, list(overrides))
    return _prepare_new(config, out, list(overrides))


def _prepare_auto(config, out, overrides: list[str]) -> PreparedRun:
    cli = on_command_line()
    if out is None:
        raise UsageError("resuming automatically needs the run directory: "
                         + ("--auto-resume with --out RUN_DIR" if cli else "out=RUN_DIR"))
    last = checkpoint_path(Path(out))
    if not last.is_file():
        return _prepare_new(config, out, overrides, failed_start_ok=True)
    wanted = absolute_data_source(as_config(config, overrides))
    diffs = config_differences(load_checkpoint(last)["config"], wanted, ignore=MACHINE_DEPENDENT)
    if diffs:  # a changed job script must not silently continue the run it started with other settings
        raise UsageError(
            f"{out} holds a run started with other settings than {'this command' if cli else 'this call'} "
            "asks for:\n  " + "\n  ".join(diffs) + "\ngive the settings it was started with, continue it with "
            + ("--resume RUN_DIR (where --set changes a setting)" if cli else "resume=True (where overrides "
               "change a setting)") + f" or choose another {'--out' if cli else 'out'}")
    return PreparedRun(wanted, Path(out), str(last), True)


def _prepare_resume(config, out, overrides: list[str]) -> PreparedRun:
    cli = on_command_line()
    if out is None:
        raise UsageError("resuming needs the run directory to continue: "
                         + ("--resume RUN_DIR" if cli else "out=RUN_DIR"))
    run_dir = Path(out)
    last = checkpoint_path(run_dir)
    if not last.is_file():
        raise UsageError(_no_run_to_resume(run_dir, last))
    stored = load_checkpoint(last)["config"]
    if stored.method.registered() is None:  # evaluation and export do without it; training on does not
        raise UsageError(f"{run_dir} was trained with method {stored.method.name!r}, which is not registered here; "
                         "resuming trains it, so register it first: "
                         + (f"slimssl --import MODULE pretrain --resume {shell_quote(run_dir)} (MODULE, or a .py "
                            "file, registers it), or install the package that declares it" if cli
                            else "slimssl.methods.register_method"))
    cfg = config_from_dict(stored.model_dump(mode="json"), f"{last} (stored config)", overrides)
    if cfg.data.source != stored.data.source:  # --data given: stored absolute, as for a new run
        cfg = absolute_data_source(cfg)
        refuse_run_in_data(run_dir, cfg.data.source)
    if config is not None:  # the call that started the run, given again (a notebook, a job script): no change
        given = absolute_data_source(as_config(config, overrides))
        diffs = config_differences(cfg, given, ignore=MACHINE_DEPENDENT, labels=("the run's", "given"))
        if diffs:
            raise UsageError("resuming continues with the config saved in the run (with the changes given "
                             "applied), and the config given differs from it:\n  " + "\n  ".join(diffs) + "\n"
                             + ("drop --config (--set, --epochs and --data still apply)" if cli
                                else "pass config=None (overrides still apply)"))
    _check_run_config(run_dir, stored, cfg, last)
    changed = config_differences(stored, cfg, ignore=MACHINE_DEPENDENT)
    if changed and dist.is_main():  # the run and its config.yaml take them from here on: say so
        log.warning("resuming %s with settings changed from the saved run:\n  %s", run_dir, "\n  ".join(changed))
    return PreparedRun(cfg, run_dir, str(last), True)


# settings no resume changes (the menu and the weights' shapes are checked against the checkpoint's): where a run's
# config.yaml and its last.pt differ in one, the checkpoint is another run's
RUN_IDENTITY = ("menu.", "method.name", "model.arch", "model.depths", "model.base_width", "model.stem",
                "model.channel_divisor")


def _check_run_config(run_dir: Path, stored: Config, cfg: Config, last: Path) -> None:
    """The run's config.yaml against the checkpoint beside it: refused when it describes another network or method
    (a last.pt copied in from another run would continue there, rewriting config.yaml and mixing two runs' metrics);
    otherwise, differences from the settings the resume continues with are edits of config.yaml, which a resume
    does not read (it writes the file again): said, with the way to change a setting."""
    path = run_dir / CONFIG
    try:
        written = load_config(path, stored=True) if path.is_file() else None
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError, SlimsslError):
        written = None
    if written is None:  # missing or no config: the checkpoint's settings are the run's, config.yaml is written again
        return
    labels = (CONFIG, f"{CHECKPOINTS}/{last.name}")
    other = config_differences(written, stored, prefixes=RUN_IDENTITY, labels=labels)
    if other:
        raise UsageError(f"{last} is not the checkpoint of the run {path} describes:\n  " + "\n  ".join(other)
                         + f"\n(a checkpoint copied in from another run?) put back this run's own {LAST} (an "
                         "epoch_XXXX.pt of it will do), or resume the other run in its own folder")
    # a key config.yaml still has as the checkpoint does is one this call changes (--set, --epochs): no edit
    by_hand = {line.split(":")[0] for line in config_differences(written, stored, ignore=MACHINE_DEPENDENT)}
    edited = [line for line in config_differences(written, cfg, ignore=MACHINE_DEPENDENT,
                                                   labels=(CONFIG, "resumed with")) if line.split(":")[0] in by_hand]
    if edited and dist.is_main():
        log.warning("%s differs from the settings the run resumes with (its checkpoint's, with the changes given "
                    "applied):\n  %s\na resume does not read %s, and writes it again: change a setting with %s",
                    path, "\n  ".join(edited), CONFIG,
                    "--set KEY=VALUE" if on_command_line() else "overrides=['KEY=VALUE']")


def default_run_dir(name: str) -> Path:
    """``runs/<name>-<time>``, or with ``-2``, ``-3``, ... after it where that folder exists (a run started in the
    same second); rank 0's name for every process, whose clocks may tick apart. Jobs started together, as an array
    of them, each give their own ``--out``: two may still pick the same free name, and the second is refused."""
    run_dir = None
    if dist.is_main():
        stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path("runs") / stamp
        copy = 1
        while run_dir.exists():
            copy += 1
            run_dir = Path("runs") / f"{stamp}-{copy}"
    return dist.broadcast_object(run_dir)


def _prepare_new(config, out, overrides: list[str], failed_start_ok: bool = False) -> PreparedRun:
    """``failed_start_ok`` (automatic resume): the files of a start of the same settings that saved nothing
    (a job killed before its first checkpoint, with no time to clean up) are removed instead of refused."""
    cli = on_command_line()
    cfg = absolute_data_source(as_config(config, overrides))
    run_dir = Path(out) if out is not None else default_run_dir(cfg.name)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file; the run directory must be a folder (new, or an earlier run's "
                         "to resume)")
    if checkpoint_path(run_dir).exists():
        how = f"--resume {shell_quote(run_dir)}" if cli else "resume=True (resume='auto' starts or continues it)"
        raise UsageError(f"{run_dir} already holds a run; continue it with {how} "
                         f"or choose another {'--out' if cli else 'out'}")
    refuse_run_in_data(run_dir, cfg.data.source)
    inside = where_in_a_run(run_dir, itself=False)  # a run's checkpoints/ or any folder of it
    if inside is not None:
        raise UsageError(f"{run_dir} is {inside}, whose files are that run's own; choose "
                         f"{'an --out' if cli else 'an out folder'} outside it")
    if isinstance(config, (str, Path)) and Path(find_config(config)).resolve() == (run_dir / CONFIG).resolve():
        raise UsageError(f"{run_dir} holds the config file given ({config}), which the run would overwrite with "
                         "its resolved config; keep the file elsewhere or choose another output folder")
    if dist.is_main():
        refuse_if_training(run_dir)  # a first epoch in progress looks like a start that saved nothing
    leftovers = [name for name in (CONFIG, *RUN_FILES) if (run_dir / name).exists()]
    # rank 0 decides (the others would see its removal half done); it fails the job if it refuses
    if leftovers and failed_start_ok and (not dist.is_main() or _failed_start_of(run_dir, cfg)):
        if dist.is_main():
            remove_run_files(run_dir, FAILED_START)
            log.info("%s holds the files of a start of this run that was stopped before its first checkpoint (%s): "
                     "removed, starting it again", run_dir, ", ".join(leftovers))
    elif leftovers:  # a run whose checkpoint is gone, or a user's file: writing there would mix or lose them
        raise UsageError(f"{run_dir} holds files of an earlier run ({', '.join(leftovers)}) without its "
                         "checkpoint, so there is nothing to resume; choose another output folder"
                         + (f", or {AUTO_RESUME[cli]} to start again over this start that saved nothing"
                            if _failed_start_of(run_dir, cfg) else
                            ", or remove those files to start again in it"))
    source = str(config) if isinstance(config, (str, Path)) else "demo" if config is None else cfg.name
    return PreparedRun(cfg, run_dir, source, False)


def refuse_run_in_data(run_dir: Path, source, written: str = "the run's files (checkpoints/, tb/, ...)",
                       kept: str = "runs") -> None:
    """A run directory in the dataset's folder would mix its files into the data: its checkpoints/ and tb/
    folders would be read as classes of the next run on that folder. (``written``, ``kept``: of another output,
    such as exports.)"""
    if source is None or in_memory_only(source) or not Path(source).is_dir():
        return
    data, where = Path(source).resolve(), Path(run_dir).resolve()
    if where == data or data in where.parents:
        raise UsageError(f"{run_dir} is inside the dataset {source}: {written} would be mixed into the data; keep "
                         f"{kept} outside the dataset's folder")


def _failed_start_of(run_dir: Path, cfg: Config | None) -> bool:
    """Whether ``run_dir`` holds only what a start of ``cfg`` (None: of any settings) leaves when killed before
    its first checkpoint (by a signal before its first step, or by SIGKILL, an out-of-memory kill or a lost node
    during the first epoch): its config.yaml with the same settings, no checkpoint file, no results, and metrics
    of no step past the first epoch's end, where the first checkpoint is written (the steps it logged were never
    saved, and a resume would drop them too). A checkpoint's unfinished temporary file is no checkpoint."""
    checkpoints = run_dir / CHECKPOINTS
    if (run_dir / RESULTS).exists() or (checkpoints.is_dir() and any(
            not is_temporary(f) for f in checkpoints.iterdir())):
        return False
    try:
        saved = load_config(run_dir / CONFIG, stored=True)
        lines = (run_dir / METRICS).read_text(encoding="utf-8").splitlines() if (run_dir / METRICS).exists() else []
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError, SlimsslError):
        return False  # any doubt keeps the files
    # the first epoch's last record comes before its checkpoint: a kill in that save is still a failed start
    if any(record.get("epoch", 0) > 1 for record in map(parse_record, lines)):
        return False  # a checkpoint was written, and has gone (moved away?): its run's metrics are kept
    return cfg is None or not config_differences(saved, cfg, ignore=MACHINE_DEPENDENT)


def _no_run_to_resume(run_dir: Path, last: Path) -> str:
    """Why ``run_dir`` cannot be resumed. A checkpoint file (RUN/checkpoints/last.pt) or the checkpoints
    folder given in its place gets the run directory that holds it named."""
    cli = on_command_line()
    if run_dir.is_file():
        holder = run_dir.parent.parent if run_dir.parent.name == CHECKPOINTS else None
    elif run_dir.name == CHECKPOINTS and (run_dir / LAST).is_file():
        holder = run_dir.parent
    else:
        why = f"cannot resume: {last} {'is not a file' if last.exists() else 'does not exist'}"
        if not last.exists() and _failed_start_of(run_dir, None):
            why += (f"; the run in {run_dir} was stopped before it saved one: start it again with the "
                    f"{'command' if cli else 'call'} that started it and {AUTO_RESUME[cli]} (which replaces a "
                    "start that saved nothing)")
        return why
    what = (f"{'--resume takes' if cli else 'with resume=True, out must be'} the run directory (the folder that "
            f"holds checkpoints/last.pt), not {run_dir}")
    if holder is None:
        return what
    return f"{what}; this one is in the run directory {holder}: " + (
        f"--resume {shell_quote(holder)}" if cli else f"out={str(holder)!r}")


def absolute_data_source(cfg: Config) -> Config:
    """``cfg`` with ``data.source`` made absolute when it is an existing path and not the name of a built-in
    or registered dataset: the run's config.yaml and checkpoint then name the same data from any working
    directory (``slimssl knn RUN``, ``--resume``). A missing path stays as given, for the error to name it. A
    registered dataset is recorded with its fingerprint (``registered:NAME@FP``): the same images are needed."""

    recorded = absolute_source(cfg.data.source)
    if recorded == cfg.data.source:
        return cfg
    cfg = cfg.model_copy(deep=True)  # never change a Config the caller passed in
    cfg.data.source = recorded
    return cfg


def remove_run_files(run_dir: Path, names) -> list[str]:
    """Remove ``names`` from ``run_dir`` where they exist (a folder with what it holds); returns those removed."""
    removed = []
    for name in names:
        path = run_dir / name
        if not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    return removed


def write_run_config(run_dir: Path, cfg: Config, lr: dict) -> None:
    """RUN/config.yaml: the resolved config under the learning rate it gives (``Trainer.effective_lr``) and the
    augmentation recipe its views follow; a kill mid-write keeps the earlier file whole."""
    views = "" if cfg.data.augment else (f"# views: the {cfg.view_recipe()} augmentation recipe, the method's own "
                                         "(data.augment unset)\n")
    with atomic_write(run_dir / CONFIG, "w") as f:
        f.write(lr_header(lr) + views + cfg.to_yaml())


def lr_header(lr: dict) -> str:
    """Comment lines for RUN/config.yaml: the learning rate the run actually uses (``effective_lr``), and how it
    follows."""

    return "".join(f"# {line}\n" for line in describe_lr(lr))
