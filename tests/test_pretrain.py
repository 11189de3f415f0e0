"""Slimmable pretraining end to end on tiny data: what moves, slow start, exact resume, the CLI, export."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from slimssl.checkpoint import load_checkpoint, load_supernet, save_checkpoint
from slimssl.cli import main
from slimssl.config import config_from_dict, load_config, packaged_configs
from slimssl import load_exported
from slimssl.train.loop import StepResult, Trainer
from slimssl.train.optim import lr_at

SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
WIDTHS4 = [1.0, 0.75, 0.5, 0.25]
PRIVATE_BN = re.compile(r"\.bns\.(w[0-9p]+_d[0-9-]+)\.")


def tiny(method: str = "byol", sampling: str = "all", teacher: str = "target", widths=WIDTHS4,
         optim: dict | None = None, slim: dict | None = None, train: dict | None = None) -> dict:
    return {
        "name": f"tiny_{method}",
        "model": {"arch": "resnet18", "depths": [1, 1, 1, 1], "base_width": 4, "stem": "cifar"},
        "menu": {"widths": list(widths)},
        "method": {"name": method, "proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32, "queue_size": 64},
        "slim": {"sampling": sampling, "num_random": 1, "teacher": teacher, **(slim or {})},
        "data": {"source": "fake", "resolution": 8, "fake_size": 32},
        # a large constant-ish lr so that every update is visible in fp32
        "optim": {"lr": 0.5, "lr_scaling": "none", **(optim or {})},
        "train": {"batch_size": 8, "epochs": 2, "device": "cpu", "precision": "fp32", "log_every": 1,
                  **(train or {})},
        "eval": {"knn_k": 5, "batch_size": 32},
    }


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def record_grads(trainer: Trainer) -> dict:
    """Wrap the optimizer's step to record, per online parameter, whether it holds a gradient."""
    seen: dict = {}
    step = trainer.optimizer.step
    names = {id(p): n for n, p in trainer.model.named_parameters()}

    def wrapped(*args, **kwargs):
        seen.clear()
        seen.update({names[id(p)]: p.grad is not None for g in trainer.optimizer.param_groups for p in g["params"]})
        seen["_target_grads"] = [n for n, p in trainer.model.target.named_parameters() if p.grad is not None]
        return step(*args, **kwargs)

    trainer.optimizer.step = wrapped
    return seen


def subnet_of(name: str) -> str | None:
    match = PRIVATE_BN.search(name)
    return match.group(1) if match else None


# ---- what moves --------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["target", "online"])
@pytest.mark.parametrize("sampling", ["all", "sandwich"])
@pytest.mark.parametrize("method", ["byol", "mocov2", "mocov3"])
def test_two_steps_move_exactly_what_should_move(tmp_path, method, sampling, teacher):
    trainer = Trainer(config_from_dict(tiny(method, sampling, teacher)), tmp_path)
    model = trainer.model
    menu = [s.name for s in model.backbone.menu]
    grads = record_grads(trainer)
    online_names = [n for n, _ in model.named_parameters() if not n.startswith("target.")]
    assert {subnet_of(n) for n in online_names} - {None} == set(menu)
    assert all(not p.requires_grad for p in model.target.parameters())

    for step in (0, 1):
        drawn = {s.name for s in trainer.policy.draw(step)}
        if sampling == "sandwich":
            assert len(drawn) == 3 and len(set(menu) - drawn) == 1  # one middle entry left out
        else:
            assert drawn == set(menu)
        before = snapshot(model)
        queue_before = model.method.queue.clone() if method == "mocov2" else None
        losses = trainer.train_step(step).losses
        after = snapshot(model)
        assert set(losses) == drawn
        assert all(torch.isfinite(v) for v in losses.values())

        for name in online_names:
            owner = subnet_of(name)
            should = owner is None or owner in drawn
            assert grads[name] == should, f"step {step}: {name} grad is {'None' if should else 'set'}"
            moved = not torch.equal(before[name], after[name])
            assert moved == should, f"step {step}: {name} {'did not move' if should else 'moved'}"
        # running statistics of private BatchNorms follow the same rule
        for name in after:
            if name.startswith("target.") or not name.endswith("running_mean"):
                continue
            owner = subnet_of(name)
            if owner is not None:
                assert (not torch.equal(before[name], after[name])) == (owner in drawn), name

        # the target moves only by EMA towards the updated online weights, never by gradient
        assert grads["_target_grads"] == []
        assert all(p.grad is None for p in model.target.parameters())
        m = model.method.momentum(step / trainer.total_steps)
        for name, _ in model.target.named_parameters():
            key = "target." + name
            expected = before[key] + (1 - m) * (after[name] - before[key])
            torch.testing.assert_close(after[key], expected, atol=1e-6, rtol=1e-5)
        # (1 - m) is small: a tiny online change may round away, but the weights of the convs move
        for name in ("backbone.conv1.weight", "backbone.layer4.0.conv2.weight", "projector.0.weight"):
            assert not torch.equal(before["target." + name], after["target." + name]), f"target {name} did not move"
        # target buffers are copied from the online network
        for name, _ in model.target.named_buffers():
            assert torch.equal(after["target." + name], after[name])

        if method == "mocov2":
            assert int(model.method.queue_ptr) == (step + 1) * 2 * 8
            assert not torch.equal(queue_before, model.method.queue)


@pytest.mark.parametrize("optim", ["sgd", "lars"])
def test_slow_start_sub_networks_get_no_gradient_before_join(tmp_path, optim):
    cfg = config_from_dict(tiny("byol", "all", "online", optim={"name": optim, "weight_decay": 1e-2},
                                slim={"slow_start": 0.5, "slow_start_lr": 1.5, "loss_weights": "slimclr"}))
    trainer = Trainer(cfg, tmp_path)
    model = trainer.model
    full = model.backbone.menu.largest.name
    assert trainer.total_steps == 8 and trainer.policy.join_step == 4
    grads = record_grads(trainer)
    for step in (0, 1):
        before = snapshot(model)
        result = trainer.train_step(step)
        after = snapshot(model)
        assert set(result.losses) == {full}
        assert result.lr == pytest.approx(lr_at(step, 8, 0, trainer.peak_lr))
        for name, p in model.named_parameters():
            if name.startswith("target."):
                continue
            owner = subnet_of(name)
            if owner is not None and owner != full:
                assert grads[name] is False and p.grad is None, name
                assert torch.equal(before[name], after[name]), f"{name} moved before join"
            else:
                assert grads[name] is True, name
                assert not torch.equal(before[name], after[name]), f"{name} did not move"
        for name in after:  # private running statistics of the sub-networks untouched too
            owner = subnet_of(name)
            if owner is not None and owner != full and not name.startswith("target."):
                assert torch.equal(before[name], after[name]), name
    # once joined, every sub-network trains, at the raised lr
    join = trainer.policy.join_step
    before = snapshot(model)
    result = trainer.train_step(join)
    after = snapshot(model)
    assert set(result.losses) == set(model.backbone.menu.names)
    assert result.lr == pytest.approx(lr_at(join, 8, 0, 1.5))  # the raised base lr
    for name, _ in model.named_parameters():
        if not name.startswith("target."):
            assert grads[name] is True, name
            assert not torch.equal(before[name], after[name]), name


