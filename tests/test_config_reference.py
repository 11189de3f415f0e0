"""What every config key means: `slimssl config --explain` and docs/config.md, both from the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slimssl.cli import main
from slimssl.config import config_from_dict, load_config, packaged_configs
from slimssl.config.reference import explained_yaml, keys, markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_every_setting_says_what_it_does():
    """A key added to the schema without a description fails here, before users meet it undocumented."""
    undescribed = [key.name for key in keys() if not key.description.strip()]
    assert undescribed == []
    names = {key.name for key in keys()}
    assert {"model.channel_divisor", "slim.random_space", "optim.lars_clip", "eval.knn_k", "name"} <= names
    assert not any(name.startswith("data.views.") for name in names)  # an entry's keys have their own table


@pytest.mark.parametrize("name", [n.removesuffix(".yaml") for n in packaged_configs()])
def test_an_explained_recipe_loads_back_as_the_same_config(name):
    cfg = load_config(name, ["data.views=[{hue: 0.2}, {solarize_p: 0.1}]"])
    text = explained_yaml(cfg)
    assert yaml.safe_load(text) == cfg.model_dump(mode="json")
    assert config_from_dict(yaml.safe_load(text), "explained") == cfg


def test_each_key_follows_its_description():
    text = explained_yaml(load_config("demo", ["train.epochs=3"]))
    lines = text.splitlines()
    at = lines.index("  epochs: 3")
    assert lines[at - 1] == "  # passes over the training split [integer > 0]"
    at = lines.index("  bn_group_size: null")
    assert "[integer > 1 or null]" in lines[at - 1]
    at = lines.index("  arch: resnet18")
    assert lines[at - 1].startswith("  # ") and "resnet18 | resnet34" in " ".join(lines[at - 2:at])
    assert all(len(line) <= 110 for line in lines if line.lstrip().startswith("#"))
    commented, section = set(), ""
    for before, line in zip(lines, lines[1:]):  # every key's line comes right after its comment
        if line.lstrip().startswith(("#", "-")) or line.startswith("   "):
            continue  # comments, list items, nested values
        name = line.split(":")[0].strip()
        if not line.startswith(" ") and line.endswith(":"):
            section = name
            continue
        key = f"{section}.{name}" if line.startswith("  ") else name
        commented.add(key if before.lstrip().startswith("#") else f"{key} (no comment)")
    assert commented == {key.name for key in keys()}


def test_what_a_key_accepts_is_read_from_the_schema():
    accepts = {key.name: key.accepts for key in keys()}
    assert accepts["model.arch"] == "resnet18 | resnet34 | resnet50 | resnet101"
    assert accepts["data.flip_p"] == "number, 0 <= x <= 1"
    assert accepts["slim.slow_start"] == "number, 0 <= x < 1"
    assert accepts["data.std"] == "3 numbers > 0"
    assert accepts["menu.depths"] == "list of lists of integers >= 1 or null"
    assert accepts["data.views"] == "list of view changes, at most 2"
    assert accepts["train.knn"] == "true | false"
    defaults = {key.name: key.default for key in keys()}
    assert defaults["data.mean"] == [0.485, 0.456, 0.406] and defaults["method.options"] == {}


def test_the_reference_page_is_current():
    assert DOCS.read_text(encoding="utf-8") == markdown(), \
        "docs/config.md is out of date: python -m slimssl.config.reference > docs/config.md"


def test_cli_config_explain(capsys):
    assert main(["config", "--config", "demo", "--explain", "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "  # passes over the training split [integer > 0]\n  epochs: 3\n" in out
