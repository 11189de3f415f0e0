"""``slimssl embed`` / ``slimssl.embed``: a split's features for sub-networks, saved for use elsewhere. The
features must be what the exported sub-network computes on the images as every evaluation reads them, each row
named by its file where the split has files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import slimssl
from slimssl.checkpoint import save_checkpoint
from slimssl.data.augment import eval_transform
from slimssl.data.eval_images import load_eval_split
from slimssl.eval.embed import paths_file

from test_eval import RES, tiny_config, tiny_supernet
from test_stream_eval import CLASSES, _folder

HALF = "w0p5_d1-1-1-1"


def run_with_perturbed_bn(run, perturb_bn, bn: str = "private"):
    """A run whose checkpoint holds the tiny supernet with BatchNorm statistics far from the identity."""
    cfg = tiny_config(bn, train={"epochs": 4})
    supernet = perturb_bn(tiny_supernet(bn))
    save_checkpoint(run / "checkpoints" / "last.pt",
                    {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names,
                     "model": {"backbone." + k: v for k, v in supernet.state_dict().items()}})
    return supernet


def exported_features(supernet, subnet, images) -> torch.Tensor:
    """The exported sub-network's pooled features on ``images`` read as the evaluations read them."""
    model = supernet.export(subnet).eval()
    cfg = tiny_config()
    with torch.no_grad():
        return torch.cat([model.forward_features(eval_transform(batch, RES, cfg.data.mean, cfg.data.std))
                          for batch in images.batches(64)])


