"""Typed configs: shipped recipes, unknown keys and wrong types, --set overrides, menu checks, YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slimssl.config import Config, ConfigError, check_processes, config_from_dict, load_config, packaged_configs
from slimssl.models.arch import ARCHS
from slimssl.nn.spec import SubnetSpec

SHIPPED = packaged_configs()


def write(tmp_path: Path, data, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_shipped_configs_are_listed(config_dir):
    assert "demo.yaml" in SHIPPED
    assert len(SHIPPED) >= 8
    assert SHIPPED == sorted(p.name for p in config_dir.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name, config_dir):
    by_path = load_config(config_dir / name)
    by_name = load_config(name)
    by_stem = load_config(name.removesuffix(".yaml"))
    assert by_path == by_name == by_stem
    assert isinstance(by_path, Config)
    menu = by_path.subnet_menu()
    full = by_path.model.full_depths
    assert len(menu) >= 1
    assert menu.largest.width == 1.0
    for spec in menu:
        spec.check_fits(full)
    raw = yaml.safe_load((config_dir / name).read_text())
    assert by_path.name == raw["name"]
    assert by_path.model.arch == raw["model"]["arch"]


def test_default_config_is_demo():
    assert load_config() == load_config("demo")
    demo = load_config("demo")
    assert demo.model.full_depths == (1, 1, 1, 1)
    assert demo.subnet_menu().names == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1", "w0p25_d1-1-1-1"]


def test_r34_depth_menu_has_eight_entries():
    cfg = load_config("cifar10_r34_dspnet_byol_depth")
    names = cfg.subnet_menu().names
    assert len(names) == 8
    assert names[0] == "w1p0_d3-4-6-3"
    assert "w0p25_d2-2-2-2" in names
    assert cfg.model.full_depths == ARCHS["resnet34"][1]


def test_a_utf8_config_reads_the_same_whatever_the_locale(tmp_path, ascii_locale):
    """Config files are UTF-8 on every platform; read in the locale's encoding (cp1252 on Windows, ASCII here)
    a non-ASCII path in one was garbled or refused."""
    import subprocess
    import sys

    path = tmp_path / "mine.yaml"
    path.write_text("name: démo-Δ\ndata:\n  source: /données/cifar10\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "slimssl", "config", "--config", str(path)], env=ascii_locale,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    printed = yaml.safe_load(proc.stdout)
    assert (printed["name"], printed["data"]["source"]) == ("démo-Δ", "/données/cifar10")


# ---- unknown keys and wrong types ---------------------------------------------------------------------

def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, {"model": {"arch": "resnet18", "nope": 1}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "model.nope" in msg
    assert str(path) in msg
    assert "base_width" in msg  # lists what is allowed


def test_unknown_top_level_section_in_file(tmp_path):
    path = write(tmp_path, {"trian": {"epochs": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "trian" in str(err.value) and str(path) in str(err.value)


def test_unknown_key_via_set_names_key_and_file(config_dir):
    with pytest.raises(ConfigError) as err:
        load_config(config_dir / "demo.yaml", ["train.nope=1"])
    msg = str(err.value)
    assert "train.nope" in msg
    assert "demo.yaml" in msg


@pytest.mark.parametrize("key, value", [("train", {"epochs": "many"}), ("model", {"base_width": "wide"}),
                                        ("model", {"arch": "resnet999"}), ("menu", {"widths": "all"}),
                                        ("optim", {"lr": -1.0})])
def test_wrong_type_names_key_and_file(tmp_path, key, value):
    path = write(tmp_path, {key: value})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{key}.{next(iter(value))}" in msg
    assert str(path) in msg


def test_mocov2_without_a_queue_is_refused_and_other_methods_ignore_it():
    with pytest.raises(ConfigError, match=r"method.queue_size.*at least 1"):
        load_config("cifar10_r18_slimclr_mocov2", ["method.queue_size=0"])
    assert load_config("demo", ["method.queue_size=0"]).method.queue_size == 0  # the demo is MoCo v3: no queue


@pytest.mark.parametrize("recipe", ["demo", "cifar10_r18_dspnet_byol"])  # MoCo v3, BYOL: symmetric losses
def test_an_asymmetric_loss_is_refused_where_the_loss_has_none(recipe):
    with pytest.raises(ConfigError, match=r"method.symmetric: false has no effect on (mocov3|byol)"):
        load_config(recipe, ["method.symmetric=false"])
    assert load_config("cifar10_r18_slimclr_mocov2", ["method.symmetric=false"]).method.symmetric is False


def test_wrong_type_via_set(config_dir):
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["train.epochs=many"])
    assert "train.epochs" in str(err.value) and "demo.yaml" in str(err.value)


# ---- --set --------------------------------------------------------------------------------------------

def test_set_overrides_nested_values_with_yaml_typing():
    cfg = load_config("demo", ["train.epochs=5", "menu.widths=[1.0, 0.75]", "model.stem=imagenet",
                               "optim.lr=0.5", "data.crop_scale=null", "data.mean=[0.5, 0.5, 0.5]",
                               "train.channels_last=false", "model.depths=[1, 2, 1, 1]"])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.menu.widths == [1.0, 0.75]
    assert cfg.model.stem == "imagenet"
    assert cfg.optim.lr == 0.5
    assert cfg.data.crop_scale == (0.08, 1.0)  # null: the demo's range gives way to its recipe's (MoCo v3)
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.train.channels_last is False
    assert cfg.subnet_menu().names == ["w1p0_d1-2-1-1", "w0p75_d1-2-1-1"]
    base = load_config("demo")  # untouched values stay as in the file
    assert cfg.method == base.method and cfg.eval == base.eval and cfg.name == base.name


def test_set_applies_in_order_and_creates_missing_sections(tmp_path):
    path = write(tmp_path, {"name": "x"})
    cfg = load_config(path, ["eval.knn_k=7", "eval.knn_k=9", "model.arch=resnet50"])
    assert cfg.eval.knn_k == 9
    assert cfg.model.block == "bottleneck"


def test_set_without_equals_or_into_a_value_is_an_error():
    with pytest.raises(ConfigError):
        load_config("demo", ["train.epochs"])
    with pytest.raises(ConfigError):
        load_config("demo", ["name.sub=1"])


# ---- menu checks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["menu.widths=[1.0, 1.5]", "menu.widths=[0.0]", "menu.widths=[]",
                                      "menu.depths=[[1, 1, 2, 1]]", "menu.depths=[[1, 1, 1]]",
                                      "menu.subnets=[w0p5_d1-1-1-2]", "menu.subnets=[bogus]"])
def test_impossible_menu_raises_config_error(override):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert "demo.yaml" in str(err.value)
    assert "menu" in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("model.depths=[0,1,1,1]", r"model.depths.0: Input should be greater than or equal to 1 \(got 0\)"),
    ("model.depths=[2,-1,2,2]", r"model.depths.1: Input should be greater than or equal to 1 \(got -1\)"),
    ("menu.depths=[[1,0,1,1]]", r"menu.depths.0.1: Input should be greater than or equal to 1 \(got 0\)"),
    ("menu.depths=[[]]", r"menu.depths.0: List should have at least 1 item"),
    ("model.depths=0", r"model.depths: Input should be a valid list \(got 0\)"),
])
def test_a_stage_without_blocks_is_named_under_its_own_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_an_empty_depths_list_is_the_default_as_null_is():
    """How earlier versions read it: a checkpoint saved with [] still opens."""
    cfg = load_config("demo", ["model.depths=[]", "menu.depths=[]"])
    assert cfg.model.depths is None and cfg.menu.depths is None
    assert cfg.subnet_menu() == load_config("demo", ["model.depths=null", "menu.depths=null"]).subnet_menu()


def test_menu_depth_beyond_arch_in_file(tmp_path):
    path = write(tmp_path, {"model": {"arch": "resnet34"}, "menu": {"widths": [1.0], "depths": [[3, 4, 7, 3]]}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "w1p0_d3-4-7-3" in str(err.value)


def test_menu_crosses_widths_depths_and_named_entries():
    cfg = config_from_dict({"model": {"arch": "resnet34"},
                            "menu": {"widths": [1.0, 0.5], "depths": [[3, 4, 6, 3], [2, 2, 2, 2]],
                                     "subnets": ["w0p25_d1-1-1-1", "0.75", "w0p5_d2-2-2-2"]}})
    menu = cfg.subnet_menu()
    assert SubnetSpec(0.75, (3, 4, 6, 3)) in menu
    assert SubnetSpec(0.25, (1, 1, 1, 1)) == menu.smallest
    assert len(menu) == 6  # the repeated w0p5_d2-2-2-2 counts once


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(write(tmp_path, "model: [unclosed", "bad.yaml"))
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_missing_config_file_lists_shipped():
    with pytest.raises(ConfigError) as err:
        load_config("no_such_recipe_xyz")
    assert "no_such_recipe_xyz" in str(err.value)
    assert "demo.yaml" in str(err.value)


def test_a_shipped_config_is_found_by_its_exact_name_on_any_file_system(monkeypatch):
    """On a case-insensitive file system (macOS, Windows) DEMO.yaml opens demo.yaml: --config DEMO must still be
    the error it is on Linux, so that a command line means the same everywhere."""
    real = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: real(self) or real(self.with_name(self.name.lower())))
    with pytest.raises(ConfigError, match=r"config file 'DEMO' does not exist \(did you mean demo\?\); shipped "
                                          r"configs: .*demo.yaml"):
        load_config("DEMO")
    assert load_config("demo").name == "demo"



@pytest.mark.parametrize("assignment, expected", [
    ("menu.widths=[1.0, 0.5", "override menu.widths: the value '[1.0, 0.5' is not valid YAML"),
    ("model.base_width=@x", "override model.base_width: the value '@x' is not valid YAML"),
    ("train.epochs=!!python/object:os.system x", "override train.epochs: the value"),  # safe_load refuses tags
    ("=3", "expected KEY=VALUE with a dotted key"),
    ("train..epochs=3", "expected KEY=VALUE with a dotted key"),
    ("train.epochs.x=1", "override train.epochs.x: 'epochs' is not a section"),
    ("train.epochs", "overrides are 'KEY=VALUE' strings such as 'train.epochs=5', got 'train.epochs'"),
])
def test_unreadable_set_values_name_the_key(assignment, expected):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [assignment])
    assert expected in str(err.value) and "\n" not in str(err.value) and "--set" not in str(err.value)


def test_unreadable_set_values_name_the_flag_on_the_command_line(capsys, caplog):
    from slimssl.cli import main

    assert main(["config", "--config", "demo", "--set", "model.base_width=@x"]) == 2
    assert "--set model.base_width: the value '@x' is not valid YAML" in capsys.readouterr().err + caplog.text


def test_errors_caused_by_set_say_so():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["model.nosuch=1", "train.epochs=0", "trian.epochs=5"])
    lines = str(err.value).splitlines()
    assert any("model.nosuch: unknown key [from overrides=]" in line for line in lines)
    assert any("trian: unknown key [from overrides=] (did you mean train?)" in line for line in lines)  # a section
    assert any(line.strip().startswith("train.epochs") and "[from overrides=]" in line for line in lines)


@pytest.mark.parametrize("assignment, key", [
    ("data.std=[0.2, 0, 0.2]", "data.std.1"), ("data.crop_scale=[1.5, 0.2]", "data.crop_scale"),
    ("data.crop_scale=[0, 0]", "data.crop_scale"), ("optim.betas=[2, 0.999]", "optim.betas.0"),
    ("train.batch_size=1", "train.batch_size"), ("menu.widths=[1.0, 0.5, 1.0]", "menu.widths lists 1 more than once"),
    ("menu.widths=[1.0, 0.33333, 0.33334]", "menu.widths lists 0.3333 more than once"),
    # a negative lr after the join would train uphill; 0 would read as unset
    ("slim.slow_start_lr=-0.5", "slim.slow_start_lr"), ("slim.slow_start_lr=0", "slim.slow_start_lr"),
    ("optim.momentum=-0.5", "optim.momentum"), ("optim.momentum=1.5", "optim.momentum"),
    ("slim.slow_start=1.0", "slim.slow_start"),  # the sub-networks would never train
])
def test_values_that_would_fail_mid_training_are_refused_up_front(assignment, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", [assignment])


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "model:\n  arch: [resnet18\n", "bad.yaml"))
    assert "bad.yaml is not valid YAML" in str(err.value) and "line 3" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    """YAML alone keeps the last of two equal keys: a recipe that sets a value twice would run with one of them
    silently. Every shipped recipe loads under this rule."""
    with pytest.raises(ConfigError, match=r"twice\.yaml is not valid YAML: key 'resolution' is given twice at line 3"):
        load_config(write(tmp_path, "data:\n  resolution: 32\n  resolution: 16\n", "twice.yaml"))
    for name in packaged_configs():
        load_config(name)


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; expected a YAML file"):
        load_config(tmp_path)

# ---- YAML round trip ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_to_yaml_round_trips(name, tmp_path):
    cfg = load_config(name, ["train.epochs=3"])
    text = cfg.to_yaml()
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg
    assert load_config(write(tmp_path, text)) == cfg
    assert again.to_yaml() == text


def test_to_yaml_holds_resolved_defaults():
    data = yaml.safe_load(load_config("demo").to_yaml())
    assert data["train"]["seed"] == 0
    assert data["model"]["depths"] == [1, 1, 1, 1]
    assert set(data) == set(Config.model_fields)


@pytest.mark.parametrize("name, batch, peak, after_slow_start", [
    ("imagenet_r50_slimclr_mocov2", 1024, 0.2, None),  # SlimCLR's script: lr 0.2 at 1024, unscaled
    ("imagenet_r50_slimclr_mocov3", 1024, 1.2, 3.2),  # SlimCLR's script: 1.2, then 3.2, at 1024, unscaled
    ("imagenet_r50_dspnet_byol", 4096, 4.8, None),  # BYOL at 300 epochs: 0.3 x batch / 256
    ("cifar10_r18_slimclr_mocov2", 512, 0.06, None),  # MoCo's CIFAR-10 demo: 0.06 at 512
    ("cifar10_r18_slimclr_mocov3", 512, 0.6, None),  # solo-learn: 0.3 x batch / 256
    ("cifar10_r18_dspnet_byol", 512, 2.0, None),  # solo-learn: 1.0 x batch / 256
])
def test_recipes_reach_their_sources_learning_rates(name, batch, peak, after_slow_start):
    """docs/recipes.md: the effective peak learning rate of each recipe is its source's."""
    from slimssl.train.optim import scaled_lr

    cfg = load_config(name)
    assert cfg.train.batch_size == batch
    assert scaled_lr(cfg.optim.lr, cfg.optim, batch) == pytest.approx(peak)
    late = cfg.slim.slow_start_lr and scaled_lr(cfg.slim.slow_start_lr, cfg.optim, batch)
    assert late == (pytest.approx(after_slow_start) if after_slow_start else None)


