"""Streamed evaluation (--loader stream): the same images and the same kNN / linear-probe numbers as the in-memory
path, on a folder and on a .zip, with named errors for unreadable files and built-in datasets."""

from __future__ import annotations

import json
import logging
import pathlib
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from slimssl.checkpoint import load_checkpoint, save_checkpoint
from slimssl.cli import main
from slimssl.config import config_from_dict
from slimssl.data.datasets import load_dataset
from slimssl.data.files import DataError
from slimssl.data.eval_images import StreamedImages, as_eval_images, load_eval_split
from slimssl.eval.finetune import evaluate_classifier
from slimssl.eval.knn import knn_eval_subnets
from slimssl.eval.linear import linear_probe_subnets
from slimssl.eval.recalibrate import recalibration_images, subnet_models
from slimssl.models.build import build_supernet

RES = 12
CLASSES = ("blue", "green", "red")
SIZES = [(20, 20), (40, 24), (22, 36), (31, 17), (28, 28), (24, 40)]  # (width, height): other shapes and sides
NORM = dict(mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSSL_CACHE", str(tmp_path / "cache"))  # in-memory loads must really decode


def _image(label: int, seed: int, width: int, height: int) -> Image.Image:
    """A class colour plus a gradient and noise, so classes are separable but images differ."""
    g = np.random.default_rng(seed)
    colour = np.full(3, 40.0)
    colour[2 - label] = 200.0
    ramp = np.linspace(0, 60, width)[None, :, None] * g.random(3)
    pixels = colour + ramp + g.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _folder(root, per_class: dict[str, int] | None = None):
    """An ImageFolder of JPEGs with train/ and test/ splits, three classes, mixed sizes and aspect ratios."""
    per_class = per_class or {"train": 12, "test": 6}
    for split, n in per_class.items():
        for label, name in enumerate(CLASSES):
            for i in range(n):
                w, h = SIZES[(i + label) % len(SIZES)]
                path = root / split / name / f"{i:03d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(label, 1000 * label + i + (500 if split == "test" else 0), w, h).save(path, quality=90)
    return root


def _zip(folder, path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(folder.rglob("*.jpg")):
            z.write(f, f"data/{f.relative_to(folder)}")  # one wrapping folder, as zips often have
    return path


def _config(source, loader: str = "stream", bn: str = "private"):
    return config_from_dict({"name": "tiny", "model": {"arch": "resnet18", "depths": [1, 1, 1, 1], "base_width": 4,
                                                       "stem": "cifar", "bn": bn},
                             "menu": {"widths": [1.0, 0.5]},
                             "data": {"source": str(source), "resolution": RES, "loader": loader, "workers": 0,
                                      "mean": NORM["mean"], "std": NORM["std"]},
                             "eval": {"knn_k": 5, "batch_size": 16}})


def _supernet(bn: str = "private"):
    torch.manual_seed(0)
    return build_supernet(_config("unused", bn=bn)).eval()


def _checkpoint(path, source, loader: str = "stream", bn: str = "private"):
    cfg = _config(source, loader, bn)
    save_checkpoint(path, {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names,
                           "model": {"backbone." + k: v for k, v in _supernet(bn).state_dict().items()}})
    return path


def _both(source, split: str, workers: int = 0, **kw):
    memory = load_dataset(str(source), split, resolution=RES, **kw)
    streamed = StreamedImages(str(source), split, resolution=RES, workers=workers, **kw)
    return memory, streamed


# ---- the images ----------------------------------------------------------------------------------------

def test_streamed_images_equal_decoded_ones(tmp_path):
    root = _folder(tmp_path / "data")
    memory, streamed = _both(root, "train", workers=2)  # decoded in worker processes
    assert len(streamed) == len(memory) == 36 and streamed.resolution == memory.resolution == RES
    assert streamed.classes == memory.classes == list(CLASSES) and torch.equal(streamed.labels, memory.labels)
    assert streamed.name == "data" and streamed.split == "train"
    batches = list(streamed.batches(10))
    assert [len(b) for b in batches] == [10, 10, 10, 6] and batches[0].dtype == torch.uint8
    assert torch.equal(torch.cat(batches), memory.images)  # bit for bit, whatever the aspect ratio
    order = torch.tensor([35, 0, 7, 7, 20])
    assert torch.equal(streamed.take(order), memory.take(order))
    pieces = list(streamed.batches(2, order))
    assert [len(b) for b in pieces] == [2, 2, 1] and torch.equal(torch.cat(pieces), memory.take(order))
    assert streamed.take(torch.tensor([], dtype=torch.int64)).shape == (0, 3, RES, RES)
    with pytest.raises(IndexError, match="out of range"):
        streamed.take(torch.tensor([36]))



def test_evaluation_workers_outlive_a_stop_signal_to_the_process_group(tmp_path):
    """Ctrl-C or a preemption signals every process: a pretraining's kNN finishes (and the stop is said once, by
    the training process), so its decoding workers leave the signal to it."""
    import multiprocessing
    import os
    import signal

    root = _folder(tmp_path / "data")
    memory, streamed = _both(root, "train", workers=2)
    others = set(multiprocessing.active_children())
    batches = streamed.batches(10)
    got = [next(batches)]
    workers = [child for child in multiprocessing.active_children() if child not in others]
    assert len(workers) >= 2
    stops = [signal.SIGTERM, signal.SIGINT, *([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])]
    for worker in workers:
        for stop in stops:
            os.kill(worker.pid, stop)
    got.append(next(batches))
    assert all(worker.is_alive() for worker in workers)
    if os.path.exists(f"/proc/{workers[0].pid}/status"):  # Linux: the workers ignore them, not only hold them back
        for worker in workers:
            lines = pathlib.Path(f"/proc/{worker.pid}/status").read_text().splitlines()
            status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
            ignored, blocked = int(status["SigIgn"], 16), int(status["SigBlk"], 16)
            for stop in stops:
                assert ignored >> (stop - 1) & 1 and not blocked >> (stop - 1) & 1
    got += list(batches)  # the last batch closes the loader, which stops the workers
    assert torch.equal(torch.cat(got), memory.images) and not any(worker.is_alive() for worker in workers)


@pytest.mark.parametrize("other_thread", [False, True])
def test_a_ctrl_c_as_the_workers_start_stops_them_with_the_evaluation(tmp_path, monkeypatch, other_thread):
    """Ctrl-C right as an evaluation's workers started: its KeyboardInterrupt came before there was an iterator to
    stop them with (held back by the signal mask), or, with another thread alive to take the signal (tqdm's
    monitor after any pretraining), inside the loader's set-up: workers left running in the caller's process."""
    import multiprocessing
    import os
    import signal
    import threading

    from torch.utils.data import dataloader

    root = _folder(tmp_path / "data")
    _, streamed = _both(root, "train", workers=2)
    if other_thread:
        done = threading.Event()
        threading.Thread(target=done.wait, daemon=True).start()
    start = dataloader._MultiProcessingDataLoaderIter._reset

    def ctrl_c_once_started(self, loader, first_iter=False):
        if first_iter:
            os.kill(os.getpid(), signal.SIGINT)
        return start(self, loader, first_iter)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_reset", ctrl_c_once_started)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    others = set(multiprocessing.active_children())
    try:
        with pytest.raises(KeyboardInterrupt) as held:  # held, as a notebook holds it (with its frames)
            list(streamed.batches(10))
        left = [child for child in multiprocessing.active_children() if child not in others]
        del held
    finally:
        signal.signal(signal.SIGINT, before)
        if other_thread:
            done.set()
    assert left == []  # while the exception was still held


def test_a_crop_ratio_keeps_the_centre_and_both_loaders_agree(tmp_path):
    """eval.crop_ratio R: the shorter side resized to resolution / R, the centre kept; the same pixels whether
    decoded in memory or streamed."""
    from slimssl.data.decode import decode_full, resize_center_crop

    root = _folder(tmp_path / "data", {"train": 1, "test": 2})
    memory, streamed = _both(root, "test", workers=1, crop_ratio=0.6)
    assert memory.resolution == streamed.resolution == RES
    assert torch.equal(streamed.take(torch.arange(len(streamed))), memory.images)
    first = root / "test" / CLASSES[0] / "000.jpg"  # 20 x 20: resized to 20 (12 / 0.6), the centre 12 kept
    full = decode_full(first.read_bytes())
    assert torch.equal(memory.images[0], full[:, 4:16, 4:16])
    assert torch.equal(memory.images[0], resize_center_crop(full[None], RES, 0.6)[0])
    assert not torch.equal(memory.images, load_dataset(str(root), "test", resolution=RES).images)
    with pytest.raises(DataError, match="crop_ratio"):
        StreamedImages(str(root), "test", resolution=RES, crop_ratio=1.5)
    with pytest.raises(DataError, match="crop_ratio"):
        load_dataset(str(root), "test", crop_ratio=0.5)  # no resolution to crop to

def test_zip_streams_the_same_images(tmp_path):
    folder = _folder(tmp_path / "data")
    archive = _zip(folder, tmp_path / "data.zip")
    memory, streamed = _both(archive, "test", workers=1)
    assert torch.equal(streamed.take(torch.arange(len(streamed))), memory.images)
    assert torch.equal(streamed.labels, memory.labels)
    assert torch.equal(memory.images, load_dataset(str(folder), "test", resolution=RES).images)


def test_zip_members_of_every_compression_are_read_without_parsing_the_zip_again(tmp_path, monkeypatch):
    """A streamed zip's members are read from the offsets listed once (at ImageNet's size every worker parsed
    the zip's index again: ~15 s and ~1 GB each): stored and deflated members directly, others through zipfile.
    A damaged member is an unreadable file, named."""
    import slimssl.data.files as files

    folder = _folder(tmp_path / "data", {"train": 2, "test": 2})
    archive = tmp_path / "mixed.zip"
    methods = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
    with zipfile.ZipFile(archive, "w") as z:
        for i, f in enumerate(sorted(folder.rglob("*.jpg"))):
            z.write(f, str(f.relative_to(folder)), compress_type=methods[i % len(methods)])
    memory, streamed = _both(archive, "test")
    opened = []
    real_open_zip = files.open_zip
    monkeypatch.setattr(files, "open_zip", lambda path, *rest: opened.append(path) or real_open_zip(path, *rest))
    assert torch.equal(streamed.take(torch.arange(len(streamed))), memory.images)
    stored, deflated = [i for i in range(len(streamed)) if int(streamed.files.members.rows[i, 2]) in (0, 8)][:2]
    assert opened == [str(archive)]  # once, in this process, for the bzip2 and lzma members only
    opened.clear()
    assert streamed.files.read_at(stored) and streamed.files.read_at(deflated) and not opened

    # damage the deflated member's compressed bytes: its CRC (or inflate) fails, and the file is named
    offset, size = (int(v) for v in streamed.files.members.rows[deflated, :2])
    data = bytearray(archive.read_bytes())
    name_length, extra_length = (int.from_bytes(data[offset + at:offset + at + 2], "little") for at in (26, 28))
    data[offset + 30 + name_length + extra_length + size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    damaged = StreamedImages(str(archive), "test", resolution=RES)
    with pytest.raises(DataError, match=re.escape(f"cannot decode {streamed.files.path(deflated)} (")):
        damaged.take(torch.arange(len(damaged)))


def test_a_stored_zip_member_whose_bytes_fail_its_crc_is_unreadable_in_both_loaders(tmp_path):
    """A PPM has no checksum of its own: only the zip's CRC finds a changed pixel byte (bit rot in a copy)."""
    header, pixels = b"P6\n4 4\n255\n", bytes([77]) * 48
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr("train/a/0.ppm", header + pixels)
        z.writestr("train/b/1.ppm", header + bytes([99]) * 48)
    data = bytearray(archive.read_bytes())
    data[data.index(header + pixels) + len(header) + 10] = 78  # the stored CRC is of the bytes before
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"0\.ppm"):
        StreamedImages(str(archive), "train", resolution=4).take(torch.arange(2))
    with pytest.raises(DataError, match=r"0\.ppm"):
        load_dataset(str(archive), "train", resolution=4)


def test_threads_reading_a_zip_together_share_one_handle(tmp_path, monkeypatch):
    """Two threads making their first reads together opened the zip twice, and the second handle replaced the
    first under its reader (a bad file descriptor, or on Windows the wrong bytes)."""
    import threading
    import time

    import slimssl.data.files as files

    folder = _folder(tmp_path / "data", {"train": 2, "test": 1})
    archive = _zip(folder, tmp_path / "data.zip")
    streamed = StreamedImages(str(archive), "test", resolution=RES)
    opened, real_open = [], open

    def slow_open(*args, **kwargs):  # a slow first open: both threads ask before either has its handle
        opened.append(args[0])
        time.sleep(0.2)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(files, "open", slow_open, raising=False)
    got = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, streamed.files.read_at(i))) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with zipfile.ZipFile(archive) as z:
        expected = [z.read(f"data/test/{CLASSES[i]}/000.jpg") for i in (0, 1)]
    assert [got.get(0), got.get(1)] == expected and opened == [str(archive)]


