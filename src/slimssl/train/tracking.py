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
import logging
from pathlib import Path

from ..errors import UsageError
from ..layout import METRICS
from .metrics import scalars

log = logging.getLogger("slimssl")


class WandbRecords:
    """A pretraining callback: the first record starts (or resumes) the W&B run of ``run_dir`` in ``project``
    with the run's config; each record's numbers (``loss/<subnet>``, ``knn_top1/<subnet>``, ``lr``, ...), as
    TensorBoard gets them, are logged with the record's ``step`` and ``epoch``, which the charts take as their
    x axis. W&B's own step only counts the records: a run's steps may go back (a resume repeats the steps after
    its checkpoint; another batch renumbers them), and W&B ignores a record at an earlier step than its last.
    :meth:`finish` ends the W&B run (before a command prints its result: W&B writes to stdout as it ends)."""

    def __init__(self, project: str, run_dir: str | Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb needs the wandb package: pip install wandb (or slimssl's wandb extra); the "
                             "run's metrics.jsonl and TensorBoard events are written without it") from None
        self.wandb, self.project, self.run_dir, self.config = wandb, project, Path(run_dir), config
        self.run = None

    def __repr__(self) -> str:  # how a warning about it names it
        return f"W&B (project {self.project!r})"

    def __call__(self, record: dict) -> None:
        if self.run is None:
            self.run = self.wandb.init(project=self.project, name=self.run_dir.name, id=run_id(self.run_dir),
                                       resume="allow", config=self.config)
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        values = scalars(record)
        if values:
            self.run.log({**values, "step": record.get("step", 0), "epoch": record.get("epoch")})

    def finish(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish()
            except Exception:  # noqa: BLE001 - the run's own files are written: a tracker's failure is only said
                log.warning("W&B could not finish its run of %s (metrics.jsonl has every record)", self.run_dir,
                            exc_info=True)


def run_id(run_dir: Path) -> str:
    """The W&B id of the run in ``run_dir``: the same at every resume, another for another run."""
    with (run_dir / METRICS).open(encoding="utf-8") as f:
        first = json.loads(f.readline() or "{}")
    key = f"{run_dir.resolve()}|{first.get('time')}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
