"""The streaming view source (data.loader: stream): same interface, batches and determinism as the in-memory
one, views with the same statistics, named errors for bad files, and a Trainer that runs and resumes on it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from slimssl.config import config_from_dict
from slimssl.data.augment import TwoViewAugment, ViewRecipe, recipe, sample_crop_boxes
from slimssl.data.decode import decode_image, decode_pixels
from slimssl.data.files import DataError
from slimssl.data.stream import StreamingViews, crop_pair, full_detail_side, sample_generator, view_boxes
from slimssl.data.views import InMemoryViews
from slimssl.train.loop import Trainer
from test_pretrain import tiny

CPU = torch.device("cpu")
RES = 16
SIZES = [(16, 16), (40, 24), (20, 36), (64, 48), (30, 30), (17, 50)]  # (width, height): larger and other shapes


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSSL_CACHE", str(tmp_path / "cache"))


def _pattern(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Structured uint8 [n, H, W, 3] images: a colour gradient plus a coloured square, so crops matter."""
    g = np.random.default_rng(seed)
    ramp_x, ramp_y = np.linspace(0, 1, width)[None, :, None], np.linspace(0, 1, height)[:, None, None]
    out = []
    for _ in range(n):
        img = (g.random(3) * ramp_x + g.random(3) * ramp_y) / 2
        img[height // 4: height // 2, width // 3: 2 * width // 3] = g.random(3)
        out.append(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    return np.stack(out)


def _tree(root, n: int = 24, sizes=SIZES):
    """An ImageFolder (two classes) of mixed sizes and aspect ratios: PNGs, and every third file a JPEG
    (JPEGs and other files take different decoders)."""
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        path = root / ("cat" if i % 2 else "dog") / f"{i:03d}.{'jpg' if i % 3 == 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pattern(1, h, w, seed=i)[0]).save(path)
    return root


def _augment(res: int = RES) -> TwoViewAugment:
    return TwoViewAugment(recipe("byol", res), res)


def _stream(source, batch: int = 8, rank: int = 0, world: int = 1, workers: int = 0, **kw) -> StreamingViews:
    return StreamingViews(str(source), kw.pop("augment", _augment()), global_batch=batch, rank=rank, world=world,
                          seed=kw.pop("seed", 3), device=CPU, workers=workers, **kw)


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_views_are_deterministic_across_workers_and_call_order(tmp_path):
    root = _tree(tmp_path / "data")
    solo = _stream(root, workers=0)
    v1 = solo(1)
    assert len(v1) == 2 and all(v.shape == (8, 3, RES, RES) and v.dtype == torch.float32 for v in v1)
    assert not torch.equal(v1[0], v1[1]) and not torch.equal(v1[0], solo(2)[0])
    assert solo.steps_per_epoch == 3
    pool = _stream(root, workers=2)
    try:
        after_skip = (pool(3), pool(1))  # out of order: the prefetching iterator restarts
        in_order = [pool(2), pool(3), pool(4)]  # then prefetched in order, across the epoch boundary
    finally:
        pool.close()
    fresh = _stream(root, workers=0)
    assert _equal(after_skip[1], fresh(1)) and _equal(after_skip[0], fresh(3))
    assert _equal(in_order[0], fresh(2)) and _equal(in_order[2], fresh(4))
    assert _equal(_stream(root, workers=0)(1), v1)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_workers_started_without_fork_give_the_same_views(tmp_path, start_method):
    """spawn is the default on macOS and Windows, forkserver on Linux from Python 3.14: the workers then get
    the dataset pickled and open their own readers (of a .zip here)."""
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"{start_method} is not available here")
    root = _tree(tmp_path / "data" / "train", n=16)
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(root).as_posix())
    expected = _stream(archive, workers=0)(2)
    previous = multiprocessing.get_start_method()
    multiprocessing.set_start_method(start_method, force=True)
    try:
        pool = _stream(archive, workers=2)
        try:
            assert _equal(pool(2), expected)
        finally:
            pool.close()
    finally:
        multiprocessing.set_start_method(previous, force=True)


