"""Exported sub-networks equal the supernet's sub-networks; safetensors/ONNX files; torchvision parity."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torchvision
from torch import nn

from slimssl import ExportError, export_subnet, load_exported, verify_export
from slimssl.models.plain import PlainResNet
from slimssl.models.arch import ARCHS
from slimssl.models.resnet import SlimResNet
from slimssl.nn.spec import SubnetSpec


def cross(widths, depth_list):
    return [SubnetSpec(w, d) for w in widths for d in depth_list]


SUPERNETS = {
    "basic-cifar-private": dict(block="basic", depths=(1, 1, 1, 1), base_width=4, stem="cifar",
                                menu=cross((1.0, 0.5, 0.25), [(1, 1, 1, 1)])),
    "bottleneck-imagenet-private-depths": dict(
        block="bottleneck", depths=(2, 2, 2, 2), base_width=4, stem="imagenet",
        menu=cross((1.0, 0.75, 0.5), [(2, 2, 2, 2), (1, 1, 1, 1), (1, 2, 1, 2)])),
    "basic-imagenet-shared-depths": dict(block="basic", depths=(2, 2, 1, 2), base_width=6, stem="imagenet",
                                         bn="shared", menu=cross((1.0, 0.5), [(2, 2, 1, 2), (1, 1, 1, 1)])),
    "bottleneck-cifar-private-divisor8": dict(block="bottleneck", depths=(1, 2, 1, 1), base_width=8,
                                              stem="cifar", channel_divisor=8,
                                              menu=cross((1.0, 0.75, 0.6, 0.3), [(1, 2, 1, 1), (1, 1, 1, 1)])),
    "basic-cifar-private-zeroinit": dict(block="basic", depths=(2, 1, 1, 1), base_width=8, stem="cifar",
                                         zero_init_residual=True, menu=cross((1.0, 0.333), [(2, 1, 1, 1), (1, 1, 1, 1)])),
}


def build(name: str, perturb=None) -> SlimResNet:
    torch.manual_seed(0)
    model = SlimResNet(**SUPERNETS[name])
    if perturb is not None:
        perturb(model)
    return model.eval()


def images(n=2, size=24, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(SUPERNETS))
def test_every_menu_entry_exports_exactly(name, perturb_bn):
    model = build(name, perturb_bn)
    x = images(size=32 if SUPERNETS[name]["stem"] == "imagenet" else 16)
    outputs = {}
    for spec in model.menu:
        plain = model.export(spec)
        assert isinstance(plain, PlainResNet)
        assert not plain.training  # follows the supernet's mode
        assert plain.config.depths == spec.depths
        assert [len(s) for s in plain.stages()] == list(spec.depths)
        ref = model(x, subnet=spec)
        out = plain(x)
        assert out.shape == (2, model.feature_dim(spec))
        assert max_diff(out, ref) <= 1e-5, spec.name
        outputs[spec.name] = ref
    # sub-networks are genuinely different from each other (so the check above is not vacuous)
    full = outputs[model.menu.largest.name]
    for spec in model.menu[1:]:
        other = outputs[spec.name]
        if other.shape == full.shape:
            assert max_diff(other, full) > 1e-4
        else:
            assert other.shape[1] < full.shape[1]


def test_shared_bn_exports_widths_outside_the_menu(perturb_bn):
    model = build("basic-imagenet-shared-depths", perturb_bn)
    x = images(size=32)
    for spec in (SubnetSpec(0.6, (2, 2, 1, 2)), SubnetSpec(0.37, (1, 2, 1, 1))):
        assert max_diff(model.export(spec)(x), model(x, subnet=spec)) <= 1e-5


def test_export_in_train_mode_gives_train_mode_model_and_copies(perturb_bn):
    model = build("basic-cifar-private", perturb_bn).train()
    plain = model.export("0.5")
    assert plain.training
    x = images(size=16)
    model.eval()
    plain.eval()
    ref = model(x, subnet="0.5")
    with torch.no_grad():  # the export owns its tensors: changing it leaves the supernet alone
        for p in plain.parameters():
            p.add_(1.0)
        for b in plain.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    torch.testing.assert_close(model(x, subnet="0.5"), ref, rtol=0, atol=0)


def test_exported_parameter_count_matches_plain_resnet():
    model = build("bottleneck-cifar-private-divisor8")
    counts = [sum(p.numel() for p in model.export(s).parameters()) for s in model.menu]
    assert counts[0] < sum(p.numel() for p in model.parameters())
    widths_d = [(s.width, sum(s.depths)) for s in model.menu]
    for (w1, d1), (w2, d2), c1, c2 in zip(widths_d, widths_d[1:], counts, counts[1:]):
        if w1 >= w2 and d1 >= d2:
            assert c1 >= c2
    for spec in model.menu:  # channel_divisor 8: every exported channel count is a multiple of 8
        cfg = model.plain_config(spec)
        for c in (cfg.stem_channels, *cfg.mid_channels, *cfg.out_channels):
            assert c % 8 == 0, (spec.name, cfg)


@pytest.mark.parametrize("name", ["basic-cifar-private", "bottleneck-imagenet-private-depths",
                                  "basic-imagenet-shared-depths"])
def test_safetensors_round_trip(name, perturb_bn, tmp_path):
    model = build(name, perturb_bn)
    size = 32 if SUPERNETS[name]["stem"] == "imagenet" else 16
    x = images(size=size)
    for spec in model.menu:
        folder = export_subnet(model, spec, tmp_path, metadata={"resolution": size})
        assert folder == tmp_path / spec.name
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        info = json.loads((folder / "config.json").read_text())
        assert info["subnet"] == spec.name and info["resolution"] == size
        loaded = load_exported(folder)
        assert isinstance(loaded, PlainResNet) and not loaded.training
        assert max_diff(loaded(x), model(x, subnet=spec)) <= 1e-5
        assert verify_export(model, spec, loaded, size) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(model.menu.names)


def test_export_subnet_accepts_friendly_names(tmp_path):
    model = build("basic-cifar-private")
    assert export_subnet(model, "0.5", tmp_path).name == "w0p5_d1-1-1-1"
    assert export_subnet(model, None, tmp_path).name == "w1p0_d1-1-1-1"


def test_export_differences_are_relative_to_large_outputs():
    from slimssl.export.files import export_differences

    model = build("basic-cifar-private")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # BatchNorm weights: features in the thousands, as a trained network's can be
                p.mul_(20)

    class Rounded(nn.Module):  # the export computing the same up to float32 rounding of large numbers
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * (1 + 1e-7)

    exported = Rounded(model.export("w0p5_d1-1-1-1").eval())
    absolute, relative = export_differences(model, "w0p5_d1-1-1-1", exported, 16)
    assert absolute > 1e-5  # an absolute tolerance of 1e-5 would refuse this export
    assert relative < 1e-6 and absolute / relative > 100  # divided by the largest output, in the hundreds


def test_export_differences_of_outputs_below_1_are_not_magnified():
    """Below 1 the relative difference is the absolute one: small features of an untrained export still pass."""
    from slimssl.export.files import export_differences

    model = build("basic-cifar-private")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # BatchNorm weights: features far below 1
                p.mul_(0.01)

    class Shifted(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1e-3

    absolute, relative = export_differences(model, "w0p5_d1-1-1-1", Shifted(model.export("w0p5_d1-1-1-1")), 16)
    assert model(images(size=16), subnet="w0p5_d1-1-1-1").abs().max() < 1
    assert absolute > 0 and relative == absolute


def test_verify_export_detects_a_wrong_model(perturb_bn, tmp_path):
    model = build("basic-cifar-private", perturb_bn)
    wrong = model.export("w0p5_d1-1-1-1")
    with torch.no_grad():
        wrong.bn1.bias.add_(0.5)
    assert verify_export(model, "w0p5_d1-1-1-1", wrong, 16) > 1e-3


# ---- torchvision parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_full_export_loads_into_torchvision(arch, perturb_bn):
    block, depths = ARCHS[arch]
    torch.manual_seed(0)
    model = perturb_bn(SlimResNet(block, depths, base_width=64, stem="imagenet")).eval()
    plain = model.export()
    tv = getattr(torchvision.models, arch)(weights=None)
    tv.fc = nn.Identity()
    tv.load_state_dict(plain.state_dict(), strict=True)
    tv.eval()
    x = images(1, 32)
    with torch.no_grad():
        ref = model(x)
        out = tv(x)
    assert out.shape == (1, 512 * (4 if block == "bottleneck" else 1))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_cifar_stem_export_loads_into_torchvision_with_the_cifar_stem(perturb_bn):
    """README: a CIFAR-stem export loads into torchvision's resnet18 once conv1 is 3x3 stride 1 and the
    max-pool is removed."""
    torch.manual_seed(0)
    model = perturb_bn(SlimResNet("basic", (2, 2, 2, 2), base_width=64, stem="cifar")).eval()
    tv = torchvision.models.resnet18(weights=None)
    tv.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    tv.maxpool, tv.fc = nn.Identity(), nn.Identity()
    tv.load_state_dict(model.export().state_dict(), strict=True)
    x = images(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), model(x), rtol=1e-4, atol=1e-5)


# ---- broken export folders ----------------------------------------------------------------------------

@pytest.fixture
def exported(tmp_path):
    return export_subnet(build("basic-cifar-private"), "0.5", tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all" * 10, b"\x00" * 8 + b"{}"])
def test_corrupted_weights_raise_export_error(exported, content):
    (exported / "model.safetensors").write_bytes(content)
    with pytest.raises(ExportError, match="model.safetensors"):
        load_exported(exported)


def test_truncated_weights_raise_export_error(exported):
    path = exported / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExportError, match="model.safetensors"):
        load_exported(exported)


def test_missing_config_raises_export_error(exported):
    (exported / "config.json").unlink()
    with pytest.raises(ExportError, match="config.json"):
        load_exported(exported)


def test_missing_weights_raise_export_error(exported):
    (exported / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="model.safetensors"):
        load_exported(exported)


def test_bad_config_raises_export_error(exported):
    (exported / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="config.json"):
        load_exported(exported)
    (exported / "config.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ExportError, match="config.json.*its format is 'x', expected 'slimssl-plain-resnet'"):
        load_exported(exported)


@pytest.mark.parametrize("change, message", [
    ({"stem": "foo"}, "stem must be 'imagenet' or 'cifar', got 'foo'"),
    ({"block": "wide"}, "block must be 'basic' or 'bottleneck'"),
    ({"stem_channels": 8.0}, "stem_channels must be whole numbers >= 1, got 8.0"),
    ({"depths": [1, True, 1, 1]}, "depths must be whole numbers >= 1"),
    ({"depths": [1, 1, 1]}, "one entry per stage, got 4, 4 and 3"),
    ({"num_classes": -1}, "num_classes must be a whole number >= 0"),
])
def test_an_edited_architecture_is_refused_with_what_is_wrong(exported, change, message):
    info = json.loads((exported / "config.json").read_text())
    info["architecture"].update(change)
    (exported / "config.json").write_text(json.dumps(info))
    with pytest.raises(ExportError, match=f"config.json is not an exported slimssl config.*{re.escape(message)}"):
        load_exported(exported)


def test_weights_not_matching_config_raise_export_error(exported, tmp_path):
    other = export_subnet(build("basic-cifar-private"), "0.25", tmp_path / "other")
    (exported / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="model.safetensors"):
        load_exported(exported)


@pytest.mark.parametrize("failing", ["config.json", "model.safetensors"])
def test_a_failed_replacement_keeps_the_earlier_export_whole(exported, monkeypatch, failing):
    """The config is put in place first: when the weights cannot follow it, the earlier config is put back."""
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    import slimssl.atomic

    real_replace = slimssl.atomic.os.replace

    def disk_full(src, dst):  # the new file cannot be put in place
        if str(dst).endswith(failing):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(slimssl.atomic.os, "replace", disk_full)
    with pytest.raises(ExportError, match="No space left"):
        export_subnet(build("basic-cifar-private", perturb=lambda m: m.conv1.weight.data.add_(1)), "0.5",
                      exported.parent)
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before  # no temporary file left either
    assert load_exported(exported) is not None


def test_an_export_stopped_while_it_writes_leaves_no_empty_folder(tmp_path, monkeypatch):
    """Ctrl-C while a new export's files are written: the folder it made is gone again, not an empty export."""
    import slimssl.atomic

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(slimssl.atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_subnet(build("basic-cifar-private"), "0.5", tmp_path / "exports")
    assert list((tmp_path / "exports").iterdir()) == []  # its parent, made by the caller's path, may stay


def test_export_files_get_the_permissions_open_gives(tmp_path):
    """Those of the process's umask (read once, when slimssl.atomic is imported), not a temporary file's 0600."""
    import slimssl.atomic

    folder = export_subnet(build("basic-cifar-private"), "0.5", tmp_path)
    expected = 0o666 & ~slimssl.atomic._UMASK
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {"config.json": expected,
                                                                            "model.safetensors": expected}


def test_a_file_in_the_way_of_an_export_is_named(tmp_path):
    (tmp_path / "w0p5_d1-1-1-1").write_text("mine")
    with pytest.raises(ExportError, match="w0p5_d1-1-1-1 is a file"):
        export_subnet(build("basic-cifar-private"), "0.5", tmp_path, overwrite=True)
    assert (tmp_path / "w0p5_d1-1-1-1").read_text() == "mine"


def test_weights_that_are_not_the_ones_their_config_was_written_with_are_refused(tmp_path, caplog):
    """config.json and model.safetensors are replaced one after the other: a kill in between (or a file copied by
    hand) left new weights described by the old config, which loaded without a word. The config records the
    sha256 of its weights; the same weights still export to the same files."""
    import logging

    first = export_subnet(build("basic-cifar-private"), "0.5", tmp_path / "a")
    again = export_subnet(build("basic-cifar-private"), "0.5", tmp_path / "b")
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in ("config.json", "model.safetensors"))
    torch.manual_seed(1)
    other = export_subnet(SlimResNet(**SUPERNETS["basic-cifar-private"]).eval(), "0.5", tmp_path / "c")
    (first / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match=r"model.safetensors is not the weights file .*config.json was written "
                                          r"with \(its sha256 differs\).*remove weights_sha256 from config.json"):
        load_exported(first)
    assert "weights_sha256" not in load_exported(again).metadata  # it describes the file, not a model trained on
    # what a kill while writing leaves (a hidden temporary file, perhaps a model's size) goes with the next export
    (again / ".model.safetensors.x1y2.tmp").write_bytes(b"half of a model")
    (again / ".notes.tmp").write_text("not the export's")
    with caplog.at_level(logging.INFO, logger="slimssl"):
        export_subnet(build("basic-cifar-private"), "0.5", tmp_path / "b")
    assert sorted(p.name for p in again.iterdir()) == [".notes.tmp", "config.json", "model.safetensors"]
    assert "removed .model.safetensors.x1y2.tmp, left by an export that was killed midway" in caplog.text


