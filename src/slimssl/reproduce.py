"""``slimssl reproduce``: the papers' central claim at CIFAR scale, measured end to end.

For every recipe, (a) the slimmable run pretrains the whole menu at once, and (b) every menu entry is
pretrained alone with the same method, data, epochs and batch (``standalone_config``). Every network is
then evaluated by kNN and by the linear probe. The report compares each width with its one-by-one
counterpart, and the pretraining time of (a) with the sum of (b).

Each job is an ordinary run directory (``OUT/<recipe>/slim``, ``OUT/<recipe>/alone-<subnet>``), so the
usual commands (``slimssl report``, ``knn``, ``linear``, ``pretrain --resume``) work on it. The command
resumes: a call pretrains one epoch at a time and stops starting new work once ``--time-budget`` seconds
have passed. It then exits with :data:`EXIT_CONTINUE`, and the same command continues where it stopped.
Pretraining seconds (training steps only, with CUDA synchronised before the clock is read) add up across
calls in ``timing.json`` in each run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import Config
from .eval.results import write_json_atomic
from .nn.spec import SubnetSpec
from .train.loop import Trainer

log = logging.getLogger("slimssl")

EXIT_CONTINUE = 4  # documented: the time budget ran out with work left; run the same command again
DEFAULT_RECIPES = ("cifar10_r18_dspnet_byol", "cifar10_r18_slimclr_mocov2")
DEFAULT_EPOCHS = 50
DEFAULT_PROBE_EPOCHS = 100
FULL_WIDTH_TOLERANCE = 1.0  # points: the slimmable full width may trail the one trained alone by this much
TIME_RATIO_GOAL = 0.60  # slimmable pretraining time / one-by-one pretraining time, at most
TIMING = "timing.json"
REPORT_MD = "reproduction.md"
REPORT_JSON = "reproduction.json"
# Applied to every recipe before --set. Periodic epoch_XXXX.pt files of ten 50-epoch runs would fill a
# disk; last.pt is all that resuming needs.
REPRODUCTION_DEFAULTS = ("train.checkpoint_every=0",)
METRICS = {"knn": "knn_top1", "linear": "linear_top1"}
# Settings a resumed call may see differently without mixing anything: data.workers defaults to the CPU count
# of the machine, and only the streaming loader (which the reproduction refuses) uses it.
RESUME_IGNORES = frozenset({"data.workers"})


# ---- the plan ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One pretraining run of the reproduction and the place it lives."""

    recipe: str  # the recipe's label: its file name without .yaml
    kind: str  # "slim" (the whole menu at once) or "alone" (one menu entry as its own network)
    spec: SubnetSpec  # the menu entry this run stands for (slim: the largest)
    cfg: Config
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.recipe}/{self.run_dir.name}"


def recipe_label(recipe: str) -> str:
    """``cifar10_r18_dspnet_byol``, ``cifar10_r18_dspnet_byol.yaml`` and ``path/to/it.yaml`` share a label."""
    return Path(recipe).stem


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """The --set list every recipe gets: reproduction defaults, default epochs, --set, then the flags
    (so an explicit flag wins, as in ``slimssl pretrain``)."""
    from .train.command import flag_overrides

    return [*REPRODUCTION_DEFAULTS, f"train.epochs={DEFAULT_EPOCHS}", *flag_overrides(args)]