@pytest.mark.parametrize("error, said", [
    ("DataLoader worker (pid 4242) is killed by signal: Aborted.", True),  # torch's SIGCHLD handler, as spawn's
    ("something else went wrong", False),                                   # workers sometimes die as they exit
])
def test_a_worker_that_dies_as_the_loader_stops_it_is_said_not_raised(tmp_path, monkeypatch, caplog, error, said):
    pool = _stream(_tree(tmp_path / "data", n=16), workers=2)
    pool(0)
    batches = pool._batches
    stop = batches._shutdown_workers

    def stopped_with_a_dead_worker():
        stop()  # the workers are joined (and their pids forgotten) either way
        raise RuntimeError(error)

    monkeypatch.setattr(batches, "_shutdown_workers", stopped_with_a_dead_worker)
    with caplog.at_level(logging.WARNING, logger="slimssl"), contextlib.ExitStack() as raised:
        if not said:
            raised.enter_context(pytest.raises(RuntimeError, match=error))
        pool.close()
    assert ("killed by signal: Aborted, as the loader was stopping it: nothing is lost" in caplog.text) == said
    assert not any(worker.is_alive() for worker in batches._workers)


def test_batch_indices_match_in_memory(tmp_path):
    root = _tree(tmp_path / "data", n=20)
    stream = _stream(root, batch=6, rank=1, world=2)
    memory = InMemoryViews(torch.zeros(20, 3, 4, 4, dtype=torch.uint8), _augment(), global_batch=6, rank=1,
                           world=2, seed=3, device=CPU)
    assert stream.steps_per_epoch == memory.steps_per_epoch == 3
    for step in range(8):  # across epochs
        assert torch.equal(stream.batch_indices(step), memory.batch_indices(step))


def test_two_processes_together_give_the_single_process_batch(tmp_path):
    root = _tree(tmp_path / "data")
    whole = _stream(root, batch=8)(4)
    halves = [_stream(root, batch=8, rank=r, world=2)(4) for r in (0, 1)]
    for view in (0, 1):
        torch.testing.assert_close(torch.cat([h[view] for h in halves]), whole[view], rtol=0, atol=1e-6)


def test_zip_streams_like_the_folder(tmp_path):
    root = _tree(tmp_path / "data" / "train", n=16)
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(p for p in (tmp_path / "data").rglob("*") if p.is_file()):
            zf.write(path, "data/" + path.relative_to(tmp_path / "data").as_posix())  # wrapped in one folder
    folder = _stream(root.parent)(2)
    zipped = _stream(archive, workers=2)  # each worker opens its own zip handle
    try:
        assert _equal(zipped(2), folder)
    finally:
        zipped.close()


def _assert_close_means(a: torch.Tensor, b: torch.Tensor, sigmas: float = 4.0) -> None:
    se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
    assert abs(a.mean().item() - b.mean().item()) < sigmas * se + 1e-3, (a.mean(), b.mean(), se)


def test_statistics_match_the_in_memory_path(tmp_path):
    """Images already at the resolution, so both paths crop the same pixels."""
    n, steps = 64, 8
    images = _pattern(n, RES, RES, seed=7)
    for i, img in enumerate(images):  # listing order (class, then name) equals tensor order
        path = tmp_path / "data" / "only" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    memory = InMemoryViews(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), _augment(), global_batch=32,
                           rank=0, world=1, seed=3, device=CPU)
    stream = _stream(tmp_path / "data", batch=32)
    for view in (0, 1):
        ours = torch.cat([stream(s)[view] for s in range(steps)])
        ref = torch.cat([memory(s)[view] for s in range(steps)])
        for c in range(3):
            _assert_close_means(ours[:, c].mean(dim=(1, 2)), ref[:, c].mean(dim=(1, 2)))
            _assert_close_means(ours[:, c].std(dim=(1, 2)), ref[:, c].std(dim=(1, 2)))
        spread_ours, spread_ref = ours.mean(dim=(1, 2, 3)).std(), ref.mean(dim=(1, 2, 3)).std()
        assert abs(spread_ours - spread_ref) < 0.15 * spread_ref