def test_a_graph_of_earlier_weights_does_not_outlive_them(tmp_path, caplog):
    """An ONNX graph beside weights written again (trained further, or a re-export without --format onnx) would
    describe other weights than the folder's safetensors."""
    import logging

    from slimssl import save_exported

    folder = export_subnet(build("basic-cifar-private"), "0.5", tmp_path)
    (folder / "model.onnx").write_bytes(b"a graph of the weights before")
    model = load_exported(folder)
    with caplog.at_level(logging.INFO, logger="slimssl"):
        save_exported(model, folder)  # e.g. after fine-tuning it
    assert not (folder / "model.onnx").exists()
    assert "removed model.onnx, made with the weights and config.json written before" in caplog.text
    (folder / "model.onnx").write_bytes(b"a graph of the weights before")
    export_subnet(build("basic-cifar-private"), "0.5", tmp_path)
    assert not (folder / "model.onnx").exists()


def test_verify_export_takes_the_folder_export_subnet_returns(tmp_path):
    model = build("basic-cifar-private")
    folder = export_subnet(model, "0.5", tmp_path)
    assert verify_export(model, "0.5", folder, 16) <= 1e-5
    with pytest.raises(ExportError, match=r"config.json is neither an export folder nor a graph"):
        verify_export(model, "0.5", folder / "config.json", 16)


