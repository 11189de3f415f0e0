"""Evaluation protocols: switchable linear probe, balanced subsets, frozen-backbone check, CLI kNN."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import slimssl
from slimssl.checkpoint import load_checkpoint, save_checkpoint
from slimssl.config import config_from_dict
from slimssl.data.datasets import ImageDataset
from slimssl.errors import DataError
from slimssl.eval import linear as linear_mod
from slimssl.eval import recalibration_batches
from slimssl.eval.finetune import balanced_subset, finetune_subnet, fraction_tag
from slimssl.eval.recalibrate import subnet_models
from slimssl.eval.linear import (BackboneChangedError, SharedSlimLinear, SwitchableLinear, backbone_fingerprint,
                                 check_backbone_unchanged, linear_probe_subnets, make_heads, probe_step,
                                 train_linear_probe)
from slimssl.eval.supervised import augment_batch, random_crop_flip, topk_accuracy
from slimssl.models.build import build_supernet

RES = 8


def tiny_config(bn: str = "private", source: str = "fake", **extra):
    return config_from_dict({"name": "tiny", "model": {"arch": "resnet18", "depths": [1, 1, 1, 1], "base_width": 4,
                                                       "stem": "cifar", "bn": bn},
                             "menu": {"widths": [1.0, 0.5]},
                             "data": {"source": source, "resolution": RES, "fake_size": 64},
                             "eval": {"knn_k": 10, "batch_size": 64}, **extra})


def tiny_supernet(bn: str = "private"):
    torch.manual_seed(0)
    return build_supernet(tiny_config(bn)).eval()


def colour_dataset(n: int, seed: int, split: str = "train") -> ImageDataset:
    """4 easily separable classes: red, green, blue, grey images plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    base = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220], [128, 128, 128]], dtype=torch.float)
    images = base[labels][:, :, None, None] + 25 * torch.randn(n, 3, RES, RES, generator=gen)
    images = images.clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, labels, ["r", "g", "b", "grey"], "colours", split)


def make_checkpoint(path, bn: str = "private", epoch: float | None = None):
    """A checkpoint of the tiny supernet; ``epoch``: the epochs it says it was trained for (of 4)."""
    cfg = tiny_config(bn, train={"epochs": 4})
    supernet = tiny_supernet(bn)
    save_checkpoint(path, {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names,
                           "model": {"backbone." + k: v for k, v in supernet.state_dict().items()},
                           **({} if epoch is None else {"epoch": epoch})})
    return supernet


def test_a_knn_bank_too_large_for_the_gpu_is_kept_in_host_memory(monkeypatch, caplog):
    from slimssl.eval import knn
    from slimssl.eval.knn import bank_storage

    monkeypatch.setattr(knn, "physical_memory", lambda: 64 * 2**30)  # a machine that holds it
    cached = []  # the allocator's blocks that training left cached count as used until they are given back
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: cached.append(1))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: ((8 if cached else 1) * 2**30, 80 * 2**30))
    with caplog.at_level(logging.INFO, logger="slimssl"):  # ImageNet's train split, a four-width ResNet-50
        assert bank_storage([2048, 1536, 1024, 512], 1_281_167, "cuda") == torch.device("cpu")
    assert "kNN: the bank's features (26.2 GB for 4 sub-networks) are kept in host memory, 8.6 GB" in caplog.text
    assert bank_storage([512, 256], 50_000, "cuda:1") == torch.device("cuda:1")  # 154 MB: on the GPU
    assert bank_storage([512, 256], 500_000, "cuda:1") == torch.device("cuda:1")  # 1.5 GB of the 8 GB freed
    assert bank_storage([2048], 10**6, "cpu") == torch.device("cpu")
    monkeypatch.setattr(knn, "physical_memory", lambda: 16 * 2**30)  # refused before a pass over the split
    with pytest.raises(DataError, match=r"kNN: the bank's features of 1,281,167 images for 4 sub-networks take 26.2 "
                                        r"GB, more than this machine's memory \(17.2 GB\): evaluate fewer"):
        bank_storage([2048, 1536, 1024, 512], 1_281_167, "cpu")
    with pytest.raises(DataError, match="more than this machine's memory"):  # the GPU too small, then the host
        bank_storage([2048, 1536, 1024, 512], 1_281_167, "cuda")
    assert bank_storage([2048], 10**6, "cpu") == torch.device("cpu")  # 8.2 GB fit
    monkeypatch.setattr(knn, "physical_memory", lambda: 12 * 2**30)  # 12.9 GB: one share fits, two do not
    assert bank_storage([2048], 10**6, "cpu") == torch.device("cpu")
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)  # two processes of torchrun on this machine, each with its own share
    with pytest.raises(DataError, match=r"take 8.2 GB, in each of the 2 processes on this machine, more than"):
        bank_storage([2048], 10**6, "cpu")


def test_a_long_feature_pass_says_how_far_it_is(monkeypatch, caplog):
    """ImageNet's train split takes minutes to pass through every sub-network: a line each PROGRESS_SECONDS."""
    from slimssl.eval import features
    from slimssl.eval.features import extract_subnet_features

    supernet = tiny_supernet()
    specs = list(supernet.menu)
    monkeypatch.setattr(features, "PROGRESS_SECONDS", 0.0)  # every batch but the last
    with caplog.at_level(logging.INFO, logger="slimssl"):
        out = extract_subnet_features(supernet, specs, colour_dataset(20, 0, "test"), resolution=RES,
                                      mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=8)
    assert [r.getMessage() for r in caplog.records] == ["features of the test split: 8 of 20 images (40%)",
                                                        "features of the test split: 16 of 20 images (80%)"]
    assert all(len(f) == 20 for f in out.values())
    caplog.clear()
    monkeypatch.setattr(features, "PROGRESS_SECONDS", 60.0)  # a pass shorter than that says nothing
    with caplog.at_level(logging.INFO, logger="slimssl"):
        extract_subnet_features(supernet, specs, colour_dataset(20, 0, "test"), resolution=RES,
                                mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=8)
    assert not caplog.records


# ---- heads -------------------------------------------------------------------------------------------

def _step_only(heads, active: str, dims):
    opt = torch.optim.SGD(heads.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    feats = {n: torch.randn(16, d, generator=gen) for n, d in dims.items()}
    labels = torch.randint(0, 3, (16,), generator=gen)
    probe_step(heads, opt, feats, labels, weights={n: float(n == active) for n in dims})


def test_switchable_heads_are_independent():
    dims = {"wide": 8, "narrow": 4}
    heads = make_heads(dims, 3)
    assert isinstance(heads, SwitchableLinear)
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    _step_only(heads, "narrow", dims)
    after = heads.state_dict()
    assert torch.equal(after["heads.wide.weight"], before["heads.wide.weight"])
    assert torch.equal(after["heads.wide.bias"], before["heads.wide.bias"])
    assert not torch.equal(after["heads.narrow.weight"], before["heads.narrow.weight"])


def test_shared_head_narrow_is_leading_slice_of_full():
    dims = {"wide": 8, "narrow": 4}
    heads = make_heads(dims, 3, shared=True)
    assert isinstance(heads, SharedSlimLinear)
    narrow = heads.weight_of("narrow")
    assert narrow.shape == (3, 4)
    assert narrow.data_ptr() == heads.weight_of("wide").data_ptr()
    assert torch.equal(narrow, heads.weight_of("wide")[:, :4])
    full_before = heads.weight.detach().clone()
    _step_only(heads, "narrow", dims)
    full_after = heads.weight.detach()
    assert not torch.equal(full_after[:, :4], full_before[:, :4])  # updated through the narrow head
    assert torch.equal(full_after[:, 4:], full_before[:, 4:])       # columns the narrow one never sees
    assert torch.equal(heads.weight_of("narrow"), full_after[:, :4])


def test_distill_loss_differs_only_for_sub_width_heads():
    dims = {"wide": 8, "narrow": 4}
    gen = torch.Generator().manual_seed(0)
    feats = {n: torch.randn(8, d, generator=gen) for n, d in dims.items()}
    labels = torch.randint(0, 3, (8,), generator=gen)
    heads = make_heads(dims, 3)
    plain, logits = linear_mod.probe_loss(heads, feats, labels)
    distilled, _ = linear_mod.probe_loss(heads, feats, labels, distill=True, teacher="wide")
    ce_wide = torch.nn.functional.cross_entropy(logits["wide"], labels)
    ce_narrow = torch.nn.functional.cross_entropy(logits["narrow"], labels)
    soft = -(logits["wide"].softmax(1) * logits["narrow"].log_softmax(1)).sum(1).mean()
    assert torch.allclose(plain, ce_wide + ce_narrow)
    assert torch.allclose(distilled, ce_wide + 0.5 * ce_narrow + 0.5 * soft)


def test_topk_accuracy_and_crop_flip():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_accuracy(logits, torch.tensor([0, 1]), ks=(1, 2, 5)) == [50.0, 100.0, 100.0]
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    y = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    assert all(torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1)) for i in range(2))
    assert random_crop_flip(x, 2, torch.Generator().manual_seed(0)).shape == x.shape


def test_a_classifier_of_labels_without_class_names_has_an_output_for_the_largest_label():
    """Splits given without class names: labels 0 to 2 need 3 outputs, not 2."""
    from slimssl.eval.supervised import output_classes

    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    train = ImageDataset(images, torch.tensor([0, 2, 1]), None, "d", "train")
    test = ImageDataset(images, torch.tensor([0, 1, 1]), None, "d", "test")
    assert output_classes(train, test) == 3
    assert output_classes(ImageDataset(images, torch.tensor([0, 0, 0]), ["a", "b", "c", "d"], "d")) == 4  # named


