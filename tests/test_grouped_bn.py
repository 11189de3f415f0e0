"""Grouped BatchNorm (``model.bn_group_size``) and MoCo's shuffle-BN (``method.shuffle_bn``).

Grouped BatchNorm must behave exactly like one BatchNorm per group of consecutive samples (as if each group
sat on its own GPU); shuffle-BN must give every key the statistics of the group its shuffled position puts
it in, and hand the keys back in the batch's order. 1-vs-2-process equality is in test_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimssl.config import ConfigError, config_from_dict
from slimssl.nn.layers import SlimBatchNorm, SlimState, bind_state, grouped_batch_norm
from slimssl.nn.spec import Menu, SubnetSpec
from slimssl.seeds import derived_generator
from slimssl.train import distributed as dist
from slimssl.train.loop import Trainer

from test_pretrain import tiny


def per_group_reference(bn: nn.Module, x: torch.Tensor, size: int):
    """One fresh copy of ``bn`` per group: outputs concatenated, running statistics averaged."""
    copies = [copy.deepcopy(bn) for _ in range(len(x) // size)]
    out = torch.cat([b(chunk) for b, chunk in zip(copies, x.split(size))])
    mean = torch.stack([b.running_mean for b in copies]).mean(0)
    var = torch.stack([b.running_var for b in copies]).mean(0)
    return out, mean, var


@pytest.mark.parametrize("shape,channels_last", [((12, 5, 3, 3), False), ((12, 5, 3, 3), True), ((12, 5), False)])
def test_grouped_batch_norm_is_one_batch_norm_per_group(shape, channels_last):
    torch.manual_seed(0)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(5)
    nn.init.uniform_(bn.weight, 0.5, 2.0)
    nn.init.normal_(bn.bias)
    x = torch.randn(shape) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grouped = copy.deepcopy(bn)
    out = grouped_batch_norm(grouped, x, 4)
    ref, mean, var = per_group_reference(bn, x, 4)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grouped.running_mean, mean)
    torch.testing.assert_close(grouped.running_var, var)
    assert int(grouped.num_batches_tracked) == 1
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), x)
    torch.testing.assert_close(grad, grad_ref)
    # the groups really are separate: one BatchNorm over the whole batch gives something else
    assert not torch.allclose(out, copy.deepcopy(bn)(x), atol=1e-3)


def bound_norm(subnets=None) -> tuple[SlimBatchNorm, SlimState]:
    full = SubnetSpec(1.0, (1,))
    state = SlimState(full, Menu([full, SubnetSpec(0.5, (1,))]), private_bn=subnets is not None)
    norm = SlimBatchNorm(6, subnets=subnets)
    bind_state(norm, state)
    return norm, state


def test_shared_batch_norm_groups_its_leading_channels_and_eval_ignores_groups():
    norm, state = bound_norm()
    state.bn_group_size = 4
    x = torch.randn(8, 3, 2, 2)  # half width: the leading 3 of 6 channels
    reference = nn.BatchNorm2d(3)
    ref, mean, _ = per_group_reference(reference, x, 4)
    torch.testing.assert_close(norm(x), ref)
    torch.testing.assert_close(norm.bn.running_mean[:3], mean)
    assert torch.equal(norm.bn.running_mean[3:], torch.zeros(3))
    norm.eval()  # inference uses the running statistics, whatever the group size
    torch.testing.assert_close(norm(x), nn.functional.batch_norm(
        x, norm.bn.running_mean[:3], norm.bn.running_var[:3], norm.bn.weight[:3], norm.bn.bias[:3], False))


def test_grouped_batch_norm_with_momentum_none_keeps_the_average_of_every_batch():
    """momentum None (what BatchNorm recalibration sets): a cumulative average, as without groups."""
    bn = nn.BatchNorm2d(3, momentum=None)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 2, 2, generator=gen) * (i + 1) + i for i in range(4)]
    for x in batches:
        grouped_batch_norm(bn, x, 4)
    means = [per_group_reference(nn.BatchNorm2d(3, momentum=1.0), x, 4)[1] for x in batches]  # each batch's own
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))


def test_recalibration_of_a_model_with_groups_gives_the_statistics_it_gives_without():
    """The kNN monitor of a run with model.bn_group_size recalibrates shared BatchNorm as `slimssl knn` does."""
    from slimssl.models.resnet import SlimResNet
    from slimssl.nn.slimmable import recalibrate_bn

    torch.manual_seed(0)
    plain = SlimResNet("basic", (1, 1, 1, 1), 4, "cifar", menu=[SubnetSpec(1.0, (1,) * 4), SubnetSpec(0.5, (1,) * 4)],
                       bn="shared")
    grouped = copy.deepcopy(plain)
    grouped.slim_state.bn_group_size = 4
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 8, 8, generator=gen) + i for i in range(5)]
    for model in (plain, grouped):
        recalibrate_bn(model, "0.5", batches)
    torch.testing.assert_close(grouped.bn1.bn.running_mean, plain.bn1.bn.running_mean)


def test_private_batch_norm_groups_and_a_batch_no_larger_than_a_group_is_plain():
    norm, state = bound_norm({"w1p0_d1": 6, "w0p5_d1": 3})
    x = torch.randn(8, 6, 2, 2)
    state.bn_group_size = 8  # one group: plain BatchNorm
    torch.testing.assert_close(norm(x), copy.deepcopy(norm.bns["w1p0_d1"])(x))
    state.bn_group_size = 2
    ref, _, _ = per_group_reference(norm.bns["w1p0_d1"], x, 2)
    torch.testing.assert_close(norm(x), ref)
    with pytest.raises(ValueError, match="bn_group_size 3 must divide the batch of 8"):
        state.bn_group_size = 3
        norm(x)


def test_shuffled_forward_runs_the_shuffled_batch_and_restores_the_order():
    x = torch.arange(12.0).view(6, 2)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    seen = []

    def fn(batch):
        seen.append(batch.clone())
        return batch - batch.mean(0)  # depends on which rows share the batch, like BatchNorm

    out = dist.shuffled_forward(fn, x, order)
    assert torch.equal(seen[0], x[order])
    expected = torch.empty_like(x)
    expected[order] = fn(x[order])
    torch.testing.assert_close(out, expected)


def grouped_trainer(tmp_path, method="mocov2", group=4, shuffle=True) -> Trainer:
    cfg = tiny(method, train={"batch_size": 16})
    cfg["model"]["bn_group_size"] = group
    cfg["method"]["shuffle_bn"] = shuffle
    return Trainer(config_from_dict(cfg), tmp_path)


def test_each_key_is_normalised_with_the_group_its_shuffled_position_gives_it(tmp_path):
    trainer = grouped_trainer(tmp_path)
    trainer.model.train()
    v1, _ = trainer.views(0)
    keys = trainer.key_forward(v1, 0, 0)
    order = torch.randperm(16, generator=derived_generator(trainer.cfg.train.seed, "shuffle_bn", 0, 0))
    target = copy.deepcopy(trainer.model)
    target.slim_state.bn_group_size = None  # each group run on its own, as a GPU holding it would
    for group in order.view(4, 4):
        torch.testing.assert_close(keys[group], target.target_forward(v1[group]), rtol=1e-4, atol=1e-5)
    # not what the online network's groups (consecutive samples) would give
    assert not torch.allclose(keys, trainer.model.target_forward(v1), atol=1e-3)
    # the other view and the next step draw other orders
    assert not torch.allclose(trainer.key_forward(v1, 0, 1), keys, atol=1e-3)
    assert not torch.allclose(trainer.key_forward(v1, 1, 0), keys, atol=1e-3)


def assert_trains_and_resumes(trainer: Trainer) -> None:
    """A first step with finite losses, saved; the run resumed from it takes the second step as ``trainer`` does."""
    losses = trainer.train_step(0).losses
    assert all(torch.isfinite(v) for v in losses.values())
    trainer.save()
    with Trainer(trainer.cfg, trainer.run_dir, resume=True) as resumed:
        a, b = trainer.train_step(1).losses, resumed.train_step(1).losses
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_grouped_pretraining_trains_and_resumes(tmp_path):
    with grouped_trainer(tmp_path) as trainer:
        assert_trains_and_resumes(trainer)


def test_bad_group_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs the batch normalised in several groups"):
        grouped_trainer(tmp_path, group=None)
    cfg = tiny("mocov2", train={"batch_size": 16})
    with pytest.raises(ConfigError, match="bn_group_size 5 must divide train.batch_size 16"):
        config_from_dict({**cfg, "model": {**cfg["model"], "bn_group_size": 5}})
    with pytest.raises(ConfigError, match="either sync_bn or grouped BatchNorm"):
        config_from_dict({**cfg, "model": {**cfg["model"], "bn_group_size": 4},
                          "train": {**cfg["train"], "sync_bn": True}})
    with pytest.raises(ConfigError, match="bn_group_size"):
        config_from_dict({**cfg, "model": {**cfg["model"], "bn_group_size": 1}})