def test_save_exported_keeps_an_export_of_another_source_and_a_model_of_the_users_own(tmp_path):
    from slimssl import save_exported

    model = build("basic-cifar-private")
    folder = export_subnet(model, "0.5", tmp_path, metadata={"source": "run A"})
    tuned = load_exported(folder)
    save_exported(tuned, folder)  # trained further and saved back: the same source
    other = export_subnet(model, "0.5", tmp_path / "b", metadata={"source": "run B"})
    with pytest.raises(ExportError, match=r"already holds an export of w0p5_d1-1-1-1 from run A; choose another "
                                          r"output folder, or replace it with overwrite=True"):
        save_exported(load_exported(other), folder)
    assert load_exported(folder).metadata["source"] == "run A"
    save_exported(load_exported(other), folder, overwrite=True)
    assert load_exported(folder).metadata["source"] == "run B"
    own = tmp_path / "own" / "w0p5_d1-1-1-1"
    own.mkdir(parents=True)
    (own / "model.safetensors").write_bytes(b"a model of the user's own")
    with pytest.raises(ExportError, match=r"holds model.safetensors without a slimssl config.json"):
        export_subnet(model, "0.5", tmp_path / "own")
    assert (own / "model.safetensors").read_bytes() == b"a model of the user's own"


def test_metadata_given_to_save_exported_wins_over_what_the_loaded_model_carries(tmp_path):
    """A fine-tuned export saved at another resolution records that one; what it was not given is carried."""
    from slimssl import save_exported

    model = build("basic-cifar-private")
    folder = export_subnet(model, "0.5", tmp_path / "a", metadata={"source": "s", "resolution": 32})
    saved = save_exported(load_exported(folder), tmp_path / "b", metadata={"resolution": 16})
    info = json.loads((saved / "config.json").read_text())
    assert info["resolution"] == 16 and info["source"] == "s"  # the rest is carried


