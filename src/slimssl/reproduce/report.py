"""The comparison of a finished reproduction: per width, slimmable against alone; the time ratio; the
goals; ``reproduction.json``, ``reproduction.md`` and the plots."""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__
from ..atomic import write_json_atomic
from ..errors import UsageError
from ..eval.results import read_results
from ..report.plot import PlotError, plot_accuracy_vs_macs
from ..report.table import human
from ..wording import counted
from . import REPORT_HEADING, REPORT_JSON, REPORT_MD
from .plan import Job
from .run import probe_settings
from .timing import read_timing

log = logging.getLogger("slimssl")

FULL_WIDTH_TOLERANCE = 1.0  # points: the slimmable full width may trail the one trained alone by this much
TIME_RATIO_GOAL = 0.60  # slimmable pretraining time / one-by-one pretraining time, at most
METRICS = {"knn": "knn_top1", "linear": "linear_top1"}


# ---- the comparison ----------------------------------------------------------------------------------

def _delta(slim: float | None, alone: float | None) -> float | None:
    return None if slim is None or alone is None else slim - alone


def comparison_rows(slim: dict, alone_by_subnet: dict[str, dict]) -> list[dict]:
    """One row per menu entry: cost, then kNN and linear top-1 of the slimmable run and of the run alone."""
    rows = []
    for s in slim["subnets"]:
        a = alone_by_subnet[s["subnet"]]
        row = {"subnet": s["subnet"], "params": s["params"], "macs": s["macs"]}
        for short, key in METRICS.items():
            row[f"{short}_slim"], row[f"{short}_alone"] = s.get(key), a.get(key)
            row[f"{short}_delta"] = _delta(s.get(key), a.get(key))
        if (a.get("params"), a.get("macs")) != (s["params"], s["macs"]):
            log.warning("%s alone has %s params / %s MACs, the slimmable sub-network %s / %s", s["subnet"],
                        a.get("params"), a.get("macs"), s["params"], s["macs"])
        rows.append(row)
    return rows


def _goal(goal: str, value: float | None, target: float | None, at_least: bool, subnet: str | None = None) -> dict:
    """Whether ``value >= target`` (``at_least``) or ``value <= target`` holds, and by how much it falls
    short; ``held`` is None when either number is missing."""
    if value is None or target is None:
        return {"goal": goal, "subnet": subnet, "value": value, "target": target, "held": None, "short_by": None}
    # accuracies come as float32 percentages (80.05 is 80.04999542...): a gap is judged to 1e-4 points, so
    # exactly 1 point behind is within 1 point
    gap = round((target - value) if at_least else (value - target), 4)
    return {"goal": goal, "subnet": subnet, "value": value, "target": target, "held": gap <= 0,
            "short_by": max(0.0, gap)}


def goals(rows: list[dict], time_ratio: float | None) -> list[dict]:
    """The goals the reproduction is held to (docs/results.md): full width within 1 point of alone; every
    smaller entry at least as good as alone (kNN and linear); slimmable pretraining at most 60% of the
    one-by-one time."""
    out = []
    full, smaller = rows[0], rows[1:]  # the menu's largest entry comes first
    for short in METRICS:
        alone = full[f"{short}_alone"]
        out.append(_goal(f"{short}: full width within {FULL_WIDTH_TOLERANCE:g} point of alone",
                         full[f"{short}_slim"], None if alone is None else alone - FULL_WIDTH_TOLERANCE,
                         True, full["subnet"]))
        out += [_goal(f"{short}: {row['subnet']} at least as good as alone", row[f"{short}_slim"],
                      row[f"{short}_alone"], True, row["subnet"]) for row in smaller]
    out.append(_goal(f"pretraining time slimmable / one-by-one <= {TIME_RATIO_GOAL:.2f}", time_ratio,
                     TIME_RATIO_GOAL, False))
    return out


def comparable_knn(recipe: str, results: dict[str, dict]) -> dict:
    """The kNN settings that every run of ``recipe`` (``results``: each run's results.json, by label) was measured
    with: the same for all, each run's sub-networks alike, after pretraining. Runs in ``--out`` are ordinary run
    directories, so ``slimssl knn`` may have measured one again otherwise since; the report would compare those."""
    problems = [f"{label}: some sub-networks were measured with other settings than the rest (knn_settings)"
                for label, data in results.items() if any("knn_settings" in row for row in data["subnets"])]
    problems += [f"{label}: its kNN was measured before pretraining ended" for label, data in results.items()
                 if "knn" in (data.get("unfinished") or {})]
    settings = {label: data.get("protocols", {}).get("knn") for label, data in results.items()}
    if len({json.dumps(s, sort_keys=True) for s in settings.values()}) > 1:
        problems += [f"{label}: measured with {s}" for label, s in settings.items()]
    if problems:
        raise UsageError(f"{recipe}: the kNN numbers of its runs do not compare:\n  " + "\n  ".join(problems)
                         + "\nmeasure each run again alike (slimssl knn RUN, with its defaults), or choose another "
                         "--out")
    return next(iter(settings.values())) or {}