@pytest.mark.parametrize("name, crop_scale", [
    ("imagenet_r50_slimclr_mocov2", (0.2, 1.0)),  # MoCo v2's aug_plus, as SlimCLR's code
    ("cifar10_r18_slimclr_mocov2", (0.08, 1.0)),  # MoCo's CIFAR-10 demo: torchvision's default
    ("imagenet_r50_slimclr_mocov3", (0.2, 1.0)),  # SlimCLR's and MoCo v3's --crop-min 0.2
    ("imagenet_r50_dspnet_byol", (0.08, 1.0)),
    ("cifar10_r18_dspnet_byol", (0.08, 1.0)),
    ("cifar10_r18_slimclr_mocov3", (0.08, 1.0)),
    ("demo", (0.4, 1.0)),
])
def test_recipes_crop_as_their_sources(name, crop_scale):
    """docs/recipes.md: the random resized crop's area range of each recipe's two views."""
    from slimssl.data.views import two_view_augment

    assert [v.crop_scale for v in two_view_augment(load_config(name)).views] == [crop_scale, crop_scale]


def test_crop_scale_resolves_to_the_augmentation_recipes_and_is_saved():
    from slimssl.config import config_differences

    assert load_config("imagenet_r50_slimclr_mocov2").data.crop_scale == (0.2, 1.0)
    assert load_config("cifar10_r18_dspnet_byol", ["data.augment=mocov2"]).data.crop_scale == (0.2, 1.0)
    byol = load_config("cifar10_r18_dspnet_byol")
    assert "crop_scale:\n  - 0.08\n  - 1.0" in byol.to_yaml()  # a run's config.yaml says what it used
    # a run saved before the default followed the recipe (0.08-1 written out) continues without a difference
    saved = byol.model_dump(mode="json")
    saved["data"]["crop_scale"] = [0.08, 1.0]
    assert config_differences(config_from_dict(saved), byol) == []