def test_an_output_named_like_a_model_file_is_refused(tmp_path):
    from slimssl import save_exported

    model = build("basic-cifar-private")
    with pytest.raises(ExportError, match=r"model.safetensors is named like a file, and an export is written into a "
                                          r"folder, in which each sub-network .* give a folder name \(e.g. .*model\)"):
        export_subnet(model, "0.5", tmp_path / "model.safetensors")
    with pytest.raises(ExportError, match=r"w0p5.onnx is named like a file"):
        save_exported(model.export("0.5"), tmp_path / "w0p5.onnx")
    assert not list(tmp_path.iterdir())
    (tmp_path / "v1.pt").mkdir()  # a folder of that name that is there already is the user's choice
    assert export_subnet(model, "0.5", tmp_path / "v1.pt").is_dir()


def test_an_output_folder_that_cannot_be_made_is_an_export_error(tmp_path, monkeypatch):
    from pathlib import Path

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(ExportError, match=r"cannot make the export folder .*w0p5_d1-1-1-1: .*Permission denied"):
        export_subnet(build("basic-cifar-private"), "0.5", tmp_path / "locked")


def test_onnx_export_without_onnx_writes_nothing(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(ExportError, match="pip install 'onnx>=1.14' 'onnxruntime>=1.16' \\(the onnx extra\\)"):
        export_subnet(build("basic-cifar-private"), "0.5", tmp_path / "out", fmt="onnx")
    assert not (tmp_path / "out").exists()


def test_unknown_format_raises(tmp_path):
    with pytest.raises(ValueError, match="format"):
        export_subnet(build("basic-cifar-private"), "0.5", tmp_path, fmt="tflite")


# ---- ONNX ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export(tmp_path, perturb_bn):
    onnx = pytest.importorskip("onnx")
    model = build("basic-cifar-private", perturb_bn)
    folder = export_subnet(model, "0.5", tmp_path, fmt="onnx", resolution=16)
    path = folder / "model.onnx"
    assert path.is_file() and path.stat().st_size > 0
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input][:1] == ["images"]
    assert [o.name for o in graph.graph.output] == ["features"]
    assert (folder / "model.safetensors").is_file()
    # the config.json beside it travels inside the graph, each value as JSON text
    carried = {p.key: json.loads(p.value) for p in graph.metadata_props}
    assert carried == json.loads((folder / "config.json").read_text())
    assert carried["subnet"] == "w0p5_d1-1-1-1" and carried["architecture"]["depths"]
    export_subnet(model, "0.5", tmp_path)  # exported again without ONNX: the old graph would not match
    assert not path.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_computes_the_subnet(tmp_path, perturb_bn):
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model = build("basic-cifar-private", perturb_bn)
    folder = export_subnet(model, "0.5", tmp_path, fmt="onnx", resolution=16)
    x = images(3, 16)  # another batch size than the export example: the batch axis is dynamic
    (out,) = ReferenceEvaluator(str(folder / "model.onnx")).run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x, subnet="0.5"), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_verify_export_runs_the_onnx_file_itself(tmp_path, perturb_bn):
    pytest.importorskip("onnx")
    from slimssl import verify_export

    model = build("basic-cifar-private", perturb_bn)
    half = export_subnet(model, "0.5", tmp_path, fmt="onnx", resolution=16) / "model.onnx"
    assert verify_export(model, "0.5", half, 16) < 1e-4
    with pytest.raises(ExportError, match=r"shape \[2, 16\], the sub-network w1p0_\S+ \[2, 32\]"):
        verify_export(model, "1.0", half, 16)  # another sub-network's graph


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_export_verify_checks_the_onnx_graph_and_fails_above_tolerance(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    import slimssl.export.files as export_files
    from slimssl.cli import main

    args = ["export", "--config", "demo", "--set", "model.base_width=4", "--random-init", "--subnet", "0.5",
            "--format", "onnx", "--verify", "--json"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert 0.0 <= row["onnx_max_abs_diff"] < 1e-5 and row["max_abs_diff"] < 1e-5
    # an ONNX graph that computes something else fails the command, though the safetensors export matches
    run_onnx = export_files.run_onnx
    monkeypatch.setattr(export_files, "run_onnx", lambda path, x: run_onnx(path, x) + 1e-3)
    assert main([*args, "--out", str(tmp_path / "b")]) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["onnx_max_abs_diff"] == pytest.approx(1e-3, rel=1e-2) and row["max_abs_diff"] < 1e-5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name, sizes", [("basic-cifar-private", (12, 20)),
                                         ("basic-imagenet-shared-depths", (24, 40))])
