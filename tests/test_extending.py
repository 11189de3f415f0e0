"""A method of one's own (docs/extending.md): registered from Python or through an entry point, it trains,
resumes and evaluates like the built-in methods, and a bad declaration is an error that says what is wrong."""

from __future__ import annotations

import json
import logging
import sys
from importlib.metadata import EntryPoint

import pytest
import torch

import slimssl
from slimssl import methods
from slimssl.checkpoint import load_checkpoint
from slimssl.config import ConfigError, config_from_dict
from slimssl.errors import ExtensionError, SlimsslError
from slimssl.methods import METHODS, Layer, Method, MethodOutput, register_method
from slimssl.methods.losses import regression_loss
from slimssl.models.heads import SlimMLP
from slimssl.nn.spec import Menu, SubnetSpec
from slimssl.train.loop import Trainer
from test_pretrain import tiny


@pytest.fixture(autouse=True)
def registry():
    """Every test starts and ends with the built-in methods only."""
    saved = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(saved)


class ThreeLayer(Method):
    """A regression method with a three-layer projector, no predictor, MoCo v2's views and a state buffer."""

    name = "threelayer"
    augment = "mocov2"
    default_options = {"loss_scale": 1.0, "note": None}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    @staticmethod
    def projector_layers(hidden, out):
        return [Layer(hidden, "bn", "relu"), Layer(hidden, "bn", "relu"), Layer(out)]

    @staticmethod
    def predictor_layers(hidden, out):
        return None

    def loss(self, online, target):
        loss = regression_loss(online[0], target[1]) + regression_loss(online[1], target[0])
        return MethodOutput(self.options["loss_scale"] * loss, online)

    def after_step(self, target):
        self.steps_seen += 1


def test_a_registered_method_trains_with_its_heads_resumes_exactly_and_evaluates(tmp_path):
    register_method(ThreeLayer)
    data = tiny("threelayer", widths=[1.0, 0.5], train={"checkpoint_every": 0})
    cfg = config_from_dict(data)
    assert cfg.data.crop_scale == (0.2, 1.0)  # the view recipe's range comes from the method's augment

    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit(max_steps=4)
    first = Trainer(config_from_dict(data), tmp_path / "resumed")
    first.fit(max_steps=2)
    second = Trainer(config_from_dict(data), tmp_path / "resumed", resume=True)
    second.fit(max_steps=4)
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model = load_checkpoint(tmp_path / "resumed")["model"]
    assert int(model["method.steps_seen"]) == 4  # the method's own state is saved and restored
    projector = sorted(k for k in model if k.startswith("projector.") and k.endswith(".weight") and model[k].dim() == 2)
    assert len(projector) == 3 and not any(k.startswith("predictor.") for k in model)

    rows = slimssl.knn(tmp_path / "resumed", save=False)
    assert [r["subnet"] for r in rows] == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1"]
    assert all(0 <= r["knn_top1"] <= 100 for r in rows)


def test_an_unknown_method_lists_the_known_ones_and_how_to_register():
    # (an installed package's methods, registered by entry point, may follow the built-in ones)
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'simsam'; known: byol, mocov2, mocov3"
                                          r"(, \w+)*\. A method of your own must be registered first"):
        config_from_dict({"method": {"name": "simsam"}})


def _named(name, **members):
    return type("Custom", (Method,), {"name": name, "loss": ThreeLayer.loss, **members})


