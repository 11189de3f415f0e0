"""Datasets given in Python (``slimssl.register_dataset``): the layouts taken, that a run on them is the run on
the same images as files, and the errors of bad input."""

from __future__ import annotations

import logging
import shutil
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


def test_more_layouts_lists_dicts_names_16_bits_and_alpha(register):
    hwc, labels = pixels(6), np.array([0, 1, 0, 1, 1, 0])
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    names = np.array(["dog", "cat"])[labels]  # class names as labels: sorted, "cat" is 0
    rgba = np.concatenate([hwc, np.full((6, 8, 8, 1), 7, np.uint8)], axis=3)
    layouts = {
        "pil_list": ([Image.fromarray(a) for a in hwc], labels),
        "array_list": [list(hwc), labels.tolist()],  # a list, not a tuple
        "dict_items": [{"img": Image.fromarray(a), "label": int(y)} for a, y in zip(hwc, labels)],
        "named": (hwc, names.tolist()),
        "sixteen_bits": (hwc.astype(np.uint16) * 257, labels),
        "alpha": (rgba, labels),
    }
    for name, data in layouts.items():
        register(name, data)
        got = load_dataset(name)
        assert torch.equal(got.images, chw), name
        assert got.labels.tolist() == (1 - labels).tolist() if name == "named" else labels.tolist(), name
    assert load_dataset("named").classes == ["cat", "dog"]
    register("given_order", (hwc, names), classes=["dog", "cat"])
    assert load_dataset("given_order").labels.tolist() == labels.tolist()
    # tiny images whose layout reads both ways: channels last in NumPy, first in torch, as each stores them
    tiny_hwc = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    register("tiny_numpy", tiny_hwc)
    register("tiny_torch", torch.from_numpy(tiny_hwc).permute(0, 3, 1, 2).contiguous())
    assert load_dataset("tiny_numpy").images[0, :, 0, 0].tolist() == [0, 1, 2]
    assert torch.equal(load_dataset("tiny_numpy").images, load_dataset("tiny_torch").images)
    register("two", [hwc[0], hwc[1]])  # a list of two images, not an (images, labels) pair
    assert torch.equal(load_dataset("two").images, chw[:2]) and load_dataset("two").labels is None
    read_only = hwc.copy()
    read_only.flags.writeable = False  # np.load(mmap_mode="r") gives such arrays
    register("read_only", (read_only, labels))
    assert torch.equal(load_dataset("read_only").images, chw)


def test_float_pixels_are_rounded_to_the_nearest_byte(register):
    """Floats in [0, 1] become uint8 by rounding, as PIL does, not by truncation."""
    images = torch.tensor([0.999, 0.5, 0.2, 0.0]).view(4, 1, 1, 1).expand(4, 3, 4, 4)
    register("floats", (images, [0, 1, 0, 1]))
    assert load_dataset("floats").images[:, 0, 0, 0].tolist() == [255, 128, 51, 0]  # 254.7, 127.5 (to even), 51.0


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