def test_onnx_graph_takes_other_image_sizes(tmp_path, perturb_bn, name, sizes):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = build(name, perturb_bn)
    spec = model.menu[-1]
    folder = export_subnet(model, spec, tmp_path, fmt="onnx", resolution=16 if name.startswith("basic-c") else 32)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    for size in sizes:  # neither is the tracing size
        x = images(3, size)
        (out,) = session.run(None, {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x, subnet=spec), rtol=1e-4, atol=1e-4)


# ---- torch.export (pt2) --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["basic-cifar-private", "bottleneck-imagenet-private-depths"])
def test_pt2_program_runs_without_slimssl_at_any_batch_and_size(tmp_path, perturb_bn, name):
    """model.pt2 is what a deployment without slimssl loads: torch.export.load alone gives the sub-network, its
    batch and image size free from the smallest size the network's strides allow, with config.json inside."""
    from slimssl.export.graphs import smallest_program_input

    model = build(name, perturb_bn)
    spec = model.menu[-1]  # the narrowest (and, with depths, shallowest)
    folder = export_subnet(model, spec, tmp_path, fmt="pt2", resolution=40)  # above both stems' strides
    extra = {"config.json": ""}
    program = torch.export.load(str(folder / "model.pt2"), extra_files=extra)
    assert json.loads(extra["config.json"]) == json.loads((folder / "config.json").read_text())
    least = smallest_program_input(load_exported(folder).config)
    assert least == (33 if SUPERNETS[name]["stem"] == "imagenet" else 9)
    assert json.loads(extra["config.json"])["pt2_input"] == {"min_size": least}  # a runtime reads it first
    for batch, height, width in [(1, least, least), (3, least + 7, 2 * least), (2, 40, 40)]:
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
        torch.testing.assert_close(program.module()(x), model(x, subnet=spec), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match=f">= {least}"):
        program.module()(images(1, least - 1))  # smaller than the strides allow: torch's guard refuses it


def test_a_pt2_program_of_a_supernet_in_train_mode_is_its_eval_mode_sub_network(tmp_path, perturb_bn):
    """Exported straight after training (the supernet still in train mode): the program uses the running
    statistics, not those of each batch, and the supernet keeps its mode."""
    supernet = build("basic-cifar-private", perturb_bn).train()
    folder = export_subnet(supernet, "0.5", tmp_path, fmt="pt2", resolution=16)
    assert supernet.training
    assert verify_export(supernet, "0.5", folder / "model.pt2", 16) < 1e-5


def test_verifying_a_pt2_program_shows_none_of_torchs_own_loader_warnings(tmp_path, perturb_bn):
    """torch.export.load warns of its own calls on some versions (2.4: torch.load's weights_only; 2.11: a
    non-writable buffer): a user of `export --verify` can do nothing about them, so they are not shown."""
    import warnings

    supernet = build("basic-cifar-private", perturb_bn)
    folder = export_subnet(supernet, "0.5", tmp_path, fmt="pt2", resolution=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verify_export(supernet, "0.5", folder / "model.pt2", 16) < 1e-5


class _TouchesWhenUnpickled:
    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (self.marker,))


def test_a_pt2_program_whose_index_marks_a_weight_pickled_is_refused_unread(tmp_path, perturb_bn):
    """torch.export.load unpickles the weights an archive marks ``use_pickle``: a file made to run code."""
    import io
    import zipfile

    supernet = build("basic-cifar-private", perturb_bn)
    program = export_subnet(supernet, "0.5", tmp_path, fmt="pt2", resolution=16) / "model.pt2"
    names = zipfile.ZipFile(program).namelist()
    if not any(name.endswith("_weights_config.json") for name in names):
        pytest.skip("this torch writes the older archive format, which torch.load reads whole (docstring)")
    payload = _TouchesWhenUnpickled()
    payload.marker = tmp_path / "code-ran"
    pickled = io.BytesIO()
    torch.save(payload, pickled)
    with zipfile.ZipFile(program) as source:
        index = next(n for n in names if n.endswith("_weights_config.json"))
        config = json.loads(source.read(index))
        first = next(iter(config["config"]))
        config["config"][first]["use_pickle"] = True  # and its bytes, the payload's pickle
        weight = next(n for n in names if n.endswith("weights/" + config["config"][first]["path_name"]))
        replaced = {index: json.dumps(config).encode(), weight: pickled.getvalue()}
        hostile = tmp_path / "hostile.pt2"
        with zipfile.ZipFile(hostile, "w") as out:
            for item in source.infolist():
                out.writestr(item, replaced.get(item.filename, source.read(item.filename)))
    with pytest.raises(ExportError, match=r"holds pickled entries .* if you trust its source"):
        verify_export(supernet, "0.5", hostile, 16)
    disguised = tmp_path / "disguised.pt2"  # an unreadable index member before torch's own: refused too
    with zipfile.ZipFile(hostile) as source, zipfile.ZipFile(disguised, "w") as out:
        out.writestr("archive/aaa_weights_config.json", b"not json")
        for item in source.infolist():
            out.writestr(item, source.read(item.filename))
    with pytest.raises(ExportError, match=r"aaa_weights_config.json cannot be read .* if you trust its source"):
        verify_export(supernet, "0.5", disguised, 16)
    assert not payload.marker.exists()


