"""The ``whole`` training crop of fine-tuning and of the augmented linear probe: RandomResizedCrop of each whole
picture of a streamed split (the papers' ImageNet protocols), where ``resized`` crops the evaluation image."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import slimssl
from slimssl.checkpoint import save_checkpoint
from slimssl.cli import main
from slimssl.config import config_from_dict
from slimssl.data.datasets import load_dataset
from slimssl.data.eval_images import StreamedImages
from slimssl.errors import UsageError
from slimssl.eval.finetune import finetune_subnet
from slimssl.eval.linear import linear_probe_subnets, train_linear_probe
from slimssl.models.build import build_supernet

RES = 12
NORM = dict(mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSSL_CACHE", str(tmp_path / "cache"))


def _framed_folder(root, per_class: int = 6):
    """PNGs of 48 x 36: a class colour in the centre half (what crop ratio 0.5 keeps), a white frame around it."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for split in ("train", "test"):
        for label, colour in enumerate(colours):
            for i in range(per_class):
                pixels = np.full((36, 48, 3), 255, dtype=np.uint8)
                pixels[9:27, 12:36] = colour
                pixels[9:27, 12:36, i % 3] += 10 * i  # images of a class differ
                path = root / split / f"c{label}" / f"{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    return root


def _streamed(root, split: str = "train", workers: int = 0, crop_ratio: float = 0.5) -> StreamedImages:
    return StreamedImages(str(root), split, resolution=RES, workers=workers, crop_ratio=crop_ratio)


def _config(source, loader: str = "stream", train_crop: str = "pad"):
    return config_from_dict({"name": "tiny", "model": {"arch": "resnet18", "depths": [1, 1, 1, 1], "base_width": 4,
                                                       "stem": "cifar"},
                             "menu": {"widths": [1.0, 0.5]},
                             "data": {"source": str(source), "resolution": RES, "loader": loader, "workers": 0,
                                      "mean": NORM["mean"], "std": NORM["std"]},
                             "eval": {"knn_k": 5, "batch_size": 16, "crop_ratio": 0.5, "train_crop": train_crop}})


def _supernet():
    torch.manual_seed(0)
    return build_supernet(_config("unused")).eval()


def _is_white(images: torch.Tensor) -> torch.Tensor:
    return (images >= 250).all(dim=1)  # [B, H, W]: pixels of the frame


def test_whole_crops_reach_the_frame_that_the_evaluation_image_leaves_out(tmp_path):
    train = _streamed(_framed_folder(tmp_path / "d"))
    order = torch.arange(len(train)).repeat(4)  # every image, four draws each
    centres = torch.cat(list(train.batches(8)))
    crops = torch.cat(list(train.random_crops(8, order, seed=3)))
    assert crops.shape == (len(order), 3, RES, RES) and crops.dtype == torch.uint8
    assert not _is_white(centres).any()  # crop ratio 0.5: the centre half only
    assert _is_white(crops).any(dim=(1, 2)).float().mean() > 0.3  # many crops take in some of the frame
    assert not torch.equal(crops[:len(train)], crops[len(train):2 * len(train)])  # new draws for each position
    # the crop of the n-th image depends on (seed, n) only: not on the batch size, and the same again
    assert torch.equal(torch.cat(list(train.random_crops(5, order, seed=3))), crops)
    assert not torch.equal(torch.cat(list(train.random_crops(8, order, seed=4))), crops)


def test_whole_crops_are_the_same_with_loader_workers(tmp_path):
    root = _framed_folder(tmp_path / "d", per_class=3)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    alone = torch.cat(list(_streamed(root).random_crops(4, order, seed=1)))
    assert torch.equal(torch.cat(list(_streamed(root, workers=2).random_crops(4, order, seed=1))), alone)


