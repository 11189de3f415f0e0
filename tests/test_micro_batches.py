"""Gradient accumulation (``train.micro_batches``): a step run in parts takes the same optimiser step as the
whole batch would, where the loss is a mean over samples and BatchNorm sees each part on its own, which is what
``model.bn_group_size`` of the part's size gives in one pass. So the two must train the same weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimssl.config import ConfigError, check_processes, config_from_dict
from slimssl.errors import ExtensionError
from slimssl.seeds import derived_generator
from slimssl.train.compile import refuse_cuda_graphs_with_micro_batches
from slimssl.train.loop import Trainer

from test_grouped_bn import assert_trains_and_resumes
from test_pretrain import tiny

BATCH, PARTS = 16, 2
# BYOL with DSPNet's sandwich and target teacher; MoCo v2 with SlimCLR's online distillation and re-weighting
SETTINGS = {
    "byol": dict(method="byol", sampling="sandwich"),
    "mocov2": dict(method="mocov2", teacher="online",
                   slim={"distill_alpha": 0.5, "distill_temperature": 5.0, "loss_weights": "slimclr"}),
}


def trainer_of(tmp_path, name: str, settings: dict, group: int | None = None, **train) -> Trainer:
    cfg = tiny(**settings, train={"batch_size": BATCH, "grad_diagnostics_every": 1, **train})
    cfg["data"]["fake_size"] = 2 * BATCH
    cfg["model"]["bn_group_size"] = group
    return Trainer(config_from_dict(cfg), tmp_path / name)


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def grad_records(trainer: Trainer) -> list[dict]:
    trainer.metrics.close()
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["grad_norm"] for r in map(json.loads, lines) if "grad_norm" in r]


@pytest.mark.parametrize("method", list(SETTINGS))
def test_a_step_in_micro_batches_trains_what_one_pass_with_groups_of_their_size_trains(tmp_path, method):
    with trainer_of(tmp_path, "parts", SETTINGS[method], micro_batches=PARTS) as accumulated, \
            trainer_of(tmp_path, "groups", SETTINGS[method], group=BATCH // PARTS) as grouped:
        compare_training(accumulated, grouped, method)


def compare_training(accumulated: Trainer, grouped: Trainer, method: str) -> None:
    start = parameters(accumulated)
    assert all(torch.equal(start[k], v) for k, v in parameters(grouped).items())
    for step in range(3):
        a, g = accumulated.train_step(step), grouped.train_step(step)
        assert a.losses.keys() == g.losses.keys()
        for name in a.losses:
            torch.testing.assert_close(a.losses[name], g.losses[name], rtol=1e-4, atol=1e-5)
    after_a, after_g = parameters(accumulated), parameters(grouped)
    assert any(not torch.equal(start[k], after_a[k]) for k in start)  # trained
    for k in after_a:
        torch.testing.assert_close(after_a[k], after_g[k], rtol=1e-4, atol=1e-5, msg=k)
    if method == "mocov2":  # the queue took the same keys in the same places
        torch.testing.assert_close(accumulated.model.method.queue, grouped.model.method.queue, rtol=1e-4, atol=1e-5)
    # SlimCLR's gradient-imbalance record measures each sub-network's whole gradient, over all the parts
    records_a, records_g = grad_records(accumulated), grad_records(grouped)
    assert len(records_a) == len(records_g) == 3
    for ra, rg in zip(records_a, records_g):
        assert ra.keys() == rg.keys()
        for name in ra:
            assert ra[name] == pytest.approx(rg[name], rel=1e-3, abs=1e-6)


def test_micro_batches_are_not_the_whole_batch_in_one_pass(tmp_path):
    """The parts do change something: BatchNorm over 8 samples is not BatchNorm over 16."""
    with trainer_of(tmp_path, "parts", SETTINGS["byol"], micro_batches=PARTS) as accumulated, \
            trainer_of(tmp_path, "whole", SETTINGS["byol"]) as whole:
        a, w = accumulated.train_step(0).losses, whole.train_step(0).losses
    assert any(not torch.allclose(a[n], w[n], atol=1e-4) for n in a)


@pytest.mark.parametrize("method", ["mocov3", "mocov2"])
def test_methods_with_in_batch_keys_or_shuffled_keys_train_in_micro_batches_and_resume(tmp_path, method):
    cfg = tiny(method, train={"batch_size": BATCH, "micro_batches": PARTS})
    if method == "mocov2":  # shuffle-BN permutes the processes' micro-batch, in groups
        cfg["model"]["bn_group_size"] = 4
        cfg["method"]["shuffle_bn"] = True
    with Trainer(config_from_dict(cfg), tmp_path) as trainer:
        assert_trains_and_resumes(trainer)


@pytest.mark.parametrize("train,model,method,world,expected", [
    ({"micro_batches": 3}, {}, {}, 1, "train.micro_batches: 3 parts of the per-process batch 16"),
    ({"micro_batches": 16}, {}, {}, 1, "use one of 1, 2, 4, 8"),
    ({"micro_batches": 8}, {}, {}, 2, "per-process batch 8 (train.batch_size 16 over 2 processes)"),
    # SyncBatchNorm on one process is plain BatchNorm: a part of one sample would fail in the first step
    ({"micro_batches": 16, "sync_bn": True}, {}, {}, 1, "at least 2 samples"),
    ({"micro_batches": 3}, {"bn_group_size": 8}, {}, 1, "BatchNorm groups of 8: use one of 1, 2"),
    ({"micro_batches": 4}, {"bn_group_size": 8}, {}, 1,
     "must divide the per-process micro-batch 4 (train.batch_size 16 over 1 process in 4 train.micro_batches; "),
    ({"micro_batches": 4}, {"bn_group_size": 8}, {}, 1, "or train.micro_batches 1 or 2, which keeps the groups"),
    # a part of one group: shuffle-BN would have nothing to shuffle between
    ({"micro_batches": 2}, {"bn_group_size": 8}, {"name": "mocov2", "shuffle_bn": True}, 1,
     "lower train.micro_batches 2"),
])
def test_micro_batches_that_do_not_fit_the_batch_are_refused(train, model, method, world, expected):
    cfg = tiny(train={"batch_size": BATCH, **train})
    cfg["model"].update(model)
    cfg["method"].update(method)
    with pytest.raises(ConfigError) as info:
        check_processes(config_from_dict(cfg), world, "'tiny'")
    assert expected in str(info.value)


def test_parts_of_one_sample_are_accepted_where_batch_norm_is_synchronised_over_processes():
    cfg = tiny(train={"batch_size": BATCH, "micro_batches": 8, "sync_bn": True})
    check_processes(config_from_dict(cfg), 2, "'tiny'")  # 8 per process, parts of 1: statistics over 2


def test_each_part_is_shuffled_in_an_order_of_its_own_over_its_samples(tmp_path):
    """Shuffle-BN in parts: part p's keys are normalised in the groups of a permutation of the part's samples
    drawn from (seed, step, view, p)."""
    cfg = tiny("mocov2", train={"batch_size": BATCH, "micro_batches": PARTS})
    cfg["model"]["bn_group_size"] = 4
    cfg["method"]["shuffle_bn"] = True
    with Trainer(config_from_dict(cfg), tmp_path) as trainer:
        trainer.model.train()
        view = trainer.views(0)[0]
        reference = copy.deepcopy(trainer.model)
        reference.slim_state.bn_group_size = None  # each group on its own, as a GPU holding it would
        size = BATCH // PARTS
        for part in range(PARTS):
            samples = view[part * size:(part + 1) * size]
            keys = trainer.key_forward(samples, 0, 0, part)
            order = torch.randperm(size, generator=derived_generator(trainer.cfg.train.seed, "shuffle_bn", 0, 0, part))
            for group in order.view(-1, 4):
                torch.testing.assert_close(keys[group], reference.target_forward(samples[group]), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(trainer.key_forward(samples, 0, 0, 0), trainer.key_forward(samples, 0, 0, 1),
                                  atol=1e-3)


def test_a_method_whose_prepared_target_is_not_a_batch_is_named_before_any_update(tmp_path):
    from slimssl.methods import METHODS, register_method
    from slimssl.methods.byol import BYOL

    class NormTracking(BYOL):  # keeps a per-step value among its prepared outputs: fine in one pass, not in parts
        name = "normtracking"

        def prepare_target(self, target):
            return [*target, target[0].norm(dim=1).mean()]

    register_method(NormTracking)
    try:
        cfg = tiny("normtracking", train={"batch_size": BATCH, "micro_batches": PARTS})
        with Trainer(config_from_dict(cfg), tmp_path) as trainer:
            before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
            with pytest.raises(ExtensionError, match="method 'normtracking': prepare_target returned a 0-d tensor at "
                                                     "position 2; with train.micro_batches 2"):
                trainer.train_step(0)
            assert all(torch.equal(v, before[k]) for k, v in trainer.model.named_parameters())  # no update yet
    finally:
        METHODS.pop("normtracking", None)


def test_a_run_on_a_gpu_refuses_cuda_graphs_with_micro_batches_before_reading_data(tmp_path, monkeypatch):
    import slimssl.train.loop as loop

    monkeypatch.setattr(loop, "pick_device", lambda *args, **kwargs: torch.device("cuda"))
    cfg = tiny(train={"batch_size": BATCH, "micro_batches": PARTS, "compile": "reduce-overhead"})
    cfg["data"]["source"] = str(tmp_path / "missing")  # never read: the refusal comes first
    with pytest.raises(ConfigError, match="train.compile reduce-overhead captures CUDA graphs"):
        Trainer(config_from_dict(cfg), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_micro_batches_are_not_combined_with_cuda_graphs():
    cuda = torch.device("cuda")
    with pytest.raises(ConfigError, match="train.micro_batches 2.*train.compile=default"):
        refuse_cuda_graphs_with_micro_batches("reduce-overhead", 2, cuda)
    refuse_cuda_graphs_with_micro_batches("default", 2, cuda)  # no graphs: accepted
    refuse_cuda_graphs_with_micro_batches("reduce-overhead", 1, cuda)  # no accumulation
    refuse_cuda_graphs_with_micro_batches("reduce-overhead", 2, torch.device("cpu"))  # inductor captures none there