@pytest.mark.parametrize("name, crop_ratio", [
    ("imagenet_r50_slimclr_mocov2", 0.875),  # resize 256, centre crop 224: every ImageNet linear protocol
    ("imagenet_r50_slimclr_mocov3", 0.875),
    ("imagenet_r50_dspnet_byol", 0.875),
    ("cifar10_r18_dspnet_byol", 1.0),  # CIFAR is evaluated on the whole 32 px image
    ("demo", 1.0),
])
def test_recipes_evaluate_with_their_protocols_crops(name, crop_ratio):
    """ImageNet: centre 0.875 for evaluation, RandomResizedCrop for fine-tuning (and the augmented probe);
    CIFAR: the whole image, and the padded crop."""
    cfg = load_config(name)
    assert cfg.eval.crop_ratio == crop_ratio
    assert cfg.eval.train_crop == ("whole" if name.startswith("imagenet") else "pad")


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.5"])
def test_an_impossible_crop_ratio_is_refused(bad):
    with pytest.raises(ConfigError, match="eval.crop_ratio"):
        load_config("demo", [f"eval.crop_ratio={bad}"])


def test_overrides_never_change_the_callers_dict():
    data = {"name": "mine", "train": {"epochs": 3}, "data": {"source": "digits"}}
    cfg = config_from_dict(data, overrides=["train.epochs=5", "data.resolution=16"])
    assert cfg.train.epochs == 5 and cfg.data.resolution == 16
    assert data == {"name": "mine", "train": {"epochs": 3}, "data": {"source": "digits"}}