def test_a_slow_start_shorter_than_a_step_keeps_one_peak_lr_and_says_so(tmp_path, caplog):
    cfg = config_from_dict(tiny("byol", "all", "online", slim={"slow_start": 0.01, "slow_start_lr": 1.5}))
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        trainer = Trainer(cfg, tmp_path)
    assert trainer.policy.join_step == 0 and "slow_start_lr is not used" in caplog.text
    assert "peak_after_slow_start" not in trainer.effective_lr()  # what is logged is what is used
    assert trainer.train_step(0).lr == pytest.approx(lr_at(0, trainer.total_steps, 0, trainer.peak_lr))


def test_sub_networks_that_joined_keep_training_when_a_resume_adds_epochs(tmp_path):
    """slow_start is a fraction of the steps: more epochs move the join later, past sub-networks that had joined."""
    import slimssl

    data = tiny("byol", "all", slim={"slow_start": 0.5}, train={"checkpoint_every": 0})  # 4 steps an epoch
    run = slimssl.pretrain(config_from_dict(data), tmp_path / "run", max_steps=6)  # joined at step 4
    assert load_checkpoint(run.run_dir)["train_state"]["joined_at"] == 4
    slimssl.pretrain(None, run.run_dir, resume=True, overrides=["train.epochs=5"])  # joins at 10 if started so
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert [len(losses[step]) for step in range(1, 21)] == [1] * 4 + [4] * 16  # steps 1-4 ran the full width alone

    fresh = Trainer(config_from_dict(data, overrides=["train.epochs=5"]), tmp_path / "fresh")
    assert fresh.policy.join_step == 10 and fresh.state.joined_at is None  # a new run's slow start is as configured

    # a checkpoint from before the join step was recorded: found from its config and epoch
    old = slimssl.pretrain(config_from_dict(data), tmp_path / "old", max_steps=6)
    saved = load_checkpoint(old.run_dir)
    del saved["train_state"]["joined_at"]
    save_checkpoint(old.run_dir / "checkpoints" / "last.pt",
                    {**saved, "config": saved["config"].model_dump(mode="json")})
    resumed = Trainer(config_from_dict(data, overrides=["train.epochs=5"]), old.run_dir, resume=True)
    assert resumed.state.joined_at == 4 and resumed.policy.join_step == 4

    # another batch renumbers the steps: the join step with them (4 steps an epoch at batch 8, 2 at batch 16)
    long = slimssl.pretrain(config_from_dict(data, overrides=["train.epochs=4"]), tmp_path / "long", max_steps=12)
    assert load_checkpoint(long.run_dir)["train_state"]["joined_at"] == 8
    slimssl.pretrain(None, long.run_dir, resume=True, overrides=["train.batch_size=16"], max_steps=7)
    state = load_checkpoint(long.run_dir)["train_state"]
    assert state["step"] == 7 and state["joined_at"] == 4


def test_a_checkpoint_with_train_state_this_slimssl_does_not_know_is_refused_naming_who_saved_it(tmp_path):
    """A newer slimssl's progress that this one would drop is not resumed from: the run would not continue exactly."""
    import slimssl
    from slimssl.checkpoint import CheckpointError

    run = slimssl.pretrain(config_from_dict(tiny("byol", "all")), tmp_path / "run", max_steps=2)
    saved = load_checkpoint(run.run_dir)
    assert saved["saved_by"] == f"slimssl {slimssl.__version__}"
    saved["train_state"]["ema_of_something"] = 0.5
    saved["model"]["backbone.new_buffer"] = torch.zeros(1)  # its weights may have changed too: not blamed first
    saved["saved_by"] = "slimssl 9.0"  # as a newer slimssl would write it
    last = run.run_dir / "checkpoints" / "last.pt"
    torch.save({**saved, "config": saved["config"].model_dump(mode="json")}, last)
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match=r"does not know \(ema_of_something\).*saved by slimssl 9\.0"):
        slimssl.pretrain(None, run.run_dir, resume=True)
    assert last.read_bytes() == before  # refused before anything was written


def test_a_checkpoint_without_joined_at_saved_at_the_join_step_had_not_joined():
    """A checkpoint is saved after its step: at the join step itself, the sub-networks had not trained yet."""
    from slimssl.train.resume import _joined_at

    saved = config_from_dict({"menu": {"widths": [1.0, 0.5]}, "slim": {"slow_start": 0.5}, "train": {"epochs": 4}})
    assert _joined_at(saved, 10, 2.0) is None  # 5 steps an epoch, 20 in all: they join at step 10
    assert _joined_at(saved, 15, 3.0) == 10
    assert _joined_at(saved, 5, 1.0) is None


def test_a_finished_run_given_more_epochs_writes_the_epoch_checkpoint_its_end_was(tmp_path):
    import slimssl

    run = slimssl.pretrain(config_from_dict(tiny(train={"checkpoint_every": 1})), tmp_path / "run")  # 2 epochs
    ended = load_checkpoint(run.run_dir)
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == ["epoch_0001.pt", "last.pt"]
    slimssl.pretrain(None, run.run_dir, resume=True, overrides=["train.epochs=4"])
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == \
        ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    second = load_checkpoint(run.run_dir / "checkpoints" / "epoch_0002.pt")
    assert second["train_state"]["step"] == 8 and all(torch.equal(second["model"][k], v)
                                                      for k, v in ended["model"].items())


def test_target_always_runs_full_size(tmp_path):
    trainer = Trainer(config_from_dict(tiny("mocov3", "all", "online")), tmp_path)
    model = trainer.model
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    full = model.target_forward(x)
    with model.subnet(model.backbone.menu.smallest):
        small_online = model.online(x)
        torch.testing.assert_close(model.target_forward(x), full, rtol=0, atol=0)
    assert model.slim_state.active == model.backbone.menu.largest  # restored on exit
    assert small_online.shape == full.shape  # every sub-network lands in the target's embedding space
    assert not torch.allclose(model.online(x), small_online)


