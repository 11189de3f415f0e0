"""``slimssl import-backbone CKPT --width W`` on a slimmable ResNet in SlimCLR's layout (its released
checkpoints): the imported width must be the network SlimCLR's model runs at that width, its leading channels
with that width's BatchNorm. The checkpoint is written here from a slimssl supernet by SlimCLR's naming: full
convolutions, ``bn.<i>`` per width from the widest, blocks numbered ``features.<k>``, ``shortcut`` for
torchvision's ``downsample``."""

from __future__ import annotations

import re

import pytest
import torch

import slimssl
from slimssl.cli import main
from slimssl.config import config_from_dict
from slimssl.errors import ExportError
from slimssl.export.imported import import_backbone
from slimssl.models.build import build_supernet

WIDTHS = [1.0, 0.5, 0.25]


def supernet_and_slimclr_checkpoint(perturb_bn, arch: str = "resnet50"):
    """A slimssl ResNet-50-pattern supernet (narrow: base width 16) and its weights as SlimCLR names them."""
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"arch": arch, "stem": "imagenet", "base_width": 16},
                            "menu": {"widths": WIDTHS}})
    supernet = perturb_bn(build_supernet(cfg)).eval()
    names = {spec.width: spec.name for spec in cfg.subnet_menu()}
    order = {name: i for i, name in enumerate(names[w] for w in sorted(names, reverse=True))}
    block_number = {}
    for key in supernet.state_dict():
        found = re.match(r"layer(\d)\.(\d+)\.", key)
        if found:
            block_number.setdefault(found.group(0), len(block_number))
    slimclr = {}
    for key, value in supernet.state_dict().items():
        found = re.match(r"layer\d\.\d+\.", key)
        if found:
            key = f"features.{block_number[found.group(0)]}." + key[found.end():]
        key = key.replace("downsample.", "shortcut.")
        bn = re.match(r"(.*)\.bns\.([^.]+)\.(.*)", key)
        if bn:
            key = f"{bn.group(1)}.bn.{order[bn.group(2)]}.{bn.group(3)}"
        slimclr[key] = value.clone()
    slimclr["fc.0.weight"] = torch.randn(32, 64)  # SlimCLR's MoCo head: left out
    return supernet, slimclr


def test_each_width_of_a_slimclr_checkpoint_is_the_supernets_sub_network(tmp_path, perturb_bn):
    supernet, slimclr = supernet_and_slimclr_checkpoint(perturb_bn)
    moco = {"state_dict": {**{f"module.encoder_q.{k}": v for k, v in slimclr.items()},
                           **{f"module.encoder_k.{k}": v + 1 for k, v in slimclr.items()}}, "epoch": 200}
    torch.save(moco, tmp_path / "slimclr.pth.tar")
    x = torch.randn(2, 3, 64, 64)
    for width in WIDTHS:
        folder = import_backbone(tmp_path / "slimclr.pth.tar", tmp_path / f"w{width}", width=width,
                                 prefix="state_dict.module.encoder_q.")
        model = slimssl.load_exported(folder)
        assert model.metadata["source_width"] == width
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), supernet(x, subnet=width), rtol=1e-4, atol=1e-5)


def test_a_slimmable_checkpoint_needs_a_width_it_has_and_a_plain_one_none(tmp_path, perturb_bn, capsys):
    _, slimclr = supernet_and_slimclr_checkpoint(perturb_bn)
    torch.save(slimclr, tmp_path / "slimclr.pth")
    with pytest.raises(ExportError, match=r"holds a slimmable ResNet in SlimCLR's layout .* widths 1, 0.5, 0.25"):
        import_backbone(tmp_path / "slimclr.pth", tmp_path / "out")
    with pytest.raises(ExportError, match="width 0.75 is none of them"):
        import_backbone(tmp_path / "slimclr.pth", tmp_path / "out", width=0.75)
    with pytest.raises(ExportError, match="width must be a positive number"):
        import_backbone(tmp_path / "slimclr.pth", tmp_path / "out", width="half")
    folder = import_backbone(tmp_path / "slimclr.pth", tmp_path / "half", width=0.5)
    with pytest.raises(ExportError, match="holds none"):  # the width imported is a plain ResNet
        import_backbone(slimssl.load_exported(folder).state_dict(), tmp_path / "again", width=0.5)
    assert not (tmp_path / "out").exists() and not (tmp_path / "again").exists()
    assert main(["import-backbone", str(tmp_path / "slimclr.pth"), "--width", "0.25", "--out", str(tmp_path / "q"),
                 "--json"]) == 0
    assert '"source_width": 0.25' in capsys.readouterr().out


def test_a_slimmable_resnet_whose_first_stage_has_no_shortcut_is_refused_saying_so(tmp_path, perturb_bn):
    """SlimCLR's CIFAR ResNet keeps the stem's channels in its first stage: no shortcut marks where it starts."""
    _, slimclr = supernet_and_slimclr_checkpoint(perturb_bn, arch="resnet18")
    with pytest.raises(ExportError, match="first block of its slimmable ResNet has no shortcut"):
        import_backbone(slimclr, tmp_path / "out", width=0.5)
    assert not (tmp_path / "out").exists()
