"""Datasets given in Python (``slimssl.register_dataset``): the layouts taken, that a run on them is the run on
the same images as files, and the errors of bad input."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretrain import tiny

import slimssl
from slimssl.checkpoint import load_checkpoint
from slimssl.data.datasets import load_dataset
from slimssl.data.decode import resize_center_crop
from slimssl.data.files import DataError, MissingSplitError
from slimssl.errors import UsageError


@pytest.fixture
def register():
    """``slimssl.register_dataset`` whose names are forgotten after the test (the registry is per process)."""
    names = []

    def register_(name, *args, **kwargs):
        names.append(name)
        slimssl.register_dataset(name, *args, **kwargs)

    yield register_
    for name in dict.fromkeys(names):
        slimssl.unregister_dataset(name)


def pixels(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3] images of smooth random patterns (so that resizing them is not trivial)."""
    gen = np.random.default_rng(seed)
    coarse = gen.integers(0, 256, (n, 3, 4, 4)).astype(np.float32)
    fine = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(h, w), mode="bilinear")
    return fine.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class Items(torch.utils.data.Dataset):
    """A torchvision-like dataset: (image, label) items and the classes' names."""

    def __init__(self, images, labels, to_item=lambda a: Image.fromarray(a), classes=("cat", "dog")):
        self.images, self.labels, self.to_item, self.classes = images, labels, to_item, list(classes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.to_item(self.images[i]), int(self.labels[i])


def test_every_layout_gives_the_same_images(register):
    hwc, labels = pixels(6), np.array([0, 1, 0, 1, 1, 0])
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    register("reference", (hwc, labels))
    expected = load_dataset("reference")
    assert torch.equal(expected.images, chw) and expected.labels.tolist() == labels.tolist()
    assert expected.classes == ["0", "1"] and expected.name == "reference" and len(expected) == 6
    layouts = {
        "chw": (chw, torch.from_numpy(labels)),
        "floats": (chw.float() / 255, labels.tolist()),
        "pil_items": Items(hwc, labels),
        "tensor_items": Items(hwc, labels, to_item=lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255),
    }
    for name, data in layouts.items():
        register(name, data)
        got = load_dataset(name)
        assert torch.equal(got.images, chw) and got.labels.tolist() == labels.tolist(), name
    assert load_dataset("pil_items").classes == ["cat", "dog"]  # the dataset's own names

    register("grey", hwc[..., 0])  # [N, H, W]: grey, unlabelled
    grey = load_dataset("grey")
    assert grey.labels is None and grey.classes is None
    assert torch.equal(grey.images, chw[:, :1].expand(-1, 3, -1, -1))


def test_registered_images_are_copied_and_resized_as_files_are(register):
    hwc = pixels(4, 12, 16)
    register("wide", hwc, test=hwc[:2])
    hwc[:] = 0  # the caller's array changes afterwards: the registered images do not
    chw = torch.from_numpy(pixels(4, 12, 16)).permute(0, 3, 1, 2)
    got = load_dataset("wide", resolution=8, crop_ratio=0.875)
    assert torch.equal(got.images, resize_center_crop(chw, 8, 0.875)) and got.images.shape == (4, 3, 8, 8)
    assert len(load_dataset("wide", "test", resolution=8)) == 2
    with pytest.raises(DataError, match=r"\(12, 16\) pixels; set data.resolution"):
        load_dataset("wide")  # not square, and no resolution to make it so
    with pytest.raises(MissingSplitError, match="without a val split.*val= to slimssl.register_dataset"):
        load_dataset("wide", "val", resolution=8)


def test_a_run_on_registered_images_is_the_run_on_the_same_images_as_files(register, tmp_path):
    train, test = pixels(16, seed=1), pixels(8, seed=2)
    train_labels, test_labels = np.repeat([0, 1], 8), np.repeat([0, 1], 4)
    for split, images, labels in (("train", train, train_labels), ("test", test, test_labels)):
        for i, (image, label) in enumerate(zip(images, labels)):
            path = tmp_path / "tree" / split / f"c{label}" / f"{i:03d}.png"  # listed in this order
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    register("mine", (train, train_labels), (test, test_labels), classes=["c0", "c1"])

    runs = {}
    for name, source in (("files", str(tmp_path / "tree")), ("registered", "mine")):
        cfg = tiny("byol", train={"epochs": 1})
        cfg["data"] = {"source": source, "resolution": 8}
        runs[name] = slimssl.pretrain(cfg, tmp_path / name)
    files, registered = (load_checkpoint(runs[n].run_dir / "checkpoints" / "last.pt") for n in ("files", "registered"))
    assert all(torch.equal(files["model"][k], v) for k, v in registered["model"].items())
    knn = [[row["knn_top1"] for row in runs[n].results["subnets"]] for n in ("files", "registered")]
    assert knn[0] == knn[1] and len(knn[0]) == 4
    assert runs["registered"].results["protocols"]["knn"]["data"] == "mine"

    assert [row["knn_top1"] for row in slimssl.knn(runs["registered"].run_dir, save=False)] == knn[1]
    with pytest.raises(UsageError, match="'mine' is a dataset held in memory"):
        slimssl.knn(runs["registered"].run_dir, loader="stream", save=False)
    slimssl.unregister_dataset("mine")  # as in another process: the run's data.source names what is gone
    with pytest.raises(DataError, match="'mine' is neither.*registered with slimssl.register_dataset"):
        slimssl.knn(runs["registered"].run_dir, save=False)
    register("mine", (train, train_labels))  # the fixture forgets it again


def test_a_streamed_run_refuses_registered_images(register, tmp_path):
    register("mine", pixels(8))
    cfg = tiny("byol")
    cfg["data"] = {"source": "mine", "resolution": 8, "loader": "stream"}
    with pytest.raises(DataError, match="'mine' is a dataset held in memory.*data.loader=memory"):
        slimssl.pretrain(cfg, tmp_path / "run")


@pytest.mark.parametrize("args, kwargs, match", [
    (("cifar10", np.zeros((2, 8, 8, 3), np.uint8)), {}, "not a built-in name"),
    (("a/b", np.zeros((2, 8, 8, 3), np.uint8)), {}, "no '.' or '/'"),
    (("x.zip", np.zeros((2, 8, 8, 3), np.uint8)), {}, "no '.' or '/'"),
    (("bad", (np.full((2, 8, 8, 3), -0.5), [0, 1])), {}, "in \\[0, 1\\] and not normalised.*-0.5 to -0.5"),
    (("bad", np.full((2, 8, 8, 3), 300, np.int32)), {}, "in \\[0, 255\\], got values from 300 to 300"),
    (("bad", np.zeros((2, 8, 8, 2), np.uint8)), {}, "1 or 3 channels"),
    (("bad", np.zeros((8, 8), np.uint8)), {}, "expected images as"),
    (("bad", (np.zeros((2, 8, 8, 3), np.uint8), [0, 1, 1])), {}, "expected 2 labels.*got 3"),
    (("bad", (np.zeros((2, 8, 8, 3), np.uint8), [0.0, 1.0])), {}, "integers from 0"),
    (("bad", (np.zeros((2, 8, 8, 3), np.uint8), [0, -1])), {}, "from -1"),
    (("bad", (np.zeros((2, 8, 8, 3), np.uint8), [0, 2])), {"classes": ["a", "b"]}, "label 2 but 2 class names"),
    (("bad", Items([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], [0, 1])), {},
     "item 1 is \\(8, 9\\) pixels, item 0 \\(8, 8\\)"),
    (("bad", [(np.zeros((8, 8, 3), np.uint8), 0), np.zeros((8, 8, 3), np.uint8)]), {}, "item 1 has no label"),
    (("bad", Items([], [])), {}, "the dataset is empty"),
    (("bad", "a folder"), {}, "got the path .a folder.; a folder or .zip of images is a data source"),
    (("bad", 3), {}, "expected \\(images, labels\\), images, or a map-style dataset"),
])
def test_bad_input_is_refused_with_what_was_expected(args, kwargs, match):
    with pytest.raises(DataError, match=match):
        slimssl.register_dataset(*args, **kwargs)
    with pytest.raises(DataError, match="no dataset 'bad' is registered"):
        slimssl.unregister_dataset("bad")  # nothing was kept


MY_DATA = '''
import numpy as np
import slimssl

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
slimssl.register_dataset("mine", (images[:16], np.arange(16) % 2), (images[16:], np.arange(8) % 2))
'''


def test_the_command_line_finds_a_dataset_registered_by_an_imported_file(tmp_path, monkeypatch, caplog):
    from slimssl.cli import main

    (tmp_path / "my_data.py").write_text(MY_DATA)
    monkeypatch.chdir(tmp_path)
    tiny_run = ["--config", "demo", "--data", "mine", "--set", "model.base_width=4", "data.resolution=8",
                "train.batch_size=8",                "--out", "run", "--max-steps", "1", "--device", "cpu"]
    try:
        with caplog.at_level(logging.INFO, logger="slimssl"):
            assert main(["--import", "my_data.py", "pretrain", *tiny_run]) == 0
        assert "continue with: slimssl --import my_data.py pretrain --resume run" in caplog.text
    finally:
        slimssl.unregister_dataset("mine")
        sys.modules.pop("my_data", None)  # as in a new process
    assert main(["knn", "run", "--no-save"]) == 2
    assert "'mine' is neither a known dataset name" in caplog.text
    try:
        assert main(["--import", "my_data.py", "pretrain", "--resume", "run", "--max-steps", "2"]) == 0
    finally:
        slimssl.unregister_dataset("mine")
        sys.modules.pop("my_data", None)