def test_sandwich_in_width_space_trains_with_shared_bn(tmp_path):
    data = tiny("byol", "sandwich", "online", slim={"random_space": "space", "num_random": 2})
    data["model"].update(bn="shared", depths=[2, 1, 1, 1])
    data["menu"] = {"widths": [1.0, 0.25], "depths": [[2, 1, 1, 1], [1, 1, 1, 1]]}
    trainer = Trainer(config_from_dict(data), tmp_path)
    drawn = trainer.policy.draw(0)
    assert any(s not in trainer.model.backbone.menu for s in drawn)  # off-menu widths are drawn
    losses = trainer.train_step(0).losses
    assert set(losses) == {s.name for s in drawn}
    assert all(torch.isfinite(v) for v in losses.values())


def test_random_space_with_private_bn_is_refused_before_training(tmp_path):
    data = tiny("byol", "sandwich", "online", slim={"random_space": "space", "num_random": 2, "slow_start": 0.5})
    with pytest.raises(ValueError, match="random_space"):
        Trainer(config_from_dict(data), tmp_path)


# ---- resume ----------------------------------------------------------------------------------------------

def _optim_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {f"{names[id(p)]}.{k}": v for p, s in trainer.optimizer.state.items() for k, v in s.items()
            if torch.is_tensor(v)}


@pytest.mark.parametrize("method,sampling,optim,k", [
    ("byol", "sandwich", "lars", 2),  # in the middle of epoch 0
    ("mocov2", "all", "sgd", 5),  # a queue, in the middle of epoch 1
    ("mocov3", "sandwich", "lars", 4),  # at an epoch boundary
])
def test_resume_gives_identical_weights(tmp_path, method, sampling, optim, k):
    n = 6
    data = tiny(method, sampling, "online", optim={"name": optim}, train={"checkpoint_every": 0})
    cfg = config_from_dict(data)
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit(max_steps=n)
    assert straight.state.step == n

    first = Trainer(cfg, tmp_path / "resumed")
    first.fit(max_steps=k)
    assert first.state.step == k
    second = Trainer(config_from_dict(data), tmp_path / "resumed", resume=True)
    assert second.state.step == k
    second.fit(max_steps=n)
    assert second.state.step == n

    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, f"resumed run differs in {differ[:5]}"
    oa, ob = _optim_state(straight), _optim_state(second)
    assert oa.keys() == ob.keys()
    assert all(torch.equal(oa[key], ob[key]) for key in oa)
    if method == "mocov2":
        assert torch.equal(straight.model.method.queue, second.model.method.queue)
        assert int(second.model.method.queue_ptr) == (n * 16) % 64
    # the checkpoint on disk holds the same weights
    saved = load_checkpoint(tmp_path / "resumed")
    assert saved["train_state"]["step"] == n
    assert all(torch.equal(saved["model"][key], a[key]) for key in a)


# ---- the command line ---------------------------------------------------------------------------------------