def test_resized_train_crop_zooms_in_and_never_pads():
    """ImageNet's train crop (RandomResizedCrop + flip) keeps image content at every pixel and magnifies it;
    CIFAR's (pad, then crop) brings in the zero padding at the shifted border."""
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).expand(64, 3, 32, 32).contiguous()
    norm = dict(mean=(0.0,) * 3, std=(1.0,) * 3)
    resized = augment_batch(ramp, 32, **norm, generator=torch.Generator().manual_seed(0), crop="resized")
    assert resized.shape == (64, 3, 32, 32) and resized.min() >= 0 and resized.max() <= 1
    rows = resized[:, 0, 16]  # along x: a ramp, rising or (flipped) falling
    slopes = (rows[:, 1:] - rows[:, :-1]).abs().mean(1) * 31  # 1: the original ramp's; 1 / zoom after a crop
    assert (slopes < 1.01).all() and slopes.min() < 0.5
    assert (rows[:, -1] > rows[:, 0]).any() and (rows[:, -1] < rows[:, 0]).any()  # flipped and not
    ones = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    assert torch.equal(augment_batch(ones, 32, **norm, generator=torch.Generator(), crop="resized"),
                       torch.ones(64, 3, 32, 32))
    assert (augment_batch(ones, 32, **norm, generator=torch.Generator(), crop="pad") == 0).any()
    with pytest.raises(ValueError, match="train_crop must be one of pad, resized, whole, got 'centre'"):
        augment_batch(ones, 32, **norm, generator=torch.Generator(), crop="centre")

# ---- balanced subsets --------------------------------------------------------------------------------

def test_balanced_subset_is_balanced_and_seeded():
    labels = torch.arange(1000) % 10
    labels[:50] = 3  # unequal class sizes
    idx = balanced_subset(labels, 0.1, seed=0)
    counts = torch.bincount(labels[idx], minlength=10)
    assert (counts == counts[0]).all() and counts[0] == 10
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, balanced_subset(labels, 0.1, seed=0))
    assert not torch.equal(idx, balanced_subset(labels, 0.1, seed=1))
    tiny = balanced_subset(labels, 0.001, seed=0)  # rounds to 0 per class: at least one each
    assert torch.equal(torch.bincount(labels[tiny], minlength=10), torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError):
        balanced_subset(labels, 0.0, seed=0)
    assert [fraction_tag(f) for f in (0.01, 0.1, 0.005, 1)] == ["1pct", "10pct", "0p5pct", "100pct"]


# ---- the probe ---------------------------------------------------------------------------------------

def test_a_widths_probe_is_the_same_alone_or_among_others_in_any_order():
    """Each head starts from the seed and its sub-network's name alone, and trains on its own features."""
    supernet = tiny_supernet()
    train, test = colour_dataset(64, 0), colour_dataset(32, 1, "test")
    names = supernet.menu.names

    def probe(subnets):
        return linear_probe_subnets(supernet, train, test, subnets=subnets, epochs=2, batch_size=16, seed=3)

    together, backwards = probe(names), probe(names[::-1])
    for name in names:
        alone = probe([name])[name]
        assert together[name] == backwards[name] == alone


def test_linear_probe_learns_separable_data():
    supernet = tiny_supernet()
    train, test = colour_dataset(160, 0), colour_dataset(80, 1, "test")
    before = backbone_fingerprint(supernet)
    results = linear_probe_subnets(supernet, train, test, epochs=15, batch_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert set(results) == set(supernet.menu.names)
    for r in results.values():
        assert r["top1"] > 80.0  # chance: 25
        assert r["top5"] == 100.0  # 4 classes
    check_backbone_unchanged(supernet, before)


def probe_and_heads(*args, **options):
    probe = train_linear_probe(*args, **options)
    return probe.results, probe.heads


def test_linear_probe_options_run():
    supernet = tiny_supernet()
    train, test = colour_dataset(64, 0), colour_dataset(32, 1, "test")
    for kw in ({"augment": True}, {"augment": True, "train_crop": "resized"}, {"distill": True, "shared_head": True}):
        results, heads = probe_and_heads(supernet, train, test, epochs=2, batch_size=32, **kw)
        assert set(results) == set(supernet.menu.names)
        assert isinstance(heads, SharedSlimLinear if kw.get("shared_head") else SwitchableLinear)


def test_distilled_probe_teacher_is_the_widest_head_in_any_order():
    supernet = tiny_supernet()
    train, test = colour_dataset(64, 0), colour_dataset(32, 1, "test")
    kw = dict(subnets=["0.5", "1.0"], epochs=2, batch_size=32)
    _, plain = probe_and_heads(supernet, train, test, **kw)
    _, distilled = probe_and_heads(supernet, train, test, distill=True, **kw)
    teacher, student = "w1p0_d1-1-1-1", "w0p5_d1-1-1-1"
    # the full width learns from the labels alone, as without distillation; the half width from it too
    assert torch.equal(plain.state_dict()[f"heads.{teacher}.weight"], distilled.state_dict()[f"heads.{teacher}.weight"])
    assert not torch.equal(plain.state_dict()[f"heads.{student}.weight"],
                           distilled.state_dict()[f"heads.{student}.weight"])


def test_backbone_change_is_detected(monkeypatch):
    supernet = tiny_supernet()
    train, test = colour_dataset(32, 0), colour_dataset(16, 1, "test")
    original = linear_mod.extract_subnet_features

    def tampering(models, *args, **kwargs):
        with torch.no_grad():
            next(iter(models.values())).conv1.weight.add_(1.0)
        return original(models, *args, **kwargs)

    monkeypatch.setattr(linear_mod, "extract_subnet_features", tampering)
    with pytest.raises(BackboneChangedError, match="conv1.weight"):
        linear_probe_subnets(supernet, train, test, epochs=1)
    before = backbone_fingerprint(supernet)
    with torch.no_grad():
        supernet.layer1[0].bn1.bns["w0p5_d1-1-1-1"].running_mean.add_(1.0)  # a buffer counts too
    with pytest.raises(BackboneChangedError, match="running_mean"):
        check_backbone_unchanged(supernet, before)


def test_shared_bn_recalibrates_copies_only():
    supernet = tiny_supernet("shared")
    assert not supernet.slim_state.private_bn
    before = backbone_fingerprint(supernet)
    train = colour_dataset(64, 0)
    models = subnet_models(supernet, list(supernet.menu), train.images, recalibrate_batches=None, batch_size=16,
                           resolution=RES, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert all(m is not supernet for m in models.values())
    assert models["w1p0_d1-1-1-1"] is not models["w0p5_d1-1-1-1"]
    check_backbone_unchanged(supernet, before)
    stats = [m.layer1[0].bn1.bn.running_mean[:2] for m in models.values()]
    assert not torch.equal(stats[0], supernet.layer1[0].bn1.bn.running_mean[:2])
    assert not torch.equal(stats[0], stats[1])
    private = tiny_supernet()
    assert all(m is private for m in subnet_models(private, list(private.menu), train.images,
                                                   recalibrate_batches=None, batch_size=16, resolution=RES,
                                                   mean=(0.5,) * 3, std=(0.25,) * 3).values())


def test_shared_statistics_not_estimated_or_fewer_batches_than_asked_are_said(caplog):
    supernet = tiny_supernet("shared")
    train = colour_dataset(40, 0)
    image = dict(batch_size=16, resolution=RES, mean=(0.5,) * 3, std=(0.25,) * 3)
    subnet_models(supernet, list(supernet.menu), train.images, recalibrate_batches=0, **image)
    assert "w1p0_d1-1-1-1, w0p5_d1-1-1-1 evaluated with shared BatchNorm statistics that were not estimated for " \
           "them (recalibrate_bn 0)" in caplog.text
    subnet_models(supernet, [supernet.menu.largest], train.images, recalibrate_batches=5, **image)
    assert "BatchNorm recalibration reads 2 batch(es) of 16, not 5: the train split holds 40 images" in caplog.text
    assert recalibration_batches(5, False, 40, 16) == 2 and recalibration_batches(5, False, 8, 16) == 1
    assert recalibration_batches(None, True, 40, 16) == 0


def test_recalibration_reads_whole_batches_only():
    supernet = tiny_supernet("shared")
    spec = supernet.menu.smallest
    kw = dict(batch_size=16, resolution=RES, mean=(0.5,) * 3, std=(0.25,) * 3)

    def stats(images, batches):
        model = subnet_models(supernet, [spec], images, recalibrate_batches=batches, **kw)[spec.name]
        return model.layer1[0].bn1.bn.running_var

    train = colour_dataset(33, 0).images  # 2 whole batches and 1 image over: a third batch would be that image
    assert torch.equal(stats(train, 3), stats(train, 2))
    assert not torch.equal(stats(train, 2), stats(train, 1))
    few = colour_dataset(10, 0).images  # fewer than a batch: one batch of all of them
    assert torch.equal(stats(few, 3), stats(few, 1))


def test_a_label_fraction_below_one_image_per_class_says_what_it_uses(caplog):
    labels = torch.arange(300)  # 300 classes of one image
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert len(balanced_subset(labels, 0.01)) == 300
    assert "less than one image per class: one of each class is used (300 images, 1 of the split)" in caplog.text


def test_finetune_refuses_a_single_labelled_image():
    one_class = colour_dataset(8, 0)
    one_class.labels.zero_()
    with pytest.raises(slimssl.UsageError, match="gives 1 labelled image; fine-tuning needs 2"):
        finetune_subnet(tiny_supernet(), "0.5", one_class, one_class, label_fraction=0.1, epochs=1)


def test_label_fractions_are_taken_in_0_to_1_with_1_itself_meaning_every_label():
    """Fine-tuning on every label (1.0) is allowed; 0 and numbers outside (0, 1] are refused."""
    from slimssl.eval.evaluate import finetune_jobs

    supernet = tiny_supernet()
    assert [f for _, f in finetune_jobs(supernet, "1.0", 1.0)] == [1.0]
    assert [f for _, f in finetune_jobs(supernet, "1.0", [0.1, 1])] == [0.1, 1.0]
    for bad in (0, 1.5, -0.1):
        with pytest.raises(slimssl.UsageError, match=r"\(0, 1\]"):
            finetune_jobs(supernet, "1.0", bad)


def test_finetune_runs_and_keeps_supernet():
    supernet = tiny_supernet()
    before = backbone_fingerprint(supernet)
    train, test = colour_dataset(80, 0), colour_dataset(40, 1, "test")
    out = finetune_subnet(supernet, "0.5", train, test, label_fraction=0.1, seed=3, epochs=2, min_steps=5,
                          mean=(0.5,) * 3, std=(0.25,) * 3)
    assert out["subnet"] == "w0p5_d1-1-1-1" and out["num_labelled"] == 8 and out["per_class"] == 2
    assert out["indices"] == balanced_subset(train.labels, 0.1, 3).tolist()
    assert 0.0 <= out["top1"] <= 100.0 and out["recipe"]["steps"] == 5
    check_backbone_unchanged(supernet, before)


# ---- CLI ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["knn", "recalibrate"])
def test_cli_evaluation_on_a_missing_gpu_is_one_line_exit_2(tmp_path, capsys, caplog, command):
    from slimssl.cli import main

    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    make_checkpoint(ckpt)
    extra = ["--subnet", "0.5", "--out", str(tmp_path / "re.pt")] if command == "recalibrate" else []
    assert main([command, str(ckpt), "--device", "cuda", *extra]) == 2
    text = capsys.readouterr().err + caplog.text
    assert "--device) is cuda, but PyTorch sees no CUDA device here" in text and "Traceback" not in text
    assert not (tmp_path / "re.pt").exists()


def test_cli_knn_json(tmp_path, capsys):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["knn", str(run / "checkpoints" / "last.pt"), "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["subnet"] for r in rows] == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1"]
    for r in rows:
        assert r["params"] > 0 and r["macs"] > 0 and 0.0 <= r["knn_top1"] <= 100.0
    assert rows[0]["params"] > rows[1]["params"]
    saved = json.loads((run / "results.json").read_text())
    assert {r["subnet"]: r["knn_top1"] for r in saved["subnets"]} == {r["subnet"]: r["knn_top1"] for r in rows}
    assert saved["protocols"]["knn"]["k"] == 10


def test_a_checkpoint_whose_config_says_slow_start_lr_0_is_read_as_it_trained(tmp_path):
    """Before 0 was refused, a run's slow_start_lr 0 was read as null (it trained on at optim.lr): its checkpoint
    is still evaluated, with that meaning, while a new config with 0 is refused."""
    make_checkpoint(tmp_path / "in.pt")
    saved = load_checkpoint(tmp_path / "in.pt")
    config = saved["config"].model_dump(mode="json")
    save_checkpoint(tmp_path / "old.pt", {**{k: v for k, v in saved.items() if k not in ("format", "version")},
                                          "config": {**config, "slim": {**config["slim"], "slow_start_lr": 0.0}}})
    supernet, cfg = slimssl.load_supernet(tmp_path / "old.pt")
    assert cfg.slim.slow_start_lr is None
    assert [row["subnet"] for row in slimssl.knn(tmp_path / "old.pt", data="fake", device="cpu", save=False)] == \
        supernet.menu.names
    with pytest.raises(slimssl.ConfigError, match="slim.slow_start_lr"):
        config_from_dict({**config, "slim": {"slow_start_lr": 0.0}})
    with pytest.raises(slimssl.ConfigError, match="slim.slow_start_lr"):  # not a value it trained with as unset
        config_from_dict({**config, "slim": {"slow_start_lr": -0.5}}, stored=True)


def test_cli_recalibrate_shared_bn(tmp_path, capsys):
    from slimssl.cli import main

    make_checkpoint(tmp_path / "in.pt", bn="shared")
    written = torch.load(tmp_path / "in.pt", weights_only=True)
    torch.save({**written, "saved_by": "slimssl 0.0.1"}, tmp_path / "in.pt")  # saved by an older slimssl
    assert main(["recalibrate", str(tmp_path / "in.pt"), "--subnet", "0.5", "--batches", "1",
                 "--out", str(tmp_path / "out.pt"), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["subnet"] == "w0p5_d1-1-1-1"
    old, new = load_checkpoint(tmp_path / "in.pt"), load_checkpoint(tmp_path / "out.pt")
    key = "backbone.bn1.bn.running_mean"
    assert not torch.equal(old["model"][key], new["model"][key])
    assert new["recalibrated"]["subnet"] == "w0p5_d1-1-1-1"
    assert new["saved_by"] == f"slimssl {slimssl.__version__}"  # the file recalibrate wrote names its writer
    assert main(["recalibrate", str(tmp_path / "in.pt"), "--subnet", "0.3:9,9,9,9", "--out",
                 str(tmp_path / "x.pt"), "--device", "cpu"]) == 2  # a sub-network that cannot exist


def test_recalibrate_checkpoint_from_python_is_the_command(tmp_path, capsys, caplog):
    from slimssl.cli import main

    make_checkpoint(tmp_path / "in.pt", bn="shared")
    row = slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "api.pt", batches=2, seed=3,
                                         device="cpu", eval_batch_size=4)
    assert row == {"subnet": "w0p5_d1-1-1-1", "batches": 2, "batches_read": 2, "batch_size": 4, "images_read": 8,
                   "out": str(tmp_path / "api.pt")}
    capsys.readouterr()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="slimssl")
    assert main(["recalibrate", str(tmp_path / "in.pt"), "--subnet", "0.5", "--batches", "2", "--seed", "3",
                 "--out", str(tmp_path / "cli.pt"), "--device", "cpu", "--eval-batch-size", "4"]) == 0
    said = capsys.readouterr()
    assert f"of w0p5_d1-1-1-1 on 2 batch(es) of 4 (8 images) -> {tmp_path / 'cli.pt'}" in said.out
    assert "wrote" not in caplog.text  # said once, not again as a log line
    # more batches than the train split holds: what was read is said and recorded, beside what was asked
    many = slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "many.pt", batches=10_000,
                                          device="cpu", eval_batch_size=4)
    from slimssl.data.datasets import load_dataset

    images = len(load_dataset("fake", fake_size=load_checkpoint(tmp_path / "in.pt")["config"].data.fake_size))
    assert (many["batches"], many["batches_read"], many["images_read"]) == (10_000, images // 4, images // 4 * 4)
    whole = slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "whole.pt", batches=1, device="cpu",
                                           eval_batch_size=10 * images)  # a batch larger than the split
    assert (whole["batches_read"], whole["images_read"]) == (1, images)
    assert load_checkpoint(tmp_path / "many.pt")["recalibrated"]["batches_read"] == images // 4
    assert f"BatchNorm recalibration reads {images // 4} batch(es) of 4, not 10000" in caplog.text
    api, cli = load_checkpoint(tmp_path / "api.pt"), load_checkpoint(tmp_path / "cli.pt")
    assert api["recalibrated"] == cli["recalibrated"]
    assert all(torch.equal(api["model"][k], cli["model"][k]) for k in api["model"])
    (tmp_path / "precious.pt").write_bytes(b"someone's own file")
    named = r"must name a .pt \(or .pth\) file"
    for out, message in [(tmp_path / "x.txt", named), (tmp_path, named),
                         (tmp_path / "in.pt", "is the checkpoint being read"),
                         (tmp_path / "precious.pt", "exists and is not a checkpoint that recalibrate wrote")]:
        with pytest.raises(slimssl.UsageError, match=message):
            slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, out, device="cpu")
    assert (tmp_path / "precious.pt").read_bytes() == b"someone's own file"
    again = slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "many.pt", batches=1, device="cpu",
                                           eval_batch_size=4)  # an earlier recalibration is replaced
    assert again["batches"] == 1 and load_checkpoint(tmp_path / "many.pt")["recalibrated"]["batches"] == 1
    slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "r.pth", batches=1, device="cpu",
                                   eval_batch_size=4)  # PyTorch's other usual suffix
    assert load_checkpoint(tmp_path / "r.pth")["recalibrated"]["subnet"] == "w0p5_d1-1-1-1"
    for bad, message in [(dict(batches=0), "batches must be an int >= 1"), (dict(seed=1.5), "seed must be an int"),
                         (dict(bacthes=2), "did you mean batches")]:
        with pytest.raises((slimssl.UsageError, TypeError), match=message):
            slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "y.pt", device="cpu", **bad)
    assert not (tmp_path / "y.pt").exists()


