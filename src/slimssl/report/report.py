"""Per-run tables of results.json, and the gradient-norm series of metrics.jsonl."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Sequence

from ..eval.results import read_metrics, read_results, same_data, stale_note, unfinished_note
from ..layout import RESULTS
from .table import is_number, markdown_table

log = logging.getLogger("slimssl")

# Always shown (missing values print as '-'), in this order; other measured keys follow where a run has them.
BASE_COLUMNS = ["subnet", "params", "macs", "knn_top1"]
_ORDER = ["subnet", "params", "macs", "knn_top1", "knn_top1_random_init", "linear_top1", "linear_top5"]
_NOT_COLUMNS = {"width", "depths"}


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    """The results.json content of every run directory, in the given order, with ``run`` set to the label
    that tells it from the others (:func:`run_labels`): runs of one recipe share their config's name."""
    results = [read_results(d) for d in run_dirs]
    for result, label, run_dir in zip(results, run_labels(run_dirs), run_dirs):
        result["run"] = label
        note = unfinished_note(result)
        if note:  # evaluated on a checkpoint from before pretraining's end
            log.warning("%s: results measured before pretraining finished (%s)", label, note)
        stale = stale_note(run_dir, result)  # metrics.jsonl alone: a report reads no checkpoint
        if stale:
            log.warning("%s", stale)
    return results


def run_title(result: dict) -> str:
    """A run's label for headings and legends: its name, and when its numbers are not final, which are not."""
    note = unfinished_note(result)
    return f"{result.get('run', 'run')}" + (f" (unfinished: {note})" if note else "")


def with_results(run_dirs: Sequence[str | Path]) -> list[str | Path]:
    """``run_dirs`` less the run directories that have no results.json yet (still pretraining, as a glob such as
    ``runs/*`` may catch), each named in a warning; all of them when none has one, for load_runs to refuse."""
    unique = list({_resolved(d): d for d in reversed(run_dirs)}.values())[::-1]  # the first of each folder
    if len(unique) < len(run_dirs):
        log.warning("a run directory was given twice: reported once")
    run_dirs = unique
    finished = [d for d in run_dirs if not Path(d).is_dir() or (Path(d) / RESULTS).exists()]
    if not finished:
        return list(run_dirs)
    for d in run_dirs:
        if d not in finished:
            log.warning("%s has no %s yet (a run still pretraining?): left out of the report", d, RESULTS)
    return finished


def _resolved(run_dir: str | Path) -> Path:
    """``run_dir`` resolved, or as given where it cannot be (a link loop, which reading it then says)."""
    try:
        return Path(run_dir).resolve()
    except (RuntimeError, OSError):  # RuntimeError: a link loop before Python 3.13
        return Path(run_dir).absolute()


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run directory's folder name, or the path as given where two folders have the same name."""
    names = [_resolved(d).name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def run_columns(result: dict) -> list[str]:
    """The table's columns: the base ones, then every measured number a row has (not the settings or files
    recorded beside them)."""
    present = [k for row in result.get("subnets", []) for k, v in row.items() if is_number(v)]
    extra = sorted({k for k in present if k not in _ORDER and k not in _NOT_COLUMNS}, key=_natural)
    return [c for c in _ORDER if c in BASE_COLUMNS or c in present] + extra


def _natural(key: str) -> list:
    """Sort key that reads numbers as numbers: finetune_1pct_top1, finetune_1pct_top5, finetune_10pct_top1."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def run_table(result: dict) -> str:
    """A Markdown section for one run: a heading with its name and one row per sub-network."""
    config = result.get("config")
    about = [config["name"]] if isinstance(config, dict) and isinstance(config.get("name"), str) else []
    if result.get("resolution"):
        about.append(f"{result['resolution']} px")
    parts = [", ".join(about)] if about else []
    note = unfinished_note(result)
    parts += [f"unfinished: {note}"] if note else []
    title = f"## {result.get('run', 'run')}" + (f" ({'; '.join(parts)})" if parts else "")
    table = f"{title}\n\n{markdown_table(result.get('subnets', []), run_columns(result))}"
    apart = [f"{row['subnet']} ({_settings_of(row, key, result)})" for row in result.get("subnets", [])
             for key in row if key.endswith("_settings")]
    if apart:  # a number measured otherwise than the protocol's latest call: say so, and how, under the table
        table += ("\n\nMeasured with other settings than the latest of their protocol (`protocols` in results.json;"
                  " these rows keep theirs as `<protocol>_settings`): " + "; ".join(apart))
    other = other_data(result)
    if other:
        table += "\n\nMeasured on other data than the run's own " + other
    how = protocol_settings(result)
    if how:  # a 1-epoch probe reads like a 100-epoch one in the table
        table += "\n\nHow each protocol measured (`protocols` in results.json): " + how
    return table


def protocol_settings(result: dict) -> str | None:
    """Each protocol's settings in words (``knn: k 200, temperature 0.1, ...``), without the data and resolution
    that the heading and the other-data line give; None when results.json records none."""
    protocols = result.get("protocols")
    if not isinstance(protocols, dict):
        return None
    said = [f"{name}: " + ", ".join(f"{k} {_said(v)}" for k, v in settings.items()
                                    if k not in ("data", "resolution") and v is not None)
            for name, settings in protocols.items() if isinstance(settings, dict)]
    return "; ".join(said) or None


def _said(value) -> str:
    """A setting in a line of prose: results.json's spelling of true and false, a float as short as it is, and a
    nested setting (a fine-tuning recipe) in parentheses, rather than Python's reprs."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):  # 0.1, 1e-05; never rounded (two settings that differ must read differently)
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_said(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_said, value)) + "]"
    return str(value)


