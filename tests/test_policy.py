"""SlimPolicy: which sub-networks run at a step, their loss weights and teachers."""

from __future__ import annotations

import pytest
import torch

from slimssl.config import config_from_dict
from slimssl.nn.spec import SubnetSpec
from slimssl.slim.policy import WIDTH_GRID, SlimPolicy

WIDTHS4 = [1.0, 0.75, 0.5, 0.25]


def policy(widths=WIDTHS4, total_steps=100, seed=0, depths=None, model_depths=(1, 1, 1, 1), **slim):
    menu = {"widths": widths}
    if depths is not None:
        menu["depths"] = depths
    # sub-networks outside the menu exist only with shared BatchNorm
    bn = "shared" if slim.get("random_space") == "space" else "private"
    cfg = config_from_dict({"model": {"depths": list(model_depths), "bn": bn}, "menu": menu, "slim": slim})
    return SlimPolicy(cfg.slim, cfg.subnet_menu(), total_steps, seed)


def widths(specs):
    return [s.width for s in specs]


def test_all_gives_the_whole_menu_largest_first():
    p = policy(widths=[0.25, 1.0, 0.5], sampling="all")
    for step in (0, 7, 99):
        assert widths(p.draw(step)) == [1.0, 0.5, 0.25]
        assert p.draw(step) == list(p.menu)


def test_sandwich_largest_smallest_and_distinct_random_middles():
    p = policy(widths=[1.0, 0.875, 0.75, 0.5, 0.375, 0.25], sampling="sandwich", num_random=2)
    middles = set()
    for step in range(40):
        drawn = p.draw(step)
        assert len(drawn) == 4 and len(set(drawn)) == 4
        assert drawn[0] == p.menu.largest and drawn[-1] == p.menu.smallest
        assert all(s in p.menu for s in drawn)
        assert widths(drawn) == sorted(widths(drawn), reverse=True)
        middles.add(tuple(drawn[1:-1]))
    assert len(middles) > 1  # varies across steps


def test_sandwich_runs_its_draws_in_the_menus_order_on_a_width_and_depth_menu():
    """Width first, then the number of blocks: the smallest entry is the one run last."""
    p = policy(widths=[1.0, 0.5], depths=[[2, 2, 2, 2], [2, 1, 1, 1], [1, 2, 2, 2]], model_depths=(2, 2, 2, 2),
               sampling="sandwich", num_random=4)
    drawn = p.draw(50)
    assert drawn == list(p.menu) and drawn[-1] == p.menu.smallest
    assert [s.name for s in drawn[-3:]] == ["w0p5_d2-2-2-2", "w0p5_d1-2-2-2", "w0p5_d2-1-1-1"]
    assert sorted(reversed(drawn), reverse=True) == drawn  # sorted() knows the same order


def test_sandwich_is_deterministic_in_seed_and_step():
    a = policy(sampling="sandwich", num_random=1, seed=3)
    b = policy(sampling="sandwich", num_random=1, seed=3)
    c = policy(sampling="sandwich", num_random=1, seed=4)
    draws_a = [a.draw(s) for s in range(30)]
    assert draws_a == [b.draw(s) for s in range(30)]
    assert draws_a == [a.draw(s) for s in range(30)]  # no hidden state: asking again gives the same
    assert draws_a != [c.draw(s) for s in range(30)]
    # a 4-entry menu with one random pick leaves exactly one middle entry out
    for drawn in draws_a:
        assert len(drawn) == 3
        assert len(set(p for p in a.menu) - set(drawn)) == 1


def test_sandwich_num_random_larger_than_middle_gives_whole_menu():
    p = policy(sampling="sandwich", num_random=5)
    assert p.draw(0) == list(p.menu)


def test_random_space_draws_valid_specs_between_smallest_and_largest():
    p = policy(widths=[1.0, 0.25], depths=[[2, 2, 2, 2], [1, 1, 1, 1]], model_depths=(2, 2, 2, 2),
               sampling="sandwich", num_random=2, random_space="space")
    lo, hi = p.menu.smallest, p.menu.largest
    assert lo == SubnetSpec(0.25, (1, 1, 1, 1)) and hi == SubnetSpec(1.0, (2, 2, 2, 2))
    seen_widths, seen_depths = set(), set()
    for step in range(50):
        drawn = p.draw(step)
        assert drawn[0] == hi and lo in drawn
        assert 2 <= len(drawn) <= 4 and len(set(drawn)) == len(drawn)
        for spec in drawn:
            assert lo.width <= spec.width <= hi.width
            k = spec.width / WIDTH_GRID
            assert abs(k - round(k)) < 1e-6, spec
            assert all(a <= d <= b for a, d, b in zip(lo.depths, spec.depths, hi.depths))
            spec.check_fits(hi.depths)
            seen_widths.add(spec.width)
            seen_depths.add(spec.depths)
    assert len(seen_widths) > 4 and len(seen_depths) > 4
    assert [p.draw(s) for s in range(10)] == [p.draw(s) for s in range(10)]
    # the random draws cover the whole grid in time, its ends too (shallower sub-networks at the full width)
    random_widths = {spec.width for step in range(400) for spec in p.draw(step)[1:] if spec != lo}
    assert random_widths == {round(0.25 + WIDTH_GRID * k, 2) for k in range(16)}