def test_a_methods_own_options_take_defaults_overrides_and_are_checked(tmp_path):
    register_method(ThreeLayer)
    data = tiny("threelayer", widths=[1.0, 0.5])

    def first_loss(options):
        trainer = Trainer(config_from_dict({**data, "method": {**data["method"], "options": options}}),
                          tmp_path / str(len(list(tmp_path.iterdir()))))
        assert trainer.model.method.options == {**ThreeLayer.default_options, **options}
        return trainer.train_step(0).losses["w1p0_d1-1-1-1"].item()

    assert first_loss({"loss_scale": 2}) == pytest.approx(2 * first_loss({}))  # an int for a float option
    cfg = config_from_dict(data, overrides=["method.options.note=any value", "method.options.loss_scale=0.5"])
    assert cfg.method.options == {"note": "any value", "loss_scale": 0.5}  # --set reaches them too
    as_int = config_from_dict(data, overrides=["method.options.loss_scale=2"]).method.options["loss_scale"]
    assert as_int == 2.0 and type(as_int) is float  # the method reads the type of its default
    with pytest.raises(ConfigError, match=r"method.options.scale: unknown option of method 'threelayer' "
                                          r"\(its options: loss_scale, note\) \[from overrides=\]"):
        config_from_dict(data, overrides=["method.options.scale=2"])
    with pytest.raises(ConfigError, match=r"method.options.loss_scale: expected float like its default 1.0, "
                                          r"got 'big'"):
        config_from_dict(data, overrides=["method.options.loss_scale=big"])
    with pytest.raises(ConfigError, match=r"unknown option of method 'byol' \(its options: none\)"):
        config_from_dict(tiny("byol"), overrides=["method.options.loss_scale=2"])


@pytest.mark.parametrize("cls, message", [
    (int, "takes a subclass of slimssl.methods.Method, got <class 'int'>"),
    (_named(""), "name must be a name such as 'simsiam'"),
    (_named("sim-siam"), "name must be a name such as 'simsiam'.*got 'sim-siam'"),
    (type("NoLoss", (Method,), {"name": "noloss"}), "NoLoss must implement loss"),
    (_named("custom", default_options=["scale"]), "default_options must be a dict of option names"),
    (_named("custom", augment="simclr"), "augment must be one of the view recipes byol, mocov2, mocov3, got 'simclr'"),
    (_named("byol"), "method name 'byol' is taken by slimssl.methods.byol.BYOL"),
    (_named("custom", projector_layers=staticmethod(lambda hidden, out: [Layer(hidden, "ln"), Layer(out)])),
     r"unknown norm 'ln' in .*Custom.projector_layers; expected None, 'bn' or 'bn_noaffine'"),
    (_named("custom", predictor_layers=staticmethod(lambda hidden, out: [(hidden, "bn", "gelu"), (out,)])),
     r"unknown activation 'gelu' in .*Custom.predictor_layers; expected None or 'relu'"),
    (_named("custom", projector_layers=staticmethod(lambda hidden, out: [])), "projector_layers declares no layers"),
])
def test_register_method_refuses_a_bad_declaration(cls, message):
    with pytest.raises(ExtensionError, match=message):
        register_method(cls)
    assert list(METHODS) == ["byol", "mocov2", "mocov3"]


def test_a_head_declaration_that_refuses_the_checks_sizes_is_checked_when_built():
    def wide_only(hidden, out):
        assert hidden >= 128, "hidden too small"
        return [Layer(hidden, "bn", "relu"), Layer(out)]

    cls = _named("wideonly", projector_layers=staticmethod(wide_only))
    assert register_method(cls) is cls


def test_a_head_declared_by_a_plain_method_is_checked_when_built_and_the_error_names_it(tmp_path):
    def heads(self, hidden, out):  # not static: register_method cannot call it without an instance
        return [Layer(hidden, "layernorm", "relu"), Layer(out)]

    register_method(_named("plainheads", predictor_layers=heads))
    with pytest.raises(ExtensionError, match=r"unknown norm 'layernorm' in .*Custom.predictor_layers; expected None"):
        Trainer(config_from_dict(tiny("plainheads", widths=[1.0, 0.5])), tmp_path / "run")


def test_registering_a_class_defined_again_replaces_it():
    def define():
        class Again(ThreeLayer):
            name = "again"
        return Again

    first, second = define(), define()
    assert register_method(first) is first and register_method(second) is second
    assert METHODS["again"] is second


def test_an_unknown_norm_in_a_head_declaration_is_an_error():
    with pytest.raises(ExtensionError, match="unknown norm 'ln' in head declaration"):
        SlimMLP(8, [Layer(8, "ln")], Menu([SubnetSpec(1.0, (1, 1, 1, 1))]))