def _write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_pretrain_cli_then_export(tmp_path, capsys):
    config = _write_config(tmp_path / "tiny.yaml", tiny("byol", "sandwich", "target", widths=[1.0, 0.5, 0.25]))

    # a partial run: the run directory holds config, metrics, TensorBoard events and the last checkpoint
    partial = tmp_path / "partial"
    assert main(["pretrain", "--config", str(config), "--out", str(partial), "--max-steps", "2"]) == 0
    assert (partial / "config.yaml").is_file()
    assert yaml.safe_load((partial / "config.yaml").read_text())["method"]["name"] == "byol"
    records = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2]
    assert all(r["loss"] and all(isinstance(v, float) for v in r["loss"].values()) for r in records if "loss" in r)
    assert list((partial / "tb").glob("events.out.tfevents.*"))
    assert (partial / "checkpoints" / "last.pt").is_file()
    assert load_checkpoint(partial / "checkpoints" / "last.pt")["train_state"]["step"] == 2
    assert not (partial / "results.json").exists()
    # the same --out again refuses instead of overwriting the run
    assert main(["pretrain", "--config", str(config), "--out", str(partial), "--max-steps", "2"]) == 2

    # a full tiny run writes results.json with a row per sub-network
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--epochs", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((run / "results.json").read_text())
    assert printed == results
    assert results["steps"] == 4  # 32 images / batch 8, one epoch
    assert results["run"] == "run"  # the folder's name, as evaluation commands write it; the recipe's is in config
    rows = {r["subnet"]: r for r in results["subnets"]}
    assert list(rows) == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1", "w0p25_d1-1-1-1"]
    for row in rows.values():
        for key in ("params", "macs", "knn_top1", "knn_top1_random_init"):
            assert isinstance(row[key], (int, float)), (row["subnet"], key, row.get(key))
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["knn_top1_random_init"] <= 100
    assert rows["w1p0_d1-1-1-1"]["params"] > rows["w0p5_d1-1-1-1"]["params"] > rows["w0p25_d1-1-1-1"]["params"]
    assert rows["w1p0_d1-1-1-1"]["macs"] > rows["w0p5_d1-1-1-1"]["macs"] > rows["w0p25_d1-1-1-1"]["macs"]

    # export every sub-network and verify it against the supernet
    ckpt = run / "checkpoints" / "last.pt"
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--all", "--verify", "--out", str(out), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert [r["subnet"] for r in exported] == list(rows)
    assert all(r["max_abs_diff"] <= 1e-5 for r in exported)

    supernet, cfg = load_supernet(ckpt)
    x = torch.randn(3, 3, cfg.data.resolution, cfg.data.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for r in exported:
            plain = load_exported(r["path"])
            assert Path(r["path"]).name == r["subnet"]
            torch.testing.assert_close(plain.forward_features(x), supernet(x, subnet=r["subnet"]),
                                       atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(plain(x), supernet(x, subnet=r["subnet"]), atol=1e-6, rtol=1e-5)


def test_pretrain_cli_resume_to_the_end(tmp_path, capsys):
    config = _write_config(tmp_path / "tiny.yaml", tiny("mocov3", "all", "online", widths=[1.0, 0.5],
                                                        train={"epochs": 1}))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--max-steps", "3"]) == 0
    assert not (run / "results.json").exists()
    assert main(["pretrain", "--resume", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


# ---- real data ------------------------------------------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason=f"{SHARED_CIFAR10} is absent")
def test_cifar10_dspnet_byol_recipe_two_steps(tmp_path, monkeypatch):
    # kNN of a randomly initialised ResNet-18 over 60k images is not the point of a 2-step smoke on CPU
    monkeypatch.setattr(Trainer, "knn", lambda self: {})
    run = tmp_path / "run"
    code = main(["pretrain", "--config", "cifar10_r18_dspnet_byol.yaml", "--data", str(SHARED_CIFAR10),
                 "--out", str(run), "--device", "cpu", "--max-steps", "2",
                 "--set", "train.batch_size=16", "--set", "train.precision=fp32", "--set", "train.log_every=1",
                 "--set", "method.proj_hidden=256", "--set", "method.pred_hidden=256"])
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2
    for loss in losses:
        assert len(loss) == 4  # sandwich: largest + smallest + 2 random of [1, .75, .5, .25]
        assert all(0 <= v <= 8 for v in loss.values())  # two views of 2 - 2 cos
    saved = load_checkpoint(run)
    assert saved["train_state"]["step"] == 2
    assert saved["menu"] == ["w1p0_d2-2-2-2", "w0p75_d2-2-2-2", "w0p5_d2-2-2-2", "w0p25_d2-2-2-2"]


def test_logged_loss_of_a_sandwich_subnet_averages_only_the_steps_that_drew_it(tmp_path, monkeypatch):
    # 5 widths, sandwich with 1 random middle one: each middle width runs in only some steps of a window
    cfg = config_from_dict(tiny("byol", sampling="sandwich", widths=[1.0, 0.75, 0.5, 0.375, 0.25],
                                train={"log_every": 4, "epochs": 2}))
    trainer = Trainer(cfg, tmp_path)
    loss_of = {s.name: float(i + 1) for i, s in enumerate(trainer.model.backbone.menu)}

    def constant_losses(step):  # each sub-network's loss is a constant: its mean must be that constant
        return StepResult({t.spec.name: torch.tensor(loss_of[t.spec.name]) for t in trainer.policy.plan(step)},
                          lr=0.1)

    monkeypatch.setattr(trainer, "train_step", constant_losses)
    monkeypatch.setattr(Trainer, "knn", lambda self: {})
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in records if "loss" in r]
    assert logged
    middle_counts = [sum(1 for s in range(4) if name in {t.spec.name for t in trainer.policy.plan(s)})
                     for name in list(loss_of)[1:-1]]
    assert 0 < min(middle_counts) < 4, "the test needs a middle width drawn in some steps of the window only"
    for loss in logged:
        assert loss == {name: loss_of[name] for name in loss}


def test_last_checkpoint_is_written_once_per_epoch(tmp_path, monkeypatch):
    import slimssl.train.loop as loop

    written = []
    save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda path, payload: written.append(path.name) or save(path, payload))
    monkeypatch.setattr(Trainer, "knn", lambda self: {})
    trainer = Trainer(config_from_dict(tiny("byol", widths=[1.0, 0.5])), tmp_path)
    trainer.fit()  # 2 epochs of 4 steps: the end of the run is the end of an epoch, already saved
    assert written == ["last.pt", "last.pt"]


@pytest.mark.parametrize("bn, crop_ratio", [("private", 1.0), ("shared", 1.0), ("private", 0.75)])
def test_pretraining_knn_equals_the_knn_command_on_its_checkpoint(bn, crop_ratio, tmp_path, capsys):
    """results.json's kNN is what `slimssl knn RUN` measures: with shared BatchNorm both re-estimate each
    width's statistics first (the shared running statistics belong to no width in particular), and with an
    evaluation crop ratio both evaluate the centre crops, not the training images."""
    data = tiny("byol", train={"epochs": 1})
    data["model"]["bn"] = bn
    if crop_ratio != 1:  # digits (the fake data is noise made at the resolution, which no ratio changes)
        data["data"].update(source="digits", resolution=12)
        data["train"]["batch_size"] = 128  # one epoch of digits in 11 steps
        data["eval"]["crop_ratio"] = crop_ratio
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(cfg_file), "--out", str(run)]) == 0
    capsys.readouterr()
    results = json.loads((run / "results.json").read_text())
    trained = {r["subnet"]: r["knn_top1"] for r in results["subnets"]}
    assert main(["knn", str(run), "--json", "--device", "cpu"]) == 0
    assert {r["subnet"]: r["knn_top1"] for r in json.loads(capsys.readouterr().out)} == trained
    # and pretraining recorded the settings `slimssl knn` uses by default
    after = json.loads((run / "results.json").read_text())
    assert after["protocols"] == results["protocols"] and {"knn"} == set(results["protocols"])


# ---- every shipped recipe, shrunk ---------------------------------------------------------------------

@pytest.mark.parametrize("name", packaged_configs())
def test_every_shipped_recipe_trains_a_step_when_shrunk(name, tmp_path):
    """The recipe's own method, heads, menu, slimming, optimiser and BatchNorm settings together, with only
    the sizes shrunk: a recipe whose settings contradict each other fails here, not on a GPU."""
    cfg = load_config(name)
    shrink = ["model.base_width=4", "data.source=fake", "data.loader=memory", "data.resolution=32",
              "data.fake_size=16", "train.batch_size=8", "train.device=cpu", "train.precision=fp32",
              "eval.knn_random_init=false", "method.proj_hidden=16", "method.pred_hidden=16", "method.queue_size=64"]
    if cfg.model.bn_group_size:
        shrink.append("model.bn_group_size=4")  # two groups of the shrunk batch, as the recipe has several
    trainer = Trainer(load_config(name, shrink), tmp_path)
    result = trainer.train_step(trainer.policy.join_step)  # the first step on which the sub-networks run
    trainer.metrics.close()
    assert result.lr is not None  # the optimiser stepped
    losses = result.losses
    ran = list(losses)
    menu = trainer.model.backbone.menu
    assert menu.largest.name in ran and menu.smallest.name in ran
    assert all(torch.isfinite(v) for v in losses.values())
    # what evaluation, export and profile open: the checkpoint's supernet, its depths the arch's when unset
    trainer.save()
    supernet, _ = load_supernet(tmp_path)
    assert supernet.menu == menu and torch.equal(supernet.conv1.weight, trainer.model.backbone.conv1.weight)


