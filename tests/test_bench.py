"""``slimssl bench`` prints the data path, the slimmable step and the one-by-one baseline on the CPU."""

import json
import logging

import pytest
import torch
import yaml

from slimssl.cli import main
from slimssl.config import ConfigError, config_from_dict, standalone_config
from slimssl.models.build import build_supernet
from slimssl.report.profile import count_params

from test_pretrain import tiny


def test_dense_baseline_network_is_the_subnet_as_a_standalone_network():
    cfg = config_from_dict(tiny("byol"))
    supernet = build_supernet(cfg)
    for spec in cfg.subnet_menu():
        dense = build_supernet(standalone_config(cfg, spec))
        assert count_params(dense.export()) == count_params(supernet.export(spec))


def test_standalone_config_is_the_entry_alone_with_scaled_heads_and_no_slimming():
    """The baseline of the reproduction: the menu entry as a network of its own (its depths too), its heads'
    hidden layers at its width, as inside the supernet, and none of the slimming settings."""
    from slimssl.config.schema import SlimConfig
    from slimssl.nn.spec import SubnetSpec

    data = tiny("byol", "sandwich", "online", widths=[1.0, 0.5],
                slim={"slow_start": 0.5, "slow_start_lr": 1.5, "loss_weights": "slimclr", "distill_alpha": 0.3})
    data["model"]["depths"] = [2, 2, 2, 2]
    data["menu"]["depths"] = [[2, 2, 2, 2], [1, 1, 1, 1]]
    alone = standalone_config(config_from_dict(data), SubnetSpec(0.5, (1, 1, 1, 1)))
    assert alone.slim == SlimConfig()  # no slow start (nor its lr), distillation or re-weighting
    assert alone.subnet_menu().names == ["w1p0_d1-1-1-1"] and alone.model.base_width == 2
    assert (alone.method.proj_hidden, alone.method.pred_hidden) == (16, 16)  # 32 at width 0.5
    assert (alone.method.proj_dim, alone.optim, alone.train) == (16, config_from_dict(data).optim,
                                                                 config_from_dict(data).train)


def test_a_subnet_whose_stages_no_network_of_its_own_has_is_refused_as_a_baseline():
    data = tiny("byol")
    data["model"]["base_width"] = 10  # at width 0.25: stages of 2, 5, 10, 20 channels; base_width 2 gives 2, 4, 8, 16
    cfg = config_from_dict(data)
    quarter = next(spec for spec in cfg.subnet_menu() if spec.width == 0.25)
    with pytest.raises(ConfigError, match=r"has \[2, 2, 5, 10, 20, 2, 5, 10, 20\] channels .*which no network of its "
                                          r"own has \(base_width 2 gives \[2, 2, 4, 8, 16, 2, 4, 8, 16\]\)"):
        standalone_config(cfg, quarter)
    bottleneck = config_from_dict(tiny("byol"), overrides=["model.arch=resnet50", "model.base_width=4",
                                                           "menu.widths=[1.0, 0.75]"])  # inner 3, 6, ...; outputs 12, 24
    alone = standalone_config(bottleneck, next(s for s in bottleneck.subnet_menu() if s.width == 0.75))
    assert alone.model.base_width == 3 and alone.menu.widths == [1.0]
    odd_outputs = config_from_dict(tiny("byol"), overrides=["model.arch=resnet50", "model.base_width=64",
                                                            "menu.widths=[1.0, 0.251]"])
    with pytest.raises(ConfigError, match=r"\[16, 16, 32, 64, 128, 64, 128, 257, 514\] channels"):
        standalone_config(odd_outputs, next(s for s in odd_outputs.subnet_menu() if s.width == 0.251))


def test_bench_json_has_every_measurement(tmp_path, capsys, caplog):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny("mocov2")))
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["bench", "--config", str(path), "--device", "cpu", "--steps", "1", "--warmup", "1", "--json"]) == 0
    # the trainers' set-up lines say nothing about speed (nor do the four dense networks repeat them)
    assert "effective peak lr" not in caplog.text and "train.knn" not in caplog.text
    rows = json.loads(capsys.readouterr().out)
    names = [r["what"] for r in rows]
    assert names[0].startswith("data path") and names[1].startswith("slimmable step (4 sub-networks)")
    assert sum(n.startswith("dense ") for n in names) == 4  # data, not the text table's indentation
    # the ratio of the times, under its own key: not an img/s
    assert names[-1] == "slimmable / one-by-one speed ratio" and rows[-1]["img_per_s"] is None
    dense = sum(rows[1]["batch"] / r["img_per_s"] for r in rows if r["what"].startswith("dense "))
    assert rows[-1]["ratio"] == pytest.approx(dense * rows[1]["img_per_s"] / rows[1]["batch"])
    assert all(r["img_per_s"] > 0 and r["device"] == "cpu" for r in rows[:-1])
    # each row names what it measured on and with, as the text's header does
    assert all(r["hardware"].startswith("cpu (") and r["torch"] == torch.__version__ and r["loader"] == "memory"
               for r in rows)


