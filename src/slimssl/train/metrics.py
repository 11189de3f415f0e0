"""Run metrics: JSON lines (always) and TensorBoard scalars (when tensorboard is installed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("slimssl")


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            log.info("tensorboard is not installed: metrics go to metrics.jsonl only")

    def write(self, record: dict) -> None:
        """Append one record; numeric values (also one level of nested dicts) become TensorBoard scalars."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self.tb.add_scalar(f"{key}/{sub}", v, step)
                elif isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