def test_a_config_object_is_checked_again_as_a_whole_when_used():
    from slimssl.models.build import as_config, build_supernet

    byol = config_from_dict({"method": {"name": "byol"}})
    assert byol.data.crop_scale == (0.08, 1.0)
    # an override or an assignment of the method: the crop range resolved from the old recipe follows it
    assert as_config(byol, ["method.name=mocov2"]).data.crop_scale == (0.2, 1.0)
    byol.method.name = "mocov2"
    assert as_config(byol).data.crop_scale == (0.2, 1.0)
    given = config_from_dict({"method": {"name": "byol"}, "data": {"crop_scale": [0.3, 1.0]}})
    assert as_config(given, ["method.name=mocov2"]).data.crop_scale == (0.3, 1.0)  # given: kept
    broken = load_config("demo")
    broken.menu.widths = [0.5]  # passes the menu section's own checks, not the whole config's
    with pytest.raises(ConfigError, match="menu"):
        build_supernet(broken)


@pytest.mark.parametrize("overrides", ["train.epochs=2", {"train.epochs": 2}])
def test_overrides_that_are_not_a_list_say_how_to_write_them(overrides, tmp_path):
    import slimssl

    for call in (lambda: load_config("demo", overrides),
                 lambda: slimssl.pretrain("demo", tmp_path, overrides=overrides)):
        with pytest.raises(ConfigError, match=r"overrides must be a list of 'KEY=VALUE' strings such as "
                                              r"\['train.epochs=2'\]"):
            call()
    assert not tmp_path.joinpath("checkpoints").exists()


