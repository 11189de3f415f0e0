"""Run metrics: JSON lines (always), TensorBoard scalars (when tensorboard is installed) and the progress bar."""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..atomic import atomic_write
from ..layout import METRICS, TENSORBOARD
from . import distributed as dist

log = logging.getLogger("slimssl")


def output_spread(outputs) -> torch.Tensor | None:
    """How far a sub-network is from collapse, on one step's online outputs (those its loss reads, the first
    view's): the standard deviation over the batch of each dimension of the L2-normalised outputs, averaged over
    the dimensions and scaled by sqrt(dimensions). Outputs spread evenly over the sphere read about 1, outputs
    that all point one way (a collapse) 0. None for outputs that are not a batch of vectors (a method of one's
    own may return other things)."""
    first = next((o for o in outputs if isinstance(o, torch.Tensor) and o.dim() == 2 and o.shape[0] > 1), None)
    if first is None:
        return None
    unit = torch.nn.functional.normalize(first.detach().float(), dim=1)
    return unit.std(dim=0).mean() * first.shape[1] ** 0.5


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers by tag, as trackers plot them: ``lr``, and one level of nested dicts as ``loss/<subnet>``;
    not ``step`` and ``time``, which place them."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{sub}": v for sub, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
            out[key] = value
    return out