def test_asymmetric_mocov2_runs_only_the_forwards_its_loss_reads(tmp_path):
    """MoCo v2 as published (symmetric: false, the ImageNet recipe): queries from view 1, keys from view 2. The
    forwards left out change nothing in training: the same losses and weights as computing all of them."""
    data = tiny("mocov2", "all", "online", slim={"distill_alpha": 0.5})
    data["method"]["symmetric"] = False
    cfg = config_from_dict(data)
    lean, full = Trainer(cfg, tmp_path / "lean"), Trainer(cfg, tmp_path / "full")
    full.model.method.views_used = lambda: ((0, 1), (0, 1))  # the old way: every view through both networks
    calls = {}
    for name, trainer in (("lean", lean), ("full", full)):
        for side in ("online_forward", "target_forward"):
            forward = getattr(trainer, side)

            def counted(x, _forward=forward, _key=(name, side)):  # the images each side forwards
                calls[_key] = calls.get(_key, 0) + len(x)
                return _forward(x)
            setattr(trainer, side, counted)
    for step in range(2):
        losses = lean.train_step(step).losses, full.train_step(step).losses
        assert {k: v.item() for k, v in losses[0].items()} == {k: v.item() for k, v in losses[1].items()}
    subnets, batch = len(cfg.subnet_menu().names), cfg.train.batch_size
    assert calls == {("lean", "online_forward"): 2 * subnets * batch, ("lean", "target_forward"): 2 * batch,
                     ("full", "online_forward"): 4 * subnets * batch, ("full", "target_forward"): 4 * batch}
    weights = [dict(t.model.named_parameters()) for t in (lean, full)]  # BatchNorm statistics aside
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert torch.equal(lean.model.method.queue, full.model.method.queue)


# ---- the Python API: slimssl.pretrain ------------------------------------------------------------------

def test_python_pretrain_stops_resumes_and_interoperates_with_the_cli(tmp_path, capsys):
    import slimssl
    from slimssl.cli import main

    run_dir = tmp_path / "run"
    first = slimssl.pretrain(tiny("byol", train={"epochs": 3}), run_dir, overrides=["train.knn_every=0"], max_steps=3)
    assert isinstance(first, slimssl.PretrainRun)
    assert (first.run_dir, first.step, first.total_steps, first.finished, first.results) == (run_dir, 3, 12, False, {})
    assert "knn_every: 0" in (run_dir / "config.yaml").read_text()
    assert "# views: the byol augmentation recipe, the method's own (data.augment unset)" in \
        (run_dir / "config.yaml").read_text()  # what `augment: null` stood for
    # the shell continues a run started from Python, and Python finishes it
    assert main(["pretrain", "--resume", str(run_dir), "--max-steps", "6"]) == 0
    last = slimssl.pretrain(out=run_dir, resume=True)
    assert last.finished and last.step == 12
    assert last.results == json.loads((run_dir / "results.json").read_text())
    supernet, saved = slimssl.load_supernet(run_dir)
    assert saved.train.knn_every == 0 and saved.name == "tiny_byol"


def test_a_resume_that_trains_nothing_leaves_the_run_as_it_was(tmp_path, caplog):
    """Settings changed by a resume that trains and evaluates nothing (a finished run; max_steps at the run's
    step) are not saved: config.yaml would otherwise describe settings the checkpoint was never trained with."""
    import slimssl

    files = ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "results.json")
    unfinished, finished = tmp_path / "unfinished", tmp_path / "finished"
    slimssl.pretrain(tiny("byol", train={"epochs": 1}), unfinished, overrides=["train.knn=false"], max_steps=2)
    slimssl.pretrain(tiny("byol", train={"epochs": 1}), finished, overrides=["train.knn=false"])
    for run, max_steps in ((unfinished, 2), (unfinished, 1), (finished, None)):
        before = {name: (run / name).read_bytes() for name in files if (run / name).is_file()}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="slimssl"):
            done = slimssl.pretrain(out=run, resume=True, max_steps=max_steps,
                                    overrides=["data.resolution=16", "optim.lr=0.1"])
        assert done.step == (2 if run == unfinished else 4)
        assert {name: (run / name).read_bytes() for name in before} == before
        assert "keeps the settings the run was trained with, and those this call changed are not kept: give " \
               "them again to a resume that trains" in caplog.text
        if max_steps is not None:
            said = [r for r in caplog.records
                    if f"at step 2 already: max_steps {max_steps} trains nothing" in r.message]
            assert [r.levelno for r in said] == [logging.WARNING if max_steps < 2 else logging.INFO]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slimssl"):  # nothing changed: nothing to say about settings
        slimssl.pretrain(out=finished, resume=True)
    assert "finished at step 4 already" in caplog.text and "keeps the settings" not in caplog.text
    # and a resume that trains takes the changed settings from there on
    assert slimssl.pretrain(out=unfinished, resume=True, max_steps=3, overrides=["optim.lr=0.1"]).step == 3
    assert "lr: 0.1" in (unfinished / "config.yaml").read_text()


def test_runs_stopped_early_leave_no_threads_behind(tmp_path):
    """A process that stops and resumes a run many times (a notebook, a scheduler) keeps no TensorBoard writer
    thread of the calls that stopped before the end: one was left per call."""
    import threading

    import slimssl

    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    slimssl.pretrain(tiny("byol", train={"epochs": 3}), run_dir, overrides=["train.knn_every=0"], max_steps=1)
    threads = threading.active_count()
    for step in range(2, 6):
        assert slimssl.pretrain(out=run_dir, resume=True, max_steps=step).step == step
    assert threading.active_count() == threads
    assert len(list((run_dir / "tb").iterdir())) == 5  # each call wrote its events


def test_a_sandwich_that_never_draws_some_private_bn_entries_is_refused_when_it_trains(tmp_path):
    """num_random 0 trains the largest and the smallest alone: with private BatchNorm the others would stay as
    initialised, yet be evaluated and exported as pretrained. Refused by training, not by the config, so that
    a checkpoint saved with such a config still opens for evaluation and export."""
    from slimssl.config import ConfigError

    cfg = config_from_dict(tiny(sampling="sandwich", slim={"num_random": 0}))  # the config itself is valid
    never = r"so w0p75_d1-1-1-1, w0p5_d1-1-1-1 would never be trained.*--set slim.num_random=1"
    with pytest.raises(ConfigError, match=never):
        Trainer(cfg, tmp_path / "private")
    assert not (tmp_path / "private" / "checkpoints").exists()
    for ok in (tiny(sampling="sandwich", slim={"num_random": 0}, widths=(1.0, 0.25)),  # both entries drawn
               {**tiny(sampling="sandwich", slim={"num_random": 0}), "model": {**tiny()["model"], "bn": "shared"}},
               tiny(sampling="all", slim={"num_random": 0})):
        Trainer(config_from_dict(ok), tmp_path / "ok").close()


