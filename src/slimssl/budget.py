"""Choosing the sub-network to deploy within a budget of MACs or parameters: of the sub-networks a run measured
(its results.json), the most accurate one that fits. ``slimssl export RUN --max-macs 300M`` exports it."""

from __future__ import annotations

import logging
import math
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .errors import UsageError
from .eval.results import read_results, run_dir_of, stale_note, unfinished_note
from .layout import RESULTS, checkpoint_path
from .report.table import human, is_number

log = logging.getLogger("slimssl")

PREFERRED_METRICS = ("linear_top1", "knn_top1")  # the probe where it was run; kNN, which every run measures
UNITS = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}  # as the tables print counts (report.table.human)
NAMES = {"macs": "MACs", "params": "params"}


def parse_count(value: str | float) -> float:
    """A positive count of MACs or parameters: a number, or text such as ``300M``, ``1.5G``, ``11k`` or ``2e6``."""
    if is_number(value):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*([kMGT]?)\s*", str(value))
        try:  # in decimal: 4.1M is 4,100,000, not float's 4,099,999.9999999995
            number = float(Decimal(match.group(1)) * Decimal(int(UNITS[match.group(2)]))) if match else math.nan
        except InvalidOperation:  # "1.2.3"
            number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"expected a count > 0 such as 300M, 1.5G, 11k or 2e6, got {value!r}")
    return number


def pick_subnet(run: str | os.PathLike, *, max_macs: str | float | None = None, max_params: str | float | None = None,
                metric: str | None = None) -> dict[str, Any]:
    """The results.json row (subnet, width, depths, params, macs and the measured values) of the most accurate
    sub-network of ``run`` whose backbone fits within ``max_macs`` and ``max_params`` (counted as results.json
    and `slimssl profile` count them, at the run's resolution; numbers, or text such as ``"300M"``), with
    ``picked_by``: the metric it was ranked by.

    ``run`` is a run directory or its ``checkpoints/last.pt``, which results.json describes. ``metric`` is any
    accuracy of the rows (``knn_top1``, ``linear_top1``, ``finetune_10pct_top1``, ...); by default the one
    measured for the most sub-networks that fit, the linear probe's before the kNN's on equal counts. Those it
    was not measured for are left out, with a warning. Of equal accuracies the one with fewer MACs wins."""
    if max_macs is None and max_params is None:
        raise UsageError("give a budget: max_macs and/or max_params (--max-macs, --max-params)")
    limits = {key: parse_count(value) for key, value in (("macs", max_macs), ("params", max_params))
              if value is not None}
    if not Path(run).exists():
        raise UsageError(f"{run} does not exist; expected a run directory (or its checkpoints/last.pt)")
    run_dir = run_dir_of(run)
    if run_dir is None:
        raise UsageError(f"{run} is not a run directory or its checkpoints/last.pt: the accuracies a sub-network is "
                         "picked by are those of a run's results.json, which describes its last checkpoint")
    data = read_results(run_dir)
    rows = [row for row in data["subnets"] if all(is_number(row.get(key)) for key in limits)]
    if not rows:
        raise UsageError(f"{run_dir}/results.json holds no sub-network with its {' and '.join(limits)}")
    budget = " and ".join(f"{human(limit)} {NAMES[key]}" for key, limit in limits.items())
    fit = [row for row in rows if all(row[key] <= limit for key, limit in limits.items())]
    _warn_of_rounding(rows, fit, limits)
    if not fit:  # in full: the tables' rounding could print the budget and the smallest cost alike
        smallest = min(rows, key=lambda row: tuple(row[key] for key in limits))
        costs = " and ".join(f"{exact(smallest[key])} {NAMES[key]}" for key in limits)
        within = " and ".join(f"{exact(limit)} {NAMES[key]}" for key, limit in limits.items())
        raise UsageError(f"no sub-network of {run_dir} fits within {within}: the smallest, {smallest['subnet']}, "
                         f"has {costs}")
    if metric is not None and not str(metric).endswith(("_top1", "_top5")):
        raise UsageError(f"metric must be an accuracy such as knn_top1, linear_top1 or finetune_10pct_top1, got "
                         f"{metric!r}")
    metric = metric or max(PREFERRED_METRICS, key=lambda m: sum(is_number(row.get(m)) for row in fit))
    ranked = [row for row in fit if is_number(row.get(metric))]
    if not ranked:
        measured = sorted({key for row in data["subnets"] for key, v in row.items()
                           if key.endswith(("_top1", "_top5")) and is_number(v)})
        raise UsageError(f"{metric} is not measured for any sub-network of {run_dir} that fits within {budget}; "
                         f"measured: {', '.join(measured) or 'nothing'} (slimssl knn, linear or finetune RUN "
                         "measures them)")
    _warn_of_what_the_ranking_leaves(data, run_dir, fit, ranked, metric)
    best = max(ranked, key=lambda row: (row[metric], -row["macs"] if is_number(row.get("macs")) else -math.inf))
    log.info("picked %s within %s: %s %.2f, %s MACs, %s params (%d of %d sub-networks fit)", best["subnet"], budget,
             metric, best[metric], human(best.get("macs")), human(best.get("params")), len(fit), len(rows))
    return {**best, "picked_by": metric}


def exact(count: float) -> str:
    """A count in full, with the tables' rounding beside it: ``4,042,752 (4.04M)``."""
    digits = f"{int(count):,}" if float(count).is_integer() else f"{count:,.2f}"
    return digits if count < 1000 else f"{digits} ({human(count)})"


def _warn_of_rounding(rows: list[dict], fit: list[dict], limits: dict[str, float]) -> None:
    """A budget copied from a table (``4.04M``) is rounded: a sub-network that prints as the budget but counts
    a little more is left out, and said to be."""
    for row in (r for r in rows if r not in fit):
        over = [key for key, limit in limits.items() if row[key] > limit]
        if all(human(row[key]) == human(limits[key]) for key in over):
            log.warning("%s is left out: %s, over the budget only by the tables' rounding; give the exact count to "
                        "include it", row["subnet"], " and ".join(f"{exact(row[k])} {NAMES[k]} > {exact(limits[k])}"
                                                                   for k in over))


def _warn_of_what_the_ranking_leaves(data: dict, run_dir: Path, fit: list[dict], ranked: list[dict],
                                     metric: str) -> None:
    """Say which sub-networks that fit are not ranked, which were measured otherwise, and whether the values
    describe an earlier network than the run's last checkpoint."""
    unmeasured = [row["subnet"] for row in fit if row not in ranked]
    if unmeasured:
        log.warning("%s is not measured for %s, which fit too: left out of the choice", metric, ", ".join(unmeasured))
    protocol = metric.rsplit("_", 1)[0]  # knn_top1 -> knn: a row measured with other settings holds knn_settings
    other = [row["subnet"] for row in ranked if f"{protocol}_settings" in row]
    if other:
        log.warning("%s of %s was measured with other settings than the others' (their %s_settings in %s): "
                    "compared as it is", metric, ", ".join(other), protocol, RESULTS)
    note = unfinished_note(data)
    if note:
        log.warning("%s/%s holds values measured before pretraining ended (%s)", run_dir, RESULTS, note)
    from .checkpoint import checkpoint_epoch  # torch: not for parsing --max-macs (cli_args)

    stale = stale_note(run_dir, data, checkpoint_epoch(checkpoint_path(run_dir)))
    if stale:
        log.warning("%s", stale)