def test_verify_export_runs_a_plain_model_in_eval_mode_and_gives_it_back_in_its_own(perturb_bn):
    """A model being fine-tuned is verified, then trained on: its BatchNorm must still be training."""
    from slimssl import verify_export

    supernet = build("basic-cifar-private", perturb_bn).train()
    plain = supernet.export("0.5").train()
    assert verify_export(supernet, "0.5", plain, 16) < 1e-5  # compared in eval mode, both
    assert plain.training and supernet.training


def test_the_unfolded_max_pool_is_the_stems_max_pool():
    from slimssl.export.graphs import UnfoldedMaxPool

    pool = nn.MaxPool2d(3, 2, 1)
    for size in (2, 7, 8, 33, 34):
        x = torch.randn(2, 3, size, size + 1, generator=torch.Generator().manual_seed(size)) - 5  # all below 0
        assert torch.equal(UnfoldedMaxPool(pool)(x), pool(x))
    with pytest.raises(ValueError, match="MaxPool2d"):
        UnfoldedMaxPool(nn.MaxPool2d(2))


def test_a_torch_that_cannot_keep_the_max_pools_size_dynamic_gets_a_program_of_any_size(tmp_path, perturb_bn,
                                                                                      monkeypatch):
    """Before torch 2.13, max_pool2d's shape rule ties a program to one parity of image size, and export fails:
    the program is then traced with the unfolded max-pool, and still takes any size, of either parity."""
    import torch.export

    model = build("bottleneck-imagenet-private-depths", perturb_bn)
    spec = model.menu[-1]
    real, traced = torch.export.export, []

    def old_torch(module, *args, **kwargs):
        traced.append(type(module.maxpool).__name__)
        if isinstance(module.maxpool, nn.MaxPool2d):
            raise RuntimeError("Constraints violated (height, width)!")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", old_torch)
    folder = export_subnet(model, spec, tmp_path, fmt="pt2", resolution=40)
    assert traced == ["MaxPool2d", "UnfoldedMaxPool"]
    program = torch.export.load(str(folder / "model.pt2")).module()
    for size in (33, 34, 40, 41):
        x = images(2, size)
        torch.testing.assert_close(program(x), model(x, subnet=spec), rtol=1e-5, atol=1e-5)
    assert isinstance(load_exported(folder).maxpool, nn.MaxPool2d)  # the weights' model is as it was


def test_a_pt2_program_of_images_smaller_than_its_strides_takes_that_size(tmp_path, perturb_bn):
    """At 8 pixels the CIFAR stem's last feature map has 1 pixel: the program is compiled for that size alone."""
    model = build("basic-cifar-private", perturb_bn)
    folder = export_subnet(model, "0.5", tmp_path, fmt="pt2", resolution=8)
    assert json.loads((folder / "config.json").read_text())["pt2_input"] == {"size": 8}
    assert verify_export(model, "0.5", folder / "model.pt2", 8) < 1e-5
    program = torch.export.load(str(folder / "model.pt2")).module()
    x = images(3, 8)  # another batch: still dynamic
    torch.testing.assert_close(program(x), model(x, subnet="0.5"), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match=r"\b8\b"):  # torch's guard names the size it was compiled for
        program(images(2, 16))


def test_pt2_export_is_verified_and_replaced_like_the_other_graphs(tmp_path, capsys, perturb_bn):
    from slimssl.cli import main
    from slimssl import save_exported

    model = build("basic-cifar-private", perturb_bn).double()
    folder = export_subnet(model, "0.5", tmp_path, fmt="pt2", resolution=16)
    assert verify_export(model, "0.5", folder / "model.pt2", 16) <= 1e-12  # the weights' dtype, float64
    with pytest.raises(ExportError, match=r"shape \[2, 16\], the sub-network w1p0_\S+ \[2, 32\]"):
        verify_export(model, "1.0", folder / "model.pt2", 16)  # another sub-network's program
    (folder / "model.onnx").write_bytes(b"a graph of the weights before")
    export_subnet(model, "0.5", tmp_path, fmt="pt2", resolution=16)  # a new graph replaces every earlier one
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt2", "model.safetensors"]
    save_exported(load_exported(folder), folder)  # weights written again without a graph: the program goes
    assert not (folder / "model.pt2").exists() and "pt2_input" not in json.loads((folder / "config.json").read_text())
    (folder / "model.pt2").write_bytes(b"not an archive")
    with pytest.raises(ExportError, match=r"model.pt2 is not a readable torch.export program"):
        verify_export(model, "0.5", folder / "model.pt2", 16)
    args = ["export", "--config", "demo", "--set", "model.base_width=4", "--random-init", "--subnet", "0.5",
            "--format", "pt2", "--verify", "--json", "--out", str(tmp_path / "cli")]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert 0.0 <= row["pt2_max_abs_diff"] < 1e-5 and row["max_abs_diff"] < 1e-5
    assert (tmp_path / "cli" / row["subnet"] / "model.pt2").is_file()


def test_cli_export_formats_are_the_librarys():
    from slimssl.cli import build_parser
    from slimssl.export import FORMATS

    export = build_parser()._subparsers._group_actions[0].choices["export"]
    (action,) = [a for a in export._actions if "--format" in a.option_strings]
    assert tuple(action.choices) == FORMATS