def test_large_jpeg_is_decoded_at_reduced_scale_and_cropped(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_pattern(1, 600, 800)[0]).save(buf, "JPEG")
    views = recipe("byol", RES)
    side = full_detail_side(RES, views)
    assert side == math.ceil(RES / math.sqrt(0.08 * 0.75))
    img = decode_image(buf.getvalue(), side)
    assert img.mode == "RGB" and min(img.size) >= side and img.size == (100, 75)  # 1/8 scale
    pixels = decode_pixels(buf.getvalue(), side)
    assert torch.equal(pixels, torch.from_numpy(np.array(img)).permute(2, 0, 1))
    crops = crop_pair(pixels, views, RES, sample_generator(0, 5, 2))
    assert crops.shape == (2, RES, RES, 3) and crops.dtype == torch.uint8
    assert torch.equal(crops, crop_pair(pixels, views, RES, sample_generator(0, 5, 2)))
    assert not torch.equal(crops, crop_pair(pixels, views, RES, sample_generator(0, 5, 3)))


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def test_decoded_pixels_are_those_of_pil():
    """JPEGs not shrunk by draft take torchvision's decoder: the same pixels as PIL's, whatever the colour
    space or coding; PIL still names the error of a corrupt one."""
    rgb = Image.fromarray(_pattern(1, 45, 60, seed=1)[0])
    for data in (_jpeg(rgb), _jpeg(rgb, progressive=True), _jpeg(rgb, subsampling=0), _jpeg(rgb.convert("L")),
                 _jpeg(rgb.convert("CMYK"))):
        assert decode_image(data, 40).size == (60, 45)  # not shrunk by draft
        pixels = decode_pixels(data, 40)
        assert pixels.shape == (3, 45, 60) and pixels.dtype == torch.uint8
        assert torch.equal(pixels, torch.from_numpy(np.array(decode_image(data, 40))).permute(2, 0, 1))
    truncated = _jpeg(rgb)[:-200]
    with pytest.raises(OSError) as pil_error:
        decode_image(truncated, 40)
    with pytest.raises(OSError, match=re.escape(str(pil_error.value))):
        decode_pixels(truncated, 40)


