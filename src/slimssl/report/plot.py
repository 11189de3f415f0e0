"""Figures: accuracy against MACs per run, and the gradient-imbalance diagnostic.

matplotlib is an optional dependency (the ``plot`` extra). Figures are drawn on the Agg
canvas directly, without pyplot, so nothing changes the caller's matplotlib backend (figure.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence, Union

from ..atomic import atomic_write
from ..errors import UsageError
from ..eval.results import unfinished_note
from .report import run_title
from .table import is_number

log = logging.getLogger("slimssl")


class PlotError(UsageError):
    """A plot that cannot be drawn: matplotlib missing, or no data for the asked metric."""


def _figure(figsize=(6.4, 4.4)):
    try:
        from .figure import ReportFigure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'matplotlib>=3.6' (the plot extra)") from None
    return ReportFigure(figsize=figsize, layout="constrained")


def _save(fig, path: str | Path | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as file:  # a full disk leaves no half-written image, and names the file
            fig.savefig(file, dpi=150, format=Path(path).suffix.lstrip(".").lower())


METRIC_LABELS = {"knn_top1": "kNN top-1 (%)", "linear_top1": "linear probe top-1 (%)",
                 "linear_top5": "linear probe top-5 (%)", "finetune_1pct_top1": "fine-tune 1% labels top-1 (%)",
                 "finetune_10pct_top1": "fine-tune 10% labels top-1 (%)",
                 "knn_top1_random_init": "kNN top-1, random init (%)"}


def accuracy_points(result: Mapping, metric: str) -> list[tuple[float, float, str]]:
    """(macs, value, subnet) of every sub-network of a run that has ``metric``, by increasing MACs."""
    points = [(float(r["macs"]), float(r[metric]), r["subnet"]) for r in result.get("subnets", [])
              if is_number(r.get(metric)) and is_number(r.get("macs")) and r["macs"] > 0]
    return sorted(points)


def plot_accuracy_vs_macs(results: Sequence[Mapping], metric: str = "knn_top1", path: str | Path | None = None,
                          title: str | None = None, join_singles: str | None = None):
    """One line with a marker per sub-network for every run (log-scale MACs on x, ``metric`` on y); a run whose
    menu crosses widths with depths gets one line per depth, in one colour.

    ``join_singles``: draw the runs with a single sub-network (networks pretrained one by one) as one
    line with this label instead of one marker each. Returns the matplotlib Figure (saved to ``path``).
    """
    series: list[tuple[str, list[tuple[float, float, str]]]] = []
    singles: list[tuple[float, float, str]] = []
    joined: list[Mapping] = []
    for result in results:
        points = accuracy_points(result, metric)
        if not points:
            log.warning("run %s has no %s values with MACs; not drawn", result.get("run", "?"), metric)
            continue
        if join_singles and len(result.get("subnets", [])) == 1:
            singles += points
            joined.append(result)
        else:
            series.append((run_title(result), points))
    if singles:
        series.append((_joined_label(join_singles, joined), sorted(singles)))
    if not series:
        available = sorted({k for r in results for row in r.get("subnets", []) for k, v in row.items()
                            if is_number(v) and k not in ("params", "macs", "width")})
        raise PlotError(f"no run has values of {metric!r} with MACs; metrics found: {', '.join(available) or 'none'}")
    fig = _figure()
    ax = fig.add_subplot()
    markers, styles = "osD^vP*Xh<>", ("-", "--", ":", "-.")
    for i, (label, points) in enumerate(series):
        by_depth = _by_depth(points)
        for j, (depths, line) in enumerate(by_depth.items()):  # a width x depth menu: one line per depth
            macs, values, _ = zip(*line)
            ax.plot(macs, values, marker=markers[i % len(markers)], linestyle=styles[j % len(styles)],
                    color=f"C{i % 10}", label=label if len(by_depth) == 1 else f"{label}, {depths}")
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    _save(fig, path)
    return fig


RunDirs = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def plot_runs(runs: RunDirs, metric: str = "knn_top1", path: str | Path | None = None, *, title: str | None = None,
              join_singles: str | None = None):
    """The figure of ``slimssl report RUN... --plot``: accuracy against MACs of each run's results.json.

    ``runs`` is a run directory (a path, or the :class:`~slimssl.PretrainRun` pretraining returned) or a list of
    them; a run not measured yet (no results.json) is left out, with a warning, as the report leaves it out.
    Returns the matplotlib Figure (a notebook shows it), saved to ``path`` as the suffix says (.png, .pdf, .svg).
    """
    from .report import load_runs, with_results

    run_dirs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    if not run_dirs:
        raise PlotError("no run to plot: give a run directory, or a list of them")
    return plot_accuracy_vs_macs(load_runs(with_results(run_dirs)), metric, path, title=title,
                                 join_singles=join_singles)


def _by_depth(points: list[tuple[float, float, str]]) -> dict[str, list[tuple[float, float, str]]]:
    """``points`` split by their sub-networks' depths (``d2-2-2-2`` of ``w0p5_d2-2-2-2``), costliest first: a
    line joins the widths of one depth, not networks of other depths that happen to lie between them."""
    groups: dict[str, list[tuple[float, float, str]]] = {}
    for point in points:
        groups.setdefault(point[2].partition("_")[2], []).append(point)
    return dict(sorted(groups.items(), key=lambda item: -max(p[0] for p in item[1])))


def _joined_label(label: str, joined: Sequence[Mapping]) -> str:
    """The legend of the runs drawn as one line: ``label``, marked unfinished where one of them is; a warning when
    they were measured at other resolutions or on other data, whose points then do not belong on one line."""
    sizes = {r.get("resolution") for r in joined}
    data = {json.dumps(((r.get("config") or {}).get("data") or {}).get("source")) for r in joined}
    if len(sizes) > 1 or len(data) > 1:
        log.warning("--join-singles %s: the runs joined were pretrained at other resolutions or on other data "
                    "(%s); their points do not belong on one line", label,
                    ", ".join(f"{r.get('run', '?')}: {r.get('resolution')} px" for r in joined))
    unfinished = [r.get("run", "?") for r in joined if unfinished_note(r)]
    return label + (f" (unfinished: {', '.join(unfinished)})" if unfinished else "")


def plot_grad_norms(series_by_run: Mapping[str, Mapping[str, Mapping[str, list]]], path: str | Path | None = None):
    """The gradient-imbalance diagnostic: per run and sub-network, the gradient norm its loss puts on the
    weights shared with the smaller sub-networks and on the rest, over training steps (two panels)."""
    if not any(series_by_run.values()):
        raise PlotError("no grad_norm records in metrics.jsonl of the runs")
    fig = _figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharex=True)
    for run, series in series_by_run.items():
        for subnet, s in series.items():
            label = f"{run}: {subnet}" if len(series_by_run) > 1 else subnet
            for ax, part in zip(axes, ("shared", "rest")):
                ax.plot(s["step"], s[part], label=label)
    for ax, part in zip(axes, ("shared weights", "other weights")):
        ax.set_title(f"gradient norm on {part}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="x-small")
    _save(fig, path)
    return fig
