"""What a run directory holds, by name, and where the shipped recipes are. Free of torch, so that reading a
run's results (``slimssl report``) or listing the recipes (``slimssl config --list``) does not wait for it.

    RUN/config.yaml         the resolved config the run trains with (before its logs: it marks the folder a run's)
    RUN/checkpoints/last.pt written at every epoch's end and on a stop; what --resume reads
    RUN/metrics.jsonl       one record per log window, kNN and lr changes
    RUN/tb/                 the same records for TensorBoard
    RUN/results.json        params, MACs and every evaluation's values per sub-network
    RUN/.results.json.lock  held while an evaluation merges its values into results.json
    RUN/.train.lock         held by the process that trains the run (one at a time)
    RUN/finetune/           each fine-tuning result with its labelled indices
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"  # in CHECKPOINTS
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
RESULTS = "results.json"
RESULTS_LOCK = ".results.json.lock"
TRAINING_LOCK = ".train.lock"
FINETUNE = "finetune"
# what an exported sub-network's folder holds
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
PACKAGED = resources.files("slimssl") / "configs"  # the shipped recipes, found by name (``--config demo``)


def packaged_configs() -> list[str]:
    """The file names of the shipped recipes (``demo.yaml``, ...), sorted."""
    return sorted(p.name for p in PACKAGED.iterdir() if p.name.endswith(".yaml"))


def checkpoint_path(run_dir: str | Path, name: str = LAST) -> Path:
    """Where a run directory keeps the checkpoint ``name`` (default: the last one)."""
    return Path(run_dir) / CHECKPOINTS / name


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The file a command given ``checkpoint`` reads: a run directory stands for its checkpoints/last.pt."""
    path = Path(checkpoint)
    return checkpoint_path(path) if path.is_dir() else path


def run_markers(path: str | Path) -> list[str]:
    """What marks ``path`` as a run directory: its last checkpoint, or its config.yaml beside a file that only a
    run writes (its metrics, results or training lock: a run in its first epoch has no checkpoint yet). A
    config.yaml and a checkpoints/ folder alone are no run: a project of one's own may hold both."""
    path = Path(path)
    if checkpoint_path(path).is_file():
        return [f"{CHECKPOINTS}/{LAST}"]
    beside = [name for name in (METRICS, RESULTS, TRAINING_LOCK) if (path / name).is_file()]
    return [CONFIG, *beside] if beside and (path / CONFIG).is_file() else []


def is_run_dir(path: str | Path) -> bool:
    return bool(run_markers(path))


def enclosing_run(path: str | Path) -> Path | None:
    """The run directory that ``path`` lies inside (``path`` itself not counted), or None."""
    return next((parent for parent in Path(path).resolve().parents if is_run_dir(parent)), None)


def where_in_a_run(path: str | Path, itself: bool = True) -> str | None:
    """``"a run directory (config.yaml, ...)"`` or ``"inside the run RUN (...)"`` where ``path`` is (``itself``)
    or lies in a run directory, naming what marks it; None elsewhere."""
    if itself and is_run_dir(path):
        return f"a run directory ({', '.join(run_markers(path))})"
    run = enclosing_run(path)
    return None if run is None else f"inside the run {run} ({', '.join(run_markers(run))})"


def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` is one exported sub-network's folder (its config.json and model.safetensors)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = Path(path)
    return path.is_dir() and (path / EXPORT_CONFIG).is_file() and (path / EXPORT_WEIGHTS).is_file()