def test_random_space_covers_a_menu_that_does_not_cross_widths_with_depths():
    """The narrowest entry is full depth here, and the shallowest is half width: draws span both ranges."""
    cfg = config_from_dict({"model": {"depths": [2, 2, 2, 2], "bn": "shared"},
                            "menu": {"widths": [1.0, 0.25], "subnets": ["w0p5_d1-1-1-1"]},
                            "slim": {"sampling": "sandwich", "num_random": 2, "random_space": "space"}})
    p = SlimPolicy(cfg.slim, cfg.subnet_menu(), 100, 0)
    assert p.menu.smallest == SubnetSpec(0.25, (2, 2, 2, 2))
    drawn = {spec for step in range(50) for spec in p.draw(step)}
    assert {1, 2} <= {d for spec in drawn for d in spec.depths}  # one block per stage, as w0p5_d1-1-1-1 has
    assert min(s.width for s in drawn) == 0.25


def test_slow_start_only_the_full_network_before_join():
    p = policy(sampling="all", slow_start=0.5, total_steps=10)
    assert p.join_step == 5
    # the step the fraction names, not one before it through float rounding (0.29 * 100 = 28.999...)
    assert policy(sampling="all", slow_start=0.29, total_steps=100).join_step == 29
    assert policy(sampling="all", slow_start=0.5, total_steps=97 * 50).join_step == 2425
    for step in range(5):
        assert not p.joined(step)
        assert p.draw(step) == [p.menu.largest]
        assert [(t.spec, t.weight, t.distill) for t in p.plan(step)] == [(p.menu.largest, 1.0, False)]
    for step in (5, 9):
        assert p.joined(step)
        assert p.draw(step) == list(p.menu)
    s = policy(sampling="sandwich", num_random=1, slow_start=0.5, total_steps=10)
    assert s.draw(4) == [s.menu.largest] and len(s.draw(5)) == 3


def test_slimclr_loss_weights():
    p = policy(sampling="all", loss_weights="slimclr")
    assert [t.weight for t in p.plan(0)] == [2.5, 1.0, 1.0, 1.0]
    s = policy(sampling="sandwich", num_random=1, loss_weights="slimclr")
    for step in range(5):
        tasks = s.plan(step)
        assert tasks[0].weight == pytest.approx(1 + sum(t.spec.width for t in tasks[1:]))
        assert all(t.weight == 1.0 for t in tasks[1:])
    u = policy(sampling="all", loss_weights="uniform")
    assert [t.weight for t in u.plan(0)] == [1.0] * 4


@pytest.mark.parametrize("sampling", ["all", "sandwich"])
def test_online_teacher_distils_sub_networks_only(sampling):
    p = policy(sampling=sampling, num_random=1, teacher="online")
    for step in range(5):
        tasks = p.plan(step)
        assert tasks[0].spec == p.menu.largest and not tasks[0].distill
        assert all(t.distill for t in tasks[1:])
    t = policy(sampling=sampling, num_random=1, teacher="target")
    assert not any(task.distill for task in t.plan(0))


def test_the_runs_random_streams_never_share_a_seed():
    from slimssl.seeds import STREAMS, derived_generator, derived_seed

    seeds = [derived_seed(seed, stream, step) for seed in (0, 1) for stream in STREAMS for step in range(300)]
    assert len(set(seeds)) == len(seeds)  # e.g. the sub-network draw of step 31 is not the views' of step 1
    assert derived_seed(0, "shuffle_bn", 3, 0) != derived_seed(0, "shuffle_bn", 3, 1) != derived_seed(0, "shuffle_bn", 3)
    assert derived_seed(-1, "step_views", 5) == derived_seed(2**64 - 1, "step_views", 5)  # any int seed works
    a, b = derived_generator(7, "step_views", 2), derived_generator(7, "step_views", 2)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))  # a pure function of its inputs