def plan_jobs(recipes: list[str], out: Path, overrides: list[str]) -> list[Job]:
    """Recipe by recipe, the slimmable run first, then one run per menu entry (largest first), so that a
    partial reproduction already holds complete comparisons of the first recipe."""
    from .errors import UsageError
    from .config import load_config, standalone_config

    labels = [recipe_label(r) for r in recipes]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--recipes names the same recipe twice: {', '.join(recipes)}")
    jobs = []
    for recipe, label in zip(recipes, labels):
        cfg = load_config(recipe, overrides)
        if cfg.data.loader != "memory":  # a streamed run skips kNN: half of the comparison would be missing
            raise UsageError(f"recipe {recipe}: data.loader is {cfg.data.loader!r}, but the reproduction compares "
                             "kNN, which needs the images in memory: use data.loader=memory")
        menu = cfg.subnet_menu()
        jobs.append(Job(label, "slim", menu.largest, cfg, out / label / "slim"))
        for spec in menu:
            jobs.append(Job(label, "alone", spec, standalone_config(cfg, spec), out / label / f"alone-{spec.name}"))
    return jobs


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved: Config, planned: Config) -> list[str]:
    """``key: saved X, now Y`` for every setting that differs (dotted keys, e.g. ``train.epochs``), except
    the machine-dependent :data:`RESUME_IGNORES`."""
    a, b = _flatten(saved.model_dump(mode="json")), _flatten(planned.model_dump(mode="json"))
    keys = sorted((set(a) | set(b)) - RESUME_IGNORES)
    return [f"{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_saved_configs(jobs: list[Job]) -> None:
    """Refuse to continue runs that were started with other settings (before any work starts)."""
    import yaml

    from .errors import UsageError
    from .config import config_from_dict

    for job in jobs:
        path = job.run_dir / "config.yaml"
        if not path.is_file():
            continue
        saved = config_from_dict(yaml.safe_load(path.read_text()), str(path))
        diffs = config_differences(saved, job.cfg)
        if diffs:
            raise UsageError(
                f"{job.run_dir} holds a run started with other settings than this command asks for:\n  "
                + "\n  ".join(diffs)
                + "\nrun the same command as before (same --epochs, --batch-size, --data, --device, --set), "
                  "or choose another --out")


# ---- per-job state -----------------------------------------------------------------------------------

@dataclass
class JobTiming:
    """Seconds a job has cost so far, accumulated over calls (``RUN/timing.json``)."""

    pretrain_seconds: float = 0.0  # training steps only: the number the comparison uses
    eval_seconds: float = 0.0  # kNN and profiling done during pretraining
    checkpoint_seconds: float = 0.0  # writing checkpoints
    setup_seconds: float = 0.0  # building the trainer: data, model, resuming (once per call)
    probe_seconds: float = 0.0  # the linear probe
    step: int = 0  # the training step the times above reach
    chunks: int = 0
    devices: list[str] = field(default_factory=list)


def read_timing(run_dir: Path) -> JobTiming:
    path = run_dir / TIMING
    if not path.is_file():
        return JobTiming()
    known = JobTiming.__dataclass_fields__
    return JobTiming(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def write_timing(run_dir: Path, timing: JobTiming) -> None:
    write_json_atomic(run_dir / TIMING, asdict(timing))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_pretrained(job: Job) -> bool:
    """Trainer.finish wrote results.json (with ``steps``; an evaluation command on a partial run writes
    results.json too, without it)."""
    path = job.run_dir / "results.json"
    return path.is_file() and "steps" in json.loads(path.read_text())


# ---- the budget of one call --------------------------------------------------------------------------

class Budget:
    """Units of work (an epoch of pretraining, one linear probe) of this call: the first always runs,
    later ones only start while ``seconds`` have not passed, so every call makes progress."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start, self.units = seconds, time.perf_counter(), 0

    def allows(self) -> bool:
        return self.seconds is None or self.units == 0 or time.perf_counter() - self.start < self.seconds

    def used(self) -> None:
        self.units += 1


# ---- pretraining -------------------------------------------------------------------------------------

class TimedTrainer(Trainer):
    """A Trainer that times its evaluation (kNN, the final profile) and checkpoint writing apart, so what
    remains of a chunk's wall time is training steps."""

    def __init__(self, *args, **kwargs):
        self.apart = {"eval": 0.0, "checkpoint": 0.0}
        self._timing_apart = False
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def _timed_apart(self, kind: str) -> Iterator[None]:
        if self._timing_apart:  # finish() runs knn(): count it once
            yield
            return
        self._timing_apart = True
        _sync(self.device)  # the training work queued so far belongs to training
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.apart[kind] += time.perf_counter() - start
            self._timing_apart = False

    def knn(self) -> dict[str, float]:
        with self._timed_apart("eval"):
            return super().knn()

    def finish(self) -> dict:
        with self._timed_apart("eval"):
            return super().finish()

    def save(self, name: str = "last.pt"):
        with self._timed_apart("checkpoint"):
            return super().save(name)


def run_chunk(trainer: TimedTrainer, timing: JobTiming, run_dir: Path) -> dict:
    """Train one epoch (or up to the end) and add its seconds to ``timing``; the results when finished."""
    end = min(trainer.state.step + trainer.steps_per_epoch, trainer.total_steps)
    before = dict(trainer.apart)
    _sync(trainer.device)
    start = time.perf_counter()
    try:
        return trainer.fit(max_steps=end)
    finally:  # an interrupted chunk's seconds count too: its steps were saved
        _sync(trainer.device)
        wall = time.perf_counter() - start
        apart = {k: trainer.apart[k] - before[k] for k in before}
        timing.pretrain_seconds += wall - sum(apart.values())
        timing.eval_seconds += apart["eval"]
        timing.checkpoint_seconds += apart["checkpoint"]
        timing.step, timing.chunks = trainer.state.step, timing.chunks + 1
        write_timing(run_dir, timing)


def pretrain_job(job: Job, budget: Budget) -> bool:
    """Pretrain ``job`` epoch by epoch while the budget allows; True once its results.json exists."""
    from .train.command import lr_header

    if is_pretrained(job):
        return True
    if not budget.allows():
        return False
    job.run_dir.mkdir(parents=True, exist_ok=True)
    config_file = job.run_dir / "config.yaml"
    if not config_file.is_file():
        config_file.write_text(lr_header(job.cfg, 1) + job.cfg.to_yaml())
    resume = (job.run_dir / "checkpoints" / "last.pt").is_file()
    timing = read_timing(job.run_dir)
    start = time.perf_counter()
    trainer = TimedTrainer(job.cfg, job.run_dir, resume=resume)
    timing.setup_seconds += time.perf_counter() - start
    name = device_name(trainer.device)
    if name not in timing.devices:
        timing.devices.append(name)
    if timing.step != trainer.state.step:
        log.warning("%s: timing.json reached step %d, the checkpoint step %d: the seconds of the steps in "
                    "between (a call killed after saving) are not counted", job.label, timing.step, trainer.state.step)
    log.info("%s: pretraining from step %d of %d", job.label, trainer.state.step, trainer.total_steps)
    while budget.allows():
        results = run_chunk(trainer, timing, job.run_dir)
        budget.used()
        if results:
            log.info("%s: pretrained in %.1f s", job.label, timing.pretrain_seconds)
            return True
    trainer.metrics.close()  # finish() closes it on a completed run
    return False


# ---- the linear probe --------------------------------------------------------------------------------

def probe_settings(cfg: Config, epochs: int) -> dict:
    """What ``slimssl linear`` stores under protocols.linear: per-sub-network heads, cached features."""
    from .eval.linear import DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_RECALIBRATE_BATCHES

    return {"data": cfg.data.source, "epochs": epochs, "lr": DEFAULT_LR, "batch_size": DEFAULT_BATCH_SIZE,
            "optimizer": "sgd momentum 0.9, cosine, no weight decay", "standardized_features": True,
            "distill": False, "shared_head": False, "augment": False, "seed": 0,
            "recalibrate_bn": 0 if cfg.model.bn == "private" else DEFAULT_RECALIBRATE_BATCHES,
            "resolution": cfg.data.resolution}


def is_probed(job: Job, settings: dict) -> bool:
    from .eval.results import read_results

    data = read_results(job.run_dir)
    return (data.get("protocols", {}).get("linear") == settings
            and all(row.get("linear_top1") is not None for row in data["subnets"]))


class LabelledData:
    """Train and test splits per data config, loaded once per call and shared by the probes."""

    def __init__(self):
        self._splits: dict[tuple, tuple] = {}

    def splits(self, cfg: Config):
        from .errors import UsageError
        from .data.datasets import load_dataset

        d = cfg.data
        key = (d.source, d.resolution, d.fake_size, d.skip_unreadable, cfg.train.seed)
        if key not in self._splits:
            kw = dict(resolution=d.resolution, skip_unreadable=d.skip_unreadable, fake_size=d.fake_size,
                      seed=cfg.train.seed)
            train, test = (load_dataset(d.source, split, **kw) for split in ("train", "test"))
            if train.labels is None or test.labels is None:
                raise UsageError(f"data {d.source!r} has no labels (a folder without class sub-folders): the "
                                 "reproduction evaluates by kNN and linear probe, so it needs a labelled dataset")
            self._splits[key] = train, test
        return self._splits[key]


def probe_job(job: Job, budget: Budget, epochs: int, data: LabelledData) -> bool:
    """Linear probe of a pretrained job into its results.json (``linear_top1``); True once stored."""
    from .checkpoint import load_supernet
    from .eval.linear import linear_probe_subnets
    from .eval.results import merge_results
    from .train.loop import pick_device

    settings = probe_settings(job.cfg, epochs)
    if is_probed(job, settings):
        return True
    if not budget.allows():
        return False
    supernet, cfg = load_supernet(job.run_dir)
    device = pick_device(cfg.train.device)
    train, test = data.splits(cfg)
    _sync(device)
    start = time.perf_counter()
    results = linear_probe_subnets(
        supernet, train, test, resolution=cfg.data.resolution, mean=cfg.data.mean, std=cfg.data.std,
        epochs=epochs, lr=settings["lr"], batch_size=settings["batch_size"], device=device, seed=settings["seed"],
        feature_batch_size=cfg.eval.batch_size, recalibrate_batches=settings["recalibrate_bn"])
    _sync(device)
    timing = read_timing(job.run_dir)
    timing.probe_seconds += time.perf_counter() - start
    write_timing(job.run_dir, timing)
    values = {name: {"linear_top1": r["top1"], "linear_top5": r["top5"]} for name, r in results.items()}
    merge_results(job.run_dir, values, protocol="linear", settings=settings)
    budget.used()
    log.info("%s: linear probe %s", job.label, ", ".join(f"{n}={r['top1']:.2f}" for n, r in results.items()))
    return True


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
    gap = (target - value) if at_least else (value - target)
    return {"goal": goal, "subnet": subnet, "value": value, "target": target, "held": gap <= 0,
            "short_by": max(0.0, gap)}


def goals(rows: list[dict], time_ratio: float | None) -> list[dict]:
    """The issue's goals: full width within 1 point of alone; every smaller entry at least as good as
    alone (kNN and linear); slimmable pretraining at most 60% of the one-by-one time."""
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


def recipe_summary(recipe: str, jobs: list[Job]) -> dict:
    from .eval.results import read_results

    slim_job = next(j for j in jobs if j.kind == "slim")
    alone_jobs = [j for j in jobs if j.kind == "alone"]
    slim = read_results(slim_job.run_dir)
    alone = {j.spec.name: read_results(j.run_dir)["subnets"][0] for j in alone_jobs}
    rows = comparison_rows(slim, alone)
    timings = {j.label: read_timing(j.run_dir) for j in jobs}
    slim_seconds = timings[slim_job.label].pretrain_seconds
    alone_seconds = sum(timings[j.label].pretrain_seconds for j in alone_jobs)
    ratio = slim_seconds / alone_seconds if alone_seconds > 0 else None
    devices = sorted({d for t in timings.values() for d in t.devices})
    return {"recipe": recipe, "method": slim_job.cfg.method.name, "menu": [r["subnet"] for r in rows],
            "epochs": slim_job.cfg.train.epochs, "batch_size": slim_job.cfg.train.batch_size,
            "data": slim_job.cfg.data.source, "rows": rows,
            "time": {"slim_pretrain_seconds": slim_seconds, "alone_pretrain_seconds": alone_seconds,
                     "ratio": ratio,
                     "per_run": {label: asdict(t) for label, t in timings.items()}},
            "devices": devices, "goals": goals(rows, ratio),
            "run_dirs": {"slim": str(slim_job.run_dir), **{j.spec.name: str(j.run_dir) for j in alone_jobs}}}


def plot_recipe(summary: dict, out: Path) -> list[str]:
    """Accuracy against MACs, slimmable and alone, per metric; skipped (logged) without matplotlib."""
    from .report.plot import PlotError, plot_accuracy_vs_macs

    files = []
    for short, key in METRICS.items():
        series = [{"run": label, "subnets": [{"subnet": r["subnet"], "macs": r["macs"], key: r[f"{short}_{part}"]}
                                             for r in summary["rows"]]}
                  for label, part in (("slimmable (one run)", "slim"), ("pretrained alone", "alone"))]
        path = out / f"{summary['recipe']}_{key}_vs_macs.png"
        try:
            plot_accuracy_vs_macs(series, key, path, title=summary["recipe"])
        except PlotError as e:
            log.warning("plot %s skipped: %s", path.name, e)
            continue
        files.append(path.name)
    return files


def software() -> dict:
    from . import __version__

    return {"slimssl": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}


def write_report(out: Path, jobs: list[Job], probe_epochs: int) -> dict:
    recipes = list(dict.fromkeys(j.recipe for j in jobs))
    summaries = [recipe_summary(r, [j for j in jobs if j.recipe == r]) for r in recipes]
    for summary in summaries:
        summary["plots"] = plot_recipe(summary, out)
    doc = {"complete": True, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "software": software(), "devices": sorted({d for s in summaries for d in s["devices"]}),
           "probe": {"protocol": "linear", **probe_settings(jobs[0].cfg, probe_epochs)},
           "knn": {"k": jobs[0].cfg.eval.knn_k, "temperature": jobs[0].cfg.eval.knn_temperature},
           "goals_targets": {"full_width_tolerance_points": FULL_WIDTH_TOLERANCE, "time_ratio": TIME_RATIO_GOAL},
           "recipes": summaries}
    doc["all_goals_held"] = all(g["held"] for s in summaries for g in s["goals"])
    write_json_atomic(out / REPORT_JSON, doc)
    (out / REPORT_MD).write_text(report_markdown(doc))
    return doc


# ---- Markdown ----------------------------------------------------------------------------------------

def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _seconds(s: float) -> str:
    return f"{s:,.0f} s ({s / 60:.1f} min)" if s >= 60 else f"{s:.1f} s"


def comparison_table(rows: list[dict]) -> str:
    from .report.table import human

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
    lines = ["| run | steps | pretraining | img/s | device |", "|---|---:|---:|---:|---|"]
    for label, t in summary["time"]["per_run"].items():
        seconds = t["pretrain_seconds"]
        rate = f"{t['step'] * summary['batch_size'] / seconds:,.0f}" if seconds > 0 else "-"
        lines.append(f"| {label.split('/', 1)[-1]} | {t['step']} | {_seconds(seconds)} | {rate} | "
                     f"{', '.join(t['devices']) or '-'} |")
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
        "# Reproduction: slimmable pretraining against networks pretrained one by one", "",
        f"- Date: {doc['created']}",
        f"- Software: slimssl {sw['slimssl']}, torch {sw['torch']}"
        + (f" (CUDA {sw['cuda']})" if sw["cuda"] else "") + f", Python {sw['python']}",
        f"- Device(s) of the pretraining: {', '.join(doc['devices']) or 'unknown'}",
        f"- kNN: k={doc['knn']['k']}, T={doc['knn']['temperature']:g}, train split as the bank, test split as queries",
        f"- Linear probe: one head per sub-network, frozen backbone, cached features without augmentation, "
        f"{probe['epochs']} epochs, SGD lr {probe['lr']:g} cosine, batch {probe['batch_size']}",
        "- Pretraining time: wall-clock seconds of the training steps (CUDA synchronised), without kNN, "
        "checkpoint writing and set-up; summed over calls",
    ]
    if len(doc["devices"]) > 1:
        lines.append("- **Warning:** the runs used different devices, so their times do not compare")
    for s in doc["recipes"]:
        t = s["time"]
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines += ["", f"## {s['recipe']}", "",
                  f"{s['method']}, {s['epochs']} epochs, batch {s['batch_size']}, data {s['data']}.", "",
                  comparison_table(s["rows"]), "",
                  f"- Pretraining time (a), the slimmable run: {_seconds(t['slim_pretrain_seconds'])}",
                  f"- Pretraining time (b), the {len(s['rows'])} runs alone together: "
                  f"{_seconds(t['alone_pretrain_seconds'])}",
                  f"- Ratio a / b: {ratio} (goal: at most {TIME_RATIO_GOAL:.2f})", "",
                  timing_table(s), "",
                  "Goals:", "", *(_goal_line(g) for g in s["goals"])]
        lines += ["", *(f"![{p}]({p})" for p in s["plots"])] if s["plots"] else []
    verdict = "All goals hold." if doc["all_goals_held"] else "Not every goal holds (see above)."
    lines += ["", f"**{verdict}**", ""]
    return "\n".join(lines)


# ---- the command -------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="slimmable vs one-by-one pretraining on CIFAR-10: pretrain, evaluate, compare (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For each recipe, pretrain (a) the slimmable network and (b) each menu entry alone with\n"
                    "the same method, epochs and batch; evaluate every network by kNN and linear probe; write\n"
                    "OUT/reproduction.md, OUT/reproduction.json and accuracy-vs-MACs plots.\n"
                    "Run the same command again to continue an unfinished reproduction (see docs/results.md).",
        epilog=f"exit codes:\n  0  done: the report is written (again, if it was already)\n"
               f"  {EXIT_CONTINUE}  the --time-budget ran out with work left: run the same command again\n"
               "  3  stopped by SIGTERM/SIGINT after saving: run the same command again\n"
               "  2  bad arguments, or settings that differ from the runs already in --out")
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                   help="comma-separated shipped config names or YAML paths (default: %(default)s)")
    p.add_argument("--data", help="dataset name or path for every recipe (default: the recipes' data.source)")
    p.add_argument("--out", required=True, type=Path, help="folder of the runs and the report")
    p.add_argument("--epochs", type=int, help=f"pretraining epochs of every run (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=int, help="total batch of every run (default: the recipe's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help=f"start no new epoch or probe after SECONDS of this call and exit {EXIT_CONTINUE} "
                        "(the first one always runs); default: run to the end")
    p.add_argument("--probe-epochs", type=int, default=DEFAULT_PROBE_EPOCHS, help="linear probe epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of every recipe (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print reproduction.json on stdout (or the progress, when work is left)")
    p.set_defaults(func=cmd_reproduce)


def _check_args(args: argparse.Namespace) -> None:
    from .errors import UsageError

    if args.time_budget is not None and args.time_budget < 0:
        raise UsageError(f"--time-budget must be >= 0 seconds, got {args.time_budget:g}")
    if args.probe_epochs < 1:
        raise UsageError(f"--probe-epochs must be >= 1, got {args.probe_epochs}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")


def restart_if_checkpoint_lost(job: Job, probe_epochs: int) -> None:
    """A job that is not finished (pretrained and probed) but whose ``last.pt`` is gone starts again.

    That happens when a reproduction travels between machines without its checkpoints (they are large;
    the finished runs' results are all the report needs). The lost run's times, logs and partial results
    are removed, so that they are not counted twice."""
    import shutil

    if not job.run_dir.is_dir() or (job.run_dir / "checkpoints" / "last.pt").is_file():
        return
    if is_pretrained(job) and is_probed(job, probe_settings(job.cfg, probe_epochs)):
        return
    lost = [p for p in (TIMING, "metrics.jsonl", "results.json", "tb") if (job.run_dir / p).exists()]
    if not lost:
        return
    log.warning("%s: not finished and its checkpoint is gone: starting it again (removing %s)", job.label,
                ", ".join(lost))
    for name in lost:
        path = job.run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_jobs(jobs: list[Job], budget: Budget, probe_epochs: int) -> int:
    """Pretrain and probe the jobs in order while the budget lasts; the number of jobs done."""
    data = LabelledData()
    done = 0
    for job in jobs:
        restart_if_checkpoint_lost(job, probe_epochs)
        if not (pretrain_job(job, budget) and probe_job(job, budget, probe_epochs, data)):
            break
        done += 1
    return done


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .cli import _emit
    from .train.loop import EXIT_INTERRUPTED, Interrupted

    _check_args(args)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    jobs = plan_jobs(recipes, args.out, recipe_overrides(args))
    check_saved_configs(jobs)
    budget = Budget(args.time_budget)
    try:
        done = run_jobs(jobs, budget, args.probe_epochs)
    except Interrupted as e:
        log.warning("%s", e)
        log.warning("reproduction interrupted; run the same command again to continue")
        return EXIT_INTERRUPTED
    log.info("this call: %d units of work in %.1f s", budget.units, time.perf_counter() - budget.start)
    if done < len(jobs):
        log.warning("%d of %d jobs done; run the same command again to continue", done, len(jobs))
        status = {"complete": False, "jobs_done": done, "jobs_total": len(jobs),
                  "jobs": [{"run": j.label, "pretrained": is_pretrained(j)} for j in jobs]}
        if args.json:
            _emit(args, status, "")
        return EXIT_CONTINUE
    doc = write_report(args.out, jobs, args.probe_epochs)
    log.info("wrote %s and %s", args.out / REPORT_MD, args.out / REPORT_JSON)
    _emit(args, doc, report_markdown(doc))
    return 0