def test_view_boxes_are_those_of_sample_crop_boxes():
    """One pass over both views' draws gives what one ``sample_crop_boxes`` call per view gives."""
    views = recipe("byol", RES)
    other = (views[0], ViewRecipe(crop_scale=(0.5, 1.0), crop_ratio=(0.5, 2.0)))
    for pair in (views, other):
        for i, (height, width) in enumerate([(375, 500), (20, 900), (7, 7), (1, 1), (900, 31)] * 20):
            gen = sample_generator(4, i, 7)
            ref = [sample_crop_boxes(1, height, width, v.crop_scale, v.crop_ratio, gen, "cpu")[0] for v in pair]
            boxes = view_boxes(height, width, pair, sample_generator(4, i, 7))
            assert boxes == [tuple(int(x) for x in box.tolist()) for box in ref]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crops_are_torchvision_resized_crops_of_the_boxes(interpolation):
    """Each view is its box cropped and resized (antialiased bilinear, or bicubic) as torchvision's
    RandomResizedCrop does on uint8 tensors, and within 2 levels of PIL's resize of the crop. Recent torch gives
    torchvision's values exactly; torch 2.4 and 2.5 round about one value in eight one level apart."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    image = Image.fromarray(_pattern(1, 90, 120, seed=2)[0])
    views = recipe("byol", 24, interpolation=interpolation)
    pixels = decode_pixels(_jpeg(image), full_detail_side(24, views))
    assert pixels.shape == (3, 90, 120)
    decoded = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    for row in range(10):
        crops = crop_pair(pixels, views, 24, sample_generator(1, 2, row))
        for crop, (top, left, h, w) in zip(crops, view_boxes(90, 120, views, sample_generator(1, 2, row))):
            ref = TF.resized_crop(pixels.contiguous(), top, left, h, w, [24, 24], antialias=True,
                                  interpolation=InterpolationMode(interpolation))
            apart = (crop.permute(2, 0, 1).int() - ref.int()).abs()
            assert apart.max() <= 1 and apart.float().mean() < 0.25
            pil = decoded.crop((left, top, left + w, top + h)).resize(
                (24, 24), Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC)
            assert (crop.int() - torch.from_numpy(np.array(pil)).int()).abs().max() <= 2


def _corrupt(root):
    bad = root / "cat" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    return bad


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_file_is_named(tmp_path, workers):
    root = _tree(tmp_path / "data", n=8)
    _corrupt(root)
    stream = _stream(root, workers=workers)
    with pytest.raises(DataError, match=r"001\.png.*skip_unreadable"):
        stream(0)  # batch 8 of 8 images: every file is in the first step


def test_skip_unreadable_replaces_deterministically_and_logs(tmp_path, caplog):
    root = _tree(tmp_path / "data", n=8)
    bad = _corrupt(root)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        first = _stream(root, skip_unreadable=True)(0)
        again = _stream(root, skip_unreadable=True, workers=2)
        try:
            assert _equal(again(0), first)
        finally:
            again.close()
        assert list(again.unreadable) == [str(bad)]
    assert "001.png" in caplog.text and "replaced" in caplog.text


def test_bad_sources_raise_named_errors(tmp_path):
    with pytest.raises(DataError, match="loader: memory"):
        _stream("fake")
    with pytest.raises(DataError, match="nope"):
        _stream(tmp_path / "nope")
    with pytest.raises(DataError, match="fewer than train.batch_size 64"):
        _stream(_tree(tmp_path / "data", n=8), batch=64)
    data = tiny("byol", widths=[1.0, 0.5])
    data["data"].update(loader="stream")  # the built-in "fake" source
    with pytest.raises(DataError, match="loader: memory"):
        Trainer(config_from_dict(data), tmp_path / "run")


def test_trainer_streams_saves_and_resumes_exactly(tmp_path, caplog):
    root = _tree(tmp_path / "data", n=24)
    data = tiny("byol", "sandwich", "online", widths=[1.0, 0.5], train={"checkpoint_every": 0})
    data["data"] = {"source": str(root), "resolution": 8, "loader": "stream", "workers": 1}
    n, k = 6, 2
    with caplog.at_level(logging.INFO, logger="slimssl"):
        straight = Trainer(config_from_dict(data), tmp_path / "straight")
    assert straight.train_data is None and straight.knn_monitor is None
    assert straight.steps_per_epoch == 3 and "no test split for kNN evaluation" in caplog.text
    results = straight.fit()
    assert straight.state.step == n and results["steps"] == n
    assert all(row["knn_top1"] is None for row in results["subnets"])
    assert json.loads((tmp_path / "straight" / "results.json").read_text())["steps"] == n

    data["data"]["workers"] = 0  # resuming with another number of workers changes nothing
    first = Trainer(config_from_dict(data), tmp_path / "resumed")
    first.fit(max_steps=k)
    second = Trainer(config_from_dict(data), tmp_path / "resumed", resume=True)
    assert second.state.step == k
    second.fit()
    a, b = straight.model.state_dict(), second.model.state_dict()
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, f"resumed run differs in {differ[:5]}"


def test_an_unreadable_file_met_in_training_keeps_the_steps_trained_and_their_log(tmp_path):
    root = _tree(tmp_path / "data", n=24)
    data = tiny("byol", widths=[1.0, 0.5], train={"checkpoint_every": 0, "epochs": 4})
    data["data"] = {"source": str(root), "resolution": 8, "loader": "stream", "workers": 0}
    run = tmp_path / "run"
    trainer = Trainer(config_from_dict(data), run)
    originals = {p: p.read_bytes() for p in root.rglob("*.*")}
    step_fn = trainer.train_step

    def train_step(step):
        if step == 4:  # in epoch 2, after the checkpoint of step 3: every file now fails to decode
            for path in originals:
                path.write_bytes(b"not an image")
        return step_fn(step)

    trainer.train_step = train_step
    with pytest.raises(DataError, match=r"cannot decode .*\n.*the 4 steps trained so far are saved in .*last\.pt: "
                                        r"continue with slimssl pretrain --resume"):
        trainer.fit()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"] == 4
    trainer.metrics.close()
    with (run / "metrics.jsonl").open("a") as f:  # as a run that trained on past its checkpoint would leave
        f.write(json.dumps({"step": 6, "loss": {"w1p0_d1-1-1-1": 1.0}}) + "\n")
    for path, content in originals.items():
        path.write_bytes(content)
    resumed = Trainer(config_from_dict(data), run, resume=True)
    resumed.fit()
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, resumed.total_steps + 1))  # every step logged once (log_every 1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("lr")] == list(range(1, resumed.total_steps + 1))  # TensorBoard too


def test_a_folder_wrapping_the_dataset_streams_from_loader_workers(tmp_path):
    _tree(tmp_path / "outer" / "cifar" / "train", n=8)
    _tree(tmp_path / "outer" / "cifar" / "test", n=4)
    views = _stream(tmp_path / "outer", workers=1)  # a worker opens its own reader, from the listed root
    try:
        assert views(0)[0].shape[0] == 8
    finally:
        views.close()


def test_a_run_of_unreadable_files_too_long_to_skip_is_one_clear_error(tmp_path):
    root = _tree(tmp_path / "data", n=8)
    (root / "aaa").mkdir()
    for i in range(200):  # more in a row than a sample tries (100), in the class listed first
        (root / "aaa" / f"{i:03d}.jpg").write_bytes(b"")
    views = _stream(root, workers=1, skip_unreadable=True)
    with pytest.raises(DataError) as caught:
        for step in range(3):
            views(step)
    message = str(caught.value)
    assert re.match(r".*data: no readable image among 100 files in a row from .*aaa/\d+\.jpg; is the dataset intact\?$",
                    message) and "Traceback" not in message, message


def _send_stop_signals_to_the_workers() -> list:
    """SIGTERM and SIGINT to every loader worker of this process, as Ctrl-C or a preemption sends them."""
    workers = multiprocessing.active_children()
    assert len(workers) >= 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    return workers


def test_workers_outlive_a_stop_signal_to_the_process_group(tmp_path):
    """SIGTERM/SIGINT to every process (Ctrl-C, preemption): the trainer must still finish its step and save."""
    stream = _stream(_tree(tmp_path / "data"), workers=2)
    try:
        stream(0)
        workers = _send_stop_signals_to_the_workers()
        assert _equal(stream(1), _stream(tmp_path / "data")(1))
        assert all(worker.is_alive() for worker in workers)
    finally:
        stream.close()
    assert not any(worker.is_alive() for worker in workers)  # close() joins them


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask") or multiprocessing.get_start_method() != "fork",
                    reason="needs POSIX signal masks and forked workers (the slowed start is patched in)")
def test_a_stop_signal_while_the_workers_start_does_not_kill_them(tmp_path, monkeypatch):
    """The signal may come before a worker has set itself to ignore it: it must wait, then be dropped."""
    import time

    import slimssl.data.stream as stream_mod

    ignore = stream_mod.ignore_stop_signals

    def slow_start(worker_id: int) -> None:
        time.sleep(1.0)  # the signals below arrive in here
        ignore(worker_id)

    monkeypatch.setattr(stream_mod, "ignore_stop_signals", slow_start)
    stream = _stream(_tree(tmp_path / "data"), workers=2)
    try:
        stream._restart(0)  # starts the workers without waiting for a batch
        workers = _send_stop_signals_to_the_workers()
        assert _equal(stream(0), _stream(tmp_path / "data")(0))
        assert all(worker.is_alive() for worker in workers)
    finally:
        stream.close()


def test_a_process_that_never_closes_its_source_still_exits(tmp_path):
    """Workers ignore SIGTERM, the signal multiprocessing's exit handler stops them with."""
    root = _tree(tmp_path / "data", n=8)
    script = (f"import torch; from slimssl.data.stream import StreamingViews; from slimssl.data.augment import "
              f"TwoViewAugment, recipe; s = StreamingViews({str(root)!r}, TwoViewAugment(recipe('byol', 8), 8), "
              f"global_batch=4, rank=0, world=1, seed=0, device=torch.device('cpu'), workers=2); s(0); print('ok')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns below twice its limit
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("decoder", ["streamed", "in memory"])
def test_an_image_over_pillows_size_guard_is_refused_naming_the_way_to_allow_it(monkeypatch, fmt, decoder):
    """Whichever decoder reads it: a JPEG that torchvision decodes (which has no guard of its own) too."""
    import io

    from PIL import Image

    from slimssl.data.decode import decode_error, decode_full, decode_pixels

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 10)).save(buffer, fmt)
    decode = (lambda data: decode_pixels(data, 8)) if decoder == "streamed" else decode_full
    expected = decode(buffer.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1536)  # 64 x 48 is twice that: not over Pillow's guard yet
    assert torch.equal(decode(buffer.getvalue()), expected)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1535)
    with pytest.raises(Image.DecompressionBombError) as refused:
        decode(buffer.getvalue())
    assert "refuses an image this large" in decode_error(refused.value)
    assert "set $SLIMSSL_MAX_IMAGE_PIXELS=none (or a larger number of pixels)" in decode_error(refused.value)


def test_pillows_size_guard_is_set_from_the_environment_in_every_process():
    """Set when slimssl's decoder is imported: a loader worker started afresh (spawn) imports it too."""
    import subprocess
    import sys

    code = "import slimssl.data.decode; from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"
    from PIL import Image

    for value, expected in (("none", "None"), ("1000", "1000"), ("", str(Image.MAX_IMAGE_PIXELS))):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "SLIMSSL_MAX_IMAGE_PIXELS": value})
        assert run.stdout.strip() == expected


def test_full_detail_side_keeps_the_smallest_crop_of_either_view():
    """Images are decoded large enough for the smaller crop scale of the two views (8% of the area here), not
    the larger one's."""
    views = (ViewRecipe(crop_scale=(0.08, 1.0)), ViewRecipe(crop_scale=(0.5, 1.0)))
    assert full_detail_side(16, views) == full_detail_side(16, views[::-1]) == math.ceil(16 / math.sqrt(0.08 * 0.75))
