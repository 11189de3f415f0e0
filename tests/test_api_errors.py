"""Bad input to the Python API raises a SlimsslError that names what was wrong, and leaves the supernet, its
statistics and the files on disk as they were."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import slimssl
from slimssl import SlimsslError
from slimssl.checkpoint import save_checkpoint

TINY = ["model.base_width=4"]  # the demo: widths 1, .5, .25 at depth 1-1-1-1


@pytest.fixture
def supernet():
    torch.manual_seed(0)
    return slimssl.build_supernet(slimssl.load_config("demo", TINY)).eval()


def x(channels: int = 3, dtype=torch.float32):
    return torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


def test_a_width_given_as_a_number_is_the_width_at_full_depth(supernet):
    assert torch.equal(supernet(x(), subnet=0.5), supernet(x(), subnet="0.5"))
    assert supernet.resolve(1).name == "w1p0_d1-1-1-1" and supernet.menu.require(0.25).name == "w0p25_d1-1-1-1"
    with supernet.subnet(0.25) as spec:
        assert spec.width == 0.25


@pytest.mark.parametrize("subnet, expected", [
    (True, "got bool True"), ([0.5], "got list [0.5]"), (b"0.5", "got bytes"),
    (0.3, "w0p3_d1-1-1-1 is not in the menu"),
    ("0.75", "private BatchNorm (model.bn: private) only the menu's entries have BatchNorm layers"),
    (2, "width must be in (0, 1]"),
    (1e-5, "width must be in (0, 1], got 1e-05"),
])
def test_sub_networks_of_another_type_or_value_are_named(supernet, subnet, expected):
    with pytest.raises(SlimsslError, match=expected.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        supernet(x(), subnet=subnet)
    assert supernet.slim_state.active == supernet.slim_state.full  # nothing leaked from the failed call


@pytest.mark.parametrize("images, got", [
    (x(channels=1), "shape (2, 1, 8, 8)"),  # would run silently on a slice of the stem's weights
    (x(dtype=torch.uint8), "dtype torch.uint8"), (torch.randn(3, 8, 8), "shape (3, 8, 8)"), (None, "NoneType"),
])
def test_inputs_that_are_not_rgb_float_batches_are_refused(supernet, images, got):
    with pytest.raises(slimssl.SlimsslError, match=r"expected a float tensor of images \[batch, 3, height, width\]"):
        supernet(images)
    with pytest.raises(slimssl.SlimsslError, match=got.replace("(", r"\(").replace(")", r"\)")):
        supernet(images, subnet="0.5")


def test_recalibration_without_batches_or_with_a_bad_one_keeps_the_statistics():
    cfg = slimssl.load_config("demo", [*TINY, "model.bn=shared"])
    model = slimssl.build_supernet(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimsslError, match="got no batches"):
        slimssl.recalibrate_bn(model, "0.5", [])
    with pytest.raises(SlimsslError, match="expected a float tensor of images"):
        slimssl.recalibrate_bn(model, "0.5", [x(), x(channels=1)])  # fails on the second batch
    with pytest.raises(slimssl.InputError, match=r"an iterable of batches of images, got one tensor of shape "
                                                 r"\[2, 3, .*\]: pass \[images\] for one batch"):
        slimssl.recalibrate_bn(model, "0.5", x())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    slimssl.recalibrate_bn(model, "0.5", [x()])  # a good call still changes them
    assert not all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_configs_given_as_dicts_and_bad_config_arguments():
    assert slimssl.build_supernet({"model": {"base_width": 4}}).base_width == 4
    with pytest.raises(SlimsslError, match="expected a Config, a dict of config sections"):
        slimssl.build_supernet(5)
    with pytest.raises(SlimsslError, match="overrides must be a list"):
        slimssl.load_config("demo", "model.base_width=4")


def test_a_binary_file_is_not_a_config(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SlimsslError, match="is not text"):
        slimssl.build_supernet(str(path))


def test_export_checks_the_format_and_the_folder_before_writing(supernet, tmp_path):
    with pytest.raises(SlimsslError, match="unknown export format 'pt'"):
        slimssl.export_subnet(supernet, "0.5", tmp_path / "out", fmt="pt")
    assert not (tmp_path / "out").exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    for out in (a_file, a_file / "below"):
        with pytest.raises(SlimsslError, match="notes.txt is a file"):
            slimssl.export_subnet(supernet, "0.5", out)
    assert a_file.read_text() == "kept"


def test_load_exported_names_a_missing_folder_and_an_unbuildable_config(supernet, tmp_path):
    with pytest.raises(SlimsslError, match="nope does not exist"):
        slimssl.load_exported(tmp_path / "nope")
    folder = slimssl.export_subnet(supernet, "0.5", tmp_path / "out")
    info = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**info, "architecture": ["not", "a", "mapping"]}))
    with pytest.raises(SlimsslError, match="is not an exported slimssl config"):
        slimssl.load_exported(folder)


def test_a_checkpoint_whose_weights_do_not_fit_its_config(supernet, tmp_path):
    cfg = slimssl.load_config("demo", TINY)
    state = {"backbone." + k: v for k, v in supernet.state_dict().items()}
    path = tmp_path / "bad.pt"
    save_checkpoint(path, {"config": slimssl.load_config("demo", ["model.base_width=8"]).model_dump(mode="json"),
                           "menu": cfg.subnet_menu().names, "model": state})
    with pytest.raises(SlimsslError, match="the stored weights do not fit the stored config"):
        slimssl.load_supernet(path)
    from slimssl.cli import main  # recalibrate reads the checkpoint itself: the same one-line error, exit 2

    assert main(["recalibrate", str(path), "--subnet", "0.5", "--out", str(tmp_path / "re.pt"), "--device", "cpu"]) == 2
    assert not (tmp_path / "re.pt").exists()
    save_checkpoint(path, {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names, "model": state,
                           "version": "x"})
    with pytest.raises(SlimsslError, match="version 'x'; expected an integer"):
        slimssl.load_checkpoint(path)


@pytest.mark.parametrize("width, depths, expected", [
    ("abc", (1,), "width must be a number"), (None, (1,), "width must be a number"),
    (0.5, None, "depths must be whole numbers"), (0.5, (1.7, 1), "depths must be whole numbers"),
    (0.5, "12", "depths must be whole numbers"), (0.5, (True, 1), "depths must be whole numbers"),
])
def test_a_spec_of_the_wrong_types_is_refused_not_truncated(width, depths, expected):
    with pytest.raises(SlimsslError, match=expected):
        slimssl.SubnetSpec(width, depths)


@pytest.mark.parametrize("kwargs, expected", [
    ({"block": "wide"}, "block must be one of"), ({"stem": "tiny"}, "stem must be"),
    ({"bn": "group"}, "bn must be 'private' or 'shared'"), ({"base_width": 0}, "base_width must be a positive"),
    ({"base_width": 8.5}, "base_width must be a positive"), ({"channel_divisor": 0}, "channel_divisor must be"),
    ({"depths": (2, 0)}, "every stage needs at least one block"), ({"depths": ()}, "at least one block"),
    ({"depths": (2, 1.5)}, "depths must be whole numbers"),
])
def test_a_supernet_of_impossible_shape_is_refused(kwargs, expected):
    with pytest.raises(SlimsslError, match=expected):
        slimssl.SlimResNet(**{"base_width": 4, "stem": "cifar", **kwargs})


def test_menus_take_names_and_refuse_mixed_stage_counts():
    assert slimssl.Menu(["w0p5_d1-1", "w1p0_d1-1"]).names == ["w1p0_d1-1", "w0p5_d1-1"]
    with pytest.raises(SlimsslError, match="different numbers of stages"):
        slimssl.Menu([slimssl.SubnetSpec(1.0, (1, 1)), slimssl.SubnetSpec(0.5, (1, 1, 1))])


def test_export_metadata_cannot_replace_the_keys_the_loader_reads(supernet, tmp_path):
    folder = slimssl.export_subnet(supernet, "0.5", tmp_path, metadata={"architecture": 1, "source": "mine"})
    assert json.loads((folder / "config.json").read_text())["source"] == "mine"
    assert torch.equal(slimssl.load_exported(folder)(x()), supernet(x(), subnet="0.5"))


def test_python_evaluation_and_pretraining_refuse_bad_numbers_with_named_errors(tmp_path):
    import slimssl
    from slimssl.config import config_from_dict
    from slimssl.checkpoint import save_checkpoint
    from slimssl.models.build import build_supernet

    cfg = config_from_dict({"model": {"base_width": 4, "depths": [1, 1, 1, 1]}, "menu": {"widths": [1.0, 0.5]},
                            "data": {"source": "fake", "resolution": 8, "fake_size": 16}})
    save_checkpoint(tmp_path / "m.pt", {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names,
                                        "model": {"backbone." + k: v for k, v in build_supernet(cfg).state_dict().items()}})
    ckpt = tmp_path / "m.pt"
    for call, name in [(lambda: slimssl.knn(ckpt, k=0), "k"), (lambda: slimssl.knn(ckpt, temperature=-1), "temperature"),
                       (lambda: slimssl.knn(ckpt, recalibrate_bn=-5), "recalibrate_bn"),
                       (lambda: slimssl.knn(ckpt, k="5"), "k must be an int"),
                       (lambda: slimssl.linear_probe(ckpt, epochs=0), "epochs"),
                       (lambda: slimssl.linear_probe(ckpt, lr=-1.0), "lr"),
                       (lambda: slimssl.linear_probe(ckpt, train_crop="centre"), "train_crop"),
                       (lambda: slimssl.finetune(ckpt, "0.5", 0.1, train_crop="centre"),
                        "train_crop must be one of pad, resized, whole, got 'centre'"),
                       (lambda: slimssl.finetune(ckpt, "0.5", 0.1, batch_size=0), "batch_size"),
                       (lambda: slimssl.knn(ckpt, device="gpu"), "gpu"),
                       (lambda: slimssl.pretrain(cfg, tmp_path / "run", max_steps=0), "max_steps"),
                       (lambda: slimssl.pretrain(cfg, tmp_path / "m.pt"), "is a file")]:
        with pytest.raises(slimssl.SlimsslError, match=name):
            call()
    assert not (tmp_path / "run").exists()


def test_menu_membership_takes_names_and_widths_and_export_checks_metadata_first(tmp_path):
    import slimssl

    menu = slimssl.Menu(["w1p0_d1-1-1-1", "w0p5_d1-1-1-1"])
    assert "w0p5_d1-1-1-1" in menu and 0.5 in menu and "0.5" in menu and menu.smallest in menu
    assert 0.25 not in menu and "nonsense" not in menu and None not in menu
    supernet = slimssl.build_supernet({"model": {"base_width": 4, "depths": [1, 1, 1, 1]},
                                       "menu": {"widths": [1.0, 0.5]}})
    with pytest.raises(slimssl.SlimsslError, match="metadata"):
        slimssl.export_subnet(supernet, 0.5, tmp_path / "out", metadata={"x": object()})
    assert not (tmp_path / "out").exists()


def test_the_lower_level_functions_raise_slimssl_errors_for_bad_input(supernet, monkeypatch):
    """The building blocks under the commands (usable on their own) name bad input as SlimsslErrors, so the
    command line prints them as one line instead of a traceback."""
    from slimssl.data.augment import recipe
    from slimssl.data.datasets import ImageDataset
    from slimssl.eval.finetune import balanced_subset
    from slimssl.eval.knn import knn_eval_subnets
    from slimssl.eval.supervised import augment_batch
    from slimssl.train.distributed import timeout_seconds

    unlabelled = ImageDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), None, None, "folder")
    cases = [
        (lambda: knn_eval_subnets(supernet, unlabelled, unlabelled, k=5, temperature=0.1, resolution=8,
                                   mean=(0.5,) * 3, std=(0.5,) * 3), "kNN needs labels; the train split of dataset 'folder' has none"),
        (lambda: balanced_subset(torch.arange(10), 0.0), r"label fraction must be in \(0, 1\], got 0.0"),
        (lambda: augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 8, mean=(0.5,) * 3, std=(0.5,) * 3,
                               generator=torch.Generator(), crop="centre"),
         "train_crop must be one of pad, resized, whole, got 'centre'"),
        (lambda: augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 8, mean=(0.5,) * 3, std=(0.5,) * 3,
                               generator=torch.Generator(), crop=None),  # the config's default is the API's
         "train_crop must be one of pad, resized, whole, got None"),
        (lambda: recipe("simclr", 32), "unknown augmentation recipe 'simclr'; known: byol, mocov2, mocov3"),
    ]
    for call, message in cases:
        with pytest.raises(SlimsslError, match=message):
            call()
    monkeypatch.setenv("SLIMSSL_DIST_TIMEOUT", "soon")
    with pytest.raises(SlimsslError, match=r"\$SLIMSSL_DIST_TIMEOUT must be a number of seconds, got 'soon'"):
        timeout_seconds()


def test_images_of_another_dtype_than_the_network_are_named(supernet):
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(slimssl.InputError, match=f"network's dtype torch.float32, got {dtype}"):
            supernet(x(dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the inputs itself
        assert supernet(x(dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert torch.allclose(supernet.double()(x(dtype=torch.float64)).float(), supernet.float()(x()), atol=1e-5)


def test_devices_name_what_runs(monkeypatch):
    from slimssl.devices import pick_device

    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(slimssl.DeviceError, match="expected auto, cpu, cuda or cuda:N"):
        pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(slimssl.DeviceError, match=r"sees 2 CUDA device\(s\) here \(cuda:0 to cuda:1\)"):
        pick_device(torch.device("cuda", 2))
    # a process of a distributed job takes GPU LOCAL_RANK and makes it current; one GPU too many is named
    chosen = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("cuda") == torch.device("cuda", 1) and chosen == [1]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(slimssl.DeviceError, match=r"LOCAL_RANK=2, but this machine has 2 CUDA device\(s\).*"
                                                  r"at most 2 processes per node"):
        pick_device("cuda")
    with pytest.raises(slimssl.DeviceError, match="each process of a distributed job takes its own GPU, number "
                                                  "LOCAL_RANK: use cuda"):
        pick_device("cuda:0")  # every process on one GPU


def test_an_apple_gpu_is_said_to_be_unsupported_and_fp16_on_the_cpu_to_be_slow(capsys, caplog):
    """mps is refused (not silently run on the CPU) wherever a device is given, saying why; fp16 on the CPU runs,
    with a warning that it is several times slower."""
    from slimssl.cli import main
    from slimssl.devices import pick_device, pick_dtype

    hint = "Apple GPUs, mps, are not supported yet: use cpu"
    with pytest.raises(slimssl.DeviceError, match=hint):
        pick_device("mps")
    with pytest.raises(slimssl.ConfigError, match=hint):
        slimssl.load_config("demo", ["train.device=mps"])
    with pytest.raises(SystemExit):
        main(["pretrain", "--device", "mps:0"])
    assert hint in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--device", "gpu"])
    assert "mps" not in capsys.readouterr().err  # only for mps
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert pick_dtype("fp16", torch.device("cpu")) == torch.float16 and pick_dtype("bf16", torch.device("cpu"))
    assert caplog.text.count("fp16 on the CPU runs several times slower") == 1


def test_a_device_name_is_checked_where_it_is_given(capsys):
    from slimssl.cli import main

    assert slimssl.load_config("demo", ["train.device=cuda:3"]).train.device == "cuda:3"
    with pytest.raises(slimssl.ConfigError, match=r"train.device: Input should be auto, cpu, cuda or cuda:N "
                                                  r"\(got 'gpu'\) \[from overrides=\]"):
        slimssl.load_config("demo", ["train.device=gpu"])
    for command in (["pretrain"], ["knn", "RUN"], ["export", "RUN", "--all", "--out", "x"], ["bench"],
                    ["reproduce", "--out", "x"], ["finetune", "RUN", "--label-fraction", "0.1", "--all"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--device", "cuda1"])
        assert exit_.value.code == 2
        assert "argument --device: expected auto, cpu, cuda or cuda:N, got 'cuda1'" in capsys.readouterr().err


def test_a_menu_given_one_name_says_it_needs_a_list():
    with pytest.raises(slimssl.SubnetError, match=r"a menu is a list of sub-networks.*Menu\(\['w0p5_d1-1'\]\)"):
        slimssl.Menu("w0p5_d1-1")
    assert slimssl.Menu(["w0p5_d1-1"]).names == ["w0p5_d1-1"]


def test_export_subnet_keeps_an_export_of_another_source(supernet, tmp_path):
    slimssl.export_subnet(supernet, 0.5, tmp_path, metadata={"source": "runs/a"})
    with pytest.raises(slimssl.ExportError, match="from runs/a; choose another output folder"):
        slimssl.export_subnet(supernet, 0.5, tmp_path, metadata={"source": "runs/b"})
    slimssl.export_subnet(supernet, 0.5, tmp_path, metadata={"source": "runs/b"}, overwrite=True)
    slimssl.export_subnet(supernet, 0.5, tmp_path / "plain")
    slimssl.export_subnet(supernet, 0.5, tmp_path / "plain")  # no source either time: replaced, as torch.save


def test_a_private_bn_supernet_needs_the_full_network_in_its_menu():
    with pytest.raises(slimssl.SubnetError, match=r"lacks the full network w1p0_d1-1.*bn='shared'"):
        slimssl.SlimResNet(depths=(1, 1), menu=["w0p5_d1-1"], base_width=4)
    shared = slimssl.SlimResNet(depths=(1, 1), menu=["w0p5_d1-1"], base_width=4, bn="shared")
    assert shared(x()).shape == (2, 8)  # any width runs with shared statistics, the full one included


def test_build_supernet_takes_overrides_as_load_config_does():
    built = slimssl.build_supernet("demo", overrides=["model.base_width=4", "menu.widths=[1.0, 0.25]"])
    assert built.menu.names == ["w1p0_d1-1-1-1", "w0p25_d1-1-1-1"] and built.base_width == 4
    with pytest.raises(slimssl.ConfigError, match="model.nosuch"):
        slimssl.build_supernet("demo", ["model.nosuch=1"])


def test_resolve_many_gives_the_menu_or_the_named_sub_networks_once_each(supernet):
    assert supernet.resolve_many(None) == supernet.resolve_many("all") == list(supernet.menu)
    assert [s.name for s in supernet.resolve_many([0.25, "w1p0_d1-1-1-1", "0.25"])] == [
        "w0p25_d1-1-1-1", "w1p0_d1-1-1-1"]
    assert supernet.resolve_many(0.5) == [supernet.resolve(0.5)]
    with pytest.raises(slimssl.SubnetError, match="no sub-network given"):
        supernet.resolve_many([])


def test_copies_to_the_gpu_pin_host_tensors_only():
    from slimssl.devices import to_device_async

    class Recorder:  # a tensor stand-in that records how it is moved (this machine may have no GPU)
        def __init__(self, device: str, log: list):
            self.device, self.log = torch.device(device), log

        def pin_memory(self):
            self.log.append("pin")
            return Recorder("cpu", self.log)

        def to(self, device, non_blocking=False):
            self.log.append(("to", str(device), non_blocking))
            return self

    cuda = torch.device("cuda")  # as --device cuda gives it, without an index; a GPU tensor says cuda:0
    log = []
    to_device_async(Recorder("cuda:0", log), cuda)
    assert log == [("to", "cuda", False)]  # a GPU tensor is never pinned: pinning it would fail
    log = []
    to_device_async(Recorder("cpu", log), cuda)
    assert log == ["pin", ("to", "cuda", True)]  # a host tensor goes through pinned memory, without a wait


def test_export_and_finetune_name_the_function_that_takes_what_was_given(supernet, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = slimssl.load_config("demo", TINY)
    weights = {"backbone." + k: v for k, v in supernet.state_dict().items()}
    save_checkpoint(run / "checkpoints" / "last.pt",
                    {"config": cfg.model_dump(mode="json"), "menu": supernet.menu.names, "model": weights})
    with pytest.raises(SlimsslError, match=r"export_run takes a checkpoint .* slimssl.export_subnet\(supernet"):
        slimssl.export_run(supernet, tmp_path / "out", "0.5")
    with pytest.raises(SlimsslError, match=r"export_subnet takes a supernet in memory .* slimssl.export_run"):
        slimssl.export_subnet(str(run), "0.5", tmp_path / "out")
    compiled = torch.compile(supernet)  # a wrapper of the supernet, as train.compile makes one: exported as it
    assert slimssl.load_exported(slimssl.export_subnet(compiled, "0.5", tmp_path / "compiled", config=cfg))
    with pytest.raises(SlimsslError, match=r"not in the menu.*to fine-tune on 0.1 of the labels, pass "
                                           r"label_fractions=0.1"):
        slimssl.finetune(run, 0.1, device="cpu", save=False)
    assert not (tmp_path / "out").exists()
    with caplog.at_level("WARNING", logger="slimssl"):
        slimssl.export_subnet(supernet, "0.5", tmp_path / "bare")
    assert "records no resolution, mean, std of its inputs: pass config=" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="slimssl"):
        slimssl.export_subnet(supernet, "0.5", tmp_path / "described", config=cfg)
    assert "records no" not in caplog.text


def test_a_supernet_takes_its_menu_as_widths_and_a_width_alone_says_where_its_depths_come_from():
    supernet = slimssl.SlimResNet(depths=(1, 1, 1, 1), base_width=4, stem="cifar", menu=["1.0", 0.5])
    assert supernet.menu.names == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1"]
    with pytest.raises(SlimsslError, match=r"give them, one per stage \(e.g. 'w0p5_d2-2-2-2' or '0.5:2,2,2,2'\), "
                                           r"or ask the supernet \(supernet.resolve\('0.5'\)\)"):
        slimssl.SubnetSpec.parse("0.5")


def test_an_export_knows_its_feature_size_and_takes_a_classifier_into_its_config(supernet, tmp_path):
    from torch import nn

    folder = slimssl.export_subnet(supernet, "0.5", tmp_path, config=slimssl.load_config("demo", TINY))
    plain = slimssl.load_exported(folder, device="cpu")
    assert plain.feature_dim == plain(x()).shape[1] == supernet.feature_dim("0.5")
    plain.fc = nn.Linear(plain.feature_dim, 7)
    assert plain.config.num_classes == 7  # so the config rebuilds the model that holds these weights
    slimssl.PlainResNet(plain.config).load_state_dict(plain.state_dict())
    plain.fc = nn.Identity()
    assert plain.config.num_classes == 0
    plain.fc = nn.Linear(plain.feature_dim, 3, bias=False)  # which no config describes: left to the caller
    assert plain.config.num_classes == 0
    with pytest.raises(slimssl.DeviceError, match="'tpu' is not a device"):
        slimssl.load_exported(folder, device="tpu")
    run = tmp_path / "run"
    (run / "config.yaml").parent.mkdir()
    (run / "config.yaml").write_text("name: mine\n")
    with pytest.raises(SlimsslError, match=r"is a directory; .*a run's config is .*config.yaml"):
        slimssl.load_config(run)


def test_slimssls_functions_give_the_callers_random_state_back(tmp_path, supernet):
    """Loading, exporting, profiling and evaluating build networks whose random initial weights are then replaced:
    the caller's draws after each call are those they would have made without it."""
    run = slimssl.pretrain("demo", tmp_path / "run", overrides=[*TINY, "train.epochs=1"], max_steps=1)
    exported = slimssl.export_subnet(supernet, 0.5, tmp_path / "export")
    calls = {
        "load_supernet": lambda: slimssl.load_supernet(run.run_dir),
        "load_exported": lambda: slimssl.load_exported(exported),
        "export_subnet": lambda: slimssl.export_subnet(supernet, 0.25, tmp_path / "again"),
        "verify_export": lambda: slimssl.verify_export(supernet, 0.5, exported, 16),
        "export_run": lambda: slimssl.export_run(run.run_dir, tmp_path / "exports", 0.5, overwrite=True),
        "profile": lambda: slimssl.profile(supernet, resolution=16),
        "knn": lambda: slimssl.knn(run.run_dir, 0.5, device="cpu", save=False),
        "linear_probe": lambda: slimssl.linear_probe(run.run_dir, 0.5, epochs=1, device="cpu", save=False),
        "finetune": lambda: slimssl.finetune(run.run_dir, 0.5, 0.5, epochs=1, device="cpu", save=False),
        "recalibrate_checkpoint": lambda: slimssl.recalibrate_checkpoint(run.run_dir, 0.5, tmp_path / "r.pt"),
    }
    for name, call in calls.items():
        torch.manual_seed(7)
        expected = torch.rand(4)
        torch.manual_seed(7)
        call()
        assert torch.equal(torch.rand(4), expected), name
