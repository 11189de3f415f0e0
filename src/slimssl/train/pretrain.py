"""Pretraining as a function: choose the config and the run directory, then train. ``slimssl pretrain`` and
``slimssl.pretrain`` both go through here, so a run started from Python and one started from the shell
are the same run (and either can resume the other)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import Config
from ..errors import UsageError

log = logging.getLogger("slimssl")

RUN_FILES = ("results.json", "metrics.jsonl", "tb")  # written by a run besides its checkpoints


@dataclass(frozen=True)
class PretrainRun:
    """What a pretraining call leaves: its run directory (load it with ``slimssl.load_supernet``), the
    content of its ``results.json`` once finished, and how far it got."""

    run_dir: Path
    results: dict[str, Any]  # empty when stopped early by max_steps
    step: int
    total_steps: int

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def prepare_run(config: Config | dict | str | Path | None = None, out: str | Path | None = None, *,
                overrides: Sequence[str] = (), resume: bool = False) -> tuple[Config, Path, str]:
    """(config, run directory, where the config came from) of a new run, or of the run in ``out`` to resume.

    A new run gets ``out`` (default ``runs/<name>-<time>``), which must not hold another run. A resumed run
    takes the config saved in its checkpoint; ``overrides`` still apply (e.g. more epochs)."""
    from ..checkpoint import load_checkpoint
    from ..config import config_from_dict
    from ..models.build import as_config

    if isinstance(overrides, str):  # a lone "key=value" would otherwise be read character by character
        raise UsageError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    if resume:
        if out is None:
            raise UsageError("resuming needs the run directory to continue (--resume RUN_DIR, or out=RUN_DIR)")
        if config is not None:
            raise UsageError("resuming continues with the config saved in the run; drop --config (in Python: "
                             "config=None); --set, --epochs and --data still apply")
        run_dir = Path(out)
        last = run_dir / "checkpoints" / "last.pt"
        if not last.is_file():
            raise UsageError(f"cannot resume: {last} {'is not a file' if last.exists() else 'does not exist'}")
        source = str(last)
        stored = load_checkpoint(last)["config"]
        return config_from_dict(stored.model_dump(mode="json"), f"{last} (stored config)", list(overrides)), \
            run_dir, source
    cfg = as_config(config, list(overrides))
    run_dir = Path(out) if out is not None else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir} (resume=True) "
                         "or choose another output folder")
    leftovers = [name for name in RUN_FILES if (run_dir / name).exists()]
    if leftovers:  # a run whose checkpoint is gone: writing there would mix two runs' logs
        raise UsageError(f"{run_dir} holds files of an earlier run ({', '.join(leftovers)}) without its "
                         "checkpoint; choose another output folder")
    source = str(config) if isinstance(config, (str, Path)) else "demo" if config is None else cfg.name
    return cfg, run_dir, source


def train_run(cfg: Config, run_dir: Path, source: str, *, resume: bool = False,
              max_steps: int | None = None) -> PretrainRun:
    """Train ``cfg`` in ``run_dir`` (from :func:`prepare_run`) up to its end or ``max_steps``.

    Raises :class:`~slimssl.train.loop.Interrupted` after saving when SIGTERM or SIGINT arrives."""
    from ..config import check_processes
    from . import distributed as dist
    from .loop import Trainer

    check_processes(cfg, dist.world_size(), source)
    created = dist.is_main() and not run_dir.exists()
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", run_dir)
    try:
        trainer = Trainer(cfg, run_dir, resume=resume)
    except BaseException:
        if created and not any(run_dir.iterdir()):  # refused before writing anything: leave no trace
            run_dir.rmdir()
        raise
    if dist.is_main():  # only once the run is set up (a failed resume leaves the saved run untouched)
        (run_dir / "config.yaml").write_text(lr_header(cfg, dist.world_size()) + cfg.to_yaml())
    results = trainer.fit(max_steps)
    return PretrainRun(run_dir, results, trainer.state.step, trainer.total_steps)


def pretrain(config: Config | dict | str | Path | None = None, out: str | Path | None = None, *,
             overrides: Sequence[str] = (), resume: bool = False, max_steps: int | None = None) -> PretrainRun:
    """Slimmable self-supervised pretraining, as ``slimssl pretrain`` does it.

    ``config`` is a :class:`~slimssl.Config`, a dict of sections, a YAML path or a shipped recipe name
    (default: the embedded demo); ``overrides`` are ``"section.key=value"`` strings, as ``--set`` takes.
    ``out`` is the run directory (default ``runs/<name>-<time>``). ``resume=True`` continues the run in
    ``out`` with its saved config. Under torchrun, each process calls this and the process group is joined
    here. A SIGTERM or SIGINT saves a checkpoint and raises ``Interrupted``; resume it later.
    """
    from . import distributed as dist

    dist.init_from_env()
    cfg, run_dir, source = prepare_run(config, out, overrides=overrides, resume=resume)
    return train_run(cfg, run_dir, source, resume=resume, max_steps=max_steps)


def lr_header(cfg, world: int) -> str:
    """Comment lines for RUN/config.yaml: the learning rate the run actually uses, and how it follows."""
    from .optim import scaled_lr

    o, batch = cfg.optim, cfg.train.batch_size
    peak = scaled_lr(o.lr, o, batch)
    how = (f"optim.lr {o.lr:g} x train.batch_size {batch} / optim.reference_batch {o.reference_batch}"
           if o.lr_scaling == "linear" else f"optim.lr {o.lr:g} (optim.lr_scaling: none)")
    lines = [f"# effective peak lr: {peak:g} = {how}"]
    if cfg.slim.slow_start_lr:
        lines.append(f"# effective peak lr once sub-networks join: {scaled_lr(cfg.slim.slow_start_lr, o, batch):g}")
    lines.append(f"# processes: {world}; batch per process: {batch // max(1, world)} (train.batch_size is the total)")
    return "\n".join(lines) + "\n"