def test_the_probe_and_fine_tuning_train_on_whole_crops_of_a_streamed_split_only(tmp_path):
    root = _framed_folder(tmp_path / "d")
    supernet = _supernet()
    train, test = _streamed(root), _streamed(root, "test")
    options = dict(augment=True, epochs=2, batch_size=8, **NORM)
    whole = train_linear_probe(supernet, train, test, train_crop="whole", **options)
    again = train_linear_probe(supernet, _streamed(root, workers=2), test, train_crop="whole", **options)
    resized = train_linear_probe(supernet, train, test, train_crop="resized", **options)
    assert whole.results == again.results
    assert all(torch.equal(a, b) for a, b in zip(whole.heads.parameters(), again.heads.parameters()))
    assert not torch.equal(whole.heads.state_dict()["heads.w1p0_d1-1-1-1.weight"],
                           resized.heads.state_dict()["heads.w1p0_d1-1-1-1.weight"])

    tuned = finetune_subnet(supernet, "0.5", train, test, label_fraction=0.5, epochs=2, train_crop="whole", **NORM)
    assert tuned["recipe"]["crop"] == "whole" and tuned["recipe"]["steps"] == 2  # 9 labelled images: 1 batch an epoch
    assert finetune_subnet(supernet, "0.5", _streamed(root, workers=2), test, label_fraction=0.5, epochs=2,
                           train_crop="whole", **NORM)["top1"] == tuned["top1"]

    in_memory = load_dataset(str(root), "train", resolution=RES, crop_ratio=0.5)
    with pytest.raises(UsageError, match="train_crop 'whole'.*streamed train split keeps: pass loader='stream'"):
        linear_probe_subnets(supernet, in_memory, test, train_crop="whole", **options)
    with pytest.raises(UsageError, match="train_crop 'whole'.*streamed train split"):
        finetune_subnet(supernet, "0.5", in_memory, test, label_fraction=0.5, train_crop="whole")


def _checkpoint(path, source, **config):
    cfg = _config(source, **config)
    save_checkpoint(path, {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names,
                           "model": {"backbone." + k: v for k, v in _supernet().state_dict().items()}})
    return path


def test_cli_whole_crop_is_recorded_and_refused_for_a_split_decoded_in_memory(tmp_path, caplog, monkeypatch):
    root = _framed_folder(tmp_path / "d", per_class=3)
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", root)
    common = ["--epochs", "1", "--device", "cpu", "--json"]
    assert main(["linear", str(ckpt), "--augment", "--train-crop", "whole", *common]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["protocols"]["linear_aug"]["train_crop"] == "whole"
    decoded = []
    monkeypatch.setattr("slimssl.data.eval_images.load_dataset", lambda *a, **k: decoded.append(a))
    assert main(["linear", str(ckpt), "--augment", "--train-crop", "whole", "--loader", "memory", *common]) == 2
    assert "--train-crop whole crops each whole picture, which only a streamed train split keeps: add --loader " \
        "stream" in caplog.text
    caplog.clear()
    assert main(["finetune", str(ckpt), "--subnet", "0.5", "--label-fraction", "0.5", "--train-crop", "whole",
                 "--loader", "memory", *common]) == 2
    assert "--loader stream" in caplog.text and decoded == []  # refused before any image was decoded


def test_the_configs_whole_crop_falls_back_to_resized_for_a_split_decoded_in_memory(tmp_path, caplog):
    root = _framed_folder(tmp_path / "d", per_class=3)
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", root, loader="memory", train_crop="whole")
    with caplog.at_level(logging.INFO, logger="slimssl"):
        rows = slimssl.linear_probe(ckpt, augment=True, epochs=1, device="cpu")
    assert rows and "taken from the evaluation images (resized)" in caplog.text
    settings = json.loads((tmp_path / "run" / "results.json").read_text())["protocols"]["linear_aug"]
    assert settings["train_crop"] == "resized"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slimssl"):
        slimssl.linear_probe(ckpt, augment=True, epochs=1, device="cpu", loader="stream")
    assert "resized" not in caplog.text
    settings = json.loads((tmp_path / "run" / "results.json").read_text())["protocols"]["linear_aug"]
    assert settings["train_crop"] == "whole"