def test_a_checkpoint_of_entries_not_trained_yet_says_so_when_opened(tmp_path, caplog):
    """Before a slow start's join (or from an old run that never drew them) the smaller entries are as
    initialised: evaluating or exporting them says so."""
    import slimssl

    run = tmp_path / "run"
    slimssl.pretrain(tiny(slim={"slow_start": 0.75}), run, overrides=["train.knn_every=0"], max_steps=1)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        slimssl.load_supernet(run)
    assert "w0p75_d1-1-1-1, w0p5_d1-1-1-1, w0p25_d1-1-1-1 never trained" in caplog.text
    caplog.clear()
    slimssl.pretrain(out=run, resume=True, overrides=["eval.knn_random_init=false"])  # joined, and trained
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        slimssl.load_supernet(run)
    assert "never trained" not in caplog.text


def test_a_run_without_tensorboard_installed_logs_to_metrics_jsonl_and_says_how_to_get_events(tmp_path, monkeypatch,
                                                                                                caplog):
    """TensorBoard is an extra: without it a run trains and logs as ever, and says where its events would come from."""
    import sys

    import slimssl

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with caplog.at_level(logging.INFO, logger="slimssl"):
        slimssl.pretrain(tiny("byol"), tmp_path / "run", overrides=["train.knn_every=0"], max_steps=2)
    assert "pip install tensorboard (the tensorboard extra)" in caplog.text
    assert not (tmp_path / "run" / "tb").exists()
    steps = [json.loads(line).get("step") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 2 in steps


def test_python_pretrain_refuses_bad_arguments_before_writing(tmp_path):
    import slimssl

    with pytest.raises(slimssl.SlimsslError, match="resuming needs the run directory"):
        slimssl.pretrain(resume=True)
    with pytest.raises(slimssl.SlimsslError, match="cannot resume: .*last.pt does not exist"):
        slimssl.pretrain(out=tmp_path / "none", resume=True)
    with pytest.raises(slimssl.SlimsslError, match="list of 'KEY=VALUE' strings"):
        slimssl.pretrain(tiny(), tmp_path / "a", overrides="train.epochs=1")
    with pytest.raises(slimssl.SlimsslError, match="train.epochs"):
        slimssl.pretrain(slimssl.load_config("demo"), tmp_path / "b", overrides=["train.epochs=-1"])
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_with_the_former_knn_history_still_resumes(tmp_path):
    data = tiny("byol", widths=[1.0, 0.5])
    Trainer(config_from_dict(data), tmp_path / "run").fit(max_steps=1)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    saved = torch.load(path, weights_only=True)
    saved["train_state"]["knn_history"] = [{"epoch": 1, "w1p0_d1-1-1-1": 12.5}]  # as written until 2026-12-02
    torch.save(saved, path)
    resumed = Trainer(config_from_dict(data), tmp_path / "run", resume=True)
    assert resumed.state.step == 1
    resumed.fit(max_steps=2)
    assert resumed.state.step == 2


# ---- what the loop does with the policy's plan: distillation, loss weights, lr, the whole state -----------

def _first_step_losses(tmp_path, name, **slim) -> tuple[dict[str, float], Trainer]:
    data = tiny("mocov3", "all", "online", slim=slim, optim={"momentum": 0.0, "weight_decay": 0.0})
    trainer = Trainer(config_from_dict(data), tmp_path / name)
    return {k: v.item() for k, v in trainer.train_step(0).losses.items()}, trainer


def test_online_distillation_is_mixed_into_every_sub_networks_loss_and_not_the_teachers(tmp_path):
    plain, _ = _first_step_losses(tmp_path, "alpha0", distill_alpha=0.0)
    kd_only, _ = _first_step_losses(tmp_path, "alpha1", distill_alpha=1.0)
    half, trainer = _first_step_losses(tmp_path, "alpha05", distill_alpha=0.5)
    hotter, _ = _first_step_losses(tmp_path, "t5", distill_alpha=1.0, distill_temperature=5.0)
    scaled, _ = _first_step_losses(tmp_path, "scale25", distill_alpha=0.5, distill_scale=25.0)
    full = trainer.model.backbone.menu.largest.name
    assert plain[full] == pytest.approx(kd_only[full]) == pytest.approx(half[full])  # the teacher is not distilled
    assert scaled[full] == pytest.approx(plain[full])
    for name in set(plain) - {full}:
        assert abs(kd_only[name] - plain[name]) > 1e-3  # alpha 1: the distillation term alone
        assert half[name] == pytest.approx(0.5 * plain[name] + 0.5 * kd_only[name], rel=1e-5)
        assert abs(hotter[name] - kd_only[name]) > 1e-4  # the temperature is applied
        assert scaled[name] == pytest.approx(0.5 * plain[name] + 0.5 * 25 * kd_only[name], rel=1e-5)


def test_slimclr_loss_weight_scales_the_full_networks_update(tmp_path):
    moved, logged = {}, {}
    key = "backbone.bn1.bns.w1p0_d1-1-1-1.weight"  # the full network's private BatchNorm: only its loss reaches it
    for weights in ("uniform", "slimclr"):
        data = tiny("byol", "all", "target", slim={"loss_weights": weights}, optim={"momentum": 0.0, "weight_decay": 0.0})
        trainer = Trainer(config_from_dict(data), tmp_path / weights)
        before = trainer.model.state_dict()[key].clone()
        logged[weights] = trainer.train_step(0).losses
        moved[weights] = trainer.model.state_dict()[key] - before
    assert moved["uniform"].abs().max() > 0
    # SlimCLR: the full network's loss counts 1 + the sum of the other widths (0.75 + 0.5 + 0.25)
    torch.testing.assert_close(moved["slimclr"], 2.5 * moved["uniform"], rtol=1e-4, atol=1e-7)
    # only the update is weighted: the losses logged are the method's own, comparable across rules
    assert logged["slimclr"].keys() == logged["uniform"].keys()
    for name, loss in logged["uniform"].items():
        torch.testing.assert_close(logged["slimclr"][name], loss)


def test_every_student_distils_from_the_full_network(tmp_path):
    """Online distillation: one teacher per step, the full network, for every narrower sub-network (not a chain in
    which each learns from the next larger)."""
    trainer = Trainer(config_from_dict(tiny("mocov2", "all", "online")), tmp_path)  # four widths
    teachers, distill = [], trainer.model.method.distill

    def recording(student, teacher, temperature):
        teachers.append(teacher)
        return distill(student, teacher, temperature)

    trainer.model.method.distill = recording
    trainer.train_step(0)
    assert len(teachers) == 3 and all(t is teachers[0] for t in teachers)


def test_trainer_lr_follows_warmup_floor_and_schedule(tmp_path):
    data = tiny("byol", widths=[1.0, 0.5], optim={"warmup_epochs": 1, "min_lr_ratio": 0.1})
    trainer = Trainer(config_from_dict(data), tmp_path / "cosine")
    lrs = [trainer.set_lr(s) for s in range(trainer.total_steps)]
    assert lrs == pytest.approx([lr_at(s, 8, 4, trainer.peak_lr, 0.1) for s in range(8)])
    assert lrs[0] < trainer.peak_lr / 2 and lrs[-1] > 0.1 * trainer.peak_lr * 0.99
    constant = Trainer(config_from_dict(tiny("byol", widths=[1.0, 0.5], optim={"schedule": "constant"})),
                       tmp_path / "constant")
    assert constant.set_lr(constant.total_steps - 1) == constant.peak_lr


def test_resume_keeps_the_whole_train_state(tmp_path):
    data = tiny("byol", widths=[1.0, 0.5])
    first = Trainer(config_from_dict(data), tmp_path)
    first.fit(max_steps=1)
    first.state.skipped_steps = 3
    first.save()
    resumed = Trainer(config_from_dict(data), tmp_path, resume=True)
    assert resumed.state.skipped_steps == 3
    assert resumed.state.knn_random_init and resumed.state.knn_random_init == first.state.knn_random_init


def test_fp16_resume_restores_the_loss_scale_and_continues_exactly(tmp_path):
    data = tiny("byol", widths=[1.0, 0.5], train={"precision": "fp16"})
    straight = Trainer(config_from_dict(data), tmp_path / "straight")
    straight.fit(max_steps=4)
    first = Trainer(config_from_dict(data), tmp_path / "resumed")
    first.fit(max_steps=2)
    second = Trainer(config_from_dict(data), tmp_path / "resumed", resume=True)
    assert second.scaler.is_enabled() and second.scaler.get_scale() == first.scaler.get_scale()
    second.fit(max_steps=4)
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_knn_every_logs_a_knn_record_per_epoch(tmp_path):
    trainer = Trainer(config_from_dict(tiny("byol", widths=[1.0, 0.5], train={"epochs": 3, "knn_every": 1})),
                      tmp_path)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "knn_top1" in r] == [1, 2, 3]