@pytest.mark.filterwarnings("error::UserWarning")  # torch 2.11's profiler warned that it keeps one cycle's events
def test_bench_profile_writes_the_operator_table(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny("byol")))
    table = tmp_path / "out" / "ops.txt"
    assert main(["bench", "--config", str(path), "--device", "cpu", "--steps", "1", "--warmup", "1",
                 "--no-baseline", "--profile", str(table)]) == 0
    text = table.read_text()
    assert text.startswith("1 calls, sorted by self_cpu_time_total") and "aten::convolution" in text


def test_busy_fraction_counts_overlapping_kernels_once():
    from slimssl.bench.measure import busy_fraction

    assert busy_fraction([], 100.0) == 0.0
    assert busy_fraction([(0, 10), (20, 30)], 100.0) == 0.2
    assert busy_fraction([(0, 10), (5, 15), (12, 14)], 100.0) == 0.15  # overlaps count once
    assert busy_fraction([(30, 40), (0, 50)], 100.0) == 0.5  # order does not matter
    assert busy_fraction([(0, 300)], 100.0) == 1.0  # never above 100%


def test_bench_measures_a_streamed_folder(tmp_path, capsys):
    from PIL import Image

    for i in range(16):  # images larger than the resolution, of two aspect ratios, in one class folder
        Image.new("RGB", (24 + 8 * (i % 2), 24), (i * 15, 80, 160)).save(tmp_path / f"{i}.png")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny("byol")))
    assert main(["bench", "--config", str(path), "--data", str(tmp_path), "--set", "data.loader=stream",
                 "--set", "data.workers=0", "--device", "cpu", "--steps", "1", "--warmup", "1", "--no-baseline",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["what"] == "data path (two augmented views, stream)" and rows[0]["img_per_s"] > 0
    assert rows[1]["what"].startswith("slimmable step") and len(rows) == 2
    assert main(["bench", "--config", str(path), "--data", str(tmp_path), "--set", "data.loader=stream",
                 "--set", "data.workers=0", "--device", "cpu", "--steps", "1", "--warmup", "1", "--data-only",
                 "--json"]) == 0
    assert [r["what"] for r in json.loads(capsys.readouterr().out)] == ["data path (two augmented views, stream)"]


def test_bench_data_only_needs_no_baseline_and_refuses_profile(tmp_path, capsys, caplog):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny("byol")))
    # a width with no network of its own: only the one-by-one baseline needs one, and --data-only measures none
    common = ["bench", "--config", str(path), "--device", "cpu", "--steps", "1", "--warmup", "0",
              "--set", "menu.widths=[1.0,0.3]", "--data-only"]
    assert main([*common, "--json"]) == 0
    assert [r["what"] for r in json.loads(capsys.readouterr().out)] == ["data path (two augmented views, memory)"]
    table = tmp_path / "ops.txt"
    assert main([*common, "--profile", str(table)]) == 2  # would write nothing: said, not silently skipped
    assert "--profile profiles the training step, which --data-only does not run" in caplog.text
    assert not table.exists()


def test_bench_refuses_a_baseline_it_cannot_build_before_measuring_anything(tmp_path, capsys, caplog):
    data = tiny("byol")
    data["model"]["base_width"] = 10
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["bench", "--config", str(path), "--device", "cpu", "--steps", "1", "--warmup", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "(--no-baseline)" in captured.err + caplog.text


def test_bench_leaves_no_tensorboard_writer_behind(tmp_path, capsys):
    """Its trainers' writers are closed before their scratch folder is removed (a live one wrote into it)."""
    import threading

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny("byol", widths=[1.0, 0.5])))
    before = set(threading.enumerate())
    for mode in (["--data-only"], []):
        assert main(["bench", "--config", str(path), "--device", "cpu", "--steps", "1", "--warmup", "0", *mode]) == 0
    writers = [t for t in set(threading.enumerate()) - before if "Writer" in type(t).__name__ and t.is_alive()]
    assert not writers


def test_bench_keeps_what_set_says_of_the_device_and_the_fake_data(tmp_path, monkeypatch, capsys):
    seen = {}

    def run_bench(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        return [{"what": "data path", "img_per_s": 1.0, "peak_gib": None, "gpu_busy": None, "device": "cpu",
                 "hardware": "cpu (x86_64, 2 cores)"}]

    monkeypatch.setattr("slimssl.bench.measure.run_bench", run_bench)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny("byol")))
    assert main(["bench", "--config", str(path), "--data-only", "--set", "train.device=cpu", "data.fake_size=48"]) == 0
    # not --device's default, nor one batch
    assert (seen["cfg"].train.device, seen["cfg"].data.fake_size) == ("cpu", 48)
    assert main(["bench", "--config", str(path), "--data-only", "--device", "cpu", "--batch-size", "16"]) == 0
    assert (seen["cfg"].train.device, seen["cfg"].data.fake_size) == ("cpu", 16)  # one batch of fake images


@pytest.mark.parametrize("overrides", [[], ["method.name=mocov2", "model.bn=shared", "model.bn_group_size=4"]])
def test_the_step_operator_count_finds_no_host_synchronisation(repo_root, overrides):
    # benchmarks/step_ops.py counts what a step would launch on a GPU; a tensor read by Python in the step (a
    # host synchronisation) would show up in its last line
    import subprocess
    import sys

    sets = [arg for o in overrides for arg in ("--set", o)]
    done = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "step_ops.py"), "demo", *sets, "--top", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 host synchronisations"), last
    assert int(last.split(": ")[1].split()[0]) > 100  # it counted a real step