def test_cli_linear_and_finetune_merge_into_run(tmp_path, capsys):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["linear", str(run), "--epochs", "2", "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["subnet"] for r in rows] == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1"]
    assert all({"params", "macs", "linear_top1", "linear_top5"} <= set(r) for r in rows)
    assert main(["finetune", str(run), "--subnet", "w0p5_d1-1-1-1", "--label-fraction", "0.1", "--epochs", "1",
                 "--seed", "2", "--json", "--device", "cpu"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "finetune" / "w0p5_d1-1-1-1_10pct_seed2.json").read_text())
    assert saved["indices"] == row["indices"] and len(row["indices"]) == row["num_labelled"]
    results = {r["subnet"]: r for r in json.loads((run / "results.json").read_text())["subnets"]}
    assert results["w0p5_d1-1-1-1"]["finetune_10pct_top1"] == row["top1"]
    assert results["w1p0_d1-1-1-1"]["linear_top1"] == rows[0]["linear_top1"]
    with pytest.raises(SystemExit) as refused:  # argparse: exit 2 before anything loads
        main(["finetune", str(run), "--subnet", "0.5", "--label-fraction", "2"])
    assert refused.value.code == 2


def test_results_of_other_data_merged_into_a_run_are_named(tmp_path, capsys, caplog):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")  # pretrained on fake images
    assert main(["knn", str(run), "--json", "--device", "cpu"]) == 0
    assert "not on the run's own data" not in caplog.text
    assert main(["knn", str(run), "--json", "--device", "cpu", "--data", "digits"]) == 0
    assert "knn numbers measured on digits, not on the run's own data fake (data.source), replace its knn " \
           "results" in caplog.text and "--no-save" in caplog.text
    assert json.loads((run / "results.json").read_text())["protocols"]["knn"]["data"] == "digits"
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "Measured on other data than the run's own (fake): knn on digits" in capsys.readouterr().out
    assert main(["knn", str(run), "--json", "--device", "cpu"]) == 0  # measured again on its own data
    assert main(["report", str(run)]) == 0 and "other data" not in capsys.readouterr().out


def test_every_evaluation_takes_the_sub_networks_second(tmp_path):
    """knn and linear_probe take ``subnets`` after the checkpoint, as finetune (the README's example calls it so)
    and export_run after its folder: one width, a list, or "all" (the menu)."""
    import slimssl

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    (row,) = slimssl.knn(run, 0.5, device="cpu", save=False)
    assert row["subnet"] == "w0p5_d1-1-1-1"
    menu = [r["subnet"] for r in slimssl.knn(run, "all", device="cpu", save=False)]
    assert menu == [r["subnet"] for r in slimssl.knn(run, device="cpu", save=False)] and len(menu) > 1
    rows = slimssl.linear_probe(run, ["1.0", 0.5], epochs=1, device="cpu", save=False)
    assert [r["subnet"] for r in rows] == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1"]