def _entry_points(monkeypatch, *points):
    loaded = []

    class Point(EntryPoint):
        def load(self):
            loaded.append(self.name)
            return super().load()

    def entry_points(group, name=None):
        return [Point(n, value, group) for n, value in points if name in (None, n)]

    monkeypatch.setattr(methods, "entry_points", entry_points)
    return loaded


def test_an_entry_point_method_is_imported_only_when_a_config_names_it(monkeypatch):
    loaded = _entry_points(monkeypatch, ("threelayer", f"{__name__}:ThreeLayer"),
                           ("broken", "slimssl_no_such_plugin:Method"))
    config_from_dict(tiny("byol"))
    assert loaded == []  # a built-in method never imports plugins
    assert config_from_dict(tiny("threelayer")).method.name == "threelayer"
    assert loaded == ["threelayer"] and METHODS["threelayer"] is ThreeLayer  # the broken plugin is not touched
    config_from_dict(tiny("threelayer"))
    assert loaded == ["threelayer"]  # loaded once
    with pytest.raises(ConfigError, match="unknown method 'simsam'; known: byol, mocov2, mocov3, threelayer, broken"):
        config_from_dict(tiny("simsam"))  # installed plugins are named, not imported
    assert loaded == ["threelayer"]


def test_a_method_registered_by_a_script_wins_over_an_installed_one_of_its_name(monkeypatch):
    loaded = _entry_points(monkeypatch, ("threelayer", "slimssl_no_such_plugin:ThreeLayer"))

    class Mine(ThreeLayer):
        pass

    register_method(Mine)
    assert config_from_dict(tiny("threelayer")).method.name == "threelayer" and METHODS["threelayer"] is Mine
    assert loaded == []


@pytest.mark.parametrize("point, message", [
    (("threelayer", f"{__name__}:_named"), "entry point threelayer = .*:_named .* loads .*_named.*, whose name "
                                           "is None; the entry point's name must be the method's name"),
    (("threelayer", "slimssl_no_such_plugin:Method"), "entry point threelayer = slimssl_no_such_plugin:Method "
                                                      r"\(slimssl.methods\) failed to load: ModuleNotFoundError"),
])
def test_a_bad_entry_point_is_an_error_naming_it(monkeypatch, point, message):
    _entry_points(monkeypatch, point)
    for _ in range(2):  # reported on every use, not once and then forgotten
        with pytest.raises(ConfigError, match=message):
            config_from_dict(tiny("threelayer"))
    assert "threelayer" not in METHODS


class NoDistill(ThreeLayer):
    """A method whose loss gives nothing to distil on (a Barlow-Twins-like loss would have nothing to offer)."""

    name = "nodistill"

    def loss(self, online, target):
        return MethodOutput(regression_loss(online[0], target[1]) + regression_loss(online[1], target[0]))


def test_a_method_without_distill_outputs_trains_with_the_target_teacher_and_is_named_with_the_online_one(
        tmp_path, caplog):
    register_method(NoDistill)
    trainer = Trainer(config_from_dict(tiny("nodistill", widths=[1.0, 0.5])), tmp_path / "target")
    assert set(trainer.train_step(0).losses) == {"w1p0_d1-1-1-1", "w0p5_d1-1-1-1"}
    assert "does not override distill" not in caplog.text
    online = Trainer(config_from_dict(tiny("nodistill", teacher="online", widths=[1.0, 0.5])), tmp_path / "online")
    assert "slim.teacher is online and method 'nodistill' does not override distill" in caplog.text
    with pytest.raises(ExtensionError, match="method 'nodistill' returned no distill_on from its loss, and "
                                           "slim.teacher: online distils"):
        online.train_step(0)