# ---- dtype and device ----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_keeps_the_supernets_dtype_and_verify_feeds_it(tmp_path, perturb_bn):
    model = build("basic-cifar-private", perturb_bn).double()
    plain = model.export("0.5")
    assert {p.dtype for p in plain.parameters()} == {torch.float64}
    x = images(size=16).double()
    assert max_diff(plain(x), model(x, subnet="0.5")) <= 1e-12
    assert verify_export(model, "0.5", plain, 16) <= 1e-12
    folder = export_subnet(model, "0.5", tmp_path, fmt="onnx", resolution=16)
    loaded = load_exported(folder)  # the file keeps the dtype, and so does loading it
    assert loaded.conv1.weight.dtype == torch.float64
    assert verify_export(model, "0.5", loaded, 16) <= 1e-12
    assert verify_export(model, "0.5", folder / "model.onnx", 16) < 1e-4  # a float32 graph
    half = build("basic-cifar-private", perturb_bn).to(torch.bfloat16)
    assert half.export("0.5").conv1.weight.dtype == torch.bfloat16
    assert verify_export(half, "0.5", half.export("0.5"), 16) == 0.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_export_keeps_the_supernets_device(perturb_bn):
    model = build("basic-cifar-private", perturb_bn).cuda()
    plain = model.export("0.5")
    assert plain.conv1.weight.is_cuda and plain.layer1[0].bn1.running_mean.is_cuda
    x = images(size=16).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the input check reads metadata only: no copy to the host
    try:
        with torch.no_grad():
            plain(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert verify_export(model, "0.5", plain, 16) <= 1e-5
    assert verify_export(model, "0.5", plain.cpu(), 16) <= 1e-4
    from slimssl.report.profile import profile_supernet  # evaluation profiles a supernet on its device

    assert [r["params"] for r in profile_supernet(model, 16, latency=False)] == \
        [r["params"] for r in profile_supernet(model.cpu(), 16, latency=False)]


# ---- the plain model's inputs, TorchScript, tracing, torch.export, torch.compile --------------------------

def test_plain_resnet_names_bad_inputs():
    from slimssl.models.resnet import InputError

    plain = build("basic-cifar-private").export("0.5")
    x = images(size=16)
    cases = [((x * 255).to(torch.uint8), r"expected a float tensor of images \[batch, 3, height, width\], got "
                                          r"shape \(2, 3, 16, 16\), dtype torch.uint8"),
             (x[:, :1], r"got shape \(2, 1, 16, 16\)"),
             (x[0], r"got shape \(3, 16, 16\)"),
             (x.double(), "expected images of the network's dtype torch.float32, got torch.float64")]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            plain(bad)
    with pytest.raises(InputError, match="got shape"):
        plain.forward_features(x[:, :1])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the inputs itself
        assert plain(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["basic-cifar-private", "bottleneck-imagenet-private-depths"])
def test_exported_model_scripts_traces_exports_and_compiles(name, perturb_bn):
    model = build(name, perturb_bn)
    spec = model.menu[-1]
    plain = model.export(spec)
    keys = list(plain.state_dict())
    size = 32 if SUPERNETS[name]["stem"] == "imagenet" else 16
    x, other = images(2, size), images(3, size + 8, seed=2)
    expected = model(other, subnet=spec)
    with torch.no_grad():
        scripted = torch.jit.script(plain)
        traced = torch.jit.trace(plain, x)
        exported = torch.export.export(plain, (x,)).module()
        compiled = torch.compile(plain, backend="eager", fullgraph=True)  # no graph break in the input check
        for run in (scripted, traced, compiled):
            assert max_diff(run(other), expected) <= 1e-5
        assert max_diff(exported(x), model(x, subnet=spec)) <= 1e-5
    assert list(plain.state_dict()) == keys == list(scripted.state_dict())  # torchvision's names, unchanged


def test_exported_model_traces_with_torch_fx_for_feature_extraction(perturb_bn):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = build("bottleneck-imagenet-private-depths", perturb_bn)
    spec = model.menu[-1]
    plain = model.export(spec).eval()
    x = images(2, 32)
    graph = torch.fx.symbolic_trace(plain)
    extractor = create_feature_extractor(plain, {"layer2": "c3", "layer4": "c5"})  # an FPN's inputs, say
    with torch.no_grad():
        assert max_diff(graph(x), model(x, subnet=spec)) <= 1e-5
        features = extractor(x)
        assert features["c3"].shape[:2] == (2, plain.config.out_channels[1])
        assert max_diff(features["c5"].mean((2, 3)), plain(x)) <= 1e-5


# ---- folders that are not an exported sub-network -------------------------------------------------------

def test_load_exported_says_what_a_run_directory_or_an_export_folder_is(tmp_path):
    model = build("basic-cifar-private")
    for spec in ("0.5", "0.25"):
        export_subnet(model, spec, tmp_path / "exported")
    with pytest.raises(ExportError, match=r"exported holds exported sub-networks \(w0p25_d1-1-1-1, w0p5_d1-1-1-1\), "
                                          r"one per folder; load one of them, e\.g\. slimssl\.load_exported\("):
        load_exported(tmp_path / "exported")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"run is a run directory, not an exported sub-network: load its supernet "
                                          r"with slimssl\.load_supernet\(.*slimssl export"):
        load_exported(tmp_path / "run")


def test_load_supernet_says_a_folder_is_an_export(tmp_path):
    from slimssl.checkpoint import CheckpointError, load_supernet

    folder = export_subnet(build("basic-cifar-private"), "0.5", tmp_path)
    with pytest.raises(CheckpointError, match=r"w0p5_d1-1-1-1 is an exported sub-network \(a plain ResNet\), not a "
                                              r"checkpoint: load it with slimssl\.load_exported\("):
        load_supernet(folder)
    with pytest.raises(CheckpointError, match=r"holds exported sub-networks \(w0p5_d1-1-1-1\), not a checkpoint: "
                                              r"load one with slimssl\.load_exported\(.*\), or evaluate one with "
                                              r"slimssl knn .*w0p5_d1-1-1-1 --data DATA"):
        load_supernet(tmp_path)