def test_a_streamed_zip_read_in_this_process_is_closed_with_its_split(tmp_path):
    """An evaluation without workers read the zip through a handle of its own, which was left to the garbage
    collector: a ResourceWarning ("unclosed file") at the end of every such evaluation."""
    import gc
    import warnings

    archive = _zip(_folder(tmp_path / "data", {"train": 2, "test": 1}), tmp_path / "data.zip")
    streamed = StreamedImages(str(archive), "test", resolution=RES)
    assert streamed.take(torch.arange(len(streamed))).shape[0] == len(CLASSES)
    handle = streamed.files.members._file
    assert handle is not None and not handle.closed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del streamed
        gc.collect()
    assert handle.closed and not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_reader_closes_the_zip_handle_it_inherited_and_the_parent_reads_on(tmp_path):
    """A forked loader worker opens a handle of its own; the one it inherited was dropped unclosed (a
    ResourceWarning in every worker). Closing the child's copy must leave the parent's handle readable."""
    import os

    archive = _zip(_folder(tmp_path / "data", {"train": 2, "test": 1}), tmp_path / "data.zip")
    streamed = StreamedImages(str(archive), "test", resolution=RES)
    first = streamed.files.read_at(0)
    inherited = streamed.files.members._file
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it read the same bytes and closed its inherited copy
        try:
            same = streamed.files.read_at(0) == first and inherited.closed and not streamed.files.members._file.closed
            os.write(write, b"1" if same else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"1"
    assert not inherited.closed and streamed.files.read_at(0) == first


def test_tensors_and_datasets_share_the_interface(tmp_path):
    images = torch.randint(0, 256, (5, 3, RES, RES), dtype=torch.uint8)
    wrapped = as_eval_images(images)
    assert len(wrapped) == 5 and wrapped.labels is None and wrapped.resolution == RES
    assert torch.equal(torch.cat(list(wrapped.batches(2))), images)
    ds = load_eval_split("fake", "test", loader="memory", resolution=RES, fake_size=8)
    assert as_eval_images(ds) is ds
    with pytest.raises(DataError, match="built-in"):
        load_eval_split("fake", "test", loader="stream", resolution=RES)
    with pytest.raises(DataError, match="unknown loader"):
        load_eval_split("fake", "test", loader="disk", resolution=RES)


# ---- the protocols -------------------------------------------------------------------------------------

def test_knn_linear_and_recalibration_agree_across_loaders(tmp_path):
    root = _folder(tmp_path / "data")
    (train, test), (s_train, s_test) = zip(_both(root, "train"), _both(root, "test"))
    supernet = _supernet()
    kw = dict(resolution=RES, batch_size=16, **NORM)
    knn = knn_eval_subnets(supernet, train, test, k=5, temperature=0.1, **kw)
    assert knn == knn_eval_subnets(supernet, s_train, s_test, k=5, temperature=0.1, **kw)
    assert max(knn.values()) > 50.0  # chance: 33

    probe = dict(epochs=3, batch_size=8, feature_batch_size=16, **NORM)
    for options in ({}, {"augment": True}):
        assert linear_probe_subnets(supernet, train, test, **probe, **options) == \
               linear_probe_subnets(supernet, s_train, s_test, **probe, **options)

    shared = _supernet("shared")
    specs = list(shared.menu)
    recal = dict(recalibrate_batches=2, batch_size=8, resolution=RES, **NORM)
    for spec, a, b in zip(specs, subnet_models(shared, specs, train, **recal).values(),
                          subnet_models(shared, specs, s_train, **recal).values()):
        assert torch.equal(a.layer1[0].bn1.bn.running_mean, b.layer1[0].bn1.bn.running_mean)
    old_style = list(recalibration_images(train.images, 2, 8, RES, NORM["mean"], NORM["std"], "cpu"))
    assert all(torch.equal(x, y) for x, y in zip(old_style, recalibration_images(s_train, 2, 8, RES, NORM["mean"],
                                                                                 NORM["std"], "cpu")))
    model = supernet.export(specs[1])
    assert evaluate_classifier(model, test, test.labels, resolution=RES, **NORM) == \
           evaluate_classifier(model, s_test, s_test.labels, resolution=RES, **NORM)


def _cli_json(capsys, argv: list[str]) -> list[dict]:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_streamed_knn_linear_and_finetune_match_memory(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    ckpt = str(_checkpoint(tmp_path / "model.pt", root))  # the config says data.loader: stream
    common = ["--json", "--device", "cpu", "--no-save"]
    streamed = _cli_json(capsys, ["knn", ckpt, *common, "--workers", "1"])
    assert streamed == _cli_json(capsys, ["knn", ckpt, *common, "--loader", "memory"])
    assert [r["subnet"] for r in streamed] == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1"]
    linear = ["linear", ckpt, *common, "--epochs", "2", "--batch-size", "8"]
    assert _cli_json(capsys, linear) == _cli_json(capsys, [*linear, "--loader", "memory"])
    finetune = ["finetune", ckpt, *common, "--subnet", "0.5", "--label-fraction", "0.25", "--epochs", "1",
                "--out", str(tmp_path / "ft.json")]
    assert _cli_json(capsys, finetune) == _cli_json(capsys, [*finetune, "--loader", "memory"])


@pytest.mark.parametrize("bn", ["private", "shared"])
def test_a_streamed_pretraining_measures_knn_as_slimssl_knn_does(tmp_path, capsys, bn):
    import slimssl
    from slimssl.train.loop import Trainer

    root = _folder(tmp_path / "data")
    cfg = _config(root, bn=bn).model_dump(mode="json")
    cfg["train"].update(batch_size=12, epochs=2, knn_every=1, device="cpu", precision="fp32", checkpoint_every=0)
    cfg["method"].update(proj_hidden=16, proj_dim=8, pred_hidden=16)
    run = tmp_path / "run"
    with Trainer(config_from_dict(cfg), run) as trainer:
        assert isinstance(trainer.knn_monitor.bank, StreamedImages) and trainer.train_data is None
        results = trainer.fit()
    during = {row["subnet"]: row["knn_top1"] for row in results["subnets"]}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # at random initialisation, after epoch 1 and at the end (epoch 2)
    assert [r["epoch"] for r in records if "knn_top1" in r] == [1, 2] and len(results["subnets"]) == 2
    assert all(row["knn_top1_random_init"] is not None for row in results["subnets"])
    assert results["protocols"]["knn"]["recalibrate_bn"] == (20 if bn == "shared" else 0)  # as asked
    # the standalone command, streaming the same splits, measures the final network alike
    after = {row["subnet"]: row["knn_top1"] for row in slimssl.knn(run, device="cpu", save=False)}
    assert during == after and all(v is not None for v in during.values())


def _corrupt_one_per_split(root):
    for split in ("train", "test"):
        (root / split / "green" / "001.jpg").write_bytes(b"not a jpeg")


def test_a_streamed_pretraining_finds_unreadable_kNN_files_at_its_first_kNN_not_when_built(tmp_path, monkeypatch):
    import slimssl
    from slimssl.data.eval_images import DecodedFiles
    from slimssl.train.loop import Trainer

    root = _folder(tmp_path / "data")
    _corrupt_one_per_split(root)
    cfg = _config(root).model_dump(mode="json")
    cfg["data"]["skip_unreadable"] = True
    cfg["train"].update(batch_size=12, epochs=1, device="cpu", precision="fp32")
    cfg["method"].update(proj_hidden=16, proj_dim=8, pred_hidden=16)
    decoded, getitem = [], DecodedFiles.__getitem__
    monkeypatch.setattr(DecodedFiles, "__getitem__", lambda self, i: decoded.append(i) or getitem(self, i))
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run")
    assert decoded == [] and len(trainer.knn_monitor.bank) == 36  # built without decoding an image
    with trainer:
        results = trainer.fit()
    assert (len(trainer.knn_monitor.bank), len(trainer.knn_monitor.queries)) == (35, 17)  # both files left out
    during = {row["subnet"]: row["knn_top1"] for row in results["subnets"]}
    after = {row["subnet"]: row["knn_top1"] for row in slimssl.knn(tmp_path / "run", device="cpu", save=False,
                                                                   skip_unreadable=True)}
    assert during == after


def test_train_knn_false_measures_no_knn_during_pretraining(tmp_path, caplog):
    from slimssl.train.loop import Trainer

    cfg = _config(_folder(tmp_path / "data"), loader="memory").model_dump(mode="json")
    cfg["train"].update(batch_size=12, epochs=1, knn=False, device="cpu", precision="fp32")
    with caplog.at_level(logging.INFO, logger="slimssl"), Trainer(config_from_dict(cfg), tmp_path / "run") as trainer:
        assert trainer.knn_monitor is None
        results = trainer.fit()
    assert "train.knn is false: no kNN evaluation during pretraining" in caplog.text
    assert [row["knn_top1"] for row in results["subnets"]] == [None, None] and "protocols" not in results



def test_cli_evaluates_at_the_configs_crop_ratio_or_the_flags(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    run = tmp_path / "run"
    ckpt = _checkpoint(run / "checkpoints" / "last.pt", root, loader="memory")
    knn = ["knn", str(run), "--json", "--device", "cpu"]
    default = _cli_json(capsys, knn)
    protocols = json.loads((run / "results.json").read_text())["protocols"]
    assert protocols["knn"]["crop_ratio"] == 1.0 and protocols["knn"]["resolution"] == RES

    cropped = _cli_json(capsys, [*knn, "--crop-ratio", "0.5", "--loader", "stream"])
    assert cropped != default  # other pixels: the centre half of each image
    assert json.loads((run / "results.json").read_text())["protocols"]["knn"]["crop_ratio"] == 0.5
    data = load_checkpoint(ckpt)  # the config's eval.crop_ratio is the default
    data["config"].eval.crop_ratio = 0.5
    save_checkpoint(ckpt, {**{k: v for k, v in data.items() if k not in ("format", "version")},
                           "config": data["config"].model_dump(mode="json")})
    assert _cli_json(capsys, [*knn, "--no-save"]) == cropped
    assert _cli_json(capsys, [*knn, "--no-save", "--crop-ratio", "1"]) == default

    with pytest.raises(SystemExit) as exit_info:
        main([*knn, "--crop-ratio", "0"])
    assert exit_info.value.code == 2 and "--crop-ratio" in capsys.readouterr().err

def test_cli_streams_a_zip_and_recalibrates(tmp_path, capsys):
    archive = _zip(_folder(tmp_path / "data"), tmp_path / "data.zip")
    ckpt = str(_checkpoint(tmp_path / "model.pt", archive, loader="memory", bn="shared"))
    knn = ["knn", ckpt, "--json", "--device", "cpu", "--no-save", "--recalibrate-bn", "1"]
    assert _cli_json(capsys, [*knn, "--loader", "stream", "--workers", "2"]) == _cli_json(capsys, knn)
    recal = ["recalibrate", ckpt, "--subnet", "0.5", "--batches", "1", "--device", "cpu", "--json"]
    _cli_json(capsys, [*recal, "--out", str(tmp_path / "a.pt"), "--loader", "stream"])
    _cli_json(capsys, [*recal, "--out", str(tmp_path / "b.pt")])
    a, b = (load_checkpoint(tmp_path / f"{n}.pt")["model"] for n in "ab")
    assert torch.equal(a["backbone.bn1.bn.running_mean"], b["backbone.bn1.bn.running_mean"])


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_an_evaluation_scans_its_data_once_and_the_next_one_again(tmp_path, capsys, monkeypatch, loader):
    from slimssl.data import files

    archive = _zip(_folder(tmp_path / "data"), tmp_path / "data.zip")
    ckpt = str(_checkpoint(tmp_path / "model.pt", archive, loader=loader))
    scans = []
    real_scan = files._scan_tree
    monkeypatch.setattr(files, "_scan_tree", lambda *args: scans.append(args) or real_scan(*args))
    knn = ["knn", ckpt, "--json", "--device", "cpu", "--no-save"]
    _cli_json(capsys, knn)
    assert len(scans) == 1  # the train and test splits come from one listing of the zip
    with zipfile.ZipFile(archive, "a") as z:  # a later command sees the data as it is then
        z.writestr("data/test/red/999.jpg", (tmp_path / "data" / "test" / "red" / "000.jpg").read_bytes())
    added = StreamedImages(str(archive), "test", resolution=RES)
    assert len(added) == 6 * len(CLASSES) + 1 and len(scans) == 2
    _cli_json(capsys, knn)
    assert len(scans) == 3


def test_the_runs_own_data_by_another_path_is_not_called_other_data(tmp_path, capsys, caplog, monkeypatch):
    root = _folder(tmp_path / "data")
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints" / "last.pt", root, loader="memory")  # data.source: the absolute path
    monkeypatch.chdir(tmp_path)
    _cli_json(capsys, ["knn", str(run), "--json", "--device", "cpu", "--data", "data"])  # relative: the same
    assert "not on the run's own data" not in caplog.text
    results = json.loads((run / "results.json").read_text())
    assert results["protocols"]["knn"]["data"] == str(root)  # spelt as the run's own: a report reads it as the same
    results["protocols"]["knn"]["data"] = "data"  # as files written before that spelt it: compared by file
    (run / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert main(["report", str(run)]) == 0 and "other data" not in capsys.readouterr().out
    _zip(root, tmp_path / "data.zip")
    _cli_json(capsys, ["knn", str(run), "--json", "--device", "cpu", "--data", "data.zip"])
    assert "knn numbers measured on data.zip, not on the run's own data" in caplog.text
    zipped = str(tmp_path / "data.zip")  # recorded as one spelling, whatever the folder a report runs from
    assert json.loads((run / "results.json").read_text())["protocols"]["knn"]["data"] == zipped
    assert main(["report", str(run)]) == 0 and f"knn on {zipped}" in capsys.readouterr().out
    _cli_json(capsys, ["knn", str(run), "--json", "--device", "cpu", "--subnet", "0.5"])  # one row on its own data
    report = main(["report", str(run)]) == 0 and capsys.readouterr().out
    assert f"): knn on {zipped}" not in report and f"w1p0_d1-1-1-1's knn on {zipped}" in report  # its others are


# ---- errors --------------------------------------------------------------------------------------------

def test_unreadable_file_is_named_or_skipped_like_in_memory(tmp_path, capsys, caplog):
    root = _folder(tmp_path / "data")
    bad = root / "test" / "green" / "002.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    streamed = StreamedImages(str(root), "test", resolution=RES, workers=1)
    with pytest.raises(DataError, match=f"cannot decode {bad}"):
        list(streamed.batches(4))
    ckpt = str(_checkpoint(tmp_path / "model.pt", root))
    assert main(["knn", ckpt, "--device", "cpu", "--no-save"]) == 2
    assert str(bad) in caplog.text and "evaluation commands: --skip-unreadable" in caplog.text
    for loader in ("stream", "memory"):  # the flag the message names does what it says
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="slimssl"):
            assert main(["knn", ckpt, "--device", "cpu", "--no-save", "--skip-unreadable", "--loader", loader,
                         "--workers", "0"]) == 0
        assert "002.jpg" in caplog.text  # the warning names the file it skipped or replaced

    with caplog.at_level(logging.WARNING, logger="slimssl"):
        memory, skipping = _both(root, "test", skip_unreadable=True)
    assert len(skipping) == len(memory) == 17 and "skipped 1 unreadable" in caplog.text
    assert torch.equal(skipping.take(torch.arange(17)), memory.images) and torch.equal(skipping.labels, memory.labels)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_evaluation_skips_unreadable_files_when_the_runs_config_says_so(tmp_path, loader):
    """A run pretrained with data.skip_unreadable is evaluated without --skip-unreadable given again."""
    from slimssl.eval.inputs import DataOptions

    root = _folder(tmp_path / "data", {"train": 2, "test": 2})
    _corrupt_one_per_split(root)
    cfg = _config(root, loader).model_dump(mode="json")
    cfg["data"]["skip_unreadable"] = True
    train, test = DataOptions().load_splits(config_from_dict(cfg))  # the loader and workers of the config
    assert train.labels.tolist() == test.labels.tolist() == [0, 0, 1, 2, 2]


def test_builtin_dataset_streams_never(tmp_path, capsys, caplog):
    ckpt = str(_checkpoint(tmp_path / "model.pt", "fake"))  # an (impossible) streaming config on built-in data
    assert main(["knn", ckpt, "--device", "cpu", "--no-save", "--loader", "stream"]) == 2
    assert "(--loader stream) reads an ImageFolder folder or .zip" in caplog.text and "'fake'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slimssl"):
        rows = _cli_json(capsys, ["knn", ckpt, "--device", "cpu", "--no-save", "--json"])
    assert len(rows) == 2 and "held in memory (built-in or registered): decoded in memory" in caplog.text
    with pytest.raises(SystemExit) as refused:  # argparse: exit 2 before anything loads
        main(["knn", ckpt, "--device", "cpu", "--no-save", "--workers", "-1", "--data", str(tmp_path)])
    assert refused.value.code == 2


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_test_split_with_other_classes_is_refused(tmp_path, loader, capsys, caplog):
    root = _folder(tmp_path / "data", {"train": 2, "test": 1})
    (root / "test" / "red").rename(root / "test" / "purple")  # labels of the test split would mean other classes
    ckpt = str(_checkpoint(tmp_path / "model.pt", root, loader))
    assert main(["knn", ckpt, "--device", "cpu", "--no-save", "--workers", "0"]) == 2
    message = capsys.readouterr().err + caplog.text
    assert "different classes (only in train: red; only in test: purple)" in message