def test_a_run_of_a_method_not_registered_here_is_evaluated_and_exported_but_not_resumed(tmp_path, caplog):
    """A collaborator without the method's code: the backbone is all that evaluation and export need."""
    register_method(ThreeLayer)
    data = tiny("threelayer", widths=[1.0, 0.5], train={"checkpoint_every": 0})
    run = slimssl.pretrain(config_from_dict(data), tmp_path / "run", max_steps=2)
    del METHODS["threelayer"]

    with caplog.at_level(logging.INFO, logger="slimssl"):
        supernet, cfg = slimssl.load_supernet(run.run_dir)
    assert cfg.method.name == "threelayer" and "which is not registered here: its backbone loads" in caplog.text
    rows = slimssl.knn(run.run_dir, 0.5, save=False)
    assert rows[0]["subnet"] == "w0p5_d1-1-1-1" and 0 <= rows[0]["knn_top1"] <= 100
    (row,) = slimssl.export_run(run.run_dir, tmp_path / "exported", 0.5, verify=True)
    assert row["max_abs_diff"] == 0.0
    with pytest.raises(SlimsslError, match="trained with method 'threelayer', which is not registered here; resuming "
                                           "trains it, so register it first: slimssl.methods.register_method"):
        slimssl.pretrain(None, run.run_dir, resume=True)


MY_METHOD = '''
from slimssl.methods import Method, MethodOutput, register_method
from slimssl.methods.losses import regression_loss


@register_method
class Mine(Method):
    name = "mine"

    def loss(self, online, target):
        return MethodOutput(regression_loss(online[0], target[1]) + regression_loss(online[1], target[0]), online)
'''


