"""The jobs of a reproduction: per recipe, the slimmable run and one run per menu entry alone."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..config import (MACHINE_DEPENDENT, Config, check_processes, config_differences, load_config,
                      standalone_config)
from ..errors import UsageError
from ..layout import CONFIG
from ..nn.spec import SubnetSpec
from ..slim.policy import check_every_entry_trains
from ..train.command import flag_overrides
from ..train.prepare import refuse_run_in_data
from . import DEFAULT_EPOCHS

# Applied to every recipe before --set. Periodic epoch_XXXX.pt files of ten 50-epoch runs would fill a
# disk; last.pt is all that resuming needs. The comparison uses the kNN at the end of each run; periodic kNN
# would take call time that a 50-epoch run must finish in (docs/results.md).
REPRODUCTION_DEFAULTS = ("train.checkpoint_every=0", "train.knn_every=0")


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
    return [*REPRODUCTION_DEFAULTS, f"train.epochs={DEFAULT_EPOCHS}", *flag_overrides(args)]


def plan_jobs(recipes: list[str], out: Path, overrides: list[str]) -> list[Job]:
    """Recipe by recipe, the slimmable run first, then one run per menu entry (largest first), so that a
    partial reproduction already holds complete comparisons of the first recipe."""
    labels = [recipe_label(r) for r in recipes]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--recipes names the same recipe twice: {', '.join(recipes)}")
    jobs = []
    for recipe, label in zip(recipes, labels):
        cfg = load_config(recipe, overrides)
        if cfg.data.loader != "memory":  # CIFAR-10 fits in memory, and the probes read it from there
            raise UsageError(f"recipe {recipe}: data.loader is {cfg.data.loader!r}, but the reproduction is built "
                             "for data decoded in memory (its linear probes read it so): use data.loader=memory")
        menu = cfg.subnet_menu()
        jobs.append(Job(label, "slim", menu.largest, cfg, out / label / "slim"))
        for spec in menu:
            jobs.append(Job(label, "alone", spec, standalone_config(cfg, spec), out / label / f"alone-{spec.name}"))
    for job in jobs:  # what a trainer would refuse, refused before the first run trains rather than when its turn comes
        check_processes(job.cfg, 1, f"of {job.run_dir.parent.name}/{job.run_dir.name}")
        check_every_entry_trains(job.cfg)
        refuse_run_in_data(job.run_dir, job.cfg.data.source)
    return jobs


def check_saved_configs(jobs: list[Job]) -> None:
    """Refuse to continue runs that were started with other settings (before any work starts)."""
    for job in jobs:
        path = job.run_dir / CONFIG
        if not path.is_file():
            continue
        saved = load_config(path, stored=True)  # a ConfigError names the file if it is damaged
        diffs = config_differences(saved, job.cfg, ignore=MACHINE_DEPENDENT)
        if diffs:
            raise UsageError(
                f"{job.run_dir} holds a run started with other settings than this command asks for:\n  "
                + "\n  ".join(diffs)
                + "\nrun the same command as before (same --epochs, --batch-size, --data, --device, --set), "
                  "with --set KEY=VALUE for a setting the recipe itself has changed since (docs/recipes.md lists the "
                  "changes), or choose another --out")

