"""LARS, parameter groups and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimssl.config import config_from_dict
from slimssl.train.optim import LARS, build_optimizer, lr_at, param_groups, scaled_lr


def _params():
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    return w, b


def test_param_groups_split_off_1d_params():
    w, b = _params()
    groups = param_groups([("w", w), ("b", b)], weight_decay=0.1, no_decay_1d=True)
    assert groups[0]["params"] == [w] and groups[0]["weight_decay"] == 0.1 and not groups[0]["lars_exclude"]
    assert groups[1]["params"] == [b] and groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]
    one = param_groups([("w", w), ("b", b)], weight_decay=0.1, no_decay_1d=False)
    assert len(one) == 1 and one[0]["params"] == [w, b]


def test_lars_step_matches_hand_computation():
    w, b = _params()
    lr, wd, eta, mom = 0.5, 0.1, 0.001, 0.9
    opt = LARS(param_groups([("w", w), ("b", b)], wd, True), lr=lr, momentum=mom, trust_coefficient=eta)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    gb = torch.tensor([0.5, 2.0])
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    # weights: decayed gradient g' = g + wd * w, scaled by eta * |w| / |g'|
    g1 = gw + wd * w0  # [[1.3, 2], [2, 0.4]]
    ratio1 = eta * 5.0 / math.sqrt(1.3 ** 2 + 2 ** 2 + 2 ** 2 + 0.4 ** 2)
    expected_w = w0 - lr * ratio1 * g1
    torch.testing.assert_close(w.detach(), expected_w, atol=1e-7, rtol=1e-6)
    # 1-d: plain SGD with momentum, no decay, no trust ratio
    torch.testing.assert_close(b.detach(), b0 - lr * gb)

    # a second step exercises the momentum buffer
    w.grad, b.grad = gw.clone(), gb.clone()
    w1, b1 = w.detach().clone(), b.detach().clone()
    opt.step()
    g2 = gw + wd * w1
    ratio2 = eta * w1.norm() / g2.norm()
    buf = mom * ratio1 * g1 + ratio2 * g2
    torch.testing.assert_close(w.detach(), w1 - lr * buf, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(b.detach(), b1 - lr * (mom * gb + gb))


@pytest.mark.parametrize("lr, clipped", [(0.5, False), (0.001, True)])
def test_lars_clip_caps_each_layers_step_at_lr(lr, clipped):
    w, _ = _params()
    eta = 0.02
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars_exclude": False}], lr=lr, momentum=0.9,
               trust_coefficient=eta, clip=True)
    w0, g = w.detach().clone(), torch.tensor([[1.0, 2.0], [2.0, 0.0]])  # |g| = 3, eta * |w| / |g| = 0.0333
    w.grad = g.clone()
    opt.step()
    # LARC: the step is min(eta * |w| / |g|, lr) times g; lr no longer multiplies the trust ratio
    scale = lr if clipped else eta * 5.0 / 3.0
    torch.testing.assert_close(w.detach(), w0 - scale * g)


def test_lars_options_come_from_the_config():
    net = nn.Linear(3, 4)
    cfg = config_from_dict({"optim": {"name": "lars", "trust_coefficient": 0.02, "lars_clip": True}}).optim
    opt = build_optimizer(cfg, list(net.named_parameters()), 0.3)
    assert opt.param_groups[0]["trust_coefficient"] == 0.02 and opt.param_groups[0]["clip"] is True
    # an optimiser state saved before the option existed loads as unclipped
    saved = opt.state_dict()
    del saved["param_groups"][0]["clip"]
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["clip"] is False


@pytest.mark.parametrize("lr, clip", [(0.1, False), (2.0, True)])
def test_lars_trust_ratio_is_one_for_zero_weights_and_skips_params_without_grad(lr, clip):
    z = nn.Parameter(torch.zeros(2, 2))
    idle = nn.Parameter(torch.ones(2, 2))
    opt = LARS([{"params": [z, idle], "weight_decay": 0.0, "lars_exclude": False}], lr=lr, momentum=0.9, clip=clip)
    z.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(z.detach(), torch.full((2, 2), -lr))  # plain SGD, clipped or not
    assert torch.equal(idle.detach(), torch.ones(2, 2)) and idle not in opt.state


def test_build_optimizer_groups_per_optimizer():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    named = list(net.named_parameters())
    lars = build_optimizer(config_from_dict({"optim": {"name": "lars", "weight_decay": 1e-6}}).optim, named, 0.3)
    assert isinstance(lars, LARS)
    assert [g["lars_exclude"] for g in lars.param_groups] == [False, True]
    assert [len(g["params"]) for g in lars.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in lars.param_groups] == [1e-6, 0.0]
    assert all(g["lr"] == 0.3 for g in lars.param_groups)
    sgd = build_optimizer(config_from_dict({"optim": {"name": "sgd"}}).optim, named, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    adamw = build_optimizer(config_from_dict({"optim": {"name": "adamw"}}).optim, named, 0.1)
    assert isinstance(adamw, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.999) for g in adamw.param_groups)
    adamw = build_optimizer(config_from_dict({"optim": {"name": "adamw", "betas": [0.8, 0.99]}}).optim, named, 0.1)
    assert all(g["betas"] == (0.8, 0.99) for g in adamw.param_groups)
    momentum = build_optimizer(config_from_dict({"optim": {"name": "sgd", "momentum": 0.5}}).optim, named, 0.1)
    assert all(g["momentum"] == 0.5 for g in momentum.param_groups)


def test_lr_at_warmup_and_cosine_endpoints():
    peak = 2.0
    assert lr_at(0, 100, 10, peak) == pytest.approx(peak / 10)
    assert lr_at(4, 100, 10, peak) == pytest.approx(peak * 5 / 10)
    assert lr_at(9, 100, 10, peak) == pytest.approx(peak)
    assert lr_at(10, 100, 10, peak) == pytest.approx(peak)  # cosine starts at the peak
    assert lr_at(55, 100, 10, peak) == pytest.approx(peak / 2)  # half way through the decay
    assert lr_at(100, 100, 10, peak) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(100, 100, 10, peak, min_ratio=0.1) == pytest.approx(0.2)
    assert lr_at(500, 100, 10, peak, min_ratio=0.1) == pytest.approx(0.2)  # clamped past the end
    assert lr_at(0, 100, 0, peak) == pytest.approx(peak)
    assert lr_at(77, 100, 10, peak, schedule="constant") == peak
    values = [lr_at(s, 100, 10, peak) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)


def test_scaled_lr_linear_scaling():
    linear = config_from_dict({"optim": {"lr": 0.05, "reference_batch": 256}}).optim
    assert scaled_lr(0.05, linear, 512) == pytest.approx(0.1)
    assert scaled_lr(0.05, linear, 64) == pytest.approx(0.0125)
    none = config_from_dict({"optim": {"lr": 0.05, "lr_scaling": "none"}}).optim
    assert scaled_lr(0.05, none, 4096) == 0.05