def recipe_summary(recipe: str, jobs: list[Job]) -> dict:
    slim_job = next(j for j in jobs if j.kind == "slim")
    alone_jobs = [j for j in jobs if j.kind == "alone"]
    results = {j.label: read_results(j.run_dir) for j in jobs}
    knn = comparable_knn(recipe, results)
    slim = results[slim_job.label]
    alone = {j.spec.name: results[j.label]["subnets"][0] for j in alone_jobs}
    rows = comparison_rows(slim, alone)
    timings = {j.label: read_timing(j.run_dir) for j in jobs}
    slim_seconds = timings[slim_job.label].pretrain_seconds
    alone_seconds = sum(timings[j.label].pretrain_seconds for j in alone_jobs)
    ratio = slim_seconds / alone_seconds if alone_seconds > 0 else None
    devices = sorted({d for t in timings.values() for d in t.devices})
    why_not = time_not_compared(timings, {label: data.get("steps") for label, data in results.items()}, devices)
    if why_not:
        log.warning("%s: the pretraining times are not compared: %s", recipe, why_not)
    return {"recipe": recipe, "method": slim_job.cfg.method.name, "menu": [r["subnet"] for r in rows],
            "epochs": slim_job.cfg.train.epochs, "batch_size": slim_job.cfg.train.batch_size,
            "data": slim_job.cfg.data.source, "resolution": slim_job.cfg.data.resolution,
            "knn": {key: knn.get(key) for key in ("k", "temperature", "crop_ratio")}, "rows": rows,
            "time": {"slim_pretrain_seconds": slim_seconds, "alone_pretrain_seconds": alone_seconds,
                     "ratio": ratio, "not_compared": why_not,
                     "per_run": {label: asdict(t) for label, t in timings.items()}},
            "devices": devices, "goals": goals(rows, None if why_not else ratio),
            "run_dirs": {"slim": str(slim_job.run_dir), **{j.spec.name: str(j.run_dir) for j in alone_jobs}}}


def time_not_compared(timings: dict, steps: dict[str, int | None], devices: list[str]) -> str | None:
    """Why the runs' pretraining seconds do not give the time goal a verdict, or None when they do: a run whose
    timing.json does not cover every step it trained (left out of a copy, or a run pretrained elsewhere) counts
    too few seconds, and seconds of different devices do not add up to one cost."""
    short = [f"{label} ({t.step - t.steps_not_timed} of {steps[label]} steps)" for label, t in timings.items()
             if steps[label] is None or t.step - t.steps_not_timed < steps[label]]
    if short:
        return "timing.json covers fewer steps than the run trained: " + ", ".join(short)
    if len(devices) > 1:
        return f"the runs were pretrained on different devices ({', '.join(devices)})"
    return None


def plot_name(recipe: str, key: str) -> str:
    """The file of a recipe's plot of ``key`` (a value of METRICS) against MACs."""
    return f"{recipe}_{key}_vs_macs.png"


def plot_recipe(summary: dict, out: Path) -> list[str]:
    """Accuracy against MACs, slimmable and alone, per metric; skipped (logged) without matplotlib."""
    files = []
    for short, key in METRICS.items():
        series = [{"run": label, "subnets": [{"subnet": r["subnet"], "macs": r["macs"], key: r[f"{short}_{part}"]}
                                             for r in summary["rows"]]}
                  for label, part in (("slimmable (one run)", "slim"), ("pretrained alone", "alone"))]
        path = out / plot_name(summary["recipe"], key)
        try:
            plot_accuracy_vs_macs(series, key, path, title=summary["recipe"])
        except PlotError as e:
            log.warning("plot %s skipped: %s", path.name, e)
            continue
        files.append(path.name)
    return files


def software() -> dict:
    return {"slimssl": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}


def write_report(out: Path, jobs: list[Job], probe_epochs: int) -> dict:
    recipes = list(dict.fromkeys(j.recipe for j in jobs))
    summaries = [recipe_summary(r, [j for j in jobs if j.recipe == r]) for r in recipes]
    for summary in summaries:
        summary["plots"] = plot_recipe(summary, out)
    doc = {"complete": True, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "software": software(), "devices": sorted({d for s in summaries for d in s["devices"]}),
           # what the runs were pretrained with (timing.json), which may be another machine's than this report's
           "pretraining_software": sorted({name for s in summaries for t in s["time"]["per_run"].values()
                                           for name in t["software"]}),
           "probe": {"protocol": "linear", **probe_settings(jobs[0].cfg, probe_epochs)},
           "goals_targets": {"full_width_tolerance_points": FULL_WIDTH_TOLERANCE, "time_ratio": TIME_RATIO_GOAL},
           "recipes": summaries}
    doc["all_goals_held"] = all(g["held"] for s in summaries for g in s["goals"])
    write_json_atomic(out / REPORT_JSON, doc)
    (out / REPORT_MD).write_text(report_markdown(doc), encoding="utf-8")
    return doc