def test_target_update_averages_the_weights_and_copies_every_buffer(tmp_path):
    model = Trainer(config_from_dict(tiny("byol")), tmp_path).model
    online = {n: t for n, t in model.state_dict().items() if not n.startswith(("target.", "predictor."))}
    for name, t in online.items():  # the online network moves away from its target, counters and statistics too
        t.add_(1 if t.dtype == torch.int64 else 0.5)
    before = {n: t.clone() for n, t in model.target.state_dict().items()}
    model.update_target(0.9)
    buffers = {n for n, _ in model.target.named_buffers()}
    assert any(before[n].dtype == torch.int64 for n in buffers) and any(before[n].is_floating_point() for n in buffers)
    for name, t in model.target.state_dict().items():
        if name in buffers:
            assert t.dtype == before[name].dtype and torch.equal(t, online[name]), name
        else:
            assert torch.allclose(t, 0.9 * before[name] + 0.1 * online[name]), name


def test_the_target_update_follows_tensors_that_a_move_replaced(tmp_path):
    """update_target finds its tensors once; .to() (a dtype, a device, channels_last) replaces the buffers, and
    the next update must write the new ones, not the old."""
    model = Trainer(config_from_dict(tiny("byol")), tmp_path).model
    model.update_target(0.9)
    model.to(torch.float64)
    for t in model.backbone.state_dict().values():
        t.add_(1)
    model.update_target(0.0)  # momentum 0: the target becomes the online network
    online = model.backbone.state_dict()
    assert all(torch.equal(t, online[k]) for k, t in model.target["backbone"].state_dict().items())

    def target_follows(net) -> bool:  # after the online network changed: does an update reach the target?
        with torch.no_grad():
            for p in net.backbone.parameters():
                p.add_(1)
        net.update_target(0.0)
        online = net.backbone.state_dict()
        return all(torch.equal(t, online[k]) for k, t in net.target["backbone"].state_dict().items())

    import copy

    assert target_follows(copy.deepcopy(model))  # the copy's own tensors, not the original's
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)  # the given tensors take the place of the modules' own
    assert target_follows(model)
    first = next(model.backbone.parameters())
    first.data = first.data.clone()  # a parameter given new storage
    assert target_follows(model)


def test_a_step_trains_the_model_however_it_was_left(tmp_path):
    """A step puts the model in train mode only when it is not (the walk of every module costs host time): after
    the kNN monitor, which gives it back in train mode, and after an eval() of the whole model or the backbone."""
    trainer = Trainer(config_from_dict(tiny("byol", widths=[1.0, 0.5])), tmp_path)
    trainer.knn()
    assert all(m.training for m in trainer.model.modules())
    seen = []
    forward = trainer.online_forward

    def recording(x):
        seen.append(all(m.training for m in trainer.model.modules()))
        return forward(x)

    trainer.online_forward = recording
    for step, leave in enumerate([lambda: None, trainer.model.eval, trainer.model.backbone.eval]):
        leave()
        trainer.train_step(step)
    assert seen and all(seen)


def test_progress_bar_labels_tell_depth_entries_apart():
    from slimssl.train.metrics import bar_labels

    assert bar_labels(["w1p0_d2-2-2-2", "w0p25_d2-2-2-2"]) == ["w1p0", "w0p25"]  # a width menu: widths suffice
    crossed = ["w1p0_d3-4-6-3", "w1p0_d2-2-2-2", "w0p25_d2-2-2-2"]
    assert bar_labels(crossed) == crossed  # w1p0 twice would not say which loss is which


@pytest.mark.parametrize("env, enabled, shown", [(None, True, True), ("1", True, False), ("true", True, False),
                                                 ("0", True, True), (None, False, False)])
def test_the_progress_bar_is_shown_on_rank_0_unless_tqdm_disable_turns_it_off(monkeypatch, capsys, env, enabled,
                                                                              shown):
    from slimssl.train.metrics import progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    if env is not None:
        monkeypatch.setenv("TQDM_DISABLE", env)
    with progress_bar(0, 4, enabled) as bar:
        bar.update(4)
    assert ("4/4" in capsys.readouterr().err) == shown


def test_the_progress_bar_of_a_notebook_is_redrawn_often_and_a_log_files_every_30_s(monkeypatch):
    """A notebook's kernel writes stderr to no terminal, as a log file does, but its widget is redrawn in place."""
    import tqdm.notebook

    from slimssl.train.metrics import progress_bar

    made = []

    class NotebookBar(tqdm.notebook.tqdm):  # what tqdm.auto picks in a notebook, without drawing a widget
        def __init__(self, **kwargs):
            made.append(kwargs["mininterval"])

        def __del__(self):
            pass

    monkeypatch.setattr("tqdm.auto.tqdm", NotebookBar)
    progress_bar(0, 4, True)
    monkeypatch.setattr("tqdm.auto.tqdm", tqdm.std.tqdm)
    with progress_bar(0, 4, True) as bar:  # pytest's stderr is no terminal: a log file's interval
        assert bar.mininterval == 30.0
    assert made == [0.5]


