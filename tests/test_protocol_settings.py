"""Each setting of the data order and of the evaluation protocols reaches what it sets: a setting that is
recorded but not applied would go unseen by tests that compare a protocol with itself (a mutation audit found
these gaps; every test here fails with the setting ignored)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import slimssl
import slimssl.eval.knn as knn_mod
from slimssl.data.views import BatchSharding
from slimssl.eval.finetune import _recipe, balanced_subset, default_recipe
from slimssl.eval.features import extract_subnet_features
from slimssl.eval.linear import _ProbeFeatures
from test_eval import RES, colour_dataset, make_checkpoint, tiny_supernet


# ---- the data order of pretraining ----------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_takes_each_image_once_and_the_next_epoch_reshuffles(world):
    steps = 3  # 20 images in global batches of 6: 3 steps, 2 images left out of each epoch
    shards = [BatchSharding(20, 6, rank=r, world=world, seed=3) for r in range(world)]

    def epoch(e: int) -> list[torch.Tensor]:
        return [torch.cat([s.indices(e * steps + i) for s in shards]) for i in range(steps)]

    first, second = epoch(0), epoch(1)
    for batches in (first, second):
        seen = torch.cat(batches).tolist()
        assert len(seen) == len(set(seen)) == 18  # every step other images, none twice
    assert torch.cat(first).tolist() != torch.cat(second).tolist()
    # and the same images at each step whatever the number of processes
    one = BatchSharding(20, 6, rank=0, world=1, seed=3)
    assert [b.tolist() for b in first] == [one.indices(i).tolist() for i in range(steps)]


# ---- kNN -------------------------------------------------------------------------------------------------

def test_knn_votes_with_the_k_and_temperature_given_and_records_them(tmp_path, monkeypatch):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    voted = []
    real = knn_mod.knn_accuracy

    def spy(bank, bank_labels, queries, query_labels, num_classes, k, temperature, **kw):
        voted.append((k, temperature))
        return real(bank, bank_labels, queries, query_labels, num_classes, k, temperature, **kw)

    monkeypatch.setattr(knn_mod, "knn_accuracy", spy)
    slimssl.knn(run, k=3, temperature=0.5, device="cpu")
    assert set(voted) == {(3, 0.5)}
    recorded = json.loads((run / "results.json").read_text())["protocols"]["knn"]
    assert (recorded["k"], recorded["temperature"]) == (3, 0.5)
    voted.clear()
    slimssl.knn(run, device="cpu", save=False)
    assert set(voted) == {(10, 0.1)}  # the config's eval.knn_k and eval.knn_temperature


# ---- the linear probe ------------------------------------------------------------------------------------

def test_probe_features_of_the_test_split_are_standardised_with_the_train_splits_statistics():
    supernet = tiny_supernet()
    specs = list(supernet.menu)
    train, test = colour_dataset(32, 0), colour_dataset(16, 1, "test")
    test.images = (test.images.int() + 40).clamp(max=255).to(torch.uint8)  # another mean than the train split
    image = dict(resolution=RES, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=16, device="cpu")
    models = {s.name: supernet for s in specs}
    features = _ProbeFeatures(models, specs, train, augment=False, crop="pad", **image)
    raw_train = extract_subnet_features(models, specs, train, **image)
    raw_test = extract_subnet_features(models, specs, test, **image)
    for spec, standardised in features.of_split(test).items():
        mean, std = raw_train[spec].mean(0), raw_train[spec].std(0).clamp_min(1e-6)  # (dead ReLUs: 0)
        torch.testing.assert_close(standardised, (raw_test[spec] - mean) / std, rtol=1e-4, atol=1e-4)


# ---- BatchNorm recalibration -----------------------------------------------------------------------------

def test_the_recalibration_seed_chooses_the_sample(tmp_path):
    from slimssl.checkpoint import load_checkpoint

    make_checkpoint(tmp_path / "in.pt", bn="shared")  # 64 fake train images: 4 batches of 16
    means = {}
    for seed in (0, 3, 3):
        out = tmp_path / f"seed{seed}.pt"
        slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, out, batches=2, seed=seed, eval_batch_size=16,
                                       device="cpu")
        means.setdefault(seed, []).append(load_checkpoint(out)["model"]["backbone.bn1.bn.running_mean"])
    assert torch.equal(means[3][0], means[3][1])  # a seed gives its sample again
    assert not torch.equal(means[0][0], means[3][0])


# ---- fine-tuning -----------------------------------------------------------------------------------------

def test_a_balanced_subset_takes_at_most_the_smallest_class(caplog):
    labels = torch.tensor([0] * 2 + [1] * 50)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        chosen = balanced_subset(labels, 0.5)
    assert torch.bincount(labels[chosen]).tolist() == [2, 2]
    assert "asks for 13 examples per class; the smallest class has 2, so 2 of each class are used (4 images, " \
           "0.0769 of the split)" in caplog.text


def test_the_fine_tuning_recipe_follows_the_label_fraction():
    assert default_recipe(0.01).epochs == 60 and default_recipe(0.05).epochs == 60
    assert default_recipe(0.1).epochs == 30
    defaults = dict(epochs=None, lr=None, batch_size=None, crop=None, min_steps=None)
    assert _recipe(0.1, **defaults).min_steps == 100  # the default's floor of steps
    assert _recipe(0.1, **{**defaults, "epochs": 2}).min_steps == 1  # epochs asked for run as asked
    recipe = _recipe(0.01, **defaults)
    assert (recipe.momentum, recipe.nesterov, recipe.weight_decay, recipe.lr, recipe.batch_size) == \
        (0.9, True, 0.0, 0.05, 256)


# ---- how far a checkpoint was trained --------------------------------------------------------------------

def test_a_finished_checkpoint_is_not_called_unfinished(tmp_path, caplog):
    make_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", epoch=4.0)  # 4 of 4 epochs
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        slimssl.knn(tmp_path / "run", device="cpu")
        slimssl.export_run(tmp_path / "run", tmp_path / "out", "0.5")
    assert "pretraining has not finished" not in caplog.text
    assert "unfinished" not in json.loads((tmp_path / "run" / "results.json").read_text())


def test_the_probe_visits_every_train_image_each_epoch_in_a_new_order(monkeypatch):
    """Batches of a permutation drawn per epoch, with the probe's momentum: not the same order every epoch."""
    import slimssl.eval.linear as linear_mod

    seen, momenta = [], set()
    real = linear_mod.probe_step

    def spy(heads, optimizer, features, labels, **kw):
        seen.append(labels.clone())
        momenta.update(g["momentum"] for g in optimizer.param_groups)
        return real(heads, optimizer, features, labels, **kw)

    monkeypatch.setattr(linear_mod, "probe_step", spy)
    train, test = colour_dataset(32, 0), colour_dataset(8, 1, "test")
    linear_mod.linear_probe_subnets(tiny_supernet(), train, test, resolution=RES, epochs=2, batch_size=8,
                                    device="cpu")
    first, second = torch.cat(seen[:4]), torch.cat(seen[4:])
    assert len(seen) == 8 and sorted(first.tolist()) == sorted(second.tolist()) == sorted(train.labels.tolist())
    assert not torch.equal(first, second) and momenta == {0.9}