def _settings_of(row: dict, key: str, result: dict) -> str:
    """How ``row``'s own settings (``key``: e.g. knn_settings) differ from its protocol's latest: ``knn: k 200, not
    20``."""
    protocol, own = key.removesuffix("_settings"), row[key]
    # knn_random_init_settings: of the random initialisation's kNN, against the kNN's latest
    latest = (result.get("protocols") or {}).get(protocol.removesuffix("_random_init"))
    label = protocol.replace("_random_init", " at random init")
    if not isinstance(own, dict) or not isinstance(latest, dict):
        return f"{label}: settings {own}"
    differ = [f"{k} {_said(own.get(k))}, not {_said(latest.get(k))}" for k in dict.fromkeys([*own, *latest])
              if own.get(k) != latest.get(k)]
    return f"{label}: {'; '.join(differ) or 'the same'}"


def other_data(result: dict) -> str | None:
    """Which protocols of ``result`` were measured on other data than the run pretrained on (the evaluation
    commands' --data), in words, or None. results.json spells the run's own data as its config does; a file
    written before it did is compared by file where its paths still lead to one."""
    config = result.get("config")
    own = config.get("data", {}).get("source") if isinstance(config, dict) else None
    protocols = result.get("protocols")
    if not isinstance(own, str) or not isinstance(protocols, dict):
        return None
    # each protocol's settings, and those that rows measured before its last call kept as their own
    measured = list(protocols.items())
    measured += [(f"{row['subnet']}'s {key.removesuffix('_settings')}", value)
                 for row in result.get("subnets", []) for key, value in row.items() if key.endswith("_settings")]
    other = [f"{what} on {settings['data']}" for what, settings in measured
             if isinstance(settings, dict) and isinstance(settings.get("data"), str)
             and not same_data(settings["data"], own)]
    return f"({own}): {'; '.join(other)}" if other else None


def report_markdown(results: Sequence[dict]) -> str:
    apart = settings_apart(results)
    units = ("params: the backbone's (no classifier); macs: multiply-accumulates per image at the run's resolution; "
             "accuracies in %.")
    note = ["Settings that differ between these runs, whose numbers then do not compare across the tables: "
            + "; ".join(apart)] if apart else []
    return "\n\n".join([*(run_table(r) for r in results), units, *note])


def settings_apart(results: Sequence[dict]) -> list[str]:
    """Each evaluation setting (and the resolution) that is not the same for every run reporting it, with each
    run's value: ``knn k: runA 200, runB 20``."""
    values: dict[str, dict[str, object]] = {}
    reporting: dict[str, list[tuple[str, dict]]] = {}  # protocol -> (run, its settings)
    for result in results:
        name = str(result.get("run", "?"))
        values.setdefault("resolution", {})[name] = result.get("resolution")
        for protocol, settings in (result.get("protocols") or {}).items():
            if isinstance(settings, dict):
                reporting.setdefault(protocol, []).append((name, settings))
    for protocol, runs in reporting.items():
        # a setting one run records and another leaves out (a subset file's, an option added since) is None there
        for key in dict.fromkeys(key for _, settings in runs for key in settings):
            for name, settings in runs:
                values.setdefault(f"{protocol} {key}", {})[name] = settings.get(key)
    return [f"{what}: " + ", ".join(f"{run} {value}" for run, value in by_run.items())
            for what, by_run in values.items() if len({repr(v) for v in by_run.values()}) > 1]


def grad_norm_series(run_dir: str | Path) -> dict[str, dict[str, list[float]]]:
    """From ``metrics.jsonl`` records holding ``grad_norm`` ({subnet: {"shared": x, "rest": y}}) and
    ``step``: per sub-network the lists ``step``, ``shared`` and ``rest``. Empty when there are none."""
    series: dict[str, dict[str, list[float]]] = {}
    for i, rec in enumerate(read_metrics(run_dir)):
        norms = rec.get("grad_norm")
        if not isinstance(norms, dict):
            continue
        step = rec.get("step", i)
        for subnet, parts in norms.items():
            if not isinstance(parts, dict):
                continue
            s = series.setdefault(subnet, {"step": [], "shared": [], "rest": []})
            s["step"].append(step)
            s["shared"].append(parts.get("shared", float("nan")))
            s["rest"].append(parts.get("rest", float("nan")))
    return series