def test_an_export_given_for_a_supernet_names_its_checkpoint_and_sub_network(tmp_path):
    import slimssl
    from slimssl.checkpoint import CheckpointError, save_checkpoint

    supernet = build("basic-cifar-private")
    checkpoint = tmp_path / "last.pt"
    save_checkpoint(checkpoint, {"config": {"name": "x"}, "menu": supernet.menu.names, "model": {}})
    folder = export_subnet(supernet, "0.5", tmp_path / "out", metadata={"source": str(checkpoint)})
    with pytest.raises(CheckpointError, match=rf"It was exported from {checkpoint}, whose supernet holds it as "
                                              r"w0p5_d1-1-1-1"):
        slimssl.load_supernet(folder)


def test_export_subnet_with_a_config_traces_its_graph_at_the_resolution_it_records(tmp_path):
    """With config=, config.json records the config's resolution, and the pt2 program takes images of it."""
    from slimssl.config import config_from_dict
    from slimssl.models.build import build_supernet

    cfg = config_from_dict({"model": {"arch": "resnet18", "depths": [1, 1, 1, 1], "base_width": 4, "stem": "cifar"},
                            "menu": {"widths": [1.0, 0.5]}, "data": {"resolution": 8}})
    model = build_supernet(cfg).eval()
    folder = export_subnet(model, "0.5", tmp_path, fmt="pt2", config=cfg, check_bn_statistics=False)
    recorded = json.loads((folder / "config.json").read_text())
    assert recorded["resolution"] == 8 and recorded["pt2_input"] == {"size": 8}
    x = images(2, 8)
    torch.testing.assert_close(torch.export.load(str(folder / "model.pt2")).module()(x), model(x, subnet="0.5"),
                               rtol=1e-5, atol=1e-5)


def test_export_subnet_refuses_the_config_of_another_network(tmp_path):
    """Its resolution, crop ratio, mean and std would be recorded as the export's inputs."""
    from slimssl.errors import UsageError
    from slimssl.models.build import build_supernet

    model = build_supernet("demo", ["model.base_width=4"]).eval()
    with pytest.raises(UsageError, match=r"config= is not this supernet's config:\n  block: supernet 'basic', "
                                         r"config 'bottleneck'"):
        export_subnet(model, "0.5", tmp_path, config="imagenet_r50_dspnet_byol", check_bn_statistics=False)
    assert not any(tmp_path.iterdir())


def test_export_subnet_traces_at_the_resolution_its_metadata_records_or_says_why_it_cannot(tmp_path):
    model = build("basic-cifar-private", None)
    folder = export_subnet(model, "0.5", tmp_path / "a", fmt="pt2", metadata={"resolution": 8})
    assert json.loads((folder / "config.json").read_text())["pt2_input"] == {"size": 8}
    with pytest.raises(ExportError, match=r"metadata's resolution must be a whole number of pixels >= 1, got 8.0"):
        export_subnet(model, "0.5", tmp_path / "b", fmt="pt2", metadata={"resolution": 8.0})
    with pytest.raises(ExportError, match="resolution must be a whole number of pixels >= 1, got True"):
        export_subnet(model, "0.5", tmp_path / "c", fmt="pt2", resolution=True)
    with pytest.raises(ExportError, match=r"traced at 32 px takes \{'min_size': 9\}, not the 8 px images"):
        export_subnet(model, "0.5", tmp_path / "d", fmt="pt2", resolution=32, metadata={"resolution": 8})
    assert not any((tmp_path / name).exists() for name in "bcd")


def test_export_subnet_refuses_a_config_of_the_same_network_with_another_menu(tmp_path):
    from slimssl.config import load_config
    from slimssl.errors import UsageError
    from slimssl.models.build import build_supernet

    model = build_supernet("demo", ["model.base_width=4"]).eval()
    other_menu = load_config("demo", ["model.base_width=4", "menu.widths=[1.0, 0.5]"])
    with pytest.raises(UsageError, match=r"config= is not this supernet's config:\n  menu: supernet "):
        export_subnet(model, "0.5", tmp_path, config=other_menu, check_bn_statistics=False)
    assert not any(tmp_path.iterdir())


def test_export_subnet_resolution_bounds_and_a_fixed_size_program(tmp_path):
    model = build("basic-cifar-private", None)
    for kwargs, name in (({"resolution": 0}, "resolution"), ({"metadata": {"resolution": 0}}, "metadata's resolution")):
        with pytest.raises(ExportError, match=f"^{name} must be a whole number of pixels >= 1, got 0"):
            export_subnet(model, "0.5", tmp_path / "zero", fmt="pt2", **kwargs)
    # a program traced at 32 takes 9 px and more: 9 px images, as recorded, are taken
    folder = export_subnet(model, "0.5", tmp_path / "least", fmt="pt2", resolution=32, metadata={"resolution": 9})
    assert json.loads((folder / "config.json").read_text())["pt2_input"] == {"min_size": 9}
    # a program traced at 8 takes 8 px alone, not the 16 px images the config would say
    with pytest.raises(ExportError, match=r"traced at 8 px takes \{'size': 8\}, not the 16 px images"):
        export_subnet(model, "0.5", tmp_path / "fixed", fmt="pt2", resolution=8, metadata={"resolution": 16})
    assert not (tmp_path / "zero").exists() and not (tmp_path / "fixed").exists()