def test_images_of_several_sizes_are_each_resized_as_a_folders_are(register, tmp_path):
    """A dataset of photos of several sizes (Caltech-101, Food-101, ...) registers as it is: each image is resized
    and centre-cropped alone, to the same pixels a folder of those images gives."""
    sizes = [(12, 16), (20, 9), (8, 8), (31, 17)]
    images = [pixels(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    for i, image in enumerate(images):
        path = tmp_path / "tree" / "train" / f"c{i % 2}" / f"{i // 2}.png"  # listed c0/0, c0/1, c1/0, c1/1
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    order = [0, 2, 1, 3]  # the folder's listing order
    register("photos", Items([images[i] for i in order], [0, 0, 1, 1], classes=["c0", "c1"]))
    got = load_dataset("photos", resolution=8, crop_ratio=0.875)
    assert torch.equal(got.images, load_dataset(str(tmp_path / "tree"), resolution=8, crop_ratio=0.875).images)
    register("listed", ([images[i] for i in order], [0, 0, 1, 1]))  # a list of arrays of several sizes: the same
    assert torch.equal(load_dataset("listed", resolution=8, crop_ratio=0.875).images, got.images)
    with pytest.raises(DataError, match="images are of several sizes; set data.resolution"):
        load_dataset("photos")
    register("other", Items([images[i] for i in order][::-1], [1, 1, 0, 0], classes=["c0", "c1"]))
    assert slimssl.data.registry.recorded_source("photos") != slimssl.data.registry.recorded_source("other")


def test_a_run_on_registered_images_is_the_run_on_the_same_images_as_files(register, tmp_path, monkeypatch):
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
    recorded = runs["registered"].results["protocols"]["knn"]["data"]
    assert recorded.startswith("registered:mine@")
    assert f"source: {recorded}" in (runs["registered"].run_dir / "config.yaml").read_text()

    run = runs["registered"].run_dir
    assert [row["knn_top1"] for row in slimssl.knn(run, save=False)] == knn[1]
    with pytest.raises(UsageError, match="'registered:mine@.*' is a dataset held in memory"):
        slimssl.knn(run, loader="stream", save=False)
    slimssl.unregister_dataset("mine")  # as in another process, where a folder bears the name: never read
    shutil.copytree(tmp_path / "tree", tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="names images registered in Python, and no dataset 'mine' is registered in "
                                        "this process; register the same images first.*slimssl --import FILE"):
        slimssl.knn(run, save=False)
    register("mine", (train[::-1], train_labels), (test, test_labels), classes=["c0", "c1"])  # other images
    with pytest.raises(DataError, match="names other images than the dataset 'mine' registered now"):
        slimssl.knn(run, save=False)
    with pytest.raises(DataError, match="names other images"):
        slimssl.pretrain(None, run, resume=True, overrides=["train.epochs=2"])
    with pytest.raises(DataError, match="names other images"):  # the recorded name, given: the same images
        slimssl.knn(run, data=recorded, save=False)
    assert slimssl.knn(run, data="mine", save=False)  # these images, asked for by name
    register("mine", (train, train_labels), (test, test_labels), classes=["c0", "c1"])  # the same again
    assert [row["knn_top1"] for row in slimssl.knn(run, save=False)] == knn[1]


def test_a_streamed_run_refuses_registered_images(register, tmp_path):
    register("mine", pixels(8))
    cfg = tiny("byol")
    cfg["data"] = {"source": "mine", "resolution": 8, "loader": "stream"}
    with pytest.raises(DataError, match="'registered:mine@.*' is a dataset held in memory.*data.loader=memory"):
        slimssl.pretrain(cfg, tmp_path / "run")


@pytest.mark.parametrize("args, kwargs, match", [
    (("cifar10", np.zeros((2, 8, 8, 3), np.uint8)), {}, "not a built-in name"),
    (("a/b", np.zeros((2, 8, 8, 3), np.uint8)), {}, "no '.', '/' or ':'"),
    (("x.zip", np.zeros((2, 8, 8, 3), np.uint8)), {}, "no '.', '/' or ':'"),
    (("bad", (np.full((2, 8, 8, 3), -0.5), [0, 1])), {}, "in \\[0, 1\\] and not normalised.*-0.5 to -0.5"),
    (("bad", np.full((2, 8, 8, 3), 300, np.int32)), {}, "in \\[0, 255\\] \\(or uint16\\), got values from 300 to 300"),
    (("bad", np.zeros((2, 8, 8, 2), np.uint8)), {}, "1, 3 or 4 channels"),
    (("bad", np.zeros((8, 8), np.uint8)), {}, "expected images as"),
    (("bad", np.array(5, np.uint8)), {}, "expected images as"),  # 0-d: no shape to read a layout from
    (("bad", (np.zeros((2, 8, 8, 3), np.uint8), [0, 1, 1])), {},
     "expected 2 labels \\(one per image\\), got shape \\(3,\\)"),
    (("bad", (np.zeros((2, 8, 8, 3), np.uint8), [0.0, 1.0])), {}, "integers from 0"),
    (("bad", (np.zeros((2, 8, 8, 3), np.uint8), [0, -1])), {}, "from -1"),
    (("bad", (np.zeros((2, 8, 8, 3), np.uint8), [0, 2])), {"classes": ["a", "b"]}, "label 2 but 2 class names"),
    (("bad", [(np.zeros((8, 8, 3), np.uint8), 0), np.zeros((8, 8, 3), np.uint8)]), {}, "item 1 has no label"),
    (("bad", Items([], [])), {}, "the dataset is empty"),
    (("bad", "a folder"), {}, "got the path .a folder.; a folder or .zip of images is a data source"),
    (("bad", 3), {}, "expected \\(images, labels\\), images, or a map-style dataset"),
    (("bad", None), {"test": np.zeros((2, 8, 8, 3), np.uint8)}, "dataset 'bad': train is required"),
    (("bad", np.zeros((32, 32, 3), np.uint8)), {}, "shape \\(32, 32, 3\\) looks like one image"),
    (("bad", np.full((2, 8, 8, 3), np.nan)), {}, "must be finite"),
    (("bad", torch.zeros(3, 32, 32)), {}, "looks like one image; expected a batch \\[N, C, H, W\\]; grey images as"),
    (("bad", np.array([np.zeros((8, 8, 3)), np.zeros((9, 9, 3))], dtype=object)), {}, "a NumPy array of objects"),
    (("bad", Items(np.zeros((2, 8, 8, 3), np.uint8), [0, 1], classes=["a", "b"])),
     {"test": Items(np.zeros((2, 8, 8, 3), np.uint8), [0, 1], classes=["b", "a"])},
     "name their classes differently \\(train: a, b; test: b, a\\)"),
    (("bad", (np.zeros((2, 8, 8, 3), np.uint8), ["a", "c"])), {"classes": ["a", "b"]}, "labels \\['c'\\] are not"),
    (("bad", np.zeros((2, 8, 8, 3), np.uint8)), {"classes": "ab"}, "a list of distinct names"),
    (("bad", [(np.zeros((8, 8, 3), np.uint8), 0, "x")] * 2), {}, "an \\(image, label\\) pair, got 3 values"),
    (("bad", [{"pixels": np.zeros((8, 8, 3), np.uint8)}] * 2), {}, "needs an 'image' \\(or 'img'\\) key"),
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
                "train.batch_size=8", "--out", "run", "--max-steps", "1", "--device", "cpu"]
    try:
        with caplog.at_level(logging.INFO, logger="slimssl"):
            assert main(["--import", "my_data.py", "pretrain", *tiny_run]) == 0
        assert "continue with: slimssl --import my_data.py pretrain --resume run" in caplog.text
    finally:
        slimssl.unregister_dataset("mine")
        sys.modules.pop("my_data", None)  # as in a new process
    assert main(["knn", "run", "--no-save"]) == 2
    assert "names images registered in Python, and no dataset 'mine' is registered" in caplog.text
    try:
        assert main(["--import", "my_data.py", "pretrain", "--resume", "run", "--max-steps", "2"]) == 0
    finally:
        slimssl.unregister_dataset("mine")
        sys.modules.pop("my_data", None)


def test_a_data_path_under_home_is_recorded_absolute(tmp_path, monkeypatch):
    from slimssl.data.registry import absolute_source

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path / "imgs")
    assert absolute_source("~/imgs") == str(tmp_path / "imgs")
    assert absolute_source("~/missing") == "~/missing"  # left as given, for its error to name it