def test_the_command_line_imports_a_method_of_ones_own(tmp_path, monkeypatch, capsys, caplog, request):
    from slimssl.cli import main

    # the registrations and the module its imports leave, gone for the tests that follow in this process
    request.addfinalizer(lambda: (METHODS.pop("mine", None), sys.modules.pop("my_method", None)))
    (tmp_path / "my_method.py").write_text(MY_METHOD)
    assert main(["config", "--set", "method.name=mine"]) == 2
    assert "unknown method 'mine'" in caplog.text
    assert main(["--import", str(tmp_path / "my_method.py"), "config", "--set", "method.name=mine"]) == 0
    assert "name: mine" in capsys.readouterr().out
    del METHODS["mine"]
    monkeypatch.chdir(tmp_path)  # a module name is looked for in the current folder, as `python -m` does
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_method", raising=False)
    assert main(["--import", "my_method", "config", "--set", "method.name=mine"]) == 0
    assert METHODS["mine"].__module__ == "my_method"
    tiny_run = ["--config", "demo", "--set", "method.name=mine", "model.base_width=4", "model.depths=[1,1,1,1]",
                "data.resolution=8", "method.proj_hidden=16", "method.pred_hidden=16", "method.proj_dim=8",
                "--out", "run", "--max-steps", "1", "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["--import", "my_method", "pretrain", *tiny_run]) == 0
    assert "continue with: slimssl --import my_method pretrain --resume run" in caplog.text
    del METHODS["mine"]
    assert main(["pretrain", "--resume", "run"]) == 2
    assert "run was trained with method 'mine', which is not registered here; resuming trains it, so register it " \
           "first: slimssl --import MODULE pretrain --resume run" in caplog.text
    del sys.modules["my_method"]  # as in a new process, where the import registers it again
    assert main(["--import", "my_method", "pretrain", "--resume", "run", "--max-steps", "2"]) == 0

    (tmp_path / "broken.py").write_text("raise RuntimeError('half written')\n")
    (tmp_path / "needs_more.py").write_text("import slimssl_no_such_dependency\n")
    for module, message in [("nope_module", "--import nope_module: No module named 'nope_module' (expected a "
                                            "module importable from here, or a .py file)"),
                            ("missing.py", "--import missing.py: no such file"),
                            ("broken.py", "--import broken.py failed: RuntimeError: half written"),
                            ("needs_more", "--import needs_more failed: No module named 'slimssl_no_such_dependency'"),
                            ("my_method.ipynb", "--import my_method.ipynb: a notebook cannot be imported; save the "
                                                "cells that define your method as a .py file")]:
        assert main(["--import", module, "config"]) == 2
        assert message in caplog.text
    with pytest.raises(SystemExit):  # slimssl's own option after the command: argparse's usage error, with a hint
        main(["config", "--import", "my_method"])
    assert "--import is an option of slimssl itself: it goes before the command" in capsys.readouterr().err


# ---- mistakes a newcomer makes, each refused with the method named ------------------------------------------

def _regression(self, online, target):
    return MethodOutput(regression_loss(online[0], target[1]) + regression_loss(online[1], target[0]), online)


def _simple(name, **members):
    return type("Custom", (Method,), {"name": name, "loss": _regression, **members})


@pytest.mark.parametrize("layers, message", [
    (lambda hidden, out: [Layer(hidden / 4, "bn", "relu"), Layer(out)], r"has out_dim 16.0; expected a whole number"),
    (lambda hidden, out: [Layer(0, "bn", "relu"), Layer(out)], r"has out_dim 0; expected a whole number"),
    (lambda hidden, out: [Layer(True), Layer(out)], r"has out_dim True"),
])
def test_a_head_size_that_is_not_a_whole_number_of_features_is_refused_at_registration(layers, message):
    with pytest.raises(ExtensionError, match=r"Custom.projector_layers: .*" + message):
        register_method(_named("custom", projector_layers=staticmethod(layers)))


def test_head_sizes_may_be_numpy_integers(tmp_path):
    import numpy as np

    register_method(_simple("npsizes", projector_layers=staticmethod(
        lambda hidden, out: [Layer(np.int64(hidden), "bn", "relu"), Layer(np.int32(out))])))
    trainer = Trainer(config_from_dict(tiny("npsizes", widths=[1.0, 0.5])), tmp_path / "run")
    assert trainer.model.projector.out_dim == 16 and type(trainer.model.projector.out_dim) is int


def test_heads_are_checked_against_each_other_when_built(tmp_path):
    """The predictor follows the projector's last layer, whatever its width; it must end where the target's
    outputs are, and a head that cannot be called as (hidden, out) is named."""
    wide = _simple("wideproj", projector_layers=staticmethod(lambda hidden, out: [Layer(hidden, "bn", "relu"),
                                                                                 Layer(hidden)]))
    register_method(wide)
    trainer = Trainer(config_from_dict(tiny("wideproj", widths=[1.0, 0.5])), tmp_path / "wide")
    assert trainer.model.projector.out_dim == 32 and trainer.model.predictor.out_dim == 32  # proj_hidden, not proj_dim
    assert all(torch.isfinite(v) for v in trainer.train_step(0).losses.values())

    register_method(_simple("shortpred", predictor_layers=staticmethod(lambda hidden, out: [Layer(hidden)])))
    with pytest.raises(ExtensionError, match=r"Custom.predictor_layers ends in 32 features, but the loss compares the "
                                           r"predictor's outputs with the target's, the projector's 16"):
        Trainer(config_from_dict(tiny("shortpred", widths=[1.0, 0.5])), tmp_path / "short")

    def not_static(hidden, out):  # a forgotten @staticmethod: called with the method as `hidden`
        return [Layer(hidden), Layer(out)]

    register_method(_simple("nostatic", projector_layers=not_static))
    with pytest.raises(ExtensionError, match=r"Custom.projector_layers cannot be called as \(32, 16\): too many "
                                           r"positional arguments; a head is declared as @staticmethod"):
        Trainer(config_from_dict(tiny("nostatic", widths=[1.0, 0.5])), tmp_path / "nostatic")


@pytest.mark.parametrize("key", ["proj_hidden", "proj_dim"])
def test_a_projector_size_of_zero_is_refused_by_the_config(key):
    with pytest.raises(ConfigError, match=rf"method.{key}: Input should be greater than 0"):
        config_from_dict(tiny("byol"), overrides=[f"method.{key}=0"])


def test_a_predictor_size_of_zero_is_refused_where_there_is_a_predictor(tmp_path):
    with pytest.raises(ConfigError, match=r"method.pred_hidden: Input should be greater than or equal to 0"):
        config_from_dict(tiny("byol"), overrides=["method.pred_hidden=-1"])
    with pytest.raises(ExtensionError, match=r"BYOL.predictor_layers: .* has out_dim 0; expected a whole"):
        Trainer(config_from_dict(tiny("byol"), overrides=["method.pred_hidden=0"]), tmp_path / "byol")
    # MoCo v2 has no predictor: its runs that said 0 trained, and are read as before
    Trainer(config_from_dict(tiny("mocov2"), overrides=["method.pred_hidden=0"]), tmp_path / "mocov2")


def test_options_written_as_yaml_reads_them_are_taken(tmp_path):
    register_method(_simple("opts", default_options={"lam": 0.5, "pair": (1, 2), "note": None}))
    data = tiny("opts", widths=[1.0, 0.5])
    cfg = config_from_dict(data, overrides=["method.options.lam=1e-3", "method.options.pair=[3, 4]"])
    assert cfg.method.options == {"lam": 0.001, "pair": (3, 4)}  # YAML reads 1e-3 as text
    assert type(cfg.method.options["lam"]) is float
    for bad, shown in (("nan", "'nan'"), ("1e999", "'1e999'"), ("true", "True")):
        with pytest.raises(ConfigError, match=rf"method.options.lam: expected float like its default 0.5, got {shown}"):
            config_from_dict(data, overrides=[f"method.options.lam={bad}"])


def _returning(make_loss):
    return _named("badloss", loss=lambda self, online, target: make_loss(online))


@pytest.mark.parametrize("make_loss, message", [
    (lambda online: (online[0] - online[1]).pow(2).mean(), r"loss\(\) returned Tensor; expected MethodOutput"),
    (lambda online: ((online[0] - online[1]).pow(2).mean(), None), r"loss\(\) returned tuple"),
    (lambda online: MethodOutput(1.0), r"loss\(\) returned a loss that is float; expected"),
    (lambda online: MethodOutput((online[0] - online[1]).pow(2).sum(1)),
     r"loss\(\) returned a loss that is a tensor of shape \[8\]; .*e.g. .mean\(\)"),
    (lambda online: MethodOutput((online[0] - online[1]).pow(2).mean().detach()),
     r"loss\(\) returned a loss that does not depend on the online"),
])
def test_a_loss_that_breaks_the_contract_is_an_error_naming_the_method(tmp_path, make_loss, message):
    register_method(_returning(make_loss))
    trainer = Trainer(config_from_dict(tiny("badloss", widths=[1.0, 0.5])), tmp_path / "run")
    with pytest.raises(ExtensionError, match=r"method 'badloss': " + message):
        trainer.train_step(0)


def test_a_loss_of_one_element_in_a_vector_is_one_number(tmp_path):
    register_method(_returning(lambda online: MethodOutput((online[0] - online[1]).pow(2).mean().reshape(1))))
    losses = Trainer(config_from_dict(tiny("badloss", widths=[1.0, 0.5])), tmp_path / "run").train_step(0).losses
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_the_targets_momentum_is_checked_and_recorded(tmp_path):
    register_method(_simple("wildema", momentum=lambda self, progress: 3.0 * progress))
    with pytest.raises(ExtensionError, match=r"method 'wildema': momentum\(1\) returned 3; .* needs m in \[0, 1\]"):
        Trainer(config_from_dict(tiny("wildema", widths=[1.0, 0.5])), tmp_path / "wild")  # before any update
    register_method(_simple("lateema", momentum=lambda self, progress: 2.0 if 0.3 < progress < 0.7 else 0.9))
    trainer = Trainer(config_from_dict(tiny("lateema", widths=[1.0, 0.5])), tmp_path / "late")
    with pytest.raises(ExtensionError, match=r"method 'lateema': momentum\(0.5\) returned 2"):
        trainer.train_step(trainer.total_steps // 2)

    register_method(_simple("halfway", momentum=lambda self, progress: 0.5 + progress / 4))
    run = slimssl.pretrain(tiny("halfway", widths=[1.0, 0.5]), tmp_path / "run", max_steps=3)
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["momentum"] for r in records if "momentum" in r}
    assert logged == {s: pytest.approx(0.5 + (s - 1) / run.total_steps / 4) for s in (1, 2, 3)}


def test_a_method_that_says_its_distill_on_are_logits_distils_without_a_warning(tmp_path, caplog):
    register_method(_simple("logits", distill_on_logits=True))
    Trainer(config_from_dict(tiny("logits", teacher="online", widths=[1.0, 0.5])), tmp_path / "run")
    assert "does not override distill" not in caplog.text


def test_a_method_file_named_like_another_module_is_refused(tmp_path, monkeypatch, caplog):
    from slimssl.cli import main

    monkeypatch.chdir(tmp_path)
    for name in ("copy", "queue"):  # imported already, and not yet but findable
        (tmp_path / f"{name}.py").write_text(MY_METHOD)
        assert main(["--import", f"{name}.py", "config"]) == 2
        assert f"--import {name}.py: it would be imported as {name!r}, which is already the name of the module " \
               f"{name!r}" in caplog.text and "rename the file" in caplog.text
    assert "mine" not in METHODS


def test_a_method_that_reads_no_target_output_has_no_target(tmp_path):
    """views_used ((0, 1), ()): no copy kept, updated or saved, and its momentum never asked for; it trains and
    resumes exactly, from a checkpoint saved with a target too (before targetless methods had none)."""
    def no_momentum(self, progress):
        raise AssertionError("momentum() of a method without a target")

    register_method(_simple("notarget", views_used=lambda self: ((0, 1), ()), momentum=no_momentum,
                            loss=lambda self, online, target: MethodOutput((online[0] - online[1]).pow(2).mean())))
    data = tiny("notarget", widths=[1.0, 0.5])
    straight = Trainer(config_from_dict(data), tmp_path / "straight")
    assert straight.model.target is None
    straight.fit(max_steps=4)
    saved = load_checkpoint(tmp_path / "straight")
    assert not any(k.startswith("target.") for k in saved["model"])
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records) and not any("momentum" in r for r in records)

    # saved as before 2026-12-06, with a target: built while the method said it read one
    cls = METHODS["notarget"]
    cls.views_used, cls.momentum = (lambda self: ((0, 1), (0, 1))), (lambda self, progress: 0.99)
    first = Trainer(config_from_dict(data), tmp_path / "resumed")
    assert first.model.target is not None
    first.fit(max_steps=2)
    cls.views_used, cls.momentum = (lambda self: ((0, 1), ())), no_momentum
    assert any(k.startswith("target.projector.") for k in load_checkpoint(tmp_path / "resumed")["model"])
    second = Trainer(config_from_dict(data), tmp_path / "resumed", resume=True)
    second.fit(max_steps=4)
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_method_class_imported_but_not_registered_is_named():
    class Forgotten(ThreeLayer):
        name = "forgotten"

    with pytest.raises(ConfigError, match=r"method 'forgotten' is declared by test_extending\..*Forgotten, which is "
                                          r"not registered: decorate the class with @slimssl.methods.register_method"):
        config_from_dict(tiny("forgotten"))
    assert Forgotten  # kept alive until here: an unreferenced class may be collected and forgotten


