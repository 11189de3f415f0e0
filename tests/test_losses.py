"""The pure SSL losses against hand-computed values, and the methods' loss structure and state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimssl.config import config_from_dict
from slimssl.methods import build_method
from slimssl.methods.losses import (contrastive_loss, in_batch_logits, info_nce_logits, regression_loss,
                                    soft_cross_entropy)


def method(name: str, **kw):
    return build_method(config_from_dict({"method": {"name": name, **kw}}).method)


def unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


# ---- regression -----------------------------------------------------------------------------------------

def test_regression_loss_hand_values():
    p = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 1.0], [-5.0, 0.0], [0.0, 0.5]])
    # cosines: 1/sqrt(2), -1, 1 -> losses 2 - sqrt(2), 4, 0
    expected = ((2 - math.sqrt(2)) + 4 + 0) / 3
    assert regression_loss(p, z).item() == pytest.approx(expected, abs=1e-6)
    # scale invariant and symmetric in its arguments
    assert regression_loss(7 * p, z).item() == pytest.approx(expected, abs=1e-6)
    assert regression_loss(z, p).item() == pytest.approx(expected, abs=1e-6)


# ---- MoCo v2 logits -------------------------------------------------------------------------------------

def test_info_nce_logits_and_contrastive_loss_hand_values():
    tau = 0.5
    q = torch.tensor([unit(0), unit(90)]) * 3  # norms do not matter
    k = torch.tensor([unit(60), unit(90)]) * 0.5
    queue = torch.tensor([unit(180), unit(90)])
    logits = info_nce_logits(q, k, queue, tau)
    # row 0: cos(q0,k0)=0.5, cos(q0,queue)=(-1, 0); row 1: cos(q1,k1)=1, cos(q1,queue)=(0, 1)
    expected = torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 1.0]]) / tau
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    labels = torch.zeros(2, dtype=torch.long)
    row0 = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(-2.0) + math.exp(0.0)))
    row1 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(2.0)))
    assert contrastive_loss(logits, labels).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)


def test_info_nce_logits_without_queue_is_the_positive_only():
    q, k = torch.tensor([unit(0)]), torch.tensor([unit(60)])
    for queue in (None, torch.zeros(0, 2)):
        logits = info_nce_logits(q, k, queue, 0.25)
        assert logits.shape == (1, 1)
        assert logits.item() == pytest.approx(0.5 / 0.25, abs=1e-6)


# ---- MoCo v3 logits -------------------------------------------------------------------------------------

def test_in_batch_logits_hand_values_and_diagonal_labels():
    tau = 2.0
    q = torch.tensor([unit(0), unit(90)])
    keys = torch.tensor([unit(0), unit(45)]) * 4
    logits = in_batch_logits(q, keys, tau)
    c = math.sqrt(0.5)
    torch.testing.assert_close(logits, torch.tensor([[1.0, c], [0.0, c]]) / tau, atol=1e-6, rtol=0)
    # positives on the diagonal: labels = arange
    labels = torch.arange(2)
    row0 = -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(c / 2)))
    row1 = -math.log(math.exp(c / 2) / (math.exp(0.0) + math.exp(c / 2)))
    assert contrastive_loss(logits, labels).item() == pytest.approx((row0 + row1) / 2, abs=1e-6)


# ---- distillation ---------------------------------------------------------------------------------------

def test_contrastive_logits_stay_float32_inside_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, k, queue, keys = (torch.randn(n, 16, generator=g) for n in (8, 8, 64, 16))
    exact = info_nce_logits(q, k, F.normalize(queue, dim=1), 0.2), in_batch_logits(q, keys, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # where the training step computes them
        mixed = info_nce_logits(q, k, F.normalize(queue, dim=1), 0.2), in_batch_logits(q, keys, 0.2)
    for a, b in zip(mixed, exact):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_soft_cross_entropy_hand_value_with_temperature_squared():
    # student / T = [0, ln 3] -> probabilities (1/4, 3/4); teacher uniform
    t = 2.0
    student = torch.tensor([[0.0, 2 * math.log(3.0)]])
    teacher = torch.tensor([[5.0, 5.0]])
    ce = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(student, teacher, t).item() == pytest.approx(ce * t * t, abs=1e-6)
    # at T=1: student [0, 2 ln 3] -> (1/10, 9/10)
    ce1 = -(0.5 * math.log(0.1) + 0.5 * math.log(0.9))
    assert soft_cross_entropy(student, teacher, 1.0).item() == pytest.approx(ce1, abs=1e-6)


def test_soft_cross_entropy_equals_ce_for_one_hot_teacher():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=gen)
    labels = torch.tensor([0, 3, 6, 2, 2])
    teacher = F.one_hot(labels, 7).float() * 1e4  # softmax is one-hot to float precision
    assert soft_cross_entropy(student, teacher).item() == pytest.approx(F.cross_entropy(student, labels).item(),
                                                                       abs=1e-5)
    # and a one-hot-like teacher at temperature T gives T^2 * CE(student / T)
    t = 3.0
    assert soft_cross_entropy(student, teacher, t).item() == pytest.approx(
        t * t * F.cross_entropy(student / t, labels).item(), abs=1e-4)


def test_soft_cross_entropy_teacher_gets_no_gradient():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    soft_cross_entropy(student, teacher, 2.0).backward()
    assert student.grad is not None and teacher.grad is None


# ---- methods --------------------------------------------------------------------------------------------

def _views(n=4, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen) for _ in range(4)]


def test_byol_loss_is_symmetric_cross_view_regression():
    p1, p2, z1, z2 = _views()
    m = method("byol", proj_dim=6)
    out = m.loss([p1, p2], [z1, z2])
    expected = regression_loss(p1, z2) + regression_loss(p2, z1)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(m.loss([p2, p1], [z2, z1]).loss, expected)  # swapping both views
    assert len(out.distill_on) == 2 and out.distill_on[0] is p1 and out.distill_on[1] is p2
    # distillation regresses the (detached) teacher predictions, summed over the views
    s1 = p1.clone().requires_grad_()
    kd = m.distill([s1, p2], [z1.requires_grad_(), z2], 1.0)
    torch.testing.assert_close(kd, regression_loss(s1, z1) + regression_loss(p2, z2))
    kd.backward()
    assert s1.grad is not None and z1.grad is None


def test_mocov2_loss_symmetric_and_asymmetric():
    q1, q2, k1, k2 = _views()
    m = method("mocov2", proj_dim=6, queue_size=5, temperature=0.2)
    labels = torch.zeros(4, dtype=torch.long)
    out = m.loss([q1, q2], [k1, k2])
    expected = (contrastive_loss(info_nce_logits(q1, k2, m.queue, 0.2), labels)
                + contrastive_loss(info_nce_logits(q2, k1, m.queue, 0.2), labels))
    torch.testing.assert_close(out.loss, expected)
    assert len(out.distill_on) == 2 and out.distill_on[0].shape == (4, 1 + 5)
    asym = method("mocov2", proj_dim=6, queue_size=5, temperature=0.2, symmetric=False)
    asym.queue.copy_(m.queue)
    out = asym.loss([q1, q2], [k1, k2])
    torch.testing.assert_close(out.loss, contrastive_loss(info_nce_logits(q1, k2, m.queue, 0.2), labels))
    assert len(out.distill_on) == 1


@pytest.mark.parametrize("tau", [1.0, 0.2])
def test_mocov3_loss_symmetric_and_scaled_by_two_tau(tau):
    q1, q2, k1, k2 = _views()
    m = method("mocov3", proj_dim=6, temperature=tau)
    labels = torch.arange(4)
    ce = (contrastive_loss(in_batch_logits(q1, k2, tau), labels)
          + contrastive_loss(in_batch_logits(q2, k1, tau), labels))
    out = m.loss([q1, q2], [k1, k2])
    torch.testing.assert_close(out.loss, ce * 2 * tau)
    torch.testing.assert_close(m.loss([q2, q1], [k2, k1]).loss, out.loss)
    assert [lg.shape for lg in out.distill_on] == [(4, 4), (4, 4)]


@pytest.mark.parametrize("name", ["mocov2", "mocov3"])
def test_contrastive_distill_softens_the_cosine_similarities(name):
    tau, kd_t = 0.2, 5.0
    m = method(name, proj_dim=6, temperature=tau)
    s1, s2, t1, t2 = _views(d=5)  # the loss's logits: cosine similarities over tau
    kd = m.distill([s1, s2], [t1, t2], kd_t)
    # SlimCLR: softmax(cos / 5) for teacher and student, times 5 squared, as KL (the cross-entropy less the
    # teacher's entropy); summed over the views like the SSL losses, so alpha weighs the two terms as SlimCLR intends
    def by_hand(s, t):
        p_t = F.softmax(t * tau / kd_t, dim=1)
        return (p_t * (p_t.log() - F.log_softmax(s * tau / kd_t, dim=1))).sum(1).mean() * kd_t ** 2

    torch.testing.assert_close(kd, by_hand(s1, t1) + by_hand(s2, t2))
    assert m.distill([t1, t2], [t1, t2], kd_t).abs().item() < 1e-5  # 0 when the student matches
    # the gradient is the soft cross-entropy's: the teacher term is constant for the student
    s1.requires_grad_(True)
    m.distill([s1], [t1], kd_t).backward()
    expected = torch.autograd.grad(soft_cross_entropy(s1 * tau, t1 * tau, kd_t), s1)[0]
    torch.testing.assert_close(s1.grad, expected)


# ---- MoCo v2 queue ---------------------------------------------------------------------------------------

def test_mocov2_queue_is_a_ring_buffer():
    m = method("mocov2", proj_dim=2, queue_size=5)
    assert m.queue.shape == (5, 2) and int(m.queue_ptr) == 0
    gen = torch.Generator().manual_seed(1)
    keys = [F.normalize(torch.randn(2, 2, generator=gen), dim=1) for _ in range(4)]
    m.after_step([keys[0] * 3, keys[1]])  # keys are normalised on the way in
    torch.testing.assert_close(m.queue[:4], torch.cat([keys[0], keys[1]]))
    assert int(m.queue_ptr) == 4
    old = m.queue[3].clone()
    m.after_step([keys[2], keys[3]])  # 4 new keys at slots 4, 0, 1, 2
    new = torch.cat([keys[2], keys[3]])
    torch.testing.assert_close(m.queue[4], new[0])
    torch.testing.assert_close(m.queue[:3], new[1:])
    torch.testing.assert_close(m.queue[3], old)
    assert int(m.queue_ptr) == 3


def test_mocov2_queue_more_keys_than_slots_keeps_the_newest():
    m = method("mocov2", proj_dim=2, queue_size=3)
    m.queue_ptr.fill_(2)
    keys = F.normalize(torch.arange(1.0, 11.0).view(5, 2), dim=1)
    m.after_step([keys[:3], keys[3:]])  # 5 keys from slot 2: slots 2,0,1,2,0 -> newest 3 survive
    torch.testing.assert_close(m.queue[2], keys[3])
    torch.testing.assert_close(m.queue[0], keys[4])
    torch.testing.assert_close(m.queue[1], keys[2])
    assert int(m.queue_ptr) == (2 + 5) % 3


def test_mocov2_asymmetric_queue_takes_the_second_view_only():
    m = method("mocov2", proj_dim=2, queue_size=4, symmetric=False)
    k1, k2 = F.normalize(torch.ones(2, 2), dim=1), F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    m.after_step([k1, k2])
    torch.testing.assert_close(m.queue[:2], k2)
    assert int(m.queue_ptr) == 2


# ---- momentum schedule ----------------------------------------------------------------------------------

def test_momentum_cosine_schedule_endpoints():
    m = method("byol", momentum=0.99)
    assert m.momentum(0.0) == pytest.approx(0.99)
    assert m.momentum(0.5) == pytest.approx(0.995)
    assert m.momentum(1.0) == pytest.approx(1.0)
    values = [m.momentum(i / 10) for i in range(11)]
    assert values == sorted(values)
    const = method("mocov2", momentum=0.999, momentum_schedule="constant")
    assert const.momentum(0.0) == const.momentum(1.0) == 0.999
