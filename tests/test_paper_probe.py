"""The papers' linear probe: the features as the backbone gives them (--raw-features) and a step schedule
(--milestones), recorded with the protocol's settings."""

from __future__ import annotations

import json

import pytest
import torch

import slimssl
from slimssl.eval import PROBE_OPTIMIZER
from slimssl.eval import linear as linear_mod
from slimssl.eval.features import extract_subnet_features
from slimssl.eval.linear import _ProbeFeatures, linear_probe_subnets
from slimssl.eval.supervised import augment_batch

from test_eval import RES, colour_dataset, make_checkpoint, tiny_supernet


def _recorded_lrs(monkeypatch) -> list[float]:
    lrs, step = [], linear_mod.probe_step

    def recording_step(heads, optimizer, *args, **kwargs):
        lrs.append(optimizer.param_groups[0]["lr"])
        return step(heads, optimizer, *args, **kwargs)

    monkeypatch.setattr(linear_mod, "probe_step", recording_step)
    return lrs


def test_milestones_drop_the_lr_tenfold_from_those_epochs_on(monkeypatch):
    lrs = _recorded_lrs(monkeypatch)
    train, test = colour_dataset(64, 0), colour_dataset(32, 1, "test")  # 4 steps of 16 per epoch
    linear_probe_subnets(tiny_supernet(), train, test, epochs=5, batch_size=16, lr=2.0, milestones=[2, 4])
    assert lrs == pytest.approx([2.0] * 8 + [0.2] * 8 + [0.02] * 4)


def test_raw_features_reach_the_heads_as_the_backbone_gives_them(monkeypatch):
    supernet = tiny_supernet()
    specs = list(supernet.menu)
    train = colour_dataset(32, 0)
    image = dict(resolution=RES, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=16,
                 device=torch.device("cpu"))
    models = {s.name: supernet for s in specs}
    raw = extract_subnet_features(models, specs, train, **image)
    for augment in (False, True):
        features = _ProbeFeatures(models, specs, train, augment=augment, crop="pad", raw_features=True, **image)
        for name, tensor in features.of_split(train).items():
            torch.testing.assert_close(tensor, raw[name])
        standardised = _ProbeFeatures(models, specs, train, augment=augment, crop="pad", **image).of_split(train)
        assert not torch.allclose(standardised[specs[0].name], raw[specs[0].name])
    cached = _ProbeFeatures(models, specs, train, augment=False, crop="pad", raw_features=True, **image)
    idx = torch.tensor([3, 0, 7])
    for name, tensor in cached.of_batch(idx, None, torch.Generator()).items():
        torch.testing.assert_close(tensor, raw[name][idx])

    # augmented: each step's features as they are, and the train split is not read beforehand (nothing uses it)
    read = []
    monkeypatch.setattr(linear_mod, "extract_subnet_features", lambda *a, **k: read.append(a[2]) or {})
    augmented = _ProbeFeatures(models, specs, train, augment=True, crop="pad", raw_features=True, **image)
    assert read == []
    images = train.images[idx]
    got = augmented.of_batch(idx, images, torch.Generator().manual_seed(5))
    x = augment_batch(images, RES, image["mean"], image["std"], torch.Generator().manual_seed(5), "pad")
    for spec in specs:
        torch.testing.assert_close(got[spec.name], supernet(x, subnet=spec).float())


def test_the_papers_probe_is_recorded_with_its_settings(tmp_path, capsys):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["linear", str(run), "--epochs", "3", "--device", "cpu", "--json"]) == 0
    capsys.readouterr()
    default = json.loads((run / "results.json").read_text())["protocols"]["linear"]
    # as earlier versions recorded it: a reproduction compares these settings to find probes to run again
    assert default["optimizer"] == PROBE_OPTIMIZER == "sgd momentum 0.9, cosine, no weight decay"
    assert default["standardized_features"] is True
    assert main(["linear", str(run), "--epochs", "3", "--device", "cpu", "--json", "--raw-features", "--lr", "5",
                 "--milestones", "1", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    results = json.loads((run / "results.json").read_text())
    settings = results["protocols"]["linear"]
    assert settings["standardized_features"] is False and settings["lr"] == 5
    assert settings["optimizer"] == "sgd momentum 0.9, lr x0.1 at epochs 1 and 2, no weight decay"
    assert [r["linear_top1"] for r in rows] == [r["linear_top1"] for r in results["subnets"]]


@pytest.mark.parametrize("milestones, epochs", [([0, 2], 3), ([2, 1], 3), ([1, 3], 3), ([2, 2], 4), ([], 3),
                                                ([1.5], 3), ([True], 3)])
def test_impossible_milestones_are_refused_before_any_work(tmp_path, monkeypatch, milestones, epochs):
    from slimssl.eval import evaluate

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    (run / "results.json").write_text('{"subnets": []}')
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    with pytest.raises(slimssl.UsageError, match=r"^milestones must be epochs in increasing order, each > 0 and "
                                                 rf"< epochs \({epochs}\), got"):
        slimssl.linear_probe(run, epochs=epochs, milestones=milestones, device="cpu")
    assert (run / "results.json").read_text() == '{"subnets": []}'


@pytest.mark.parametrize("milestones", [2, "12", {1, 2}, 1.0])
def test_milestones_that_are_not_a_list_of_epochs_are_refused(milestones):
    from slimssl.eval import check_milestones

    with pytest.raises(slimssl.UsageError, match=r"^milestones must be a list of epochs \(ints\), got"):
        check_milestones(milestones, 5)


def test_milestones_may_be_any_sequence_of_ints_and_are_recorded_alike(monkeypatch):
    import numpy as np

    from slimssl.eval import check_milestones

    expected = (1, 3)
    for given in ([1, 3], (1, 3), np.array([1, 3]), range(1, 5, 2)):
        normalised = check_milestones(given, 5)
        assert normalised == expected and all(type(m) is int for m in normalised)
    lrs = _recorded_lrs(monkeypatch)
    train, test = colour_dataset(32, 0), colour_dataset(16, 1, "test")
    linear_probe_subnets(tiny_supernet(), train, test, epochs=2, batch_size=16, lr=1.0, milestones=np.array([1]))
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_the_cli_refuses_a_milestone_past_the_last_epoch(tmp_path, capsys, caplog):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["linear", str(run), "--epochs", "2", "--device", "cpu", "--milestones", "2"]) == 2
    assert "--milestones must be epochs in increasing order, each > 0 and < --epochs (2), got [2]" in caplog.text
    with pytest.raises(SystemExit) as usage:  # argparse: not a positive int
        main(["linear", str(run), "--device", "cpu", "--milestones", "0"])
    assert usage.value.code == 2 and "--milestones" in capsys.readouterr().err
