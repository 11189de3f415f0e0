"""A training step runs both views through each network as one batch, BatchNorm still normalising each view on its
own: it must train exactly as running the views one at a time does, up to float rounding (in float64 the two
agree to within 1e-15; in float32 convolutions of another batch size round differently, which a few steps at a
large learning rate amplify to about 1e-5)."""

from __future__ import annotations

import pytest
import torch

from slimssl.config import config_from_dict
from slimssl.train.loop import Trainer

from test_pretrain import tiny


class OneViewAtATime(Trainer):
    """The reference: every view through every network on its own."""

    def _forward_views(self, forward, views, used):
        return [self._keep(forward(v)) if i in used else None for i, v in enumerate(views.each)]


def _trained(trainer_class, cfg, path, steps: int = 2) -> tuple[list[dict], dict]:
    trainer = trainer_class(cfg, path)
    losses = [{k: v.item() for k, v in trainer.train_step(step).losses.items()} for step in range(steps)]
    trainer.metrics.close()
    return losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("method, model, slim", [
    ("byol", {}, {"sampling": "sandwich", "teacher": "target"}),
    ("byol", {"bn": "shared"}, {}),
    ("mocov3", {"bn_group_size": 4}, {"teacher": "online", "distill_alpha": 0.5}),
], ids=["byol-private", "byol-shared-bn", "mocov3-grouped-bn"])
def test_views_in_one_batch_train_as_the_views_one_at_a_time(tmp_path, method, model, slim):
    # lr 0.1: float32's rounding, amplified by each step, stays far within the bounds below (lr 0.5 took grouped
    # BatchNorm to 1e-4 on torch 2.11-2.14, and to 5e-4 on torch 2.4; float64 agrees to 4e-13 on each)
    data = tiny(method, train={"batch_size": 16}, slim=slim, optim={"lr": 0.1})
    data["model"].update(model)
    if method != "byol":
        del data["method"]["queue_size"]  # (MoCo v3 keeps no queue)
    cfg = config_from_dict(data)
    assert Trainer(cfg, tmp_path / "probe").model.method.views_used() == ((0, 1), (0, 1))  # both views, both sides
    batched_losses, batched = _trained(Trainer, cfg, tmp_path / "batched")
    alone_losses, alone = _trained(OneViewAtATime, cfg, tmp_path / "alone")
    for step, (losses, expected) in enumerate(zip(batched_losses, alone_losses)):
        assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6), step
    # weights, the target's included, and every BatchNorm's running statistics and batch count
    assert batched.keys() == alone.keys()
    for key in batched:
        torch.testing.assert_close(batched[key], alone[key], rtol=1e-4, atol=1e-4, msg=key)


def test_a_forward_outside_a_training_step_sees_one_view(tmp_path):
    """The views count is the step's: BatchNorm of a forward after it (kNN, a user's own) takes the whole batch."""
    trainer = Trainer(config_from_dict(tiny("byol", train={"batch_size": 16})), tmp_path)
    trainer.train_step(0)
    trainer.metrics.close()
    model = trainer.model
    assert model.slim_state.views == 1 and model.target["backbone"].slim_state.views == 1
    x = torch.randn(8, 3, 8, 8)
    halves = torch.cat([model.online(x[:4]), model.online(x[4:])])
    assert not torch.allclose(model.online(x), halves, atol=1e-3)  # statistics over all 8 samples, not two halves
    with model.views_in_one_batch(2):
        torch.testing.assert_close(model.online(x), halves, rtol=1e-4, atol=1e-5)


def test_a_method_may_change_its_online_outputs_in_place(tmp_path, monkeypatch):
    """A loss of one's own that scales its inputs in place trains as with the views one at a time (the outputs
    of one batch are handed over as slices, which torch lets one change in place)."""
    from slimssl.methods import METHODS, register_method
    from slimssl.methods.byol import BYOL

    monkeypatch.setitem(METHODS, "scaled_in_place", None)  # removed again after the test
    del METHODS["scaled_in_place"]

    @register_method
    class ScaledInPlace(BYOL):
        name = "scaled_in_place"

        def loss(self, online, target):
            for out in online:
                out.mul_(2.0)
            return super().loss(online, target)

    data = tiny("byol", train={"batch_size": 16})
    data["method"]["name"] = "scaled_in_place"
    cfg = config_from_dict(data)
    batched_losses, batched = _trained(Trainer, cfg, tmp_path / "batched")
    alone_losses, alone = _trained(OneViewAtATime, cfg, tmp_path / "alone")
    for losses, expected in zip(batched_losses, alone_losses):
        assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for key in batched:
        torch.testing.assert_close(batched[key], alone[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("private", [True, False], ids=["private", "shared"])
def test_batchnorm_of_views_in_one_batch_is_that_of_the_views_one_after_the_other(momentum, private):
    """Outputs, running statistics and batch count; with momentum None (a cumulative average, as recalibration
    uses) each view's update reads the count of the batches before it."""
    import copy

    from slimssl.nn.layers import SlimBatchNorm, SlimState, bind_state
    from slimssl.nn.spec import Menu, SubnetSpec

    full = SubnetSpec(1.0, (1,))
    state = SlimState(full, Menu([full]), private_bn=private)
    norm = SlimBatchNorm(6, subnets={full.name: 6} if private else None, momentum=momentum)
    bind_state(norm, state)
    norm(torch.randn(4, 6, 2, 2))  # a batch before: the count is not where it starts
    alone = copy.deepcopy(norm)
    bind_state(alone, state)
    views = torch.randn(4, 6, 2, 2), torch.randn(4, 6, 2, 2) * 3 + 1
    state.views = 2
    together = norm(torch.cat(views))
    state.views = 1
    torch.testing.assert_close(together, torch.cat([alone(v) for v in views]))
    torch.testing.assert_close(norm.state_dict(), alone.state_dict())
    assert next(v for k, v in norm.state_dict().items() if k.endswith("num_batches_tracked")).item() == 3


def test_each_view_goes_through_the_batchnorm_module_itself(tmp_path):
    """Its hooks (and a forward replaced on it, as tests freeze BatchNorm) see every view: BatchNorm is not
    bypassed with a functional call to save kernels."""
    trainer = Trainer(config_from_dict(tiny("byol", train={"batch_size": 16})), tmp_path)
    model = trainer.model
    seen = []
    norm = model.backbone.bn1.bns[model.backbone.menu.largest.name]
    norm.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    trainer.train_step(0)
    trainer.metrics.close()
    assert seen == [16, 16]  # the two views of 16 images of the full width's online forward