@pytest.mark.parametrize("name, zero_init", [
    ("imagenet_r50_slimclr_mocov2", True),  # SlimCLR's ResNet zeroes each residual branch's last BatchNorm
    ("imagenet_r50_slimclr_mocov3", True),
    ("cifar10_r18_slimclr_mocov2", False),  # MoCo's CIFAR-10 demo: torchvision's default
])
def test_recipes_start_their_residual_branches_as_their_sources(name, zero_init):
    import slimssl

    cfg = load_config(name, ["model.base_width=8"])  # narrow: the same blocks, built quickly
    last = "bn3" if cfg.model.arch == "resnet50" else "bn2"  # a residual branch's last BatchNorm
    scales = [p for n, p in slimssl.build_supernet(cfg).named_parameters()
              if n.startswith("layer") and f".{last}." in n and n.endswith(".weight")]
    assert scales and all(bool((p == 0).all()) == zero_init for p in scales)


def test_a_raised_lr_after_the_slow_start_is_reported_only_when_there_is_a_slow_start():
    from slimssl.train.optim import effective_lr

    cfg = load_config("imagenet_r50_slimclr_mocov3")
    assert effective_lr(cfg, 8)["peak_after_slow_start"] == pytest.approx(3.2)
    assert "peak_after_slow_start" not in effective_lr(load_config(cfg.name, ["slim.slow_start=0"]), 8)


