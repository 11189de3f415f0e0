"""A run's ``results.json``: read it, and merge evaluation values into it per sub-network.

The file is ``{"run": the run directory's name, "config": {...}, "resolution": int, "subnets": [{"subnet":
name, "width": w, "depths": [...], "params": n, "macs": n, "knn_top1": x, ...}, ...]}``. Evaluation commands run on a
checkpoint inside a run directory add their values to the matching ``subnets`` entry (keyed by the
canonical sub-network name) and record their settings under ``"protocols"``, so a report can say how
every number was measured; a row measured with other settings than those holds its own
(``"knn_settings"``: see :func:`merge_results`). Protocols measured on a checkpoint from before the end of
pretraining are named under ``"unfinished"`` (:func:`mark_unfinished`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

from filelock import FileLock, Timeout

from ..atomic import STALE_SECONDS, remove_temporaries, write_json_atomic
from ..report.table import is_number
from ..errors import UsageError
from ..layout import CHECKPOINTS, CONFIG, LAST, METRICS, RESULTS, RESULTS_LOCK, is_export_dir

log = logging.getLogger("slimssl")
# how long a merge waits for another (which takes milliseconds) before it calls the lock left over
RESULTS_LOCK_SECONDS = 60



class ResultsError(UsageError):
    """A run directory or results file that cannot be read; says which file and why."""


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory whose results an evaluation of ``checkpoint`` are, or None for a loose checkpoint.

    ``RUN`` itself (a folder holding ``checkpoints/``, ``results.json`` or ``config.yaml``) and
    ``RUN/checkpoints/last.pt`` give ``RUN``. An earlier checkpoint (``RUN/checkpoints/epoch_0010.pt``) gives None: its numbers are not
    the run's, and merged into ``RESULTS`` they would replace those of the trained network.
    """
    path = Path(checkpoint)
    if path.is_dir():
        if (path / CHECKPOINTS).is_dir() or (path / RESULTS).is_file() or (path / CONFIG).is_file():
            return path
        return None
    if path.parent.name == CHECKPOINTS:
        if path.name == LAST:
            return path.parent.parent
        log.info("%s is not the run's last checkpoint: its results stay out of %s (--json prints them)",
                 path, path.parent.parent / RESULTS)
    return None


def same_data(evaluated: str | None, trained: str) -> bool:
    """Whether an evaluation read the run's own data: the same name, or the same folder or .zip however its path
    is spelt (relative to another directory, through a link)."""
    if evaluated is None or evaluated == trained:
        return True
    try:
        return os.path.samefile(os.path.expanduser(evaluated), os.path.expanduser(trained))
    except OSError:  # a built-in name, or a path that is not there (any more)
        return False


def read_results(run_dir: str | Path, missing_ok: bool = False) -> dict[str, Any]:
    """The content of ``run_dir/results.json`` (``run`` defaults to the folder name)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "does not exist"
        raise ResultsError(f"run directory {run_dir} {what}")
    path = run_dir / RESULTS
    if path.exists() and not path.is_file():
        raise ResultsError(f"{path} is not a file")
    if not path.is_file():
        if missing_ok:
            return {"run": run_dir.resolve().name, "subnets": []}
        from ..reproduce import REPORT_JSON, REPORT_MD

        if (run_dir / REPORT_JSON).is_file():  # the folder of `slimssl reproduce --out`, not a run
            raise ResultsError(f"{run_dir} holds a reproduction, whose runs are its sub-folders: read "
                               f"{run_dir / REPORT_MD}, or report its runs ({run_dir}/<recipe>/*)")
        if is_export_dir(run_dir):
            raise ResultsError(f"{run_dir} is an exported sub-network, which keeps no results: measure it with "
                               f"slimssl knn {run_dir} --data DATA (or linear, finetune; profile needs no data), or "
                               "report the run it was exported from")
        raise ResultsError(f"{path} does not exist; a run directory gets results.json at the end of pretraining "
                           "(or from 'slimssl knn RUN_DIR')")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's parser goes
        raise ResultsError(f"{path} is not readable JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("subnets", []), list):
        raise ResultsError(f"{path} does not hold a results object with a 'subnets' list")
    if not isinstance(data.get("protocols", {}), dict):  # read as an object of each protocol's settings
        raise ResultsError(f"{path}: 'protocols' is a {type(data['protocols']).__name__}; expected an object, as "
                           "slimssl writes it")
    data.setdefault("run", run_dir.resolve().name)
    data.setdefault("subnets", [])
    for i, row in enumerate(data["subnets"]):
        if not isinstance(row, dict) or "subnet" not in row:
            raise ResultsError(f"{path}: subnets[{i}] has no 'subnet' name")
    return data


def results_header(run_dir: str | Path, cfg) -> dict:
    """What a run's results.json says before its sub-networks' values: the run, its config and resolution."""
    return {"run": Path(run_dir).resolve().name, "config": cfg.model_dump(mode="json"),
            "resolution": cfg.data.resolution}


def write_results(run_dir: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``results.json`` atomically."""
    path = Path(run_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, data)


