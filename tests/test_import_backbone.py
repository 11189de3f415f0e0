"""A ResNet trained elsewhere, imported as an export (``slimssl import-backbone``, ``import_backbone``): the same
network as the one given, found in whatever checkpoint holds it, and evaluated as any export is."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import slimssl
from slimssl.cli import main
from slimssl.errors import ExportError
from slimssl.export.imported import import_backbone
from test_eval import make_checkpoint
from test_eval_exported import image_splits


def _torchvision_resnet(perturb_bn, cifar: bool = False, block=None, depths=(2, 2, 2, 2)) -> nn.Module:
    torch.manual_seed(0)
    if block is None:
        model = torchvision.models.resnet18()
    else:
        model = torchvision.models.resnet.ResNet(block, list(depths))
    if cifar:
        model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return perturb_bn(model).eval()


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)


def test_a_moco_checkpoints_query_encoder_is_imported_as_the_same_network(tmp_path, perturb_bn):
    """Nested under state_dict, prefixed, beside the key encoder and the optimiser: the file holds two ResNets,
    so the import asks which, and the one named computes what the torchvision model computes."""
    query, key = _torchvision_resnet(perturb_bn), _torchvision_resnet(lambda m: perturb_bn(m, seed=1))
    state = OrderedDict([*((f"module.encoder_q.{k}", v) for k, v in query.state_dict().items()),
                         *((f"module.encoder_k.{k}", v) for k, v in key.state_dict().items())])
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state,
                "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.03}]}},
               tmp_path / "moco.pth.tar")
    with pytest.raises(ExportError, match=r"holds 2 ResNets, under 'state_dict\.module\.encoder_k\.', "
                                          r"'state_dict\.module\.encoder_q\.': say which"):
        import_backbone(tmp_path / "moco.pth.tar", tmp_path / "q")
    assert not (tmp_path / "q").exists()
    folder = import_backbone(tmp_path / "moco.pth.tar", tmp_path / "q", prefix="state_dict.module.encoder_q.")
    plain = slimssl.load_exported(folder)
    x = torch.randn(2, 3, 40, 40)
    assert torch.allclose(plain(x), _features(query, x), atol=1e-5)
    assert not torch.allclose(plain(x), _features(key, x), atol=1e-3)  # the other encoder is another network
    info = plain.metadata
    assert (info["resolution"], info["crop_ratio"], info["mean"]) == (224, 0.875, [0.485, 0.456, 0.406])
    assert info["source"] == str((tmp_path / "moco.pth.tar").resolve())


def test_a_cifar_bottleneck_resnet_in_memory_or_in_safetensors_is_the_same_network(tmp_path, perturb_bn):
    model = _torchvision_resnet(perturb_bn, cifar=True, block=torchvision.models.resnet.Bottleneck,
                                depths=(1, 2, 1, 1))
    save_file({f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "b.safetensors")
    x = torch.randn(2, 3, 16, 16)
    for weights, folder in ((model, tmp_path / "a"), (tmp_path / "b.safetensors", tmp_path / "b")):
        plain = slimssl.load_exported(import_backbone(weights, folder))
        assert (plain.config.block, plain.config.stem, plain.config.depths) == ("bottleneck", "cifar", (1, 2, 1, 1))
        assert torch.allclose(plain(x), _features(model, x), atol=1e-5)
        assert (plain.metadata["resolution"], plain.metadata["crop_ratio"]) == (32, 1.0)


def test_an_imported_sub_network_measures_what_its_export_measures(tmp_path):
    """A sub-network's weights saved by another tool (a narrow width, prefixed, with a projector beside it) are
    imported from the command line and evaluated by kNN as the export they came from is."""
    run, data = tmp_path / "run", str(image_splits(tmp_path / "images"))
    make_checkpoint(run / "checkpoints" / "last.pt")  # menu 1 and 0.5
    (exported,) = slimssl.export_run(run, tmp_path / "out", "0.5", data=data)
    plain = slimssl.load_exported(exported["path"])
    state = {**{f"backbone.{k}": v for k, v in plain.state_dict().items()},
             "projector.0.weight": torch.zeros(4, plain.feature_dim)}
    torch.save({"state_dict": state}, tmp_path / "narrow.ckpt")
    code = main(["import-backbone", str(tmp_path / "narrow.ckpt"), "--out", str(tmp_path / "imported"),
                 "--resolution", "8", "--json"])
    assert code == 0
    expected = slimssl.knn(exported["path"], data=data, k=10, device="cpu")
    imported = slimssl.knn(tmp_path / "imported", data=data, k=10, device="cpu")
    assert [r["knn_top1"] for r in imported] == [r["knn_top1"] for r in expected]
    assert [(r["params"], r["macs"]) for r in imported] == [(r["params"], r["macs"]) for r in expected]


def test_the_command_prints_what_it_found(tmp_path, perturb_bn, capsys):
    torch.save(_torchvision_resnet(perturb_bn).state_dict(), tmp_path / "r18.pth")
    assert main(["import-backbone", str(tmp_path / "r18.pth"), "--out", str(tmp_path / "r18"), "--json",
                 "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert {k: row[k] for k in ("block", "stem", "depths", "features", "params", "resolution", "source_prefix")} \
        == {"block": "basic", "stem": "imagenet", "depths": [2, 2, 2, 2], "features": 512, "params": 11_176_512,
            "resolution": 224, "source_prefix": ""}
    assert slimssl.load_exported(tmp_path / "r18").metadata["std"] == [0.25, 0.25, 0.25]


def test_the_other_resnet_of_a_file_replaces_an_import_only_when_asked(tmp_path, perturb_bn):
    model = _torchvision_resnet(perturb_bn)
    torch.save({**{f"{side}.{k}": v for side in ("online", "target") for k, v in model.state_dict().items()}},
               tmp_path / "byol.pt")
    import_backbone(tmp_path / "byol.pt", tmp_path / "net", prefix="online.")
    import_backbone(tmp_path / "byol.pt", tmp_path / "net", prefix="online.")  # the same one again: replaced
    with pytest.raises(ExportError, match=r"holds the ResNet under 'online\.' .*not the one under 'target\.'.*"
                                          r"overwrite=True"):
        import_backbone(tmp_path / "byol.pt", tmp_path / "net", prefix="target.")
    assert slimssl.load_exported(tmp_path / "net").metadata["source_prefix"] == "online."
    import_backbone(tmp_path / "byol.pt", tmp_path / "net", prefix="target.", overwrite=True)
    assert slimssl.load_exported(tmp_path / "net").metadata["source_prefix"] == "target."


class _Hyperparameters:  # an object of the kind a Lightning checkpoint pickles beside its weights
    lr = 0.1


class _RunsACommand:  # what a hostile checkpoint holds: unpickling it would call os.system
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.skipif(tuple(int(n) for n in torch.__version__.split(".")[:2]) < (2, 6),
                    reason="torch's loader lists and stands in for a file's objects from 2.6 on")
def test_a_lightning_checkpoints_own_objects_are_read_as_placeholders_and_nothing_in_it_runs(tmp_path, perturb_bn,
                                                                                          caplog):
    """Hyper-parameters saved as objects (an argparse Namespace, a class of the training script) would make torch's
    weights-only loader refuse the file; they are read as inert placeholders, and what they would run never runs."""
    import argparse

    model = _torchvision_resnet(perturb_bn)
    checkpoint = {"hyper_parameters": {"cfg": argparse.Namespace(lr=0.1), "mine": _Hyperparameters()},
                  "state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}
    torch.save(checkpoint, tmp_path / "solo.ckpt")
    with caplog.at_level(logging.INFO, logger="slimssl"):
        plain = slimssl.load_exported(import_backbone(tmp_path / "solo.ckpt", tmp_path / "out"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(plain(x), _features(model, x), atol=1e-5)
    assert "as empty placeholders, running nothing from the file" in caplog.text and "argparse.Namespace" in caplog.text
    # an object whose unpickling would run a command: refused (torch blocks os and its kind), and nothing ran
    marker = tmp_path / "ran"
    torch.save({**checkpoint, "callbacks": _RunsACommand(marker)}, tmp_path / "hostile.ckpt")
    with pytest.raises(ExportError, match=r"holds a Python object \((argparse\.Namespace|posix\.system)\)"):
        import_backbone(tmp_path / "hostile.ckpt", tmp_path / "hostile")
    assert not marker.exists() and not (tmp_path / "hostile").exists()


@pytest.mark.parametrize("make, expected", [
    (lambda p, m: torch.save({"hparams": _Hyperparameters(), "state_dict": m.state_dict()}, p,
                             _use_new_zipfile_serialization=False),  # torch's legacy format: objects not listed
     r"holds a Python object \(test_import_backbone\._Hyperparameters\) besides tensors.*load it yourself"),
    (lambda p, m: p.write_bytes(b"not a checkpoint"), r"is not a readable PyTorch checkpoint"),
    (lambda p, m: torch.save({"encoder.weight": torch.zeros(3)}, p),
     r"holds no ResNet in torchvision's layout: no entry ends with conv1\.weight .*of 1 tensors, e\.g\. "
     r"'encoder\.weight'"),
    (lambda p, m: torch.save({**m.state_dict(), "layer2.0.extra.weight": torch.zeros(1)}, p),
     r"not a ResNet in torchvision's layout .*: unexpected key 'layer2\.0\.extra\.weight'"),
    (lambda p, m: torch.save({k: v for k, v in m.state_dict().items() if k != "layer3.1.bn2.bias"}, p),
     r"missing key 'layer3\.1\.bn2\.bias'"),
    (lambda p, m: torch.save({**m.state_dict(), "conv1.weight": torch.zeros(64, 1, 7, 7)}, p),
     r"conv1\.weight has the shape \[64, 1, 7, 7\]; expected a ResNet's stem"),
])
def test_a_file_that_holds_no_importable_resnet_is_refused_saying_why(tmp_path, perturb_bn, make, expected):
    make(tmp_path / "in.pt", _torchvision_resnet(perturb_bn))
    with pytest.raises(ExportError, match=expected):
        import_backbone(tmp_path / "in.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_and_prefixes_are_refused_before_anything_is_written(tmp_path, perturb_bn, capsys, caplog):
    torch.save(_torchvision_resnet(perturb_bn).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ExportError, match=r"no ResNet under the prefix 'module\.' .*it has one under ''"):
        import_backbone(tmp_path / "r18.pth", tmp_path / "out", prefix="module.")
    with pytest.raises(ExportError, match=r"std must be 3 numbers, one per RGB channel \(each > 0\), got \(1, 0, 1\)"):
        import_backbone(tmp_path / "r18.pth", tmp_path / "out", std=(1, 0, 1))
    with pytest.raises(ExportError, match=r"crop_ratio must be a number in \(0, 1\], got 1\.5"):
        import_backbone(tmp_path / "r18.pth", tmp_path / "out", crop_ratio=1.5)
    assert not (tmp_path / "out").exists()
    assert main(["import-backbone", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.pt does not exist; expected a checkpoint file" in capsys.readouterr().err + caplog.text


def test_what_is_not_the_backbone_is_left_out_and_a_sequential_backbone_is_read(tmp_path, perturb_bn, caplog):
    """SwAV keeps its projection head and prototypes beside the ResNet's layers; lightly's examples build the
    backbone as nn.Sequential(*resnet.children())[:-1], whose parts are numbered."""
    model = _torchvision_resnet(perturb_bn)
    x = torch.randn(2, 3, 32, 32)
    swav = {**{f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("fc.")},
            "module.projection_head.0.weight": torch.zeros(8, 512), "module.prototypes.weight": torch.zeros(3, 8)}
    with caplog.at_level(logging.INFO, logger="slimssl"):
        plain = slimssl.load_exported(import_backbone(swav, tmp_path / "swav"))
    assert torch.allclose(plain(x), _features(model, x), atol=1e-5)
    assert "left out projection_head, prototypes" in caplog.text

    class Lightly(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(*list(model.children())[:-1])
            self.projection_head = nn.Linear(512, 8)

    for weights, folder in ((Lightly(), "module"), (Lightly().state_dict(), "state")):
        plain = slimssl.load_exported(import_backbone(weights, tmp_path / folder))
        assert torch.allclose(plain(x), _features(model, x), atol=1e-5)
        assert plain.metadata["source_prefix"] == "backbone."


def test_networks_slimssl_cannot_evaluate_or_would_compute_otherwise_are_refused(tmp_path, perturb_bn):
    bottleneck = torchvision.models.resnet.Bottleneck
    cases = [
        (torchvision.models.resnet.ResNet(bottleneck, [1, 1, 1, 1], width_per_group=128).state_dict(),
         r"has channels 64, \[128, 256, 512, 1024\], \[256, 512, 1024, 2048\], which slimssl's evaluations cannot "
         r"rebuild.*wide_resnet50_2 is not"),
        (torchvision.models.resnet.ResNet(bottleneck, [1, 1, 1, 1], groups=4, width_per_group=16).state_dict(),
         r"layer1\.0\.conv2\.weight has the shape \[64, 16, 3, 3\]: a grouped convolution \(a ResNeXt\)"),
    ]
    padded = _torchvision_resnet(perturb_bn, cifar=True)
    padded.conv1.padding = (2, 2)  # solo-learn's CIFAR stem: the same weights, other features
    cases.append((padded, r"the model's conv1 has padding \(2, 2\) \(slimssl's: \(1, 1\)\): slimssl's ResNet would "
                          r"compute other features"))
    for weights, expected in cases:
        with pytest.raises(ExportError, match=expected):
            import_backbone(weights, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_a_run_directory_or_a_slimssl_checkpoint_is_refused_saying_what_to_do(tmp_path, perturb_bn):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ExportError, match=r"run is a run directory \(checkpoints/last\.pt\), whose files are that "
                                          r"run's own"):
        import_backbone(_torchvision_resnet(perturb_bn), run)
    assert sorted(p.name for p in run.iterdir()) == before
    with pytest.raises(ExportError, match=r"last\.pt is a slimssl checkpoint: take its sub-networks out with slimssl "
                                          r"export CHECKPOINT --all --out DIR"):
        import_backbone(run / "checkpoints" / "last.pt", tmp_path / "out")


def test_a_prefix_may_leave_out_its_last_dot(tmp_path, perturb_bn):
    state = {f"encoder_q.{k}": v for k, v in _torchvision_resnet(perturb_bn).state_dict().items()}
    folder = import_backbone({**state, **{k.replace("_q.", "_k."): v for k, v in state.items()}}, tmp_path / "q",
                             prefix="encoder_q")
    assert slimssl.load_exported(folder).metadata["source_prefix"] == "encoder_q."
