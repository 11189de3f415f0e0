"""Edge cases of export and of the evaluation of exports: weights replaced by
hand (the documented way: remove weights_sha256), an export that carries a classifier evaluated as features,
a config.json whose sub-network or recorded geometry is wrong, and export_run's argument errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_eval import make_checkpoint
from test_eval_exported import image_splits
from torch import nn

import slimssl
from slimssl.eval.exported import supernet_of_export
from slimssl import ExportError, load_exported, save_exported


@pytest.fixture
def exported(tmp_path):
    """The 0.5 and full-width exports of the tiny supernet's checkpoint (menu 1 and 0.5)."""
    make_checkpoint(tmp_path / "in.pt")
    rows = slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", "all")
    return {row["subnet"].split("_")[0]: Path(row["path"]) for row in rows}


def _drop_digest(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(config))


def test_weights_replaced_on_purpose_load_once_the_digest_is_removed(exported, tmp_path):
    half = exported["w0p5"]
    model = load_exported(half)
    state = {k: (v + 1 if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    save_file(state, str(half / "model.safetensors"))
    with pytest.raises(ExportError, match="sha256"):
        load_exported(half)
    _drop_digest(half)
    again = load_exported(half)
    assert all(torch.equal(again.state_dict()[k], state[k]) for k in state)


def test_weights_of_another_architecture_are_refused_naming_the_architecture(exported):
    half, full = exported["w0p5"], exported["w1p0"]
    (half / "model.safetensors").write_bytes((full / "model.safetensors").read_bytes())
    _drop_digest(half)
    with pytest.raises(ExportError, match=r"model.safetensors does not match the architecture in .*config.json"):
        load_exported(half)


def test_weights_that_are_no_safetensors_file_are_refused_with_a_hint(exported):
    half = exported["w0p5"]
    (half / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    _drop_digest(half)
    with pytest.raises(ExportError, match="is not a readable safetensors file .*re-export it"):
        load_exported(half)


def test_an_export_with_a_classifier_is_evaluated_as_its_features(exported, tmp_path):
    """What `finetune --save-models` and save_exported with an fc write: kNN reads the features, as without it."""
    data = str(image_splits(tmp_path / "images"))
    model = load_exported(exported["w0p5"])
    model.fc = nn.Linear(model.config.feature_dim, 3)
    classifier = save_exported(model, tmp_path / "classifier")
    assert load_exported(classifier).config.num_classes == 3
    rows = slimssl.knn(classifier, data=data, k=5, device="cpu")
    assert rows == slimssl.knn(exported["w0p5"], data=data, k=5, device="cpu")
    assert rows[0]["subnet"] == "w0p5_d1-1-1-1"


@pytest.mark.parametrize("name, match", [
    ("w0p5_dX", "which is not a sub-network's name"),
    ("w0p5_d2-2-2-2", r"whose depths are not the architecture's \[1, 1, 1, 1\]"),
    # an edited config.json: the 2 px export as the width 0.001 of a supernet 10**6 times its size
    ("w0p001_d1-1-1-1", r"of width 0.001: evaluating it as a sub-network would build a supernet about 1,000,000 "
                        r"times its size"),
])
def test_an_export_whose_config_names_another_sub_network_is_refused(exported, name, match):
    half = exported["w0p5"]
    config = json.loads((half / "config.json").read_text())
    config["subnet"] = name
    (half / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=match):
        supernet_of_export(half, "fake")


@pytest.mark.parametrize("recorded", [{"base_width": 7, "channel_divisor": 1}, {"base_width": "8"}, "8"])
def test_a_wrong_cut_from_record_falls_back_to_the_geometry_the_channels_give(exported, recorded):
    half = exported["w0p5"]
    supernet_before, _ = supernet_of_export(half, "fake")
    config = json.loads((half / "config.json").read_text())
    config["cut_from"] = recorded
    (half / "config.json").write_text(json.dumps(config))
    supernet, cfg = supernet_of_export(half, "fake")
    assert supernet.menu.names == ["w0p5_d1-1-1-1"]
    assert (cfg.model.base_width, cfg.model.channel_divisor) == (4, 1)  # the tiny supernet's, found again
    x = torch.randn(2, 3, 8, 8)
    name = "w0p5_d1-1-1-1"
    assert torch.equal(supernet(x, subnet=name), supernet_before(x, subnet=name))
    torch.testing.assert_close(supernet(x, subnet=name), load_exported(half)(x), rtol=0, atol=1e-6)


def test_export_run_needs_a_checkpoint_or_a_config(tmp_path):
    with pytest.raises(slimssl.UsageError, match="give a checkpoint .*or a config to export a random"):
        slimssl.export_run(None, tmp_path / "out", "all")
    assert not (tmp_path / "out").exists()


def test_a_random_initialisation_is_not_recalibrated(tmp_path):
    with pytest.raises(slimssl.UsageError, match="a random initialisation is exported with its initial ones"):
        slimssl.export_run(None, tmp_path / "out", "all", config="demo", recalibrate_bn=5)
    assert not (tmp_path / "out").exists()


def test_an_export_rebuilt_as_a_supernet_runs_the_export_when_no_sub_network_is_named(exported):
    """Its full width holds only the export's slices: a forward without subnet= must not run it."""
    half = exported["w0p5"]
    supernet, _ = supernet_of_export(half, "fake")
    x = torch.randn(2, 3, 8, 8)
    assert supernet.resolve(None).name.startswith("w0p5")
    torch.testing.assert_close(supernet(x), load_exported(half)(x))


@pytest.mark.parametrize("edit, match", [
    ({"num_classes": 10_000_000}, "unexpected key 'fc.weight'|missing key 'fc.weight'"),
    ({"out_channels": [4, 8, 16, 1_000_000]}, r"size mismatch for layer\d\.0\.conv.*the config makes"),
    ({"depths": [1, 1, 1, 20_000]}, r"the config's stages have \[1, 1, 1, 20000\] blocks, the weights' \[1, 1, 1, 1\]"),
])
def test_an_edited_config_json_that_asks_for_a_huge_network_is_refused_before_it_is_built(exported, monkeypatch,
                                                                                            edit, match):
    from slimssl.models.plain import PlainResNet

    half = exported["w0p5"]
    config = json.loads((half / "config.json").read_text())
    config["architecture"].update(edit)
    (half / "config.json").write_text(json.dumps(config))  # config.json's digest covers the weights alone
    built, init = [], PlainResNet.__init__

    def recording_init(self, arch):
        built.append((arch, torch.empty(0).device))  # the device it is built on (the default's, or meta)
        init(self, arch)

    monkeypatch.setattr(PlainResNet, "__init__", recording_init)
    with pytest.raises(ExportError, match=match):
        load_exported(half)
    assert all(device.type == "meta" for _, device in built)  # checked on the meta device alone: no memory
    assert all(arch.depths != (1, 1, 1, 20_000) for arch, _ in built)  # and never built at the edited depth
