"""``slimssl pretrain --wandb PROJECT``: a run's records sent to Weights & Biases as metrics.jsonl gets them.

The records reach it through the callbacks every run has (``slimssl.pretrain(callbacks=...)``), on rank 0, so
a tracker that fails costs a warning and its own records, never the training. The W&B run is named after the run
directory and keeps one id through resumes: a hash of the directory's path and of the time its first record was
written (which stays at the head of metrics.jsonl), so a run resumed continues its W&B run, and two runs of the
same folder name on two machines do not share one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UsageError
from ..layout import METRICS
from .metrics import scalars


class WandbRecords:
    """A pretraining callback: the first record starts (or resumes) the W&B run of ``run_dir`` in ``project``
    with the run's config; each record's numbers are logged at its step (``loss/<subnet>``, ``knn_top1/<subnet>``,
    ``lr``, ...), as TensorBoard gets them."""

    def __init__(self, project: str, run_dir: str | Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb needs the wandb package: pip install wandb (or slimssl's wandb extra); the "
                             "run's metrics.jsonl and TensorBoard events are written without it") from None
        self.wandb, self.project, self.run_dir, self.config = wandb, project, Path(run_dir), config
        self.run = None

    def __call__(self, record: dict) -> None:
        if self.run is None:
            self.run = self.wandb.init(project=self.project, name=self.run_dir.name, id=run_id(self.run_dir),
                                       resume="allow", config=self.config)
        values = scalars(record)
        if values:
            self.run.log(values, step=int(record.get("step", 0)))


def run_id(run_dir: Path) -> str:
    """The W&B id of the run in ``run_dir``: the same at every resume, another for another run."""
    with (run_dir / METRICS).open(encoding="utf-8") as f:
        first = json.loads(f.readline() or "{}")
    key = f"{run_dir.resolve()}|{first.get('time')}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