@pytest.mark.parametrize("env", ["True", " yes ", "ON"])
def test_tqdm_disable_is_read_in_any_case_and_spacing(monkeypatch, capsys, env):
    from slimssl.train.metrics import progress_bar

    monkeypatch.setenv("TQDM_DISABLE", env)
    with progress_bar(0, 4, True) as bar:
        bar.update(4)
    assert "4/4" not in capsys.readouterr().err


def test_a_resume_with_other_cpu_threads_says_it_will_not_be_bit_for_bit(tmp_path, caplog):
    """A CPU step's float rounding depends on the threads that sum it: the checkpoint records them (and torch,
    the device, the processes), and a resume that differs says so."""
    import slimssl

    run = tmp_path / "run"
    threads = torch.get_num_threads()
    slimssl.pretrain(tiny("byol", train={"epochs": 1}), run, overrides=["train.knn=false"], max_steps=1)
    assert load_checkpoint(run)["numerics"] == {"torch": torch.__version__, "device": "cpu", "processes": 1,
                                                "cpu_threads": threads}
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        slimssl.pretrain(out=run, resume=True, max_steps=2)
    assert "not be bit for bit" not in caplog.text  # the same machine, the same threads
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level(logging.WARNING, logger="slimssl"):
            slimssl.pretrain(out=run, resume=True, max_steps=3)
    finally:
        torch.set_num_threads(threads)
    assert f"was saved with cpu_threads {threads}; this process has cpu_threads {threads + 1}: the run continues" \
           in caplog.text


def test_a_pretrain_run_stands_for_its_run_directory(tmp_path, caplog, monkeypatch):
    """``slimssl.knn(run)`` as ``slimssl.knn(run.run_dir)``: a PretrainRun is an os.PathLike of its directory,
    and messages name the directory."""
    import os

    import slimssl

    run = slimssl.pretrain(tiny("byol", train={"epochs": 2}), tmp_path / "run", overrides=["train.knn_every=0"],
                           max_steps=1)
    assert os.fspath(run) == str(run) == str(tmp_path / "run")
    with pytest.raises(slimssl.UsageError, match=r"already holds a run; continue it with resume=True \(resume='auto' "
                                                 r"starts or continues it\)"):  # a notebook cell run again
        slimssl.pretrain(tiny("byol", train={"epochs": 2}), run)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "run").mkdir(parents=True)  # a run folder of the same relative name: not the one returned
    monkeypatch.chdir(tmp_path)
    relative = slimssl.pretrain(out="run", resume=True, max_steps=1)
    assert relative.run_dir == tmp_path / "run" and relative.step == 1
    monkeypatch.chdir(elsewhere)
    resumed = slimssl.pretrain(out=relative, resume=True, max_steps=2)
    assert resumed.step == 2 and resumed.run_dir == run.run_dir
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        rows = slimssl.knn(resumed, [0.5])
    assert f"{tmp_path / 'run'} holds epoch" in caplog.text and "PretrainRun(" not in caplog.text
    assert json.loads((tmp_path / "run" / "results.json").read_text())["subnets"][0]["knn_top1"] == rows[0]["knn_top1"]
    assert slimssl.pick_subnet(resumed, max_macs=1e12)["subnet"] == rows[0]["subnet"]
    (exported,) = slimssl.export_run(resumed, tmp_path / "out", rows[0]["subnet"])
    supernet, _ = slimssl.load_supernet(resumed)
    assert slimssl.verify_export(supernet, rows[0]["subnet"], exported["path"], 16) < 1e-4
    (relative,) = slimssl.export_run(resumed, "out", rows[0]["subnet"])  # a folder of the working directory
    assert relative["path"] == str(elsewhere / "out" / rows[0]["subnet"])  # named from any working directory


def test_runs_started_in_the_same_second_without_out_get_folders_of_their_own(tmp_path, monkeypatch):
    """The default run directory is named to the second: a second run of the same recipe in that second (a loop of
    short runs) gets ``-2``, not a refusal that the folder already holds a run."""
    import slimssl
    from slimssl.train import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare.time, "strftime", lambda fmt: "20261207-171420")
    config = tiny("byol", train={"epochs": 2, "knn": False})
    first = slimssl.pretrain(config, max_steps=1)
    second = slimssl.pretrain(config, max_steps=1)
    third = slimssl.pretrain(config, max_steps=1)
    name = first.run_dir.name
    assert name.endswith("-20261207-171420") and first.run_dir.parent == tmp_path / "runs"
    assert (second.run_dir.name, third.run_dir.name) == (f"{name}-2", f"{name}-3")
    assert first.step == second.step == third.step == 1


def test_the_callers_torch_modes_are_not_the_runs_and_come_back(tmp_path):
    """A notebook cell or a test left under no_grad or inference_mode, a float64 default dtype, an outer autocast:
    pretraining and the evaluations failed with torch's own errors (a loss without a gradient, float64 layers fed
    float32 images, a kNN vote in bfloat16). They run as in a plain process, and give the modes back."""
    import slimssl

    config = tiny("byol", widths=[1.0, 0.5], train={"epochs": 1, "knn": False})

    def measured(run_dir):
        run = slimssl.pretrain(config, run_dir, max_steps=2)
        knn = slimssl.knn(run, k=3, save=False)
        linear = slimssl.linear_probe(run, epochs=1, save=False)
        finetuned = slimssl.finetune(run, 1.0, 1.0, epochs=1, save=False)
        return ([r["knn_top1"] for r in knn], [r["linear_top1"] for r in linear], finetuned[0]["top1"],
                load_checkpoint(run_dir)["model"])

    plain = measured(tmp_path / "plain")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            ambient = measured(tmp_path / "ambient")
            assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
            assert torch.is_autocast_enabled("cpu")
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(dtype)
    assert ambient[:3] == plain[:3]
    assert all(torch.equal(ambient[3][k], plain[3][k]) for k in plain[3])
    supernet, cfg = slimssl.load_supernet(tmp_path / "plain")
    with pytest.raises(slimssl.SlimsslError, match=r"weights are torch.float64; the evaluations run a float32 "
                                                   r"supernet, as pretraining trains one: pass supernet.float\(\)"):
        slimssl.knn(supernet.double(), config=cfg, k=3)