# ---- Markdown ----------------------------------------------------------------------------------------

def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _seconds(s: float) -> str:
    return f"{s:,.0f} s ({s / 60:.1f} min)" if s >= 60 else f"{s:.1f} s"


def comparison_table(rows: list[dict]) -> str:
    lines = ["| subnet | params | MACs | kNN slim | kNN alone | Δ | linear slim | linear alone | Δ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["subnet"], human(r["params"]), human(r["macs"])]
        for short in METRICS:
            cells += [_num(r[f"{short}_slim"]), _num(r[f"{short}_alone"]), _num(r[f"{short}_delta"], signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(summary: dict) -> str:
    """Each run's pretraining seconds and throughput (images of the training steps per second)."""
    lines = ["| run | steps | pretraining | of which first steps | calls | img/s | device |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label, t in summary["time"]["per_run"].items():
        seconds = t["pretrain_seconds"]
        rate = f"{t['step'] * summary['batch_size'] / seconds:,.0f}" if seconds > 0 else "-"
        first = _seconds(t["first_step_seconds"]) if t.get("first_step_seconds") else "-"  # (not recorded before)
        lines.append(f"| {label.split('/', 1)[-1]} | {t['step']} | {_seconds(seconds)} | {first} | "
                     f"{t.get('calls') or '-'} | {rate} | {', '.join(t['devices']) or '-'} |")
    return "\n".join(lines)


def _goal_line(g: dict) -> str:
    if g["held"] is None:
        return f"- {g['goal']}: not measured"
    if g["goal"].startswith("pretraining time"):
        value = f"{g['value']:.2f}"
        miss = f"misses by {g['short_by']:.2f}"
    else:
        value = f"{g['value']:.2f} (needs {g['target']:.2f})"
        miss = f"misses by {g['short_by']:.2f} points"
    return f"- {g['goal']}: {value}: " + ("**held**" if g["held"] else f"**not held**, {miss}")


def report_markdown(doc: dict) -> str:
    sw = doc["software"]
    probe = doc["probe"]
    lines = [
        REPORT_HEADING, "",
        f"- Date: {doc['created']}",
        f"- Software of this report: slimssl {sw['slimssl']}, torch {sw['torch']}"
        + (f" (CUDA {sw['cuda']})" if sw["cuda"] else "") + f", Python {sw['python']}",
        f"- Device(s) of the pretraining: {', '.join(doc['devices']) or 'unknown'}",
        f"- Software of the pretraining: {'; '.join(doc.get('pretraining_software') or []) or 'not recorded'}",
        "- kNN: weighted vote of the k nearest train images (the bank) of each test image, at temperature T "
        "(each recipe's below)",
        f"- Linear probe: one head per sub-network, frozen backbone, cached features without augmentation, "
        f"{counted(probe['epochs'], 'epoch')}, SGD lr {probe['lr']:g} cosine, batch {probe['batch_size']}",
        "- Pretraining time: wall-clock seconds of the training steps (CUDA synchronised), without kNN, "
        "checkpoint writing and set-up; summed over calls",
    ]
    if len(doc["devices"]) > 1:
        lines.append("- **Warning:** the runs used different devices, so their times do not compare")
    for s in doc["recipes"]:
        t = s["time"]
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines += ["", f"## {s['recipe']}", "",
                  f"{s['method']}, {counted(s['epochs'], 'epoch')}, batch {s['batch_size']}, data {s['data']} at "
                  f"{s['resolution']} px (MACs per image at that size); kNN k={s['knn']['k']}, "
                  f"T={s['knn']['temperature']}, centre crop ratio {s['knn']['crop_ratio']}.", "",
                  comparison_table(s["rows"]), "",
                  f"- Pretraining time (a), the slimmable run: {_seconds(t['slim_pretrain_seconds'])}",
                  f"- Pretraining time (b), the {len(s['rows'])} runs alone together: "
                  f"{_seconds(t['alone_pretrain_seconds'])}",
                  f"- Ratio a / b: {ratio} (goal: at most {TIME_RATIO_GOAL:.2f})"
                  + (f"; **not compared**: {t['not_compared']}" if t.get("not_compared") else ""), "",
                  timing_table(s), "",
                  "Goals:", "", *(_goal_line(g) for g in s["goals"])]
        lines += ["", *(f"![{p}]({p})" for p in s["plots"])] if s["plots"] else []
    verdict = "All goals hold." if doc["all_goals_held"] else "Not every goal holds (see above)."
    lines += ["", f"**{verdict}**", ""]
    return "\n".join(lines)