def remove_killed_writes(run_dir: Path) -> None:
    """The temporary files of results.json that writes killed midway left in ``run_dir``. Only those a minute old:
    the end of pretraining writes the file without the merges' lock when a killed merge has left that lock."""
    for name in remove_temporaries(run_dir, of=(RESULTS,), older_than=STALE_SECONDS):
        log.debug("%s: removed %s, left by a write that was killed midway", run_dir, name)


def merge_rows(rows: list[dict], values: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """``rows`` (dicts with ``subnet``) updated with ``values[subnet]``; unknown subnets are appended."""
    out = [dict(r) for r in rows]
    index = {r["subnet"]: r for r in out}
    for name, vals in values.items():
        if name in index:
            index[name].update(vals)
        else:
            row = {"subnet": name, **vals}
            out.append(row)
            index[name] = row
    return out


def merge_results(run_dir: str | Path, values: Mapping[str, Mapping[str, Any]], *, protocol: str | None = None,
                  settings: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None,
                  trained: tuple[float | None, int] | None = None) -> Path:
    """Merge per-sub-network ``values`` ({subnet: {key: value}}) into ``run_dir/results.json``.

    Existing keys of a sub-network are overwritten, others are kept; ``settings`` are stored under
    ``protocols[protocol]``; ``defaults`` fill top-level keys the file does not have yet (run, resolution);
    ``trained``: (the epochs the evaluated checkpoint was trained for, the run's epochs), see :func:`mark_unfinished`.
    A sub-network whose values of ``protocol`` were measured with other settings than those, and are not
    measured again here, keeps its earlier settings in its own row (``<protocol>_settings``), so that every
    number still says how it was measured.
    """
    # a lock from reading to writing: evaluations of one run started side by side keep each other's values
    with results_lock(run_dir):
        remove_killed_writes(Path(run_dir))
        data = read_results(run_dir, missing_ok=True)
        for key, value in (defaults or {}).items():
            data.setdefault(key, value)
        if trained is not None and protocol is not None:
            mark_unfinished(data, protocol, *trained)
        if protocol is not None:
            protocols = data.setdefault("protocols", {})
            _keep_earlier_settings(data["subnets"], values, protocol, protocols.get(protocol), dict(settings or {}))
            protocols[protocol] = dict(settings or {})
        data["subnets"] = merge_rows(data["subnets"], values)
        return write_results(run_dir, data)


@contextlib.contextmanager
def results_lock(run_dir: str | Path, seconds: float | None = None,
                 if_stale: Literal["raise", "warn"] = "raise") -> Iterator[None]:
    """Hold the lock under which ``results.json`` is read and rewritten: by the evaluations' merges, and by the
    end of pretraining, so that neither drops what the other wrote. A holder takes milliseconds, so a lock held
    for ``seconds`` (default :data:`RESULTS_LOCK_SECONDS`) is one left by a process killed on a file system
    without file locks: an error, or (``if_stale="warn"``) a warning and the work done without it (a finished
    run writes its results whatever a stale lock says)."""
    if if_stale not in ("raise", "warn"):
        raise ValueError(f"if_stale must be 'raise' or 'warn', got {if_stale!r}")
    seconds = RESULTS_LOCK_SECONDS if seconds is None else seconds
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path = Path(run_dir) / RESULTS_LOCK
    lock = FileLock(path)
    try:
        lock.acquire(timeout=seconds)
        held = True
    except Timeout:
        held = False
        left = (f"{path} was held for {seconds:g} s: another process merging into {RESULTS} would take "
                "milliseconds, so it is probably left by one that was killed on a file system without file locks")
        if if_stale == "raise":
            raise ResultsError(f"{left}; remove it if no evaluation of this run is running") from None
        log.warning("%s; writing %s without it", left, RESULTS)
    try:
        yield
    finally:
        if held:
            lock.release()


def mark_unfinished(data: dict, protocol: str, epoch: float | None, epochs: int) -> None:
    """Keep ``data["unfinished"]`` ({"epochs": E, protocol: epoch, ...}) naming the protocols whose values were
    measured on a checkpoint from before the end of pretraining, at which epoch (rounded down, so never E). A
    protocol measured again at the end leaves it, and it goes with the last one; pretraining's own results.json
    replaces the file. A checkpoint that does not say its epoch (made elsewhere) leaves the mark as it is."""
    if epoch is None:
        return
    earlier = data.get("unfinished")
    marks = {k: v for k, v in earlier.items() if k != "epochs"} if isinstance(earlier, dict) else {}
    if epoch < epochs:
        marks[protocol] = epoch_floor(epoch)
    else:
        marks.pop(protocol, None)
    if marks:
        data["unfinished"] = {"epochs": epochs, **marks}
    else:
        data.pop("unfinished", None)


def epoch_floor(epoch: float) -> float:
    """A checkpoint's epoch to 2 decimals, rounded down: one before the end never reads as the last."""
    return math.floor(epoch * 100) / 100


def unfinished_note(data: dict) -> str | None:
    """``data``'s unfinished mark in words ("knn at epoch 1.5 of 4"), or None when it has none."""
    marks = data.get("unfinished")
    if not isinstance(marks, dict):
        return None
    parts = [f"{k} at epoch {v:g}" for k, v in marks.items() if k != "epochs" and isinstance(v, (int, float))]
    return f"{', '.join(parts) or 'measured'} of {marks.get('epochs', '?')}"


def stale_note(run_dir: str | Path, data: dict, saved_epoch: float | None = None) -> str | None:
    """A warning when ``data`` (``run_dir``'s results.json) holds values of a protocol measured on the network at
    an earlier epoch than the run has trained on to since (a resume given more epochs, stopped before its new end,
    which rewrites the file): they may not be those of its last checkpoint. None otherwise. The epoch trained to
    is metrics.jsonl's last and ``saved_epoch``, the last checkpoint's where known; a protocol's values were
    measured at the end that wrote the file (its config's epochs, or the epoch of its step's records when a resume
    lowered them below where the run stood), or at the epoch its ``unfinished`` mark says. Epochs, not steps: a
    resume with another batch size counts its steps anew."""
    train = (data.get("config") or {}).get("train") if isinstance(data.get("config"), dict) else None
    end = train.get("epochs") if isinstance(train, dict) else None
    if not isinstance(data.get("steps"), int) or not is_number(end):  # not written by pretraining's end
        return None
    records = [r for r in read_metrics(run_dir) if is_number(r.get("epoch"))]
    # the network results.json describes: its end, or further where a resume lowered the epochs below the run's
    end = max([end, *(r["epoch"] for r in records if r.get("step") == data["steps"])])
    epochs = [r["epoch"] for r in records]
    if is_number(saved_epoch):  # epochs after the last metrics record are only there
        epochs.append(saved_epoch)
    trained = epoch_floor(max(epochs, default=0))
    marks = data.get("unfinished") if isinstance(data.get("unfinished"), dict) else {}
    protocols = data.get("protocols") if isinstance(data.get("protocols"), dict) else {}
    measured = {p: marks.get(p, end) for p in protocols}
    stale = {p: e for p, e in measured.items() if is_number(e) and e < trained}
    if not stale:
        return None
    commands = dict.fromkeys("finetune" if p.startswith("finetune") else p for p in stale)
    return (f"{Path(run_dir) / RESULTS} holds values of the network at an earlier epoch than the run has trained on "
            f"to since, {trained:g}: " + ", ".join(f"{p} at epoch {e:g}" for p, e in stale.items())
            + f"; they may not be those of its last checkpoint (slimssl {' / '.join(commands)} RUN measures them "
            "again)")


def _keep_earlier_settings(rows: list[dict], values: Mapping[str, Any], protocol: str, earlier: dict | None,
                           now: dict) -> None:
    """Rows measured again lose their own settings of ``protocol``; the others, holding its values measured
    with the ``earlier`` settings of ``protocols[protocol]`` (or with none recorded, by an older version), are
    given those as their own."""
    own, random_own = f"{protocol}_settings", f"{protocol}_random_init_settings"
    kept = []
    for row in rows:
        if row["subnet"] in values or row.get(own) == now:  # measured now, or as now after all
            row.pop(own, None)
        elif (earlier != now and own not in row
              and any(row.get(f"{protocol}_{v}") is not None for v in ("top1", "top5"))):
            row[own] = earlier if earlier is not None else "not recorded"
            kept.append(row["subnet"])
        # the random initialisation's value (pretraining measures it) keeps the settings it was measured with
        random_init = f"{protocol}_top1_random_init"
        if (row.get(random_init) is None or row.get(random_own) == now
                or random_init in (values.get(row["subnet"]) or {})):
            row.pop(random_own, None)
        elif earlier != now and random_own not in row:
            row[random_own] = earlier if earlier is not None else "not recorded"
    if kept:
        log.info("results.json: %s measured with other %s settings than this call's keep theirs (in %s)",
                 ", ".join(kept), protocol, own)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (empty when the file is absent). Lines that are not JSON
    records (the last one, cut off by a crash mid-write, or a damaged file) are skipped with a warning."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records, bad = [], 0
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    for line in filter(None, lines):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # a damaged line, or one nested too deep to parse
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d of %d lines that are not JSON records", path, bad, bad + len(records))
    return records
