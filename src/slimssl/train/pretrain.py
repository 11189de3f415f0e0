"""Pretraining as a function: choose the config and the run directory (prepare.py), then train. ``slimssl
pretrain`` and ``slimssl.pretrain`` both go through here, so a run started from Python and one started from the
shell are the same run (and either can resume the other). A start that fails before its first checkpoint
leaves the run directory as it found it."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple, Sequence

from ..atomic import atomic_write, remove_temporaries
from ..config import Config, check_overrides, check_processes
from ..data.files import existing_path
from ..data.registry import in_memory_only
from ..devices import pick_device
from ..errors import UsageError
from ..eval.inputs import check_numbers
from ..eval.results import remove_killed_writes
from ..layout import CHECKPOINTS, CONFIG, METRICS, RESULTS, checkpoint_path
from ..ambient import apart_from_caller
from ..seeds import callers_random_state_kept
from . import distributed as dist
from .loop import DEVICE_SETTING, Trainer
from .lock import TrainingLock
from .prepare import RUN_OUTPUTS, prepare_run, remove_run_files, shortcut_overrides
from .signals import Interrupted

if TYPE_CHECKING:
    import torch

    from ..models.resnet import SlimResNet

log = logging.getLogger("slimssl")


@dataclass(frozen=True, repr=False)
class PretrainRun:
    """What a pretraining call leaves: its run directory (``load_supernet()`` loads its trained supernet), the
    content of its ``results.json`` once finished, and how far it got. It is an ``os.PathLike`` of its run
    directory, so it can be passed wherever one is taken (``slimssl.knn(run)``, ``pretrain(out=run, resume=True)``)."""

    run_dir: Path
    results: dict[str, Any]  # empty when stopped early by max_steps
    step: int
    total_steps: int

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def __post_init__(self) -> None:  # the run it was returned for, whatever the working directory is later
        object.__setattr__(self, "run_dir", Path(os.path.abspath(self.run_dir)))

    def __fspath__(self) -> str:  # a run stands for its directory: slimssl.knn(run), slimssl.export_run(run, ...)
        return str(self.run_dir)

    def __str__(self) -> str:  # as messages name a run directory given as a path
        return str(self.run_dir)

    def load_supernet(self) -> tuple[SlimResNet, Config]:
        """The supernet of the run's last checkpoint and its config: ``slimssl.load_supernet(run_dir)``."""
        from ..checkpoint import load_supernet

        return load_supernet(self.run_dir)

    def __repr__(self) -> str:  # short: results.json, config included, would fill a notebook's cell
        subnets = [row.get("subnet") for row in self.results.get("subnets", [])]
        measured = f", results of {len(subnets)} sub-network(s)" if subnets else ""
        return (f"PretrainRun(run_dir={str(self.run_dir)!r}, step={self.step}/{self.total_steps}"
                f"{', finished' if self.finished else ''}{measured})")


def train_run(cfg: Config, run_dir: Path, source: str, *, resume: bool = False,
              max_steps: int | None = None, callbacks: Sequence[Callable[[dict], Any]] = ()) -> PretrainRun:
    """Train ``cfg`` in ``run_dir`` (from :func:`prepare_run`) up to its end or ``max_steps``.

    Raises :class:`slimssl.Interrupted` after saving when a stop signal arrives (its ``run``:
    the :class:`PretrainRun` so far). Any other failure before the first checkpoint removes the files this
    call wrote, so that the same ``run_dir`` can be used again."""

    check_processes(cfg, dist.world_size(), source)
    is_main = dist.is_main()  # only the main process writes in the run directory, and removes from it
    created = is_main and not run_dir.exists()
    if not in_memory_only(cfg.data.source):  # a dataset path that is not there: said before a folder is made
        existing_path(str(cfg.data.source))
    pick_device(cfg.train.device, setting=DEVICE_SETTING)  # as is a device this machine does not have
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    existed = {name for name in RUN_OUTPUTS if (run_dir / name).exists()}
    saved = _saved_state(run_dir) if is_main else None
    lock = TrainingLock(run_dir) if is_main else None  # refused here: nothing of the other's is touched
    log.info("run directory: %s", run_dir)
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, resume=resume, callbacks=callbacks)  # writes config.yaml once set up
        if is_main:
            for name in remove_temporaries(run_dir / CHECKPOINTS):  # of a save killed midway: a checkpoint's size
                log.info("removed %s, left by a checkpoint save that was killed midway", name)
            remove_temporaries(run_dir, of=(CONFIG, METRICS))  # small; this process alone writes them (its lock)
            remove_killed_writes(run_dir)
        results = trainer.fit(max_steps)
    except Interrupted as e:  # a checkpoint was saved: keep everything; say how far it got (--json)
        e.run = PretrainRun(run_dir, {}, trainer.state.step, trainer.total_steps) if trainer else None
        dist.barrier()  # every process returns once rank 0 has saved
        raise
    except BaseException:
        if is_main:  # the lock held: no other process starts in the folder meanwhile (its file goes last)
            _discard_failed_start(run_dir, trainer, existed, created)
            _restore_if_unsaved(run_dir, saved)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        if lock is not None:
            lock.release()
    if is_main and resume:
        _keep_settings_if_idle(run_dir, saved)
    dist.barrier()  # every process returns once rank 0 has written the checkpoint and results.json
    return PretrainRun(run_dir, results, trainer.state.step, trainer.total_steps)


