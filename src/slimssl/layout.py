"""Where a run directory keeps its checkpoints. Free of torch, so that reading a run's results (``slimssl
report``) does not wait for it."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"  # a run directory's folder of checkpoints
LAST = "last.pt"  # in it: written at every epoch's end and on a stop; what --resume reads


def checkpoint_path(run_dir: str | Path, name: str = LAST) -> Path:
    """Where a run directory keeps the checkpoint ``name`` (default: the last one)."""
    return Path(run_dir) / CHECKPOINTS / name
