"""Operators per training step: what would become GPU kernel launches, counted on any machine.

At CIFAR scale on a GPU (32 px, a few hundred images), narrow sub-networks finish their arithmetic faster than
the host can launch their kernels, so the number of operators in a step bounds its speed there. This script
builds the recipe's real network on the CPU with a small batch of synthetic images, runs two warm-up steps, and
counts every ATen operator that does work in one more step (views, allocations and profiler markers are
left out). ``slice_backward`` launches two kernels on a GPU (a zero fill and a copy): the last column counts
it twice. Host synchronisations (a tensor read by Python) are counted apart: the step should have none.

    python benchmarks/step_ops.py cifar10_r18_dspnet_byol [--set KEY=VALUE ...] [--top 15] [--alone]

The counts do not depend on the batch or the resolution, only on the recipe and settings (a recipe's
BatchNorm groups, ``model.bn_group_size``, become groups of 8 of the small batch: as many operators).
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from slimssl.config import load_config
from slimssl.train.loop import Trainer

SMALL = ["train.device=cpu", "train.batch_size=16", "data.source=fake", "data.fake_size=64",
         "train.log_every=1000", "eval.knn_random_init=false"]
SYNC = "aten::_local_scalar_dense"  # .item(), float(tensor), bool(tensor)


class OperatorCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name  # without the overload: aten::add, not aten::add.Tensor
        if not (_is_view(func) or name.startswith(("aten::empty", "profiler::")) or name == "aten::lift_fresh"):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _is_view(func) -> bool:
    """An operator whose every output aliases an input without writing it (view, slice, transpose, ...): no work."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def count_step(cfg) -> tuple[collections.Counter, int]:
    """The operators of one training step of ``cfg`` after two warm-up steps, and its host synchronisations."""
    with tempfile.TemporaryDirectory() as run_dir, Trainer(cfg, run_dir) as trainer:
        for step in range(2):  # lazily built state (optimiser buffers, queues) out of the way
            trainer.train_step(step)
        with OperatorCount() as count:
            trainer.train_step(2)
    counts = count.counts
    return counts, counts.pop(SYNC, 0)


def kernels(counts: collections.Counter) -> int:
    return sum(counts.values()) + counts["aten::slice_backward"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a shipped recipe name or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--top", type=int, default=15, help="how many of the most frequent operators to list")
    parser.add_argument("--alone", action="store_true",
                        help="also count a step of each menu entry trained alone (the reproduction's one-by-one "
                             "runs) and print the time ratio a launch-bound GPU would give")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    # per-GPU BatchNorm groups of the small batch: as many operators as the recipe's groups of its batch
    groups = ["model.bn_group_size=8"] if cfg.model.bn_group_size else []
    cfg = load_config(args.config, SMALL + groups + args.set)
    counts, syncs = count_step(cfg)  # step 2: before a slow start lets the sub-networks in
    total = sum(counts.values())
    for name, n in counts.most_common(args.top):
        print(f"{n:6d}  {name}")
    print(f"\n{cfg.name}: {total} operators, {counts['aten::slice_backward']} of them slice_backward; "
          f"about {kernels(counts)} GPU kernels; {syncs} host synchronisations")
    if args.alone:
        compare_with_alone(cfg, kernels(counts))


def compare_with_alone(cfg, slim_kernels: int) -> None:
    """Kernels per step of the slimmable run against the menu's networks trained alone, and the time ratio
    (slimmable / alone together) if every kernel cost the same: the launch-bound end of the GPU's range."""
    from slimssl.config import standalone_config

    start = cfg.slim.slow_start
    if start:  # the step counted above ran the full network alone; every entry runs after the slow start
        joined = kernels(count_step(cfg.revalidated(["slim.slow_start=0.0"]))[0])
        per_step = start * slim_kernels + (1 - start) * joined
        print(f"slimmable: {slim_kernels} kernels per step in the first {start:.0%} (the full network alone), "
              f"{joined} after; {per_step:.0f} on average")
    else:
        per_step = slim_kernels
    alone = {spec.name: kernels(count_step(standalone_config(cfg, spec))[0]) for spec in cfg.subnet_menu()}
    for name, n in alone.items():
        print(f"alone {name}: {n} kernels per step")
    print(f"launch-bound time ratio, slimmable / alone together: {per_step:.0f} / {sum(alone.values())} = "
          f"{per_step / sum(alone.values()):.2f}")


if __name__ == "__main__":
    main()