# What a resume rewrites before its first step (its settings, a record of a changed learning rate or batch),
# put back as they were when it fails before saving a checkpoint, so that they keep describing the checkpoint.
_RESTORED_ON_FAILURE = (CONFIG, METRICS)


class SavedState(NamedTuple):
    """What a run directory held before a call trains: what a failed or idle resume puts back."""

    checkpoint_mtime: int | None  # last.pt's modification time (None: no checkpoint)
    texts: dict[str, str]  # config.yaml and metrics.jsonl
    results_mtime: int | None  # results.json's


def _saved_state(run_dir: Path) -> SavedState:
    checkpoint = _mtime(checkpoint_path(run_dir))
    texts = {} if checkpoint is None else {name: (run_dir / name).read_text(encoding="utf-8")
                                           for name in _RESTORED_ON_FAILURE if (run_dir / name).is_file()}
    return SavedState(checkpoint, texts, _mtime(run_dir / RESULTS))


def _keep_settings_if_idle(run_dir: Path, saved: SavedState) -> None:
    """A resume that trained and evaluated nothing (a finished run, or ``max_steps`` at its step) leaves the run
    as it found it: settings it changed would describe a checkpoint that was never trained with them."""
    if _mtime(run_dir / RESULTS) != saved.results_mtime:  # evaluated: results.json holds the new settings
        return
    restored = _restore_if_unsaved(run_dir, saved)
    if CONFIG in restored:
        log.warning("nothing was trained or evaluated: %s keeps the settings the run was trained with, and those "
                    "this call changed are not kept: give them again to a resume that trains", run_dir / CONFIG)


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _restore_if_unsaved(run_dir: Path, saved: SavedState) -> list[str]:
    """After a resume that failed, or trained nothing, before it saved a checkpoint, config.yaml and metrics.jsonl
    are put back as they were (the --set changes it had written, the records it had logged, are not in the
    checkpoint); the names of those that had changed."""
    if saved.checkpoint_mtime is None or _mtime(checkpoint_path(run_dir)) != saved.checkpoint_mtime:
        return []
    changed = []
    for name, text in saved.texts.items():
        if (run_dir / name).is_file() and (run_dir / name).read_text(encoding="utf-8") == text:
            continue
        changed.append(name)
        try:
            with atomic_write(run_dir / name, "w") as f:
                f.write(text)
        except OSError as e:  # the run's own error matters more
            log.warning("could not put back %s as it was before this call: %s", run_dir / name, e)
    return changed


def _discard_failed_start(run_dir: Path, trainer, existed: set[str], created: bool) -> None:
    """After a failure before any checkpoint: remove what this call wrote (its logs and config.yaml), so
    that the same output folder can be used again. A run with a checkpoint, and files that were there
    before this call, are never touched."""
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.is_dir() and any(checkpoints.glob("*.pt")):
        return
    if trainer is not None:
        trainer.metrics.close()  # TensorBoard's writer lets go of tb/ first
    try:
        removed = remove_run_files(run_dir, [name for name in RUN_OUTPUTS if name not in existed])
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
            removed.append(f"{run_dir}/")
        if removed:
            log.info("no checkpoint was written: removed what this run had written (%s), so that %s can be "
                     "used again", ", ".join(removed), run_dir)
    except OSError as e:  # the run's own error matters more than a failed clean-up
        log.warning("could not remove the files of the failed run in %s: %s", run_dir, e)


