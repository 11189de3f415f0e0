"""What a pretraining checkpoint holds (written and read here), and continuing a run from it: what a resume may
change (epochs, the batch at an epoch's end, the optimiser's hyperparameters) and what it may not (the
architecture, the optimiser's kind), and the train state that carries the loop's own progress."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import __version__
from ..checkpoint import CheckpointError, check_menu, first_mismatch, load_checkpoint
from ..wording import shell_quote
from ..config import Config, ConfigError, config_differences
from ..layout import CHECKPOINTS
from ..slim.policy import join_step
from . import distributed as dist
from .metrics import LogWindow
from .optim import OPTIMIZER_STATE_KEYS

if TYPE_CHECKING:
    from .loop import Trainer

log = logging.getLogger("slimssl")


@dataclass
class TrainState:
    """The loop's progress, saved with every checkpoint as plain data."""

    step: int = 0
    skipped_steps: int = 0
    knn_random_init: dict = field(default_factory=dict)
    joined_at: int | None = None  # the step the sub-networks joined (slow start): they stay in after a resume


@dataclass
class Resumed:
    """What a checkpoint gives a resumed run besides the tensors loaded in place."""

    state: TrainState  # in the steps of this run's batch
    window: LogWindow  # the steps since the saved run's last metrics record
    saved_step: int  # the step as the saved run counted them (another batch renumbers them)
    effective_lr: dict | None  # the learning rate the saved run trained with (None before 2026-12-02)
    metrics_bytes: int | None = None  # metrics.jsonl's length when it was saved (None before 2026-12-06)


def restore(path: Path, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, *,
            num_images: int, device: torch.device) -> Resumed:
    """Load the checkpoint at ``path`` into ``model``, ``optimizer`` and ``scaler`` (built from ``cfg``, the
    resumed run's settings, on a training set of ``num_images``), after checking that they can continue it."""
    steps_per_epoch = num_images // cfg.train.batch_size
    # on the CPU: load_state_dict moves what it needs, and an optimiser's step counts stay on the host
    # (on a GPU, AdamW would read them back at every step)
    data = load_checkpoint(path, map_location="cpu")
    saved: Config = data["config"]
    entries = dict(data["train_state"])
    entries.pop("knn_history", None)  # kept by checkpoints until 2026-12-02; metrics.jsonl has the same
    unknown = sorted(set(entries) - {f.name for f in fields(TrainState)})
    if unknown:  # a newer slimssl's progress, which this one would drop: said before its weights are blamed
        writer = data.get("saved_by", "another version of slimssl")
        raise CheckpointError(f"{path} holds train state this slimssl does not know ({', '.join(unknown)}): it was "
                              f"saved by {writer}, and this is slimssl {__version__}: resume it with the version that "
                              "saved it")
    check_menu(data["menu"], cfg, str(path))
    warn_if_numerics_differ(path, data.get("numerics"), numerics(device, dist.world_size()))
    try:
        state = data["model"]
        if getattr(model, "target", True) is None:  # a method without a target: saved with one before 2026-12-06
            state = {k: v for k, v in state.items() if not k.startswith("target.")}
        model.load_state_dict(state)
    except RuntimeError as e:  # weights of another shape: the architecture was changed on resume
        diffs = config_differences(saved, cfg, prefixes=("model.", "method."))
        raise CheckpointError(
            f"{path} holds weights of another shape than this run builds"
            + (":\n  " + "\n  ".join(diffs) if diffs else f" ({first_mismatch(e)})")
            + "\na resumed run keeps the architecture it was started with (model.*, method.*)") from None
    _load_optimizer(path, saved, cfg, optimizer, data["optimizer"])
    scaler.load_state_dict(data["scaler"])

    state = TrainState(**entries)
    saved_step, epochs_done = state.step, data.get("epoch")
    if "joined_at" not in entries:  # a checkpoint from before 2026-12-06: from its config and epoch
        state.joined_at = _joined_at(saved, saved_step, epochs_done)
    saved_steps_per_epoch = round(saved_step / epochs_done) if saved_step and epochs_done else None
    if saved.train.batch_size != cfg.train.batch_size:
        state.step = _step_with_another_batch(path, state.step, saved.train.batch_size, cfg.train.batch_size,
                                              epochs_done, num_images)
    elif saved_steps_per_epoch not in (None, steps_per_epoch) and epochs_done < cfg.train.epochs:
        # (a run trained to its end on the old set stays as it was: finished, its results kept)
        state.step = _step_with_another_training_set(saved_step, epochs_done, saved_steps_per_epoch, steps_per_epoch)
    if state.joined_at is not None and saved_step and state.step != saved_step:  # counted in the new steps too
        state.joined_at = state.joined_at * state.step // saved_step
    return Resumed(state, LogWindow.from_state_dict(data.get("log_window"), device), saved_step,
                   data.get("effective_lr"), data.get("metrics_bytes"))