def test_distillation_settings_the_run_never_reads_are_warned_of(tmp_path, caplog):
    """slim.distill_* weigh the online distillation only: with the target as teacher they change nothing, and
    BYOL's distillation (a regression) takes no temperature."""
    def warnings(method, teacher, *changes):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="slimssl"):
            Trainer(config_from_dict(tiny(method, teacher=teacher, widths=[1.0, 0.5]), overrides=list(changes)),
                    tmp_path / f"{method}-{teacher}-{len(changes)}").close()
        return [r.getMessage() for r in caplog.records if "slim.distill" in r.getMessage()]

    assert warnings("mocov2", "target", "slim.distill_alpha=1", "slim.distill_scale=25") == [
        "slim.distill_alpha is 1.0, but slim.teacher is target (no distillation term; online distils): the setting "
        "changes nothing",
        "slim.distill_scale is 25.0, but slim.teacher is target (no distillation term; online distils): the setting "
        "changes nothing"]
    assert warnings("byol", "online", "slim.distill_temperature=5", "slim.distill_alpha=1") == [
        "slim.distill_temperature is 5.0, but method 'byol' distils without a temperature: the setting changes "
        "nothing"]
    assert warnings("mocov2", "online", "slim.distill_temperature=5", "slim.distill_alpha=1") == []
    assert warnings("mocov2", "target") == []  # the defaults are no setting

    class SoftBYOL(methods.BYOL):  # its own distill reads the temperature: not held to BYOL's declaration
        name = "softbyol"

        def distill(self, student, teacher, temperature):
            return sum(((s - t.detach()) / temperature).pow(2).mean() for s, t in zip(student, teacher))

    register_method(SoftBYOL)  # (the module's fixture forgets it after the test)
    assert warnings("softbyol", "online", "slim.distill_temperature=5") == []