# the shipped file is fine: an error is said to be the overrides'
SET_ERROR = r"invalid overrides= for the config of demo\.yaml \(shipped\):\n"


@pytest.mark.parametrize("assignment, message", [
    ("train.epochs=true", "train.epochs: true or false where a number is expected"),
    ("slim.slow_start_lr=false", "slim.slow_start_lr: true or false where a number is expected"),
    ("menu.widths=[true, 0.5]", r"menu.widths: true or false where a number is expected \(got \[True, 0.5\]\)"),
    ("data.crop_scale=[0.2, true]", "data.crop_scale: true or false where a number is expected"),
    ("menu.depths=[[1, 1, 1, true]]", "menu.depths: true or false where a number is expected"),
    ("optim.lr=inf", "optim.lr: Input should be a finite number"),
    ("optim.lr=.inf", "optim.lr: Input should be a finite number"),
])
def test_a_bool_or_an_infinity_is_no_number(assignment, message):
    # the shipped file is fine: the error is said to be the --set's
    with pytest.raises(ConfigError, match=rf"{SET_ERROR}  {message}"):
        load_config("demo", [assignment])


@pytest.mark.parametrize("assignment", ["menu.widths=[1.0, 1.0]", "model.bn_group_size=3"])
def test_a_set_that_breaks_a_check_across_keys_is_said_to_be_the_sets(assignment):
    """Checks of a whole section (a repeated width, a group size that does not divide the batch) name no single
    key, but the file passed them before the --set."""
    with pytest.raises(ConfigError, match=SET_ERROR):
        load_config("demo", [assignment])


def test_the_command_line_names_its_own_flags_where_python_names_overrides(capsys, caplog):
    """The same mistake, worded for whoever made it: `--set` on the command line, `overrides=` in Python."""
    from slimssl.cli import main

    assert main(["config", "--config", "demo", "--set", "train.epochs=true", "model.nosuch=1"]) == 2
    said = capsys.readouterr().err + caplog.text
    assert "invalid --set for the config of demo.yaml" in said  # slimssl config has no other flag that sets keys
    assert "model.nosuch: unknown key [from --set]" in said and "overrides=" not in said
    caplog.clear()
    assert main(["pretrain", "--config", "demo", "--set", "train.epochs=0"]) == 2  # pretrain's flags set keys too
    said = capsys.readouterr().err + caplog.text
    assert "invalid --set (or --data, --epochs, --batch-size, --device, --seed) for the config of demo.yaml" in said
    with pytest.raises(ConfigError, match=r"invalid overrides= for .*\n  model.nosuch: unknown key \[from "
                                          r"overrides=\]"):
        load_config("demo", ["train.epochs=true", "model.nosuch=1"])


def test_a_config_changed_by_assignment_is_named_once(tmp_path):
    cfg = load_config("demo")
    cfg.menu.widths = [0.5, 0.25]  # checked as a whole when used: the full network is missing
    with pytest.raises(ConfigError, match=r"^invalid config 'demo':\n"):
        cfg.revalidated()


def test_an_error_of_the_file_and_one_of_a_set_are_said_as_the_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError,
                       match=r"invalid config .*c\.yaml:\n  optim.lr: .*\[from overrides=\]\n  train.epochs: "):
        load_config(path, ["optim.lr=abc"])