def checkpoint_payload(trainer: Trainer, window: LogWindow) -> dict:
    """What a checkpoint holds of ``trainer`` (``window``: its log window, averaged over the processes), as
    :func:`restore` reads it back."""
    return {"config": trainer.cfg.model_dump(mode="json"), "menu": trainer.model.backbone.menu.names,
            "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict(), "train_state": vars(trainer.state).copy(),
            "log_window": window.state_dict(), "effective_lr": trainer.effective_lr(),
            "epoch": trainer.state.step / max(1, trainer.steps_per_epoch), "metrics_bytes": trainer.metrics.size(),
            "numerics": numerics(trainer.device, trainer.world)}


def numerics(device: torch.device, processes: int) -> dict:
    """What the float rounding of a step depends on besides the run's settings, saved with every checkpoint: a
    resume continues bit for bit only where they are the same."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": str(torch.__version__), "device": where, "processes": processes,
            **({"cpu_threads": torch.get_num_threads()} if device.type == "cpu" else {})}


def warn_if_numerics_differ(path: Path, saved: dict | None, now: dict) -> None:
    """Say that a resume will not be bit for bit the uninterrupted run, when what its rounding depends on
    changed (a checkpoint from before 2026-12-07 records nothing, and is not compared)."""
    changed = [key for key in now if isinstance(saved, dict) and key in saved and saved[key] != now[key]]
    if changed and dist.is_main():
        log.warning("%s was saved with %s; this process has %s: the run continues, with float rounding that differs "
                    "from what an uninterrupted run would have had (its numbers will not be bit for bit the same)",
                    path, ", ".join(f"{k} {saved[k]}" for k in changed), ", ".join(f"{k} {now[k]}" for k in changed))


def _load_optimizer(path: Path, saved: Config, cfg: Config, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The saved optimiser state (momentum buffers, step counts) with ``cfg``'s hyperparameters, which a resume
    may change; refused for another kind of optimiser, whose state it would not fit."""
    changed = config_differences(saved, cfg, prefixes=OPTIMIZER_STATE_KEYS)
    if changed:  # its saved state (momentum buffers, step counts, one entry per group) fits no other optimiser
        raise CheckpointError(
            f"{path} holds the state of the optimiser the run was started with:\n  " + "\n  ".join(changed)
            + "\na resumed run keeps " + " and ".join(OPTIMIZER_STATE_KEYS) + " (its other optim.* settings "
            "may change); start a new run to use another optimiser")
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)


def _joined_at(saved: Config, step: int, epochs_done: float | None) -> int | None:
    """The step at which a saved run's sub-networks joined, if they had by ``step`` (its own steps)."""
    if not step or not epochs_done:
        return None
    join = join_step(saved.slim.slow_start, saved.train.epochs * round(step / epochs_done))
    return join if step > join else None


def _step_with_another_training_set(step: int, epochs_done: float, saved_steps_per_epoch: int,
                                    steps_per_epoch: int) -> int:
    """The step of a run resumed on a training set of another size (images added or removed, other data): the
    schedule (lr, slow start, momentum) counts epochs, so the run continues at the same epoch in steps of the
    new length, the nearest step within an epoch."""
    converted = max(1, round(epochs_done * steps_per_epoch))  # a run that trained is never back at step 0
    if dist.is_main():
        log.warning("the training set gives %d steps per epoch, and gave %d when the run was saved (images added or "
                    "removed?): the run continues at epoch %.2f, step %d of the new epochs (step %d of the old "
                    "ones); metrics.jsonl counts the new steps from here on", steps_per_epoch,
                    saved_steps_per_epoch, epochs_done, converted, step)
    return converted


def _step_with_another_batch(path: Path, step: int, saved_batch: int, batch: int, epochs_done: float | None,
                             num_images: int) -> int:
    """The step of a run resumed with another ``train.batch_size`` (e.g. on fewer processes, which the batch
    must divide) on ``num_images``. Its schedule (lr, slow start, momentum, data order) counts steps of the
    batch, so the run continues at the same epoch, which is exact only at the end of an epoch."""
    if epochs_done is None or step == 0 or abs(epochs_done - round(epochs_done)) > 1e-9:
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else path
        # in steps of the saved batch on the images there are now, as the resume with that batch counts them
        end = math.ceil(epochs_done) * (num_images // saved_batch) if epochs_done else None
        finish = (f": slimssl pretrain --resume {shell_quote(run_dir)} --max-steps {end} (max_steps={end} in "
                  "Python)" if end else "")
        raise ConfigError(
            f"{path} was saved at step {step}, within an epoch, with train.batch_size {saved_batch}: the batch "
            f"can change ({saved_batch} -> {batch}) only where an epoch ends, since the schedule counts steps of "
            f"the batch. First train it to the epoch's end with its batch, on a number of processes that divides "
            f"{saved_batch}{finish}; then change the batch")
    converted = round(epochs_done) * (num_images // batch)
    if dist.is_main():  # once for the run, not once per process
        log.warning("train.batch_size changed from %d to %d: the run continues at the end of epoch %d, step %d "
                    "of the new batch (step %d of the old one); metrics.jsonl counts the new steps from here on",
                    saved_batch, batch, round(epochs_done), converted, step)
    return converted
