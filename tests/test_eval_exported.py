"""An exported sub-network evaluated by the protocols of a checkpoint (``slimssl knn EXPORT --data DATA``):
the same numbers as its sub-network of the supernet, under its own name, and nothing saved."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slimssl
from slimssl.cli import main
from slimssl.config import config_from_dict
from slimssl.eval.exported import supernet_of_export
from slimssl import export_subnet, load_exported
from slimssl.models.build import build_supernet
from test_eval import make_checkpoint


def rows_by_name(rows: list[dict]) -> dict[str, dict]:
    return {row["subnet"]: row for row in rows}


def image_splits(root: Path) -> Path:
    """train/ and test/ of 3 classes of 8 px images: a dataset that is the same whatever a config says (fake
    images follow the config's data.fake_size and seed)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 6)):
        for label in range(3):
            (root / split / f"c{label}").mkdir(parents=True)
            for i in range(count):
                pixels = (rng.integers(0, 120, (8, 8, 3)) + 60 * label).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{label}" / f"{i}.png")
    return root


@pytest.mark.parametrize("bn", ["private", "shared"])
def test_an_export_measures_what_its_sub_network_measured(tmp_path, bn):
    """With shared BatchNorm, export and evaluation re-estimate the statistics on the same batches, and the
    export is then evaluated with the statistics it holds."""
    run, data = tmp_path / "run", str(image_splits(tmp_path / "images"))
    make_checkpoint(run / "checkpoints" / "last.pt", bn=bn)  # menu 1 and 0.5
    (exported,) = slimssl.export_run(run, tmp_path / "out", "0.5", data=data)
    folder = exported["path"]
    before = sorted(p.name for p in (tmp_path / "out" / "w0p5_d1-1-1-1").iterdir())
    # k given: an export is evaluated with the protocol's defaults (k=200), not with its run's eval.knn_k (10 here)
    knn = slimssl.knn(folder, data=data, k=10, device="cpu")
    assert knn == slimssl.knn(run, "0.5", data=data, k=10, device="cpu", save=False)  # name, params, MACs, top-1
    probe = slimssl.linear_probe(folder, data=data, epochs=2, device="cpu")
    assert probe == slimssl.linear_probe(run, "0.5", data=data, epochs=2, device="cpu", save=False)
    assert sorted(p.name for p in (tmp_path / "out" / "w0p5_d1-1-1-1").iterdir()) == before  # nothing saved
    assert not (tmp_path / "out" / "results.json").exists()


def test_an_export_needs_the_data_it_is_evaluated_on(tmp_path, capsys):
    make_checkpoint(tmp_path / "in.pt")
    (exported,) = slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", "0.5")
    with pytest.raises(slimssl.UsageError, match="does not record the data it was trained on: give the data"):
        slimssl.knn(exported["path"], device="cpu")
    assert main(["knn", exported["path"], "--device", "cpu"]) == 2
    assert main(["knn", exported["path"], "--data", "fake", "--device", "cpu", "--json"]) == 0
    assert [row["subnet"] for row in json.loads(capsys.readouterr().out)] == ["w0p5_d1-1-1-1"]


GEOMETRIES = [  # base width, sub-network, channel divisor
    (12, "0.75", 8),  # rounded by the divisor: 12 x 0.75 = 9 -> 8, stage 2: 18 -> 16
    (12, "0.5:1,1,1,1", 1),  # a shallower sub-network
    (12, "1.0", 1),  # the full width
    (64, "0.2", 1), (24, "0.15", 1), (40, "0.1235", 1),  # floored far below the base: 64 x 0.2 = 12.8 -> 12
    (36, "0.5", 6), (30, "0.25", 3),  # divisors that are not powers of 2
    (12, "0.9", 8),  # a stem rounded up past its whole layer: 10.8 -> 16 -> the 12 of the layer
]


@pytest.mark.parametrize("recorded", [True, False], ids=["cut_from", "older export"])
@pytest.mark.parametrize("base, subnet, divisor", GEOMETRIES)
def test_the_rebuilt_supernet_holds_the_export_exactly(tmp_path, base, subnet, divisor, recorded):
    """The rebuilt supernet's entry is the exported network under its own name, to the bit: rebuilt from the
    geometry the export records it was cut from, or found from its channels alone (an export written before
    config.json recorded it)."""
    width = float(subnet.split(":")[0])
    cfg = config_from_dict({"model": {"arch": "resnet18", "depths": [2, 1, 1, 1], "base_width": base, "stem": "cifar",
                                      "bn": "shared", "channel_divisor": divisor},
                            "menu": {"widths": sorted({1.0, width, 0.5}, reverse=True)}, "data": {"resolution": 8}})
    torch.manual_seed(0)
    supernet = build_supernet(cfg).eval()
    spec = supernet.resolve(subnet)
    folder = export_subnet(supernet, spec, tmp_path, check_bn_statistics=False, config=cfg)
    config_json = json.loads((folder / "config.json").read_text())
    assert config_json["cut_from"] == {"base_width": base, "channel_divisor": divisor}
    if not recorded:
        del config_json["cut_from"]
        (folder / "config.json").write_text(json.dumps(config_json))
    rebuilt, rebuilt_cfg = supernet_of_export(folder, "fake")
    assert rebuilt.menu.names == [spec.name] and rebuilt_cfg.data.resolution == 8
    exported, again = load_exported(folder).state_dict(), rebuilt.export(spec).state_dict()
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(rebuilt(x, subnet=spec), supernet(x, subnet=spec))


def test_an_export_is_profiled_as_its_sub_network_is(tmp_path, capsys):
    make_checkpoint(tmp_path / "in.pt")
    (exported,) = slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", "0.5")
    rows = {}
    for what, argv in (("export", [exported["path"]]), ("run", [str(tmp_path / "in.pt")])):
        assert main(["profile", *argv, "--no-latency", "--json"]) == 0
        rows[what] = rows_by_name(json.loads(capsys.readouterr().out))
    assert rows["export"] == {"w0p5_d1-1-1-1": rows["run"]["w0p5_d1-1-1-1"]}
    assert main(["profile", exported["path"], "--config", "demo"]) == 2  # an export is profiled as exported


def test_profile_in_python_gives_the_rows_of_the_command(tmp_path, capsys, caplog):
    """slimssl.profile of a run, of an export and of a supernet in memory: the counts `slimssl profile` prints."""
    make_checkpoint(tmp_path / "in.pt")
    (exported,) = slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", "0.5")
    assert main(["profile", str(tmp_path / "in.pt"), "--no-latency", "--json", "--num-classes", "10"]) == 0
    printed = {row["subnet"]: (row["params"], row["macs"]) for row in json.loads(capsys.readouterr().out)}
    run_rows = slimssl.profile(tmp_path / "in.pt", num_classes=10)
    assert {row["subnet"]: (row["params"], row["macs"]) for row in run_rows} == printed
    (half,) = slimssl.profile(exported["path"], num_classes=10)
    assert (half["subnet"], (half["params"], half["macs"])) == ("w0p5_d1-1-1-1", printed["w0p5_d1-1-1-1"])
    assert slimssl.profile(exported["path"], "0.5", num_classes=10) == [half]
    with pytest.raises(slimssl.SubnetError, match="is an export of w0p5_d1-1-1-1 alone"):
        slimssl.profile(exported["path"], 1.0)  # its rebuilt supernet would run any width
    supernet, cfg = slimssl.load_supernet(tmp_path / "in.pt")
    (row,) = slimssl.profile(supernet, 0.5, resolution=cfg.data.resolution, num_classes=10, latency=True)
    assert (row["params"], row["macs"]) == printed["w0p5_d1-1-1-1"] and row["latency_ms"] > 0
    assert slimssl.profile(supernet, 0.5, resolution=2 * cfg.data.resolution)[0]["macs"] > row["macs"]
    with pytest.raises(slimssl.UsageError, match="needs resolution="):
        slimssl.profile(supernet)
    with pytest.raises(slimssl.UsageError, match="resolution must be a whole number >= 1, got 0"):
        slimssl.profile(supernet, resolution=0)
    with pytest.raises(slimssl.SubnetError):
        slimssl.profile(supernet, 0.3, resolution=8)
    with pytest.raises(slimssl.UsageError, match="latency must be True or False, got 'no'"):
        slimssl.profile(supernet, resolution=8, latency="no")
    with pytest.raises(slimssl.UsageError, match="threads must be a whole number >= 1, got 0"):
        slimssl.profile(supernet, resolution=8, latency=True, threads=0)
    with pytest.raises(slimssl.UsageError, match="resolution must be a whole number >= 1, got 0"):
        slimssl.profile(tmp_path / "no_such_run", resolution=0)  # said before anything is loaded
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        slimssl.profile(supernet, resolution=8, threads=2)
    assert "threads 2 is the latency measurement's, and there is none" in caplog.text


def test_an_export_is_evaluated_at_its_own_width_alone(tmp_path, capsys, caplog):
    """Its rebuilt supernet holds the export's weights alone: another width would be a network of untrained
    weights under a real sub-network's name."""
    data = str(image_splits(tmp_path / "images"))
    make_checkpoint(tmp_path / "in.pt")
    (exported,) = slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", "0.5", data=data)
    for protocol in (slimssl.knn, slimssl.linear_probe):
        with pytest.raises(slimssl.SubnetError, match=r"sub-network w1p0_d1-1-1-1: .* is an export of "
                                                      r"w0p5_d1-1-1-1 alone"):
            protocol(exported["path"], [0.5, 1.0], data=data, device="cpu")
    with pytest.raises(slimssl.SubnetError, match="is an export of w0p5_d1-1-1-1 alone"):
        slimssl.finetune(exported["path"], 0.25, 0.5, data=data, device="cpu")
    assert main(["knn", exported["path"], "--data", data, "--subnet", "1.0", "--device", "cpu"]) == 2
    assert "is an export of w0p5_d1-1-1-1 alone" in capsys.readouterr().err + caplog.text
    assert [row["subnet"] for row in slimssl.knn(exported["path"], 0.5, data=data, device="cpu")] == ["w0p5_d1-1-1-1"]


def test_report_of_an_export_says_it_is_one(tmp_path, capsys, caplog):
    make_checkpoint(tmp_path / "in.pt")
    (exported,) = slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", "0.5")
    assert main(["report", exported["path"]]) == 2
    assert "is an exported sub-network, which keeps no results: measure it with slimssl knn" in \
        capsys.readouterr().err + caplog.text


def test_an_export_is_fine_tuned_without_naming_its_one_sub_network(tmp_path, capsys):
    data = str(image_splits(tmp_path / "images"))
    make_checkpoint(tmp_path / "in.pt")
    (exported,) = slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", "0.5", data=data)
    assert main(["finetune", exported["path"], "--data", data, "--label-fraction", "0.5", "--epochs", "1",
                 "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["subnet"], row["label_fraction"]) for row in rows] == [("w0p5_d1-1-1-1", 0.5)]
    assert main(["finetune", str(tmp_path / "in.pt"), "--data", data, "--label-fraction", "0.5"]) == 2  # a run: say which


def test_an_export_that_records_no_inputs_is_evaluated_at_the_defaults_with_a_warning(tmp_path, caplog):
    """slimssl.export_subnet without config= records no resolution, mean or std: said, not guessed silently."""
    cfg = config_from_dict({"model": {"arch": "resnet18", "depths": [1, 1, 1, 1], "base_width": 4, "stem": "cifar"},
                            "menu": {"widths": [1.0, 0.5]}})
    folder = export_subnet(build_supernet(cfg).eval(), "0.5", tmp_path, check_bn_statistics=False)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        _, rebuilt_cfg = supernet_of_export(folder, "fake")
    assert rebuilt_cfg.data.resolution == config_from_dict({}).data.resolution
    assert f"config.json records no resolution, mean, std: evaluated with the config's default (resolution " \
           f"{rebuilt_cfg.data.resolution}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        supernet_of_export(export_subnet(build_supernet(cfg).eval(), "0.5", tmp_path / "b", check_bn_statistics=False,
                                         config=cfg), "fake")
    assert "records no" not in caplog.text


def test_an_export_is_evaluated_with_the_inputs_it_records(tmp_path):
    """The mean, std and crop ratio of its run, not the defaults (a CIFAR recipe has its own mean and std)."""
    cfg = config_from_dict({"model": {"arch": "resnet18", "depths": [1, 1, 1, 1], "base_width": 4, "stem": "cifar"},
                            "menu": {"widths": [1.0, 0.5]}, "eval": {"crop_ratio": 0.75},
                            "data": {"resolution": 8, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}})
    folder = export_subnet(build_supernet(cfg).eval(), "0.5", tmp_path, check_bn_statistics=False, config=cfg)
    _, rebuilt_cfg = supernet_of_export(folder, "fake")
    assert rebuilt_cfg.data.resolution == 8 and rebuilt_cfg.eval.crop_ratio == 0.75
    assert tuple(rebuilt_cfg.data.mean) == (0.5, 0.4, 0.3) and tuple(rebuilt_cfg.data.std) == (0.2, 0.25, 0.3)


def test_an_exports_supernet_resolves_no_subnet_to_its_own(tmp_path):
    make_checkpoint(tmp_path / "in.pt")
    (exported,) = slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", "0.5")
    rebuilt, _ = supernet_of_export(exported["path"])
    assert rebuilt.resolve(None).name == "w0p5_d1-1-1-1"
    again = export_subnet(rebuilt, None, tmp_path / "again", check_bn_statistics=False)
    assert again.name == "w0p5_d1-1-1-1"


def test_profile_of_a_run_at_a_resolution_given(tmp_path):
    make_checkpoint(tmp_path / "in.pt")
    (own,) = slimssl.profile(tmp_path / "in.pt", 0.5)
    (larger,) = slimssl.profile(tmp_path / "in.pt", 0.5, resolution=32)
    assert larger["macs"] > own["macs"]