def pretrain(config: Config | dict | str | Path | None = None, out: str | os.PathLike | None = None, *,
             overrides: Sequence[str] = (), resume: bool | Literal["auto"] = False,
             max_steps: int | None = None, data: str | Path | None = None, epochs: int | None = None,
             batch_size: int | None = None, device: str | torch.device | None = None, seed: int | None = None,
             callbacks: Sequence[Callable[[dict], Any]] = ()) -> PretrainRun:
    """Slimmable self-supervised pretraining, as ``slimssl pretrain`` does it.

    ``config`` is a :class:`~slimssl.Config`, a dict of sections, a YAML path or a shipped recipe name
    (default: the embedded demo); ``overrides`` are ``"section.key=value"`` strings, as ``--set`` takes.
    ``data``, ``epochs``, ``batch_size``, ``device`` and ``seed`` set ``data.source``, ``train.epochs``,
    ``train.batch_size``, ``train.device`` and ``train.seed`` (after the overrides), as the command's flags do.
    ``callbacks``: functions each given every record the run writes to metrics.jsonl (a dict: ``step``,
    ``epoch``, the sub-networks' ``loss``, ``lr``, ``img_per_s``, ``knn_top1``, ..., and ``time``: when it was
    written, in seconds since the Unix epoch), as it is written, in the
    main process only: to send a run's curves to a tracker of your own (``lambda r: wandb.log(r, step=r["step"])``).
    A callback that raises is said (a warning with its traceback) and given no more records: a tracker that is
    down does not stop the training.
    ``out`` is the run directory (default ``runs/<name>-<time>``). ``resume=True`` continues the run in
    ``out`` with its saved config; ``resume="auto"`` continues it if ``out`` holds one (started with the
    same settings) and starts it otherwise. ``max_steps`` stops the run once it has made that many steps in
    all (counting from its start, not from this call), saving a checkpoint; ``results`` of the returned
    :class:`PretrainRun` is then empty and ``finished`` False. Under torchrun, each process calls this and the
    process group is joined here. A SIGTERM, SIGINT or SIGUSR1 saves a checkpoint and raises
    ``slimssl.Interrupted``; resume it later. The run seeds torch's generators with ``train.seed``; the caller's
    are given back as they were (the current GPU's when CUDA had been started before the call).
    """

    callbacks = _checked_callbacks(callbacks)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise UsageError(f"max_steps must be an int >= 1 (the step to stop at), or None; got {max_steps!r}")

    dist.init_from_env()
    with _quiet_except_on_rank_0():
        check_overrides(overrides)  # a str would be read letter by letter
        check_numbers(epochs=epochs, batch_size=batch_size, seed=seed)  # named as given, not as overrides
        settings = shortcut_overrides(data=data, epochs=epochs, batch_size=batch_size, device=device, seed=seed)
        cfg, run_dir, source, resume = prepare_run(config, out, overrides=[*overrides, *settings], resume=resume)
        with callers_random_state_kept(), apart_from_caller():  # not the caller's no_grad, float64, autocast
            return train_run(cfg, run_dir, source, resume=resume, max_steps=max_steps, callbacks=callbacks)


def _checked_callbacks(given) -> tuple[Callable[[dict], Any], ...]:
    """``callbacks`` as a tuple (a generator is read once, here); a lone function, or anything not a function
    among them, is refused."""
    if given is None:
        return ()
    refused = UsageError(f"callbacks must be a list of functions of a record (a dict), got {given!r}")
    if callable(given) or isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
        raise refused
    callbacks = tuple(given)
    if not all(callable(c) for c in callbacks):
        raise refused
    return callbacks


@contextlib.contextmanager
def _quiet_except_on_rank_0():
    """Rank 0 alone says how the run goes; the other processes still say what goes wrong (for this call only:
    the caller's logging is theirs)."""
    if dist.is_main():
        yield
        return
    def warnings_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING

    log.addFilter(warnings_only)
    try:
        yield
    finally:
        log.removeFilter(warnings_only)


