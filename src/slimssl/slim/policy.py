"""Which sub-networks run at a step, with what loss weight, and whether they distil from the full one.

Everything here is a pure function of (config, menu, step): every process draws the same sub-networks
without communicating, and a resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..nn.spec import Menu, SubnetSpec
from ..seeds import derived_generator
from .weights import loss_weights_rule, weigh

WIDTH_GRID = 0.05  # random widths of the "space" sampler are multiples of this


def check_every_entry_trains(cfg) -> None:
    """Refuse a run (``cfg``, a Config) whose sandwich draws none of the menu's entries between the largest and
    the smallest (``num_random`` 0) while each has private BatchNorm: those would stay as initialised, yet be
    evaluated and exported as pretrained. Checked by training, not by the config, so that a checkpoint saved with
    such a config still opens for evaluation and export."""
    from ..config import ConfigError

    s = cfg.slim
    if s.sampling != "sandwich" or s.random_space != "menu" or s.num_random or cfg.model.bn != "private":
        return
    never = list(cfg.subnet_menu())[1:-1]
    if never:
        raise ConfigError(
            f"slim.num_random 0 trains only the largest and the smallest of the menu each step, so "
            f"{', '.join(s.name for s in never)} would never be trained (their private BatchNorm never sees a "
            "batch): set slim.num_random to 1 or more, or slim.sampling to all (on a resume too: --set "
            "slim.num_random=1), or give a menu of those two alone")


@dataclass(frozen=True)
class SubnetTask:
    spec: SubnetSpec
    weight: float
    distill: bool  # mix in distillation from the full network's detached outputs
    teacher: bool = False  # the full network: its outputs are what the others distil from (it runs first)


def join_step(slow_start: float, total_steps: int) -> int:
    """The first step that trains the sub-networks (slow start: the full network alone before it)."""
    return math.floor(round(slow_start * total_steps, 6))  # 0.29 * 100 is 28.999...: step 29


class SlimPolicy:
    def __init__(self, cfg, menu: Menu, total_steps: int, seed: int):
        self.cfg, self.menu, self.total_steps, self.seed = cfg, menu, total_steps, seed
        self.join_step = join_step(cfg.slow_start, total_steps)
        loss_weights_rule(cfg.loss_weights)  # an unknown rule fails now, not at the first step

    def joined(self, step: int) -> bool:
        """Whether the sub-networks train at ``step`` (slow start: only the full network before that)."""
        return step >= self.join_step

    def draw(self, step: int) -> list[SubnetSpec]:
        """The sub-networks of ``step``, largest first (it is the teacher of online distillation)."""
        if not self.joined(step):
            return [self.menu.largest]
        if self.cfg.sampling == "all":
            return list(self.menu)
        gen = derived_generator(self.seed, "subnet_draw", step)
        picks = [self.menu.largest, self.menu.smallest]
        if self.cfg.random_space == "menu":
            middle = list(self.menu[1:-1])
            order = torch.randperm(len(middle), generator=gen).tolist()
            picks += [middle[i] for i in order[: self.cfg.num_random]]
        else:
            picks += [self._random_spec(gen) for _ in range(self.cfg.num_random)]
        unique = list(dict.fromkeys(picks))
        return [unique[0], *sorted(unique[1:], reverse=True)]  # larger first, as the menu

    def _random_spec(self, gen: torch.Generator) -> SubnetSpec:
        """A sub-network inside the menu's range: a width on a grid between its narrowest and widest entries, and
        per stage a depth between the fewest and the most blocks any entry has there (a menu need not cross
        widths with depths: its narrowest entry may be its deepest)."""
        lo, hi = self.menu.smallest, self.menu.largest
        steps = int(round((hi.width - lo.width) / WIDTH_GRID))
        width = lo.width + WIDTH_GRID * int(torch.randint(0, steps + 1, (), generator=gen))
        per_stage = list(zip(*(s.depths for s in self.menu)))
        depths = tuple(int(torch.randint(min(d), max(d) + 1, (), generator=gen)) for d in per_stage)
        return SubnetSpec(min(width, hi.width), depths)

    def plan(self, step: int) -> list[SubnetTask]:
        """The sub-networks of ``step`` with their loss weights (``slim.loss_weights``) and distillation roles."""
        specs = self.draw(step)
        weights = weigh(self.cfg.loss_weights, specs, step / max(1, self.total_steps))
        online = self.cfg.teacher == "online"
        return [SubnetTask(spec, weight, distill=online and i > 0, teacher=online and i == 0)
                for i, (spec, weight) in enumerate(zip(specs, weights))]