@dataclass
class LogWindow:
    """The steps since the last metrics record: each sub-network's summed loss (on the device, read once per
    record), how many of the steps ran it (sandwich draws differ between steps), and the last step's lr.
    Checkpoints carry it, so that a run stopped between two records and resumed writes the records of a run
    that went straight through."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    drawn: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    lr: float | None = None

    def add(self, losses: dict[str, torch.Tensor], lr: float, trained: bool) -> None:
        """One step; a skipped step (``train.nonfinite: skip``) counts, but has no losses to average."""
        self.steps += 1
        self.lr = lr
        if trained:
            for name, value in losses.items():
                self.sums[name] = self.sums.get(name, 0) + value
                self.drawn[name] = self.drawn.get(name, 0) + 1

    def means(self) -> dict[str, torch.Tensor]:
        return {name: total / self.drawn[name] for name, total in self.sums.items()}

    def averaged_over_processes(self) -> "LogWindow":
        """This window with each sum replaced by its mean over the processes (every process calls it): what the
        next record averages, saved once for all of them. The draws, and so the counts, are the same on every
        process."""
        if not self.sums:
            return self
        names = list(self.sums)
        means = dist.all_reduce_mean(torch.stack([torch.as_tensor(self.sums[n]) for n in names]))
        return LogWindow(dict(zip(names, means.unbind())), dict(self.drawn), self.steps, self.lr)

    def state_dict(self) -> dict:
        """Plain numbers for a checkpoint (reads the sums: a host sync, once per save)."""
        return {"sums": {name: float(total) for name, total in self.sums.items()}, "drawn": dict(self.drawn),
                "steps": self.steps, "lr": self.lr}

    @classmethod
    def from_state_dict(cls, state: dict | None, device: torch.device) -> "LogWindow":
        if not state:  # a checkpoint from before 2026-12-02, or written at a record
            return cls()
        sums = {name: torch.tensor(total, dtype=torch.float32, device=device)  # float32 round-trips exactly
                for name, total in state["sums"].items()}
        return cls(sums, dict(state["drawn"]), int(state["steps"]), state["lr"])


class MetricsLogger:
    """A run's records: appended to metrics.jsonl, as TensorBoard scalars too when tensorboard is installed.

    ``resumed_at``: the step a resumed run continues from, ``saved_bytes``: metrics.jsonl's length when its
    checkpoint was saved. Records written after it by the run that stopped (which had trained on past its last
    checkpoint, or was a resume itself, stopped before saving) are dropped, so that the steps trained again and
    the records a resume begins with are not logged twice."""

    def __init__(self, run_dir: Path, enabled: bool = True, resumed_at: int | None = None,
                 saved_bytes: int | None = None, callbacks: Sequence[Callable[[dict], Any]] = ()):
        self.enabled = enabled
        self.path = run_dir / METRICS
        self.tb = None
        self.callbacks = tuple(callbacks)  # given each record once it is written
        if not enabled:
            return
        if resumed_at is not None and not self._drop_records_after_save(resumed_at, saved_bytes):
            self._drop_records_after(resumed_at)  # a checkpoint that did not record the length: by their steps
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of this step and later ones of earlier runs
            purge = None if resumed_at is None else resumed_at + 1
            self.tb = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=purge)
        except ImportError:
            log.info("metrics go to metrics.jsonl; for TensorBoard events too, pip install tensorboard (the "
                     "tensorboard extra)")

    def write(self, record: dict) -> None:
        """Append one record, with ``time``: when it was written (seconds since the Unix epoch), for plots over
        wall-clock time and for a log without timestamps; numeric values (also one level of nested dicts) become
        TensorBoard scalars, at that time."""
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step, wall = record.get("step", 0), record["time"]
            for tag, value in scalars(record).items():
                self.tb.add_scalar(tag, value, step, walltime=wall)
        for callback in self.callbacks:  # a copy each: one callback changing it changes no other's, nor the file
            try:
                callback(copy.deepcopy(record))
            except Exception:  # noqa: BLE001 - a tracker that is down must not cost the run its training
                log.warning("callback %s failed, and gets no more records of this run (metrics.jsonl has them all)",
                            getattr(callback, "__qualname__", repr(callback)), exc_info=True)
                self.callbacks = tuple(c for c in self.callbacks if c is not callback)

    def has_record(self, step: int, key: str) -> bool:
        """Whether metrics.jsonl holds a record of ``step`` with ``key`` (e.g. that epoch's kNN), counting steps
        as the run does now (since its last change of batch)."""
        if not self.path.is_file():
            return False
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return any(r.get("step") == step and key in r for r in map(parse_record, lines[_numbered_from(lines):]))

    def size(self) -> int | None:
        """metrics.jsonl's length now, for the checkpoint saved next (None in a process that writes none)."""
        if not self.enabled:
            return None
        return self.path.stat().st_size if self.path.is_file() else 0

    def _drop_records_after_save(self, step: int, saved_bytes: int | None) -> bool:
        """Keep what metrics.jsonl held when the checkpoint of ``step`` was saved, and of what came after, only the
        kNN of that checkpoint's network (an epoch's or the final one, logged right after the save). False when
        the length is unknown or the file is not as it was then (shorter, or cut inside a record)."""
        if saved_bytes is None or not self.path.is_file():
            return False
        data = self.path.read_bytes()
        if len(data) < saved_bytes or (saved_bytes and data[saved_bytes - 1:saved_bytes] != b"\n"):
            return False
        after = _whole_lines(data[saved_bytes:].decode("utf-8", errors="replace"))
        kept = [line for line, record in zip(after, map(parse_record, after))
                if record.get("step") == step and "knn_top1" in record]
        if len(kept) < len(after) or not data.endswith(b"\n"):
            with atomic_write(self.path, "wb") as f:
                f.write(data[:saved_bytes] + "".join(kept).encode("utf-8"))
            log.info("metrics.jsonl: dropped %d records written after the checkpoint of step %d (steps this run "
                     "trains again, or a stopped resume's)", len(after) - len(kept), step)
        return True

    def _drop_records_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        text = self.path.read_text(encoding="utf-8")
        whole = _whole_lines(text)
        start = _numbered_from(whole)  # records of steps counted in an earlier batch stay
        kept = whole[:start] + [line for line in whole[start:] if _step_of(line) <= step]
        if len(kept) < len(whole) or not text.endswith("\n") and text:
            with atomic_write(self.path, "w") as f:
                f.writelines(kept)
            if len(kept) < len(whole):
                log.info("metrics.jsonl: dropped %d records of steps after %d, which this run trains again",
                         len(whole) - len(kept), step)

    def close(self) -> None:
        """Stop TensorBoard's writer thread; later records go to metrics.jsonl only. A failure of its last flush
        (a full disk) is a warning: it must not replace how the run ended (a save after a stop signal, an error)."""
        tb, self.tb = self.tb, None
        if tb is None:
            return
        try:
            tb.close()
        except Exception as e:  # noqa: BLE001 - whatever the writer thread met; metrics.jsonl has every record
            log.warning("TensorBoard's events in %s may lack their last records (%s: %s); metrics.jsonl has them",
                        self.path.parent / TENSORBOARD, type(e).__name__, e)


# the key of the record a resume with another batch or on a training set of another size writes (train/loop.py)
RENUMBERED = "steps_renumbered"


def _whole_lines(text: str) -> list[str]:
    """The lines of metrics.jsonl text, each with its newline; a last one cut short by a kill mid-write is dropped,
    with a word (the next record would join it)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        log.warning("metrics.jsonl: dropped its last record, cut short when the run stopped: %s", lines.pop()[:80])
    return lines


def _numbered_from(lines: list[str]) -> int:
    """The index of the first line whose steps count the run's current steps: after the last record of a
    resume with another batch or on a training set of another size, which renumbered the steps."""
    for i in range(len(lines) - 1, -1, -1):
        if f'"{RENUMBERED}"' in lines[i]:
            return i + 1
    return 0


def parse_record(line: str) -> dict:
    """A metrics.jsonl line as a dict; {} for a line that cannot be read."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # a damaged line, or one nested too deep to parse
        return {}
    return record if isinstance(record, dict) else {}


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a line that cannot be read is kept (as if of step 0)."""
    try:
        return float(parse_record(line).get("step", 0))
    except (TypeError, ValueError):
        return 0.0


def bar_labels(names: list[str]) -> list[str]:
    """The progress bar's labels: the widths alone (``w0p5``) where the sub-networks share their depths, else
    the whole names, which a depth menu needs to tell its entries apart."""
    if len({name.partition("_")[2] for name in names}) <= 1:
        return [name.partition("_")[0] for name in names]
    return names


def progress_bar(start: int, end: int, enabled: bool):
    """The training loop's progress bar over steps ``start``..``end`` (rank 0: ``enabled``)."""
    from tqdm.auto import tqdm  # late: tqdm is only needed once a run trains

    # a log file (no terminal) gets a progress line every 30 s instead of every refresh; a notebook's widget is
    # redrawn in place, though the kernel's stderr is no terminal
    in_notebook = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)
    log_file = not sys.stderr.isatty() and not in_notebook
    interval = 30.0 if log_file else 0.5 if in_notebook else 0.1
    # tqdm's own TQDM_DISABLE, read here: tqdm's notebook bar passes disable=False itself, over the variable
    off = not enabled or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")
    return tqdm(total=end, initial=start, disable=off, unit="step", dynamic_ncols=True, leave=True,
                mininterval=interval, maxinterval=max(interval, 10.0),  # (tqdm's 10 s would redraw more often)
                file=LinePerDraw(sys.stderr) if log_file else None)


class LinePerDraw:
    """A log file's view of a progress bar: each draw on a line of its own. tqdm draws over the last one after a
    carriage return, which in a file glues the next log message to the bar and makes a day's progress one line
    that grep and tail do not see."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # encoding, isatty, ...: the stream's
        if name == "stream":  # not set yet (a copy being made): no endless lookup
            raise AttributeError(name)
        return getattr(self.stream, name)
