"""Loss weights of one's own (``slim.loss_weights``, docs/extending.md): a registered rule weighs each
sub-network's backward pass at every step, and a rule that returns something unusable is an error naming it."""

from __future__ import annotations

import math

import pytest
import torch

from slimssl.checkpoint import load_supernet
from slimssl.config import ConfigError, config_from_dict
from slimssl.errors import ExtensionError
from slimssl.slim import LOSS_WEIGHTS, register_loss_weights
from slimssl.slim.policy import SlimPolicy
from slimssl.train.loop import Trainer
from test_pretrain import snapshot, tiny


@pytest.fixture(autouse=True)
def registry():
    """Every test starts and ends with the built-in rules only."""
    saved = dict(LOSS_WEIGHTS)
    yield
    LOSS_WEIGHTS.clear()
    LOSS_WEIGHTS.update(saved)


def policy(total_steps=10, **slim) -> SlimPolicy:
    cfg = config_from_dict({"model": {"depths": [1, 1, 1, 1]}, "menu": {"widths": [1.0, 0.5, 0.25]}, "slim": slim})
    return SlimPolicy(cfg.slim, cfg.subnet_menu(), total_steps, seed=0)


def test_a_registered_rule_weighs_the_step_s_sub_networks_largest_first():
    calls = []

    @register_loss_weights("by_width")
    def by_width(specs, progress):
        calls.append(([s.width for s in specs], progress))
        return [s.width for s in specs]

    p = policy(total_steps=10, loss_weights="by_width", slow_start=0.2)
    assert [t.weight for t in p.plan(0)] == [1.0]  # slow start: the full network alone
    assert [(t.spec.width, t.weight) for t in p.plan(5)] == [(1.0, 1.0), (0.5, 0.5), (0.25, 0.25)]
    assert calls == [([1.0], 0.0), ([1.0, 0.5, 0.25], 0.5)]


def test_a_rule_of_one_s_own_trains_as_the_built_in_rule_it_equals(tmp_path):
    @register_loss_weights("full_dominates")
    def full_dominates(specs, progress):  # SlimCLR's rule, written again
        return [1 + sum(s.width for s in specs[1:])] + [1] * (len(specs) - 1)

    @register_loss_weights("full_only")
    def full_only(specs, progress):
        return [1] + [0] * (len(specs) - 1)

    def two_steps(rule: str) -> dict:
        trainer = Trainer(config_from_dict(tiny(slim={"loss_weights": rule})), tmp_path / rule)
        for step in range(2):
            trainer.train_step(step)
        return snapshot(trainer.model)

    builtin, own, only = two_steps("slimclr"), two_steps("full_dominates"), two_steps("full_only")
    assert all(torch.equal(builtin[k], own[k]) for k in builtin)
    assert any(not torch.equal(builtin[k], only[k]) for k in builtin)  # the weights do reach the gradients
    # a collaborator without the rule can still load the run's backbone (evaluation and export need no rule)
    trainer = Trainer(config_from_dict(tiny(slim={"loss_weights": "full_only"})), tmp_path / "saved")
    trainer.save()
    del LOSS_WEIGHTS["full_only"]
    supernet, stored = load_supernet(tmp_path / "saved")
    assert supernet.menu.largest.width == 1.0 and stored.slim.loss_weights == "full_only"


@pytest.mark.parametrize("returned, message", [
    ([1.0, 1.0], r"returned 2 weight\(s\) for the step's 3 sub-network\(s\) \(w1p0_d1-1-1-1, w0p5_d1-1-1-1, "
                 r"w0p25_d1-1-1-1\); expected one each"),
    ([1.0, -1.0, 1.0], "expected finite numbers >= 0"),
    ([1.0, math.nan, 1.0], "expected finite numbers >= 0"),
    ([True, 1.0, 1.0], "expected finite numbers >= 0"),
    (["1", 1.0, 1.0], "expected finite numbers >= 0"),
    (2.0, "returned 2.0; expected one weight per sub-network"),
    ([0, 0.0, 0], "weighs every sub-network of the step 0 .*the step would train nothing"),
])
def test_a_rule_that_returns_unusable_weights_is_named(returned, message):
    @register_loss_weights("broken")
    def broken(specs, progress):
        return returned

    with pytest.raises(ExtensionError, match=r"loss weights 'broken' \(test_loss_weights\..*broken\) .*" + message):
        policy(loss_weights="broken").plan(0)


def test_an_unknown_rule_is_a_config_error_that_lists_the_known_and_says_how_to_add_one():
    with pytest.raises(ConfigError, match=r"slim.loss_weights: unknown loss weights 'nope'; known: uniform, slimclr\. "
                                          r"A rule of your own must be registered first"):
        config_from_dict({"slim": {"loss_weights": "nope"}})
    assert config_from_dict({"slim": {"loss_weights": "nope"}}, stored=True).slim.loss_weights == "nope"


def test_a_name_held_by_another_function_is_refused_and_the_same_function_replaces_itself():
    def rule(specs, progress):
        return [1.0] * len(specs)

    register_loss_weights("mine")(rule)
    register_loss_weights("mine")(rule)  # a notebook cell run twice
    with pytest.raises(ExtensionError, match="loss weights 'uniform' are taken by slimssl.slim.weights.uniform"):
        register_loss_weights("uniform")(rule)
    with pytest.raises(ExtensionError, match="takes a name such as 'by_width'"):
        register_loss_weights("two words")
    with pytest.raises(ExtensionError, match="decorates a function"):
        register_loss_weights("number")(3)