def test_features_are_the_exported_subnetworks_on_the_evaluation_images_and_rows_name_their_files(
        tmp_path, perturb_bn):
    supernet = run_with_perturbed_bn(tmp_path / "run", perturb_bn)
    data = _folder(tmp_path / "data")
    out = tmp_path / "features.safetensors"
    result = slimssl.embed(tmp_path / "run", "0.5", data=data, out=out, device="cpu")
    test = load_eval_split(str(data), "test", loader="memory", resolution=RES)
    expected = exported_features(supernet, "0.5", test)
    assert list(result["features"]) == [HALF]
    torch.testing.assert_close(result["features"][HALF], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(result["labels"], test.labels) and result["classes"] == list(CLASSES)
    # each row's file, relative to the dataset's folder, in the rows' order: the label is its class folder's
    assert result["paths"] == paths_file(out).read_text().splitlines()
    assert [CLASSES.index(p.split("/")[1]) for p in result["paths"]] == result["labels"].tolist()
    assert result["paths"][0] == "test/blue/000.jpg" and len(result["paths"]) == len(test) == 18
    # the file holds the same tensors, and the settings that read them
    saved = load_file(out)
    assert set(saved) == {HALF, "labels"}
    assert torch.equal(saved[HALF], result["features"][HALF]) and torch.equal(saved["labels"], test.labels)
    with safe_open(out, "pt") as f:
        settings = json.loads(f.metadata()["slimssl"])
    assert settings == json.loads(json.dumps(result["settings"]))
    assert settings["split"] == "test" and settings["resolution"] == RES and settings["subnets"] == {HALF: 16}
    # the sub-network exported measures the same
    (row,) = slimssl.export_run(tmp_path / "run", tmp_path / "exported", "0.5")
    exported = slimssl.embed(row["path"], data=data, device="cpu")
    torch.testing.assert_close(exported["features"][HALF], result["features"][HALF], rtol=1e-4, atol=1e-5)


def test_a_folder_of_images_alone_is_embedded_without_labels_and_memory_rows_have_no_paths(tmp_path, perturb_bn):
    run_with_perturbed_bn(tmp_path / "run", perturb_bn)
    data = _folder(tmp_path / "data", {"train": 2}) / "train" / "red"  # a folder of images alone
    out = tmp_path / "features.safetensors"
    streamed = slimssl.embed(tmp_path / "run", data=data, split="train", out=out, device="cpu")
    assert streamed["labels"] is None and streamed["paths"] == ["000.jpg", "001.jpg"]
    assert set(load_file(out)) == {"w1p0_d1-1-1-1", HALF}
    # decoded in memory: the same pixels, so the same features, but no file names (an earlier listing goes)
    in_memory = slimssl.embed(tmp_path / "run", data=data, split="train", out=out, device="cpu", loader="memory")
    assert in_memory["paths"] is None and not paths_file(out).exists()
    for name, features in streamed["features"].items():
        torch.testing.assert_close(in_memory["features"][name], features)


def test_shared_batch_norm_is_recalibrated_as_slimssl_recalibrate_does(tmp_path, perturb_bn):
    run_with_perturbed_bn(tmp_path / "run", perturb_bn, bn="shared")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    recalibrated = tmp_path / "half.pt"
    slimssl.recalibrate_checkpoint(checkpoint, 0.5, recalibrated, batches=1, device="cpu", eval_batch_size=16)
    result = slimssl.embed(checkpoint, "0.5", recalibrate_bn=1, eval_batch_size=16, device="cpu")
    test = load_eval_split("fake", "test", loader="memory", resolution=RES, fake_size=64)
    expected = exported_features(slimssl.load_supernet(recalibrated)[0], "0.5", test)
    torch.testing.assert_close(result["features"][HALF], expected, rtol=1e-4, atol=1e-5)
    stale = slimssl.embed(checkpoint, "0.5", recalibrate_bn=0, eval_batch_size=16, device="cpu")
    assert not torch.allclose(stale["features"][HALF], expected, atol=1e-3)  # the statistics did matter


def test_bad_requests_are_refused_before_any_work(tmp_path, perturb_bn):
    from slimssl.cli import main

    run_with_perturbed_bn(tmp_path / "run", perturb_bn)
    for bad, message in [(dict(out=tmp_path / "f.npy"), "written to a .safetensors file"),
                         (dict(out=tmp_path / "missing" / "f.safetensors"), "does not exist"),
                         (dict(split="val"), "split must be one of train, test"),
                         (dict(subnets="0.3"), "0.3")]:
        with pytest.raises(slimssl.SlimsslError, match=message):
            slimssl.embed(tmp_path / "run", device="cpu", **bad)
    with pytest.raises(SystemExit) as refused:  # argparse: --out is required and must be a .safetensors file
        main(["embed", str(tmp_path / "run"), "--out", str(tmp_path / "f.pt")])
    assert refused.value.code == 2


def test_the_command_writes_what_the_function_returns(tmp_path, perturb_bn, capsys):
    from slimssl.cli import main

    run_with_perturbed_bn(tmp_path / "run", perturb_bn)
    out = tmp_path / "f.safetensors"
    assert main(["embed", str(tmp_path / "run"), "--out", str(out), "--device", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["subnets"] == {"w1p0_d1-1-1-1": 32, HALF: 16} and doc["images"] == 64 and doc["paths_file"] is None
    assert doc["out"] == str(out.absolute())
    expected = slimssl.embed(tmp_path / "run", device="cpu")
    saved = load_file(out)
    for name, features in expected["features"].items():
        assert torch.equal(saved[name], features)


def test_the_evaluation_crop_and_skipped_files_are_those_of_the_evaluations(tmp_path, perturb_bn):
    """crop_ratio reads the images as the evaluations do; a file skipped as unreadable leaves no row, and the
    listing stays in step with the rows."""
    from test_stream_eval import _corrupt_one_per_split

    supernet = run_with_perturbed_bn(tmp_path / "run", perturb_bn)
    data = _folder(tmp_path / "data")
    _corrupt_one_per_split(data)  # test/green/001.jpg
    out = tmp_path / "f.safetensors"
    result = slimssl.embed(tmp_path / "run", "0.5", data=data, out=out, device="cpu", crop_ratio=0.5,
                           skip_unreadable=True)
    test = load_eval_split(str(data), "test", loader="memory", resolution=RES, crop_ratio=0.5, skip_unreadable=True)
    torch.testing.assert_close(result["features"][HALF], exported_features(supernet, "0.5", test), rtol=1e-4, atol=1e-5)
    assert result["settings"]["crop_ratio"] == 0.5 and len(result["paths"]) == len(test) == 17
    assert "test/green/001.jpg" not in result["paths"]
    assert [CLASSES.index(p.split("/")[1]) for p in result["paths"]] == result["labels"].tolist()
    assert result["settings"]["paths_root"] == str(data.absolute()) and result["settings"]["data"] == str(data)


def test_an_unlabelled_test_split_of_a_shared_batch_norm_run_is_embedded(tmp_path, perturb_bn):
    from test_stream_eval import _image

    run_with_perturbed_bn(tmp_path / "run", perturb_bn, bn="shared")
    for split, n in (("train", 16), ("test", 4)):  # images without class folders: no labels
        (tmp_path / "data" / split).mkdir(parents=True)
        for i in range(n):
            _image(i % 3, i, 20, 20).save(tmp_path / "data" / split / f"{i:02d}.png")
    result = slimssl.embed(tmp_path / "run", "0.5", data=tmp_path / "data", device="cpu", recalibrate_bn=1,
                           eval_batch_size=8)
    assert result["labels"] is None and result["paths"] == [f"test/{i:02d}.png" for i in range(4)]


def test_file_names_the_listing_cannot_hold_are_refused_and_others_kept_as_they_are(tmp_path, perturb_bn):
    import os

    from test_stream_eval import _image

    run_with_perturbed_bn(tmp_path / "run", perturb_bn)
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        _image(0, 1, 20, 20).save(folder / name)
    latin = os.fsencode(folder) + b"/caf\xe9.png"  # a name that is not UTF-8, as an old archive may hold
    with open(latin, "wb") as f:
        _image(1, 2, 20, 20).save(f, format="PNG")
    out = tmp_path / "f.safetensors"
    result = slimssl.embed(tmp_path / "run", data=folder, split="train", out=out, device="cpu")
    assert paths_file(out).read_bytes() == b"a.png\nb.png\ncaf\xe9.png\n"
    assert len(result["paths"]) == 3
    _image(2, 3, 20, 20).save(folder / "two\nlines.png")
    with pytest.raises(slimssl.DataError, match="has a line break in its name"):
        slimssl.embed(tmp_path / "run", data=folder, split="train", out=out, device="cpu")
    assert paths_file(out).read_bytes() == b"a.png\nb.png\ncaf\xe9.png\n"  # the earlier pair is kept
    assert len(load_file(out)[HALF]) == 3