def test_an_empty_config_file_is_refused_not_read_as_every_default(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml is empty; expected a mapping of sections \(name, model"):
        load_config(tmp_path / "empty.yaml")


def test_menu_widths_that_round_to_one_network_are_refused():
    with pytest.raises(ConfigError, match=r"menu: widths 1 and 0\.75 give the same channels \[3, 3, 6, 12, 24, 3, 6, 12, 24\]"):
        load_config("demo", ["model.base_width=3", "model.channel_divisor=8", "menu.widths=[1.0, 0.75, 0.5]"])
    distinct = load_config("demo", ["model.base_width=16", "model.channel_divisor=8", "menu.widths=[1.0, 0.75, 0.5]"])
    assert distinct.menu.widths == [1.0, 0.75, 0.5]


def test_sync_bn_with_shared_batchnorm_is_refused_by_the_config_itself():
    with pytest.raises(ConfigError, match="train.sync_bn needs model.bn: private"):
        load_config("demo", ["train.sync_bn=true", "model.bn=shared"])


@pytest.mark.parametrize("recipe", [n for n in packaged_configs() if n.startswith("imagenet")])
def test_the_readme_check_of_an_imagenet_recipe_on_synthetic_images_is_a_valid_run(recipe):
    """README: '--data fake --set data.loader=memory data.fake_size=32 train.batch_size=16', and for MoCo v2
    model.bn_group_size=8: settings a trainer takes (checked as it checks them, without building the network)."""
    sets = ["data.source=fake", "data.loader=memory", "data.fake_size=32", "train.batch_size=16"]
    cfg = load_config(recipe, sets + (["model.bn_group_size=8"] if "mocov2" in recipe else []))
    check_processes(cfg, 1, recipe)


def test_compile_off_is_read_as_written_although_yaml_reads_a_bare_off_as_false(tmp_path):
    assert load_config("demo", ["train.compile=off"]).train.compile == "off"
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  compile: off\n")
    assert load_config(str(path)).train.compile == "off"
    with pytest.raises(ConfigError, match="train.compile"):  # true says no mode: still an error
        load_config("demo", ["train.compile=true"])


def test_a_misspelt_key_inside_a_section_is_suggested_with_its_section():
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key \[from overrides=\] \(did you mean "
                                          r"train\.epochs\?\)"):
        load_config("demo", ["train.epoch=5"])


def _alias_bomb(levels: int = 9) -> str:
    """A YAML of a few hundred bytes whose lists name each other: 10**levels values once its aliases are followed."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines)


@pytest.mark.parametrize("where", ["train.epochs", "menu.widths"])  # an int refused at once; a list walked
def test_a_config_whose_aliases_hold_billions_of_values_is_refused_at_once(tmp_path, where):
    section, key = where.split(".")
    path = tmp_path / "bomb.yaml"
    path.write_text(f"method:\n  options:\n{_indent(_alias_bomb())}\n{section}:\n  {key}: *a8\n")
    assert path.stat().st_size < 700
    with pytest.raises(ConfigError, match="holds more than 100000 values or nests deeper than 32 levels"):
        load_config(path)
    shared: list = ["x"] * 10  # the same from a pickle (a checkpoint's config): lists that share one another
    for _ in range(8):
        shared = [shared] * 10
    with pytest.raises(ConfigError, match="stored config.* holds more than"):
        config_from_dict({section: {key: shared}}, "ck.pt (stored config)", stored=True)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def test_a_long_bad_value_is_quoted_short():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"epochs": list(range(1000))}})
    assert "got [0, 1, 2, 3, 4, 5, ...]" in str(info.value) and len(str(info.value)) < 300


def test_a_notebook_shows_a_config_as_its_yaml():
    """IPython displays an object by its _repr_pretty_: a Config's repr is one line of 1,500 characters."""
    cfg = load_config("demo")
    shown = []

    class Printer:  # what IPython's pretty printer gives _repr_pretty_
        text = shown.append

    cfg._repr_pretty_(Printer(), False)
    (text,) = shown
    assert text.startswith("Config 'demo':\nname: demo\nmodel:\n") and yaml.safe_load(text.split("\n", 1)[1]) == \
        cfg.model_dump(mode="json")