def test_a_method_setting_the_method_never_reads_is_warned_of(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        Trainer(config_from_dict(tiny("byol", widths=[1.0, 0.5]), overrides=["method.temperature=0.5"]),
                tmp_path / "byol")
    assert "method.temperature is 0.5, but method 'byol' does not read it: the setting changes nothing" in caplog.text
    assert "method.queue_size is 64, but method 'byol'" in caplog.text  # tiny() sets it for MoCo v2
    assert "proj_dim" not in caplog.text and "momentum" not in caplog.text  # read by BYOL
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        Trainer(config_from_dict(tiny("mocov2", widths=[1.0, 0.5]), overrides=["method.temperature=0.5"]),
                tmp_path / "mocov2")
        register_method(ThreeLayer)  # a method of one's own reads what it likes, unless it says
        Trainer(config_from_dict(tiny("threelayer", widths=[1.0, 0.5]), overrides=["method.temperature=0.5"]),
                tmp_path / "own")
    assert "method.pred_hidden is 32, but method 'mocov2'" in caplog.text  # it has no predictor
    assert "temperature" not in caplog.text and "threelayer" not in caplog.text
    caplog.clear()

    class WithPredictor(methods.MoCoV2):  # a subclass may read more than its parent: not told off
        name = "mocov2pred"
        predictor_layers = staticmethod(Method.predictor_layers)

    register_method(WithPredictor)
    from slimssl.config import standalone_config

    with caplog.at_level(logging.WARNING, logger="slimssl"):
        Trainer(config_from_dict(tiny("mocov2pred", widths=[1.0, 0.5])), tmp_path / "sub")
        mocov2 = config_from_dict(tiny("mocov2", widths=[1.0, 0.5]), overrides=["method.pred_hidden=4096"])
        alone = standalone_config(mocov2, mocov2.subnet_menu()[-1])  # the one-by-one baseline of a width
        Trainer(alone, tmp_path / "alone")
    assert "does not read it" not in caplog.text and alone.method.pred_hidden == 4096

    class ReadsAny(methods.BYOL):  # None, the documented default, said again: any setting may be read
        name = "byolany"
        settings_read = None

    register_method(ReadsAny)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        Trainer(config_from_dict(tiny("byolany", widths=[1.0, 0.5]), overrides=["method.temperature=0.5"]),
                tmp_path / "any")
    assert "does not read it" not in caplog.text


def test_a_non_finite_loss_of_a_method_of_ones_own_points_at_its_loss_too(tmp_path):
    register_method(_simple("ownloss"))
    own = Trainer(config_from_dict(tiny("ownloss", widths=[1.0, 0.5])), tmp_path / "own")
    assert "Lower optim.lr (or check method 'ownloss''s loss: a log of 0, say)" in str(own._nonfinite_error("NaN"))
    byol = Trainer(config_from_dict(tiny("byol", widths=[1.0, 0.5])), tmp_path / "byol")
    assert "Lower optim.lr, or set train.nonfinite=skip" in str(byol._nonfinite_error("NaN"))