def test_cli_linear_probes_the_sub_networks_asked_for(tmp_path, capsys, caplog):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["linear", str(run), "--epochs", "1", "--json", "--device", "cpu"]) == 0
    full = {r["subnet"]: r for r in json.loads(capsys.readouterr().out)}
    assert main(["linear", str(run), "--epochs", "3", "--json", "--device", "cpu", "--subnet", "0.5"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["subnet"] == "w0p5_d1-1-1-1" and row["params"] == full["w0p5_d1-1-1-1"]["params"]
    results = {r["subnet"]: r for r in json.loads((run / "results.json").read_text())["subnets"]}
    assert results["w0p5_d1-1-1-1"]["linear_top1"] == row["linear_top1"]
    assert results["w1p0_d1-1-1-1"]["linear_top1"] == full["w1p0_d1-1-1-1"]["linear_top1"]  # not probed again
    assert main(["linear", str(run), "--device", "cpu", "--subnet", "0.3"]) == 2  # private BN: the menu only
    assert "sub-network w0p3_d1-1-1-1 is not in the menu" in capsys.readouterr().err + caplog.text


def test_cli_train_crop_follows_the_config_or_the_flag_and_is_recorded(tmp_path, capsys):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    common = ["--epochs", "1", "--json", "--device", "cpu"]
    assert main(["linear", str(run), "--augment", *common]) == 0
    protocols = json.loads((run / "results.json").read_text())["protocols"]
    assert protocols["linear_aug"]["train_crop"] == "pad"  # the config's default
    assert main(["linear", str(run), "--augment", "--train-crop", "resized", *common]) == 0
    assert json.loads((run / "results.json").read_text())["protocols"]["linear_aug"]["train_crop"] == "resized"
    capsys.readouterr()
    assert main(["finetune", str(run), "--subnet", "0.5", "--label-fraction", "0.5", "--train-crop", "resized",
                 *common]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["recipe"]["crop"] == "resized"
    with pytest.raises(SystemExit) as refused:
        main(["linear", str(run), "--augment", "--train-crop", "centre"])
    assert refused.value.code == 2 and "--train-crop" in capsys.readouterr().err
    before = (run / "results.json").read_text()
    assert main(["linear", str(run), "--train-crop", "resized", *common]) == 2  # no crop without --augment
    assert (run / "results.json").read_text() == before


def test_cli_finetune_no_save_leaves_the_run_as_it_was(tmp_path, capsys):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["finetune", str(run), "--subnet", "0.5", "--label-fraction", "0.1", "--epochs", "1",
                 "--json", "--device", "cpu", "--no-save"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["indices_file"] is None and len(row["indices"]) == row["num_labelled"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    out = tmp_path / "picked.json"  # an explicit --out is still written
    assert main(["finetune", str(run), "--subnet", "0.5", "--label-fraction", "0.1", "--epochs", "1",
                 "--device", "cpu", "--no-save", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["indices"] == row["indices"]
    assert not (run / "results.json").exists()


def test_cli_finetune_every_subnet_at_several_fractions(tmp_path, capsys):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["finetune", str(run), "--subnet", "0.5", "w1p0_d1-1-1-1", "0.5", "--label-fraction", "0.1", "0.5",
                 "0.1", "--epochs", "1", "--json", "--device", "cpu", "--no-save"]) == 0
    rows = json.loads(capsys.readouterr().out)  # in the given order, each once
    assert [(r["subnet"], r["label_fraction"]) for r in rows] == [
        ("w0p5_d1-1-1-1", 0.1), ("w0p5_d1-1-1-1", 0.5), ("w1p0_d1-1-1-1", 0.1), ("w1p0_d1-1-1-1", 0.5)]
    assert not (run / "finetune").exists() and not (run / "results.json").exists()
    assert main(["finetune", str(run), "--all", "--label-fraction", "0.1", "0.5", "--epochs", "1", "--json",
                 "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)  # the menu's order
    assert [(r["subnet"], r["label_fraction"]) for r in rows] == [
        ("w1p0_d1-1-1-1", 0.1), ("w1p0_d1-1-1-1", 0.5), ("w0p5_d1-1-1-1", 0.1), ("w0p5_d1-1-1-1", 0.5)]
    saved = {r["subnet"]: r for r in json.loads((run / "results.json").read_text())["subnets"]}
    for r in rows:
        key = "finetune_10pct_top1" if r["label_fraction"] == 0.1 else "finetune_50pct_top1"
        assert saved[r["subnet"]][key] == r["top1"]
        assert saved[r["subnet"]][key.replace("top1", "indices_file")] == r["indices_file"]
        assert json.loads(Path(r["indices_file"]).read_text())["top1"] == r["top1"]
    assert len(list((run / "finetune").glob("*.json"))) == 4
    # one call, the same settings for every sub-network: none is told apart as measured otherwise
    assert not any(key.endswith("_settings") for row in saved.values() for key in row)


def test_fine_tuned_classifiers_are_saved_as_exports_that_score_what_was_reported(tmp_path, capsys, caplog):
    import slimssl
    from slimssl.cli import main
    from slimssl.data.datasets import load_dataset
    from slimssl.eval.finetune import evaluate_classifier

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    models = tmp_path / "models"
    # (fake images are made at the resolution whatever the crop ratio: it changes only what is recorded)
    assert main(["finetune", str(run), "--subnet", "0.5", "--label-fraction", "0.5", "--epochs", "2", "--json",
                 "--device", "cpu", "--no-save", "--save-models", str(models), "--crop-ratio", "0.875"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    folder = models / "w0p5_d1-1-1-1_50pct_seed0"
    assert row["model_path"] == str(folder.absolute())  # where it went, as export rows say
    info = json.loads((folder / "config.json").read_text())
    assert info["subnet"] == "w0p5_d1-1-1-1" and info["top1"] == row["top1"] and len(info["classes"]) == 10
    # the preprocessing its score was measured with, as an export of the supernet records it
    assert (info["resolution"], info["crop_ratio"]) == (RES, 0.875) and len(info["mean"]) == len(info["std"]) == 3
    assert "indices" not in info  # they stay in the result's JSON
    assert info["cut_from"] == {"base_width": tiny_config().model.base_width, "channel_divisor": 1}  # as an export
    model = slimssl.load_exported(folder)
    assert model.config.num_classes == 10 and model.fc.out_features == 10
    cfg = tiny_config()
    test = load_dataset("fake", "test", resolution=RES, fake_size=cfg.data.fake_size, seed=cfg.train.seed)
    top1, _ = evaluate_classifier(model, test, test.labels, resolution=RES, mean=cfg.data.mean, std=cfg.data.std)
    assert top1 == row["top1"]

    # a classifier fine-tuned from another checkpoint is not replaced, and is refused before any training
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    make_checkpoint(tmp_path / "other.pt")
    assert main(["finetune", str(tmp_path / "other.pt"), "--subnet", "0.5", "--label-fraction", "0.5", "--epochs",
                 "2", "--device", "cpu", "--no-save", "--save-models", str(models)]) == 2
    assert "already holds an export of w0p5_d1-1-1-1_50pct_seed0" in capsys.readouterr().err + caplog.text
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_save_exported_takes_a_classifier_set_by_hand_and_refuses_other_heads(tmp_path):
    import slimssl
    from slimssl import ExportError, save_exported

    model = tiny_supernet().export(0.5).eval()
    model.fc = torch.nn.Linear(model.config.feature_dim, 3)  # the usual way to add a classifier
    x = torch.rand(2, 3, RES, RES)
    assert torch.equal(slimssl.load_exported(save_exported(model, tmp_path / "head"))(x), model(x))
    model.fc = torch.nn.Sequential(torch.nn.Linear(model.config.feature_dim, 3))
    with pytest.raises(ExportError, match=r"model.fc is Sequential.*nn.Identity \(features\) or nn.Linear"):
        save_exported(model, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_cli_finetune_refuses_one_out_file_for_several_results(tmp_path, capsys, caplog):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    out = tmp_path / "one.json"
    assert main(["finetune", str(run), "--subnet", "0.5", "--label-fraction", "0.01", "0.1", "--epochs", "1",
                 "--device", "cpu", "--out", str(out)]) == 2
    assert "--out names one JSON file" in capsys.readouterr().err + caplog.text
    assert not out.exists() and not (run / "finetune").exists() and not (run / "results.json").exists()
    for both_or_neither in (["--subnet", "0.5", "--all"], []):
        assert main(["finetune", str(run), *both_or_neither, "--label-fraction", "0.1", "--device", "cpu"]) == 2
        assert "give exactly one of --subnet NAME [NAME ...] or --all" in capsys.readouterr().err + caplog.text


class CountingReads(ImageDataset):
    """An in-memory split that records every pass over it (each would decode a streamed split again)."""

    reads: list[str]

    def batches(self, batch_size, indices=None):
        self.reads.append(self.split)
        yield from super().batches(batch_size, indices)


def test_each_split_is_read_once_for_all_subnets():
    from slimssl.eval.knn import knn_eval_subnets

    supernet = tiny_supernet()
    assert len(supernet.menu) > 1
    reads: list[str] = []
    train, test = (CountingReads(**vars(colour_dataset(n, seed, split))) for n, seed, split in
                   ((32, 0, "train"), (16, 1, "test")))
    train.reads = test.reads = reads
    kw = dict(resolution=RES, mean=(0.5,) * 3, std=(0.25,) * 3)
    results = knn_eval_subnets(supernet, train, test, k=5, temperature=0.1, **kw)
    assert set(results) == set(supernet.menu.names) and reads == ["train", "test"]
    reads.clear()
    results = linear_probe_subnets(supernet, train, test, epochs=1, **kw)
    assert set(results) == set(supernet.menu.names) and reads == ["train", "test"]


# ---- the Python functions ----------------------------------------------------------------------------

def test_knn_k_beyond_the_bank_records_the_k_used(tmp_path, caplog):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        rows = slimssl.knn(run, k=100_000, device="cpu")
    used = json.loads((run / "results.json").read_text())["protocols"]["knn"]["k"]
    assert used < 100_000 and f"k={used} is used" in caplog.text
    assert slimssl.knn(run, k=used, device="cpu", save=False) == rows


def test_the_pretraining_knn_monitor_records_the_k_it_used_as_slimssl_knn_does():
    """k beyond the bank is capped in results.json's protocols too (a reproduction compares these settings)."""
    from slimssl.train.monitor import KnnMonitor

    bank = colour_dataset(6, 0)  # fewer images than the config's k of 10
    monitor = KnnMonitor(tiny_config(), bank, colour_dataset(4, 1, "test"), torch.device("cpu"))
    assert monitor.settings(tiny_supernet())["k"] == 6


def test_results_of_a_checkpoint_before_pretrainings_end_are_marked_unfinished(tmp_path, capsys, caplog):
    from slimssl.cli import main

    run = tmp_path / "run"

    def results():
        return json.loads((run / "results.json").read_text())

    make_checkpoint(run / "checkpoints" / "last.pt", epoch=1.5)  # of 4
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        slimssl.knn(run, device="cpu")
    assert "epoch 1.5 of 4" in caplog.text
    assert results()["unfinished"] == {"epochs": 4, "knn": 1.5}
    caplog.clear()
    assert main(["report", str(run), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["run"] == "run" and report["subnets"][0]["knn_top1"] is not None  # the folder, as --json names it
    assert "before pretraining finished (knn at epoch 1.5 of 4)" in caplog.text
    assert main(["report", str(run)]) == 0
    assert "## run (tiny, 8 px; unfinished: knn at epoch 1.5 of 4)" in capsys.readouterr().out

    make_checkpoint(run / "checkpoints" / "last.pt", epoch=3.999)  # rounded down: never "epoch 4 of 4"
    slimssl.linear_probe(run, epochs=1, device="cpu")
    assert results()["unfinished"] == {"epochs": 4, "knn": 1.5, "linear": 3.99}  # kNN's numbers are still 1.5's
    make_checkpoint(run / "checkpoints" / "last.pt")  # a checkpoint that does not say: the mark stays
    slimssl.knn(run, device="cpu")
    assert results()["unfinished"] == {"epochs": 4, "knn": 1.5, "linear": 3.99}
    make_checkpoint(run / "checkpoints" / "last.pt", epoch=4.0)  # the end of pretraining
    slimssl.knn(run, device="cpu")
    assert results()["unfinished"] == {"epochs": 4, "linear": 3.99}
    slimssl.linear_probe(run, epochs=1, device="cpu")
    assert "unfinished" not in results()


def test_python_protocols_equal_the_commands_and_merge_into_the_run(tmp_path, capsys):
    import slimssl
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    rows = slimssl.knn(run, device="cpu", save=False)
    assert not (run / "results.json").exists()  # save=False writes nothing
    assert main(["knn", str(run), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert [r["subnet"] for r in rows] == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1"] and rows[0]["params"] > 0

    probe = slimssl.linear_probe(run / "checkpoints" / "last.pt", epochs=1, device="cpu", crop_ratio=0.5)
    saved = json.loads((run / "results.json").read_text())
    assert saved["protocols"]["linear"]["crop_ratio"] == 0.5
    assert {r["subnet"]: r["linear_top1"] for r in saved["subnets"]} == {r["subnet"]: r["linear_top1"] for r in probe}

    (row,) = slimssl.finetune(run, 0.5, 0.25, epochs=1, device="cpu", save=False, out=tmp_path / "ft.json")
    assert row["subnet"] == "w0p5_d1-1-1-1" and json.loads((tmp_path / "ft.json").read_text()) == row
    assert not (run / "finetune").exists()


def test_a_distilled_probe_records_its_teacher_and_warns_when_it_is_not_the_full_network(tmp_path, caplog):
    import slimssl

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    slimssl.linear_probe(run, epochs=1, device="cpu", distill=True)
    assert "teacher" not in caplog.text  # the full network teaches: as before, nothing more recorded
    probe = json.loads((run / "results.json").read_text())["protocols"]["linear_distill"]
    assert "distill_teacher" not in probe and probe["head_init"] == "per_subnet"  # heads seeded per sub-network
    slimssl.linear_probe(run, [0.5], epochs=1, device="cpu", distill=True)
    assert "the distilled probe's teacher is the widest sub-network probed, w0p5_d1-1-1-1, not the full network " \
           "w1p0_d1-1-1-1" in caplog.text
    data = json.loads((run / "results.json").read_text())
    assert data["protocols"]["linear_distill"]["distill_teacher"] == "w0p5_d1-1-1-1"
    full = next(r for r in data["subnets"] if r["subnet"] == "w1p0_d1-1-1-1")
    assert "distill_teacher" not in full["linear_distill_settings"]  # kept apart: taught by the full network


def test_python_protocols_refuse_bad_input_before_any_work(tmp_path):
    import slimssl

    make_checkpoint(tmp_path / "model.pt")
    with pytest.raises(slimssl.SlimsslError, match="0.3"):
        slimssl.finetune(tmp_path / "model.pt", ["0.5", "0.3:9,9,9,9"], 0.1, device="cpu", data="/no/such/folder")
    with pytest.raises(slimssl.SlimsslError, match=r"\(0, 1\]"):
        slimssl.finetune(tmp_path / "model.pt", "all", [0.1, 2.0], device="cpu")
    with pytest.raises(slimssl.SlimsslError, match="one JSON file"):
        slimssl.finetune(tmp_path / "model.pt", "all", 0.1, out=tmp_path / "one.json", device="cpu")
    with pytest.raises(TypeError, match="crop_ratio"):  # the message lists the data keywords
        slimssl.knn(tmp_path / "model.pt", crop=0.5)
    for keywords, expected in [({"workers": -1}, "workers must be an int >= 0"),
                               ({"crop_ratio": "a"}, "crop_ratio must be a number in"),
                               ({"loader": "disk"}, "loader must be 'memory' or 'stream'"),
                               ({"skip_unreadable": "no"}, "skip_unreadable must be True or False"),
                               ({"data": ""}, "data must be a dataset name or path, got ''")]:
        with pytest.raises(slimssl.SlimsslError, match=expected):
            slimssl.linear_probe(tmp_path / "model.pt", **keywords)
    from slimssl.eval.inputs import DataKeywords, DataOptions

    assert DataKeywords.__annotations__.keys() == DataOptions.__dataclass_fields__.keys()  # what checkers are told
    with pytest.raises(TypeError, match=r"knn\(\) got unknown keyword\(s\) kk \(did you mean k\?\); its keywords "
                                        "are k, temperature"):  # and the protocol's own
        slimssl.knn(tmp_path / "model.pt", kk=3)
    with pytest.raises(slimssl.SlimsslError, match="no/such/folder"):
        slimssl.knn(tmp_path / "model.pt", data="/no/such/folder", device="cpu")
    model = tmp_path / "model.pt"
    for call, expected in [(lambda: slimssl.linear_probe(model, seed=1.5), "seed must be an int .*, got 1.5"),
                           (lambda: slimssl.finetune(model, seed="1"), "seed must be an int .*, got '1'"),
                           (lambda: slimssl.linear_probe(tmp_path / "model.pt", distill="no"),
                            "distill must be True or False, got 'no'"),
                           (lambda: slimssl.knn(tmp_path / "model.pt", save="no"), "save must be True or False"),
                           (lambda: slimssl.finetune(tmp_path / "model.pt", "0.5", "0.1"),
                            r"label fractions must be numbers in \(0, 1\], got \['0.1'\]$"),
                           (lambda: slimssl.finetune(tmp_path / "model.pt", "0.5", 10),
                            r"got \[10\]; a fraction, not a percentage: 0.1 for 10%")]:
        with pytest.raises(slimssl.SlimsslError, match=expected):
            call()


def test_cli_finetune_protects_other_json_files_and_runs_the_epochs_asked_for(tmp_path, capsys, caplog):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["knn", str(run), "--device", "cpu"]) == 0
    before = (run / "results.json").read_text()
    finetune = ["finetune", str(run), "--subnet", "0.5", "--label-fraction", "0.5", "--epochs", "1", "--device",
                "cpu", "--json"]
    assert main([*finetune, "--out", str(run / "results.json")]) == 2
    assert "is not a fine-tuning result" in caplog.text and (run / "results.json").read_text() == before
    capsys.readouterr()
    assert main([*finetune, "--out", str(tmp_path / "ft.json")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["recipe"]["steps"] == 1  # 32 labelled images, batch 32: one epoch is one step, not 100
    assert main([*finetune, "--out", str(tmp_path / "ft.json"), "--seed", "1"]) == 0  # a result may be replaced
    assert json.loads((tmp_path / "ft.json").read_text())["seed"] == 1


def test_cli_finetune_of_a_subnet_outside_the_menu_reports_its_size(tmp_path, capsys):
    from slimssl.cli import main

    make_checkpoint(tmp_path / "shared.pt", bn="shared")  # shared BatchNorm: any width runs (recalibrated)
    assert main(["finetune", str(tmp_path / "shared.pt"), "--subnet", "0.75", "--label-fraction", "0.5",
                 "--epochs", "1", "--device", "cpu", "--json", "--no-save"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["subnet"] == "w0p75_d1-1-1-1" and row["width"] == 0.75
    half = slimssl_profile(tmp_path / "shared.pt")
    assert half["w1p0_d1-1-1-1"]["params"] > row["params"] > half["w0p5_d1-1-1-1"]["params"] > 0
    assert half["w1p0_d1-1-1-1"]["macs"] > row["macs"] > half["w0p5_d1-1-1-1"]["macs"] > 0


def slimssl_profile(checkpoint) -> dict[str, dict]:
    from slimssl.eval.evaluate import cost_rows
    from slimssl.eval.inputs import load_model

    supernet, cfg, _, _ = load_model(checkpoint, "cpu")
    return cost_rows(supernet, cfg.data.resolution)


# ---- the protocols' arithmetic and learning, against values worked out by hand -------------------------

def test_knn_votes_are_the_k_nearest_weighted_by_exp_similarity_over_t():
    import math

    from slimssl.eval.knn import knn_predict

    # cosine similarities to the query (1, 0): 1, 0.9, 0.85 and -1
    bank = torch.tensor([[1.0, 0.0], [0.9, math.sqrt(1 - 0.81)], [0.85, math.sqrt(1 - 0.85 ** 2)], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # not unit length: the vote uses cosine similarity
    nearest = knn_predict(bank, labels, query, 3, k=1, temperature=1.0)
    three = knn_predict(bank, labels, query, 3, k=3, temperature=0.5)
    # each query's votes are divided by exp(its top similarity / T): the same winner, no float32 overflow
    torch.testing.assert_close(nearest, torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(three, torch.tensor([[1.0, math.exp(-0.2) + math.exp(-0.3), 0.0]]))
    assert nearest.argmax().item() == 0 and three.argmax().item() == 1  # two close votes outweigh the closest
    # at T = 0.01 the votes themselves would be exp(100) > float32's largest, all inf, and class 0 would "win"
    near = torch.tensor([[1.0, 0.0], [0.999, math.sqrt(1 - 0.999 ** 2)], [0.999, -math.sqrt(1 - 0.999 ** 2)]])
    low = knn_predict(near, labels[:3], query, 3, k=3, temperature=0.01)
    assert torch.isfinite(low).all() and low.argmax().item() == 1  # 2 exp(-0.1) > 1


def test_knn_scores_a_large_bank_in_smaller_chunks_of_queries_with_the_same_result(monkeypatch):
    """A bank of ImageNet's size would take about 10 GB of similarities per chunk of 1024 queries: the chunk
    shrinks with the bank, and the scores stay the same."""
    import slimssl.eval.knn as knn

    gen = torch.Generator().manual_seed(0)
    bank, labels, queries = torch.randn(50, 8, generator=gen), torch.randint(0, 4, (50,), generator=gen), \
        torch.randn(20, 8, generator=gen)
    whole = knn.knn_predict(bank, labels, queries, 4, k=5, chunk=1024)
    rows, real_topk = [], torch.Tensor.topk

    def counted_topk(self, *args, **kwargs):  # the queries of each chunk
        rows.append(len(self))
        return real_topk(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", counted_topk)
    monkeypatch.setattr(knn, "SIMILARITY_BYTES", 8 * 50 * 3)  # three queries' similarities to the bank
    torch.testing.assert_close(knn.knn_predict(bank, labels, queries, 4, k=5), whole)
    assert rows == [3] * 6 + [2]


def test_the_knn_normalises_its_own_features_in_place_with_the_same_votes(monkeypatch):
    """ImageNet's bank of one width is 10 GB: normalised where it lies, not copied; the scores are F.normalize's."""
    import slimssl.eval.knn as knn

    gen = torch.Generator().manual_seed(0)
    bank, labels, queries = torch.randn(50, 8, generator=gen) * 7, torch.randint(0, 4, (50,), generator=gen), \
        torch.randn(20, 8, generator=gen)
    bank[3] = 0  # a row of zeros stays zeros, as F.normalize leaves it
    expected = knn.knn_predict(bank, labels, queries, 4, k=5, temperature=0.07)
    own_bank, own_queries = bank.clone(), queries.clone()
    assert knn.normalize_rows_(own_bank) is own_bank
    assert torch.equal(own_bank, torch.nn.functional.normalize(bank, dim=1))
    copies = []
    monkeypatch.setattr(knn.F, "normalize", lambda *a, **kw: copies.append(a) or pytest.fail("copied"))
    got = knn.knn_predict(own_bank, labels, knn.normalize_rows_(own_queries), 4, k=5, temperature=0.07,
                          normalized=True)
    assert torch.equal(got, expected) and not copies
    supernet = tiny_supernet()  # and the whole evaluation makes no normalised copy
    accuracy = knn.knn_eval_subnets(supernet, colour_dataset(24, 0), colour_dataset(8, 1, "test"), k=5,
                                    temperature=0.1, resolution=RES, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert set(accuracy) == {spec.name for spec in supernet.menu}


def test_linear_probe_follows_a_cosine_schedule_and_its_crop_options_change_training(monkeypatch):
    import math

    supernet = tiny_supernet()
    train, test = colour_dataset(64, 0), colour_dataset(32, 1, "test")
    lrs, step = [], linear_mod.probe_step

    def recording_step(heads, optimizer, *args, **kwargs):
        lrs.append(optimizer.param_groups[0]["lr"])
        return step(heads, optimizer, *args, **kwargs)

    monkeypatch.setattr(linear_mod, "probe_step", recording_step)
    options = dict(epochs=4, batch_size=16, lr=0.1)
    _, plain = probe_and_heads(supernet, train, test, **options)
    total = len(lrs)
    assert total == 16 and lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * s / total)) for s in range(total)])
    monkeypatch.setattr(linear_mod, "probe_step", step)
    _, padded = probe_and_heads(supernet, train, test, augment=True, **options)
    _, resized = probe_and_heads(supernet, train, test, augment=True, train_crop="resized", **options)

    def weight(heads):
        return heads.state_dict()["heads.w1p0_d1-1-1-1.weight"]

    assert not torch.equal(weight(plain), weight(padded)) and not torch.equal(weight(padded), weight(resized))


def test_finetuning_learns_separable_data():
    supernet = tiny_supernet()
    train, test = colour_dataset(80, 0), colour_dataset(40, 1, "test")
    out = finetune_subnet(supernet, "0.5", train, test, label_fraction=0.5, epochs=30, lr=0.5, mean=(0.5,) * 3,
                          std=(0.25,) * 3)
    assert out["top1"] > 80.0  # chance is 25


def test_python_protocols_take_numpy_numbers_and_torch_devices(tmp_path):
    import numpy as np

    import slimssl

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    rows = slimssl.knn(run, k=np.int64(3), temperature=np.float32(0.5), device=torch.device("cpu"))
    assert rows == slimssl.knn(run, k=3, temperature=0.5, device="cpu", save=False)
    settings = json.loads((run / "results.json").read_text())["protocols"]["knn"]
    assert settings["k"] == 3 and settings["temperature"] == pytest.approx(0.5)  # written as plain numbers


def test_an_earlier_checkpoint_is_evaluated_without_touching_the_runs_results(tmp_path, caplog):
    import shutil

    import slimssl

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    rows = slimssl.knn(run, k=3, device="cpu")
    before = (run / "results.json").read_text()
    shutil.copy(run / "checkpoints" / "last.pt", run / "checkpoints" / "epoch_0001.pt")
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert len(slimssl.knn(run / "checkpoints" / "epoch_0001.pt", k=5, device="cpu")) == len(rows)
    assert (run / "results.json").read_text() == before  # the trained network's numbers stay the run's
    assert "is not the run's last checkpoint" in caplog.text
    slimssl.knn(run / "checkpoints" / "last.pt", k=5, device="cpu")
    assert json.loads((run / "results.json").read_text())["protocols"]["knn"]["k"] == 5


def exported_state(folder) -> dict:
    from slimssl import load_exported

    return load_exported(folder).state_dict()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def models_knn_measures(run, device: str, monkeypatch) -> dict:
    """The models ``slimssl.knn`` evaluates widths 0.25 and 0.5 of ``run`` with."""
    import slimssl
    import slimssl.eval.knn as knn_mod

    measured = {}

    def spy(*args, **kwargs):
        models = real(*args, **kwargs)
        measured.update(models)
        return models

    real = knn_mod.subnet_models
    monkeypatch.setattr(knn_mod, "subnet_models", spy)
    slimssl.knn(run, subnets=["0.25", "0.5"], device=device, save=False)
    monkeypatch.undo()
    assert set(measured) == {"w0p25_d1-1-1-1", "w0p5_d1-1-1-1"}
    return measured


def test_cli_export_of_a_shared_bn_run_is_the_model_evaluation_measured(tmp_path, capsys, caplog, monkeypatch):
    import slimssl
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt", bn="shared")  # menu: widths 1 and 0.5
    measured = models_knn_measures(run, "cpu", monkeypatch)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--subnet", "0.25", "0.5", "--out", str(out), "--device", "cpu", "--verify",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["max_abs_diff"] <= 1e-5 for r in rows)
    supernet, _ = slimssl.load_supernet(run)
    for name, model in measured.items():
        state = exported_state(out / name)
        assert_same_state(state, model.export(name).state_dict())
        stored = supernet.export(name).state_dict()  # the raw shared statistics: not what was measured
        assert not torch.equal(state["bn1.running_mean"], stored["bn1.running_mean"])
        info = json.loads((out / name / "config.json").read_text())
        assert info["bn"] == "shared" and info["bn_recalibration"] == {
            "data": "fake", "resolution": RES, "crop_ratio": 1.0, "batches": 20, "batch_size": 64, "seed": 0}
    assert main(["export", str(run), "--all", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none")]) == 2
    assert "or export the statistics as stored with --recalibrate-bn 0" in capsys.readouterr().err + caplog.text
    # --recalibrate-bn 0 exports the statistics as stored
    assert main(["export", str(run), "--subnet", "0.5", "--out", str(tmp_path / "raw"), "--recalibrate-bn", "0"]) == 0
    assert_same_state(exported_state(tmp_path / "raw" / "w0p5_d1-1-1-1"), supernet.export("0.5").state_dict())
    assert json.loads((tmp_path / "raw" / "w0p5_d1-1-1-1" / "config.json").read_text())["bn_recalibration"] is None


def test_an_export_records_the_crop_ratio_it_was_given_and_warns_of_data_it_does_not_read(tmp_path, caplog):
    import slimssl

    for bn in ("shared", "private"):
        make_checkpoint(tmp_path / bn / "checkpoints" / "last.pt", bn=bn, epoch=3.0)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        (shared,) = slimssl.export_run(tmp_path / "shared", tmp_path / "a", "0.5", crop_ratio=0.5, device="cpu")
    info = json.loads((Path(shared["path"]) / "config.json").read_text())
    assert info["crop_ratio"] == 0.5 == info["bn_recalibration"]["crop_ratio"]  # the statistics' preprocessing
    assert info["trained_epochs"] == 3.0 and info["slimssl_version"] == slimssl.__version__
    assert info["pretraining_epochs"] == 4  # an export of a run stopped early says so, when made and after
    assert "was saved at epoch 3.00 of the run's 4: pretraining has not finished" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        (private,) = slimssl.export_run(tmp_path / "private", tmp_path / "b", "0.5", data="fake", workers=0,
                                        crop_ratio=0.875)
    assert "data, workers: not used, since the export reads no data (private BatchNorm statistics" in caplog.text
    assert json.loads((Path(private["path"]) / "config.json").read_text())["crop_ratio"] == 0.875


def test_export_run_in_python_writes_what_the_cli_writes_and_load_exported_gives_its_metadata(tmp_path):
    import slimssl
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt", bn="shared", epoch=4.0)
    rows = slimssl.export_run(run, tmp_path / "py", ["0.5"], device="cpu", verify=True)
    assert [r["subnet"] for r in rows] == ["w0p5_d1-1-1-1"] and rows[0]["max_abs_diff"] <= 1e-5
    assert main(["export", str(run), "--subnet", "0.5", "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "py" / "w0p5_d1-1-1-1" / name).read_bytes() == \
            (tmp_path / "cli" / "w0p5_d1-1-1-1" / name).read_bytes()
    plain = slimssl.load_exported(rows[0]["path"])
    cfg = tiny_config("shared")
    assert plain.metadata["resolution"] == cfg.data.resolution and plain.metadata["mean"] == list(cfg.data.mean)
    assert plain.metadata["subnet"] == "w0p5_d1-1-1-1" and plain.metadata["bn_recalibration"]["batches"] == 20
    plain.fc = torch.nn.Linear(plain.config.feature_dim, 3)  # as a fine-tuning would: the preprocessing is kept
    tuned = slimssl.load_exported(slimssl.save_exported(plain, tmp_path / "tuned", {"classes": ["a", "b", "c"]}))
    assert tuned.metadata["std"] == list(cfg.data.std) and tuned.metadata["classes"] == ["a", "b", "c"]
    assert plain.metadata["crop_ratio"] == tuned.metadata["crop_ratio"] == cfg.eval.crop_ratio  # resize, then crop
    assert "bn_recalibration" not in tuned.metadata  # of the statistics before this training, no longer true
    trained = {"trained_epochs": 4.0, "pretraining_epochs": 4}  # how far its source was pretrained, still true
    assert {k: plain.metadata[k] for k in trained} == {k: tuned.metadata[k] for k in trained} == trained
    again = slimssl.load_exported(slimssl.save_exported(tuned, tmp_path / "again"))
    assert "classes" not in again.metadata and again.metadata["subnet"] == "w0p5_d1-1-1-1"
    with pytest.raises(TypeError, match=r"export_run\(\) got unknown keyword\(s\) dat \(did you mean data\?\)"):
        slimssl.export_run(run, tmp_path / "x", "all", dat="fake")


def test_load_supernet_returns_the_config_it_was_given_once_it_fits(tmp_path):
    import slimssl

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    asked = tiny_config("private").model_copy(deep=True)
    asked.eval.knn_k = 5
    supernet, cfg = slimssl.load_supernet(run, asked)
    assert cfg.eval.knn_k == 5 and slimssl.load_supernet(run)[1].eval.knn_k == tiny_config("private").eval.knn_k
    asked.model.base_width *= 2
    with pytest.raises(slimssl.CheckpointError, match="another architecture"):
        slimssl.load_supernet(run, asked)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_export_recalibrates_on_the_gpu_as_evaluation_does(tmp_path, capsys, monkeypatch):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt", bn="shared")
    measured = models_knn_measures(run, "cuda", monkeypatch)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--subnet", "0.25", "0.5", "--out", str(out), "--device", "cuda", "--verify",
                 "--json"]) == 0
    assert all(r["max_abs_diff"] <= 1e-5 for r in json.loads(capsys.readouterr().out))
    for name, model in measured.items():
        expected = model.export(name).state_dict()
        for key, value in exported_state(out / name).items():
            torch.testing.assert_close(value, expected[key].cpu(), rtol=1e-6, atol=1e-7)


def test_options_that_do_nothing_here_are_said_to_be_unused(tmp_path, caplog):
    """--resolution and --tolerance of export act only with --verify; --workers only with the stream loader.
    Taken silently, they would read as if they had done something."""
    from slimssl.cli import main

    make_checkpoint(tmp_path / "private.pt")
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert main(["export", str(tmp_path / "private.pt"), "--subnet", "0.5", "--out", str(tmp_path / "a"),
                     "--resolution", "16", "--tolerance", "1e-3"]) == 0
        assert "--tolerance and --resolution: not used without --verify" in caplog.text
        caplog.clear()
        assert main(["export", str(tmp_path / "private.pt"), "--subnet", "0.5", "--out", str(tmp_path / "b"),
                     "--resolution", "16", "--verify"]) == 0
        assert "not used" not in caplog.text
        assert main(["knn", str(tmp_path / "private.pt"), "--subnet", "0.5", "--workers", "2", "--no-save",
                     "--device", "cpu"]) == 0
    assert caplog.text.count("workers 2 (--workers): not used, since the splits are decoded in memory") == 1


def test_cli_export_reads_no_data_without_shared_statistics_to_estimate(tmp_path, monkeypatch, capsys, caplog):
    import slimssl.data.eval_images as eval_images
    from slimssl.cli import main

    def no_data(*args, **kwargs):
        raise AssertionError("the export read data")

    monkeypatch.setattr(eval_images, "load_eval_split", no_data)
    make_checkpoint(tmp_path / "private.pt")
    make_checkpoint(tmp_path / "shared.pt", bn="shared")
    for argv in ([str(tmp_path / "private.pt"), "--all"],  # private BatchNorm: every entry has its statistics
                 [str(tmp_path / "shared.pt"), "--all", "--recalibrate-bn", "0"],
                 ["--config", "demo", "--set", "model.base_width=4", "model.bn=shared", "--random-init", "--all"]):
        assert main(["export", *argv, "--out", str(tmp_path / "out"), "--overwrite", "--verify",
                     "--device", "cpu"]) == 0, argv
    assert main(["export", "--config", "demo", "--random-init", "--all", "--recalibrate-bn", "5", "--out",
                 str(tmp_path / "none")]) == 2  # a random initialisation has nothing to re-estimate
    assert "--recalibrate-bn re-estimates a trained checkpoint's" in capsys.readouterr().err + caplog.text
    with pytest.raises(AssertionError, match="read data"):  # a shared-BN checkpoint does
        main(["export", str(tmp_path / "shared.pt"), "--all", "--out", str(tmp_path / "out"), "--overwrite",
              "--device", "cpu"])


def test_cli_export_keeps_the_statistics_of_slimssl_recalibrate_and_warns_only_without_recalibration(
        tmp_path, caplog):
    from slimssl.checkpoint import load_supernet
    from slimssl.cli import main

    make_checkpoint(tmp_path / "in.pt", bn="shared")  # menu: widths 1 and 0.5
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert main(["export", str(tmp_path / "in.pt"), "--subnet", "0.25", "0.5", "--out", str(tmp_path / "a"),
                     "--device", "cpu"]) == 0
        assert "is not in the menu" not in caplog.text  # re-estimated, as evaluation does
        assert main(["export", str(tmp_path / "in.pt"), "--subnet", "0.25", "0.5", "--out", str(tmp_path / "b"),
                     "--recalibrate-bn", "0"]) == 0
    assert caplog.text.count("is not in the menu") == 1 and "w0p25_d1-1-1-1 is not in the menu" in caplog.text
    assert main(["recalibrate", str(tmp_path / "in.pt"), "--subnet", "0.25", "--batches", "1",
                 "--out", str(tmp_path / "re.pt"), "--device", "cpu"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["export", str(tmp_path / "re.pt"), "--subnet", "0.25", "0.5", "--out", str(tmp_path / "c"),
                     "--device", "cpu"]) == 0
    assert "w0p25_d1-1-1-1: exporting the BatchNorm statistics that slimssl recalibrate stored" in caplog.text
    assert "recalibrated BatchNorm of w0p5_d1-1-1-1" in caplog.text and "of w0p25" not in caplog.text
    recalibrated, _ = load_supernet(tmp_path / "re.pt")
    assert_same_state(exported_state(tmp_path / "c" / "w0p25_d1-1-1-1"), recalibrated.export("0.25").state_dict())
    info = json.loads((tmp_path / "c" / "w0p25_d1-1-1-1" / "config.json").read_text())
    assert info["bn_recalibration"] == {"subnet": "w0p25_d1-1-1-1", "batches": 1, "batches_read": 1, "batch_size": 64,
                                        "data": "fake", "by": "slimssl recalibrate"}
    # the other width is re-estimated as evaluation does: the same as from the checkpoint it was made from
    half = "w0p5_d1-1-1-1"
    assert_same_state(exported_state(tmp_path / "c" / half), exported_state(tmp_path / "a" / half))
    caplog.clear()  # the stored statistics alone: no data is read, so a data option given is said to be unused
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert main(["export", str(tmp_path / "re.pt"), "--subnet", "0.25", "--out", str(tmp_path / "d"),
                     "--data", "fake", "--device", "cpu"]) == 0
    assert "data: not used, since the export reads no data (the statistics slimssl recalibrate stored" in caplog.text


def test_evaluation_of_a_checkpoint_of_slimssl_recalibrate_measures_the_model_its_export_is(
        tmp_path, monkeypatch, caplog):
    """Evaluation keeps the statistics slimssl recalibrate stored for its sub-network, as export does; the
    other widths are re-estimated by both alike."""
    from slimssl.cli import main

    make_checkpoint(tmp_path / "in.pt", bn="shared")
    # on 4 images, not the whole small train split that the evaluation's batch of 64 re-estimates them on
    assert main(["recalibrate", str(tmp_path / "in.pt"), "--subnet", "0.25", "--batches", "1",
                 "--eval-batch-size", "4", "--out", str(tmp_path / "re.pt"), "--device", "cpu"]) == 0
    with caplog.at_level(logging.INFO, logger="slimssl"):
        measured = models_knn_measures(tmp_path / "re.pt", "cpu", monkeypatch)
    assert "w0p25_d1-1-1-1: evaluated with the BatchNorm statistics estimated for it that it holds" in caplog.text
    assert main(["export", str(tmp_path / "re.pt"), "--subnet", "0.25", "0.5", "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    for name, model in measured.items():
        assert_same_state(exported_state(tmp_path / "out" / name), model.export(name).state_dict())


def test_knn_of_chosen_sub_networks(tmp_path, capsys):
    import slimssl
    from slimssl.cli import main

    make_checkpoint(tmp_path / "shared.pt", bn="shared")  # menu: widths 1 and 0.5
    assert main(["knn", str(tmp_path / "shared.pt"), "--subnet", "0.25", "0.5", "0.25", "--json",
                 "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["subnet"] for r in rows] == ["w0p25_d1-1-1-1", "w0p5_d1-1-1-1"] and rows[0]["params"] < rows[1]["params"]
    assert all(0 <= r["knn_top1"] <= 100 for r in rows)
    # the same network as in the menu evaluation gives the same number
    menu_rows = slimssl.knn(tmp_path / "shared.pt", device="cpu", save=False)
    assert {r["subnet"]: r["knn_top1"] for r in menu_rows}["w0p5_d1-1-1-1"] == rows[1]["knn_top1"]
    make_checkpoint(tmp_path / "private.pt")  # private BatchNorm: the menu's widths only
    assert main(["knn", str(tmp_path / "private.pt"), "--subnet", "0.25", "--device", "cpu"]) == 2


def test_a_supernet_in_memory_is_evaluated_as_its_checkpoint_is_and_nothing_is_saved(tmp_path):
    import slimssl

    run = tmp_path / "run"
    supernet = make_checkpoint(run / "checkpoints" / "last.pt")
    from_file = slimssl.knn(run, device="cpu", save=False)
    supernet.train()
    in_memory = slimssl.knn(supernet, config=tiny_config(), device="cpu")
    assert in_memory == from_file and supernet.training  # given back in its own mode
    probe = slimssl.linear_probe(supernet, config=tiny_config(), epochs=1, device="cpu")
    assert [r["subnet"] for r in probe] == [r["subnet"] for r in from_file]
    tuned = slimssl.finetune(supernet, "0.5", 0.5, epochs=1, config=tiny_config(), device="cpu")
    assert tuned[0]["subnet"] == "w0p5_d1-1-1-1" and tuned[0]["indices_file"] is None
    assert not (run / "results.json").exists() and not (run / "finetune").exists() and not list(tmp_path.glob("*.json"))
    with pytest.raises(slimssl.UsageError, match="pass config="):
        slimssl.knn(supernet, device="cpu")
    with pytest.raises(slimssl.UsageError, match="got dict"):
        slimssl.knn({"model": {}}, device="cpu")
    wider = tiny_config().model_dump(mode="json")
    wider["model"]["base_width"] = 8
    with pytest.raises(slimssl.UsageError, match=r"not this supernet's config:\n  base_width: supernet 4, config 8"):
        slimssl.knn(supernet, config=wider, device="cpu")
    with pytest.raises(slimssl.UsageError, match="config= is for a supernet in memory"):
        slimssl.knn(run, config=tiny_config(), device="cpu")


def test_exporting_shared_bn_statistics_not_estimated_for_the_subnet_warns_until_recalibrated(tmp_path, caplog):
    import copy

    unestimated = "exported with shared BatchNorm statistics that were not estimated for it"
    supernet = tiny_supernet("shared").train()
    x = torch.rand(8, 3, 16, 16)
    for width in (1.0, 0.5):  # training forwards: the statistics mix the widths
        supernet(x, subnet=width)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        slimssl.export_subnet(supernet, 0.5, tmp_path / "a")
    assert unestimated in caplog.text and "recalibrate_bn(supernet, 'w0p5" in caplog.text

    def warns(model, subnet) -> bool:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="slimssl"):
            slimssl.export_subnet(model, subnet, tmp_path / "b", overwrite=True)
        return unestimated in caplog.text

    copied = copy.deepcopy(supernet)
    slimssl.recalibrate_bn(copied, 0.5, [x[:4], x[4:]])
    assert not warns(copied, 0.5)  # what evaluation measures
    assert warns(copied, 1.0)  # estimated for another width
    assert warns(supernet, 0.5)  # the copy was recalibrated, not the supernet
    copied.train()(x, subnet=0.5)  # trained on: the statistics move again
    assert warns(copied, 0.5)
    slimssl.recalibrate_bn(copied, 0.5, [x[:4], x[4:]])
    other = copy.deepcopy(supernet)
    slimssl.recalibrate_bn(other, 0.25, [x[:4], x[4:]])  # the same number of batches: the same count
    copied.load_state_dict(other.state_dict())  # 0.25's statistics now
    assert warns(copied, 0.5)
    assert not warns(tiny_supernet("private"), 0.5)  # private BatchNorm: each sub-network has its own
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):  # as asked: no word
        slimssl.export_subnet(supernet, 0.5, tmp_path / "c", check_bn_statistics=False)
    assert unestimated not in caplog.text


def test_a_checkpoint_from_slimssl_recalibrate_exports_its_subnet_without_a_warning(tmp_path, caplog):
    make_checkpoint(tmp_path / "in.pt", bn="shared")
    slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "out.pt", batches=2, device="cpu")
    supernet, _ = slimssl.load_supernet(tmp_path / "out.pt")
    assert supernet.bn_statistics_estimated(0.5) and not supernet.bn_statistics_estimated(1.0)
    original, _ = slimssl.load_supernet(tmp_path / "in.pt")
    assert not original.bn_statistics_estimated(0.5)


def test_recalibrate_does_not_overwrite_a_checkpoint_it_did_not_write(tmp_path):
    make_checkpoint(tmp_path / "in.pt", bn="shared")
    kept = tmp_path / "kept.pt"
    kept.write_bytes((tmp_path / "in.pt").read_bytes())  # a run's checkpoint copied aside, not a recalibration
    with pytest.raises(slimssl.UsageError, match="exists and is not a checkpoint that recalibrate wrote"):
        slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, kept, batches=1, device="cpu")
    assert kept.read_bytes() == (tmp_path / "in.pt").read_bytes()
    slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "r.pt", batches=1, device="cpu")
    slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "r.pt", batches=1, device="cpu")  # its own


def test_a_fine_tuned_models_path_is_absolute_from_a_relative_folder(tmp_path, monkeypatch):
    import slimssl

    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    (row,) = slimssl.finetune("run", 0.5, 0.5, epochs=1, device="cpu", save=False, save_models="models")
    assert row["model_path"] == str(tmp_path / "models" / "w0p5_d1-1-1-1_50pct_seed0")


def test_a_label_fraction_of_100_is_said_to_be_a_percentage(tmp_path):
    import slimssl

    make_checkpoint(tmp_path / "model.pt")
    with pytest.raises(slimssl.SlimsslError, match=r"got \[100\]; a fraction, not a percentage: 1 for 100%"):
        slimssl.finetune(tmp_path / "model.pt", "0.5", 100)


def test_a_protocol_gives_a_supernet_in_memory_back_on_its_device_even_when_it_fails(monkeypatch):
    """The protocols move a supernet in memory to the evaluation's device; the caller gets it back where it was
    (tests/test_cuda.py checks it with a GPU)."""
    from slimssl.eval import evaluate

    supernet, moves = tiny_supernet(), []
    to = type(supernet).to

    def recording_to(self, *args, **kwargs):
        moves.append(torch.device(args[0]))
        return to(self, *args, **kwargs)

    def failing_load(checkpoint, device, *args):
        checkpoint.to(device)  # where a GPU would be
        raise RuntimeError("failed on the device")

    monkeypatch.setattr(type(supernet), "to", recording_to)
    monkeypatch.setattr(evaluate, "load_model", failing_load)
    for protocol in (slimssl.knn, slimssl.linear_probe, slimssl.finetune):
        moves.clear()
        with pytest.raises(RuntimeError, match="failed on the device"):
            protocol(supernet, config=tiny_config(), device="cpu")
        assert moves == [torch.device("cpu")] * 2  # to the evaluation's device, then back to the caller's
    assert slimssl.knn.__name__ == "knn" and "temperature" in str(__import__("inspect").signature(slimssl.knn))


@pytest.mark.parametrize("bn, options", [("private", {}), ("private", {"raw_features": True, "lr": 0.01}),
                                         ("private", {"shared_head": True}), ("shared", {"distill": True})])
def test_a_probe_classifier_scores_what_the_probe_reported(bn, options):
    """Each sub-network exported with its head (the standardisation folded in) is a classifier of images that
    gives the probe's accuracy, and the same logits as the head on the backbone's features; from a supernet the
    caller holds in train mode too (the probe gives it back in that mode before the classifiers are made)."""
    from slimssl.data.augment import eval_transform
    from slimssl.eval.finetune import evaluate_classifier

    supernet = tiny_supernet(bn).train()
    train, test = colour_dataset(64, 0), colour_dataset(32, 1, "test")
    norm = dict(mean=(0.5,) * 3, std=(0.25,) * 3)
    probe = train_linear_probe(supernet, train, test, epochs=3, batch_size=16, **norm, **options)
    results, classifiers = probe.results, probe.classifiers()
    assert set(classifiers) == set(results) == {"w1p0_d1-1-1-1", "w0p5_d1-1-1-1"}
    for name, classifier in classifiers.items():
        assert not classifier.training and classifier.config.num_classes == 4
        top1, top5 = evaluate_classifier(classifier, test, test.labels, resolution=RES, **norm)
        assert top1 == pytest.approx(results[name]["top1"]) and top5 == pytest.approx(results[name]["top5"])
    logits = classifiers["w0p5_d1-1-1-1"](eval_transform(test.images, RES, **norm))
    assert logits.shape == (32, 4) and logits.std() > 0


def test_cli_linear_saves_each_sub_network_with_its_head_as_a_classifier_that_scores_the_probe(tmp_path, capsys,
                                                                                                caplog):
    from slimssl.cli import main
    from slimssl.data.datasets import load_dataset
    from slimssl.eval.finetune import evaluate_classifier
    from slimssl import load_exported

    run, saved = tmp_path / "run", tmp_path / "probes"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["linear", str(run), "--epochs", "2", "--json", "--device", "cpu", "--save-models", str(saved)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in saved.iterdir()) == ["w0p5_d1-1-1-1_linear_seed0", "w1p0_d1-1-1-1_linear_seed0"]
    cfg = tiny_config()
    test = load_dataset("fake", "test", resolution=RES, fake_size=cfg.data.fake_size, seed=cfg.train.seed)
    for row in rows:
        classifier = load_exported(row["model_path"])
        info = classifier.metadata
        assert info["subnet"] == row["subnet"] and info["linear_top1"] == row["linear_top1"]
        assert info["resolution"] == RES and info["mean"] == list(cfg.data.mean) and info["protocol"] == "linear"
        top1, _ = evaluate_classifier(classifier, test, test.labels, resolution=RES, mean=info["mean"],
                                      std=info["std"])
        assert top1 == pytest.approx(row["linear_top1"])
    other = tmp_path / "other"  # another run's classifiers are not replaced
    make_checkpoint(other / "checkpoints" / "last.pt")
    assert main(["linear", str(other), "--epochs", "1", "--device", "cpu", "--save-models", str(saved)]) == 2
    assert "remove that folder to replace it" in capsys.readouterr().err + caplog.text
