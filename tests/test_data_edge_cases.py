"""Edge cases of the data path: the decoded-image cache when it is damaged or
cannot be written, $SLIMSSL_MAX_IMAGE_PIXELS, zips written with "./" names, loose images beside class folders,
splits of which nothing can be read, integer pixels and [N, 1] labels given in Python."""

from __future__ import annotations

import logging
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import slimssl
from slimssl.data import decode
from slimssl.data.datasets import load_dataset
from slimssl.data.eval_images import load_eval_split
from slimssl.data.files import DataError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSSL_CACHE", str(tmp_path / "cache"))


def _save(path, color, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _tree(root, classes=("cat", "dog"), per_class=3):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _save(root / name / f"{i}.png", (c * 100, i * 10, 5))
    return root


# ---- the decoded-image cache ---------------------------------------------------------------------------

def test_a_damaged_cache_entry_is_decoded_again_with_a_warning(tmp_path, caplog):
    root = _tree(tmp_path / "data")
    first = load_dataset(str(root))
    entries = list((tmp_path / "cache").glob("*.pt"))
    assert len(entries) == 1
    entries[0].write_bytes(b"PK\x03\x04 not a torch file any more")
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        again = load_dataset(str(root))
    assert "ignoring unreadable cache file" in caplog.text
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    # decoded again, the entry is written anew and read on the next load
    assert torch.equal(load_dataset(str(root)).images, first.images)


def _kept(*indices):
    return torch.tensor(indices, dtype=torch.int64)


@pytest.mark.parametrize("planted", [
    {"x": 1},  # no images at all
    {"images": torch.zeros(3, 3, 8, 8, dtype=torch.uint8), "kept": _kept(0, 1, 2), "skipped": []},  # 3 of 6 files
    {"images": torch.zeros(6, 3, 4, 4, dtype=torch.uint8), "kept": _kept(*range(6)), "skipped": []},  # another size
    {"images": torch.zeros(6, 3, 8, 8), "kept": _kept(*range(6)), "skipped": []},  # not uint8
    {"images": torch.zeros(6, 3, 8, 8, dtype=torch.uint8), "kept": _kept(0, 1, 2, 3, 4, 9), "skipped": []},  # no 9
    {"images": torch.zeros(6, 3, 8, 8, dtype=torch.uint8), "kept": list(range(6)), "skipped": []},  # not a tensor
])
def test_a_cache_entry_that_is_not_the_splits_decoded_images_is_decoded_again(tmp_path, caplog, planted):
    root = _tree(tmp_path / "data")
    first = load_dataset(str(root), resolution=8)
    with caplog.at_level(logging.INFO, logger="slimssl"):  # the entry slimssl saved is read back as it is
        assert torch.equal(load_dataset(str(root), resolution=8).images, first.images)
    assert "read from the decoded-image cache" in caplog.text and "ignoring" not in caplog.text
    caplog.clear()
    (entry,) = (tmp_path / "cache").glob("*.pt")
    torch.save(planted, entry)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        again = load_dataset(str(root), resolution=8)
    assert "does not hold the 6 images of this split as slimssl saves them" in caplog.text
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)


def test_a_cache_that_cannot_be_written_does_not_stop_loading(tmp_path, monkeypatch, caplog):
    root = _tree(tmp_path / "data")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache's folder would go")
    monkeypatch.setenv("SLIMSSL_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        ds = load_dataset(str(root))
    assert "could not write decoded-image cache" in caplog.text
    assert ds.images.shape == (6, 3, 8, 8) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]



def test_a_full_cache_disk_does_not_stop_loading(tmp_path, monkeypatch, caplog):
    """A home folder at its quota: torch.save reports the full disk as a RuntimeError (the OSError is its context),
    which stopped pretraining, knn and linear on folder data with a traceback."""
    from slimssl.data import decoded_cache

    def full_disk_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half an entry")
        try:
            raise OSError(122, "Disk quota exceeded")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")

    monkeypatch.setattr(decoded_cache.torch, "save", full_disk_save)
    root = _tree(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        ds = load_dataset(str(root))
    assert "could not write decoded-image cache" in caplog.text and "Disk quota exceeded" in caplog.text
    assert "$SLIMSSL_CACHE moves it" in caplog.text
    assert ds.images.shape == (6, 3, 8, 8)
    assert not [p for p in tmp_path.rglob("*.pt*") if "data" not in p.parts]  # no half-written entry left

    def a_bug(obj, f, *args, **kwargs):  # any other failure is still raised
        raise RuntimeError("not a write failure")

    monkeypatch.setattr(decoded_cache.torch, "save", a_bug)
    with pytest.raises(RuntimeError, match="not a write failure"):
        load_dataset(str(_tree(tmp_path / "other", classes=("a", "b"))))


# ---- $SLIMSSL_MAX_IMAGE_PIXELS ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [("none", None), ("1234", 1234), (" 5000 ", 5000)])
def test_the_pixel_limit_variable_sets_pillows_guard(monkeypatch, raw, expected):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setenv(decode.PIXEL_LIMIT_ENV, raw)
    decode._set_pixel_limit()
    assert Image.MAX_IMAGE_PIXELS == expected


@pytest.mark.parametrize("raw", ["-5", "0", "lots", "1e9"])
def test_a_bad_pixel_limit_keeps_pillows_guard_with_a_warning(monkeypatch, caplog, raw):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89478485)
    monkeypatch.setenv(decode.PIXEL_LIMIT_ENV, raw)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        decode._set_pixel_limit()
    assert Image.MAX_IMAGE_PIXELS == 89478485
    assert "SLIMSSL_MAX_IMAGE_PIXELS" in caplog.text and "Pillow's limit is kept" in caplog.text


# ---- folders and zips ---------------------------------------------------------------------------------

def test_a_zip_whose_names_start_with_dot_slash_reads_as_its_folder(tmp_path):
    """`zip -r data.zip ./train ./test` (or zipfile.writestr) stores "./train/..."; hidden entries are skipped."""
    folder = tmp_path / "data"
    _tree(folder / "train")
    _tree(folder / "test", per_class=2)
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("./", b"")
        for path in sorted(folder.rglob("*.png")):
            zf.writestr("./" + path.relative_to(folder).as_posix(), path.read_bytes())  # (write() would normalise)
        zf.writestr("./.DS_Store", b"junk")
        zf.writestr("./train/cat/.hidden.png", b"not an image")
    assert all(name.startswith("./") for name in zipfile.ZipFile(archive).namelist())
    for split in ("train", "test"):
        from_zip, from_folder = load_dataset(str(archive), split), load_dataset(str(folder), split)
        assert from_zip.classes == from_folder.classes == ["cat", "dog"]
        assert torch.equal(from_zip.labels, from_folder.labels)
        assert torch.equal(from_zip.images, from_folder.images)


def test_loose_images_beside_class_folders_are_left_out_with_a_warning(tmp_path, caplog):
    root = _tree(tmp_path / "data")
    _save(root / "stray.png", (255, 255, 255))
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        ds = load_dataset(str(root))
    assert "ignoring 1 images outside the class folders (e.g. stray.png)" in caplog.text
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert not (ds.images == 255).all(dim=(1, 2, 3)).any()  # the white stray image is not among them


def test_a_split_of_unreadable_files_alone_is_an_error_not_an_empty_dataset(tmp_path):
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        (root / "train" / name / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="none of the 2 image files could be decoded"):
        load_dataset(str(root), "train", skip_unreadable=True)
    with pytest.raises(DataError, match="none of the 2 image files of split 'train' could be decoded"):
        load_eval_split(str(root), "train", loader="stream", resolution=8, skip_unreadable=True)


# ---- images given in Python ----------------------------------------------------------------------------

def test_integer_pixels_of_a_wider_type_are_the_same_images_as_uint8(register):
    gen = np.random.default_rng(0)
    pixels = gen.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    pixels[0, 0, 0] = 255  # the extremes are kept exactly
    pixels[1, 0, 0] = 0
    labels = np.array([0, 1, 0, 1])
    register("gaps_u8", (pixels, labels))
    register("gaps_i64", (pixels.astype(np.int64), labels))
    register("gaps_i32_torch", (torch.from_numpy(pixels.astype(np.int32)), labels))
    reference = load_dataset("gaps_u8").images
    assert torch.equal(load_dataset("gaps_i64").images, reference)
    assert torch.equal(load_dataset("gaps_i32_torch").images, reference)


@pytest.mark.parametrize("bad, match", [
    (lambda p: p.astype(np.int64) + 1, r"integer images must be in \[0, 255\].*from 1 to 256"),
    (lambda p: p.astype(np.int64) - 1, r"integer images must be in \[0, 255\].*from -1 to"),
    (lambda p: p > 100, "expected uint8 images or floats in \\[0, 1\\], got torch.bool"),
])
def test_pixels_out_of_range_or_of_no_number_type_are_refused(bad, match):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    pixels[0, 0, 0] = 255
    pixels[1, 0, 0] = 0
    with pytest.raises(DataError, match=match):
        slimssl.register_dataset("gaps_bad", (bad(pixels), [0, 1, 0, 1]))
    with pytest.raises(DataError):  # nothing was registered under the name
        load_dataset("gaps_bad")


def test_labels_of_shape_n_by_1_are_the_labels_of_shape_n(register):
    pixels = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    register("gaps_column", (pixels, np.array([[1], [0], [1], [2]])))
    register("gaps_flat", (pixels, np.array([1, 0, 1, 2])))
    column, flat = load_dataset("gaps_column"), load_dataset("gaps_flat")
    assert column.labels.tolist() == flat.labels.tolist() == [1, 0, 1, 2]
    assert column.classes == flat.classes


@pytest.mark.parametrize("before_the_frame", [b"\xff\xff\xff", b"\x00\x00junk", b"\xff\x00", b"\xff\xd0", b"\xff\x01",
                                              b"\xff\xd8"], ids=["fill", "junk", "stuffed", "RST0", "TEM", "SOI"])
def test_a_jpeg_with_odd_bytes_before_its_frame_header_is_held_to_pillows_guard(monkeypatch, before_the_frame):
    """Bytes that torchvision's decoder skips before the size header must not skip the size check with them."""
    import io

    from PIL import Image

    from slimssl.data.decode import decode_full

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, "JPEG")
    data = buffer.getvalue()[:2] + before_the_frame + buffer.getvalue()[2:]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 is over twice that
    with pytest.raises(Image.DecompressionBombError):
        decode_full(data)


def test_a_file_of_another_format_under_an_image_name_is_unreadable_and_never_handed_to_an_outside_program(
        tmp_path, monkeypatch):
    """PostScript named .jpg: Pillow would start Ghostscript to render it. It is unreadable, as any non-image file,
    in both loaders; a GIF named .jpg (as scraped datasets hold them) is read."""
    import io
    import subprocess

    def no_outside_program(*args, **kwargs):
        raise AssertionError(f"an outside program was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", no_outside_program)
    monkeypatch.setattr(subprocess, "check_call", no_outside_program)
    root = _tree(tmp_path / "d" / "train")
    (root / "cat" / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(gif, "GIF")
    (root / "dog" / "gif.jpg").write_bytes(gif.getvalue())
    for loader in ("memory", "stream"):
        with pytest.raises(DataError, match=r"eps\.jpg \(UnidentifiedImageError: cannot identify image file\)"):
            load_eval_split(str(tmp_path / "d"), "train", loader=loader, resolution=8).take(torch.arange(8))
        split = load_eval_split(str(tmp_path / "d"), "train", loader=loader, resolution=8, skip_unreadable=True)
        assert len(split) == 7 and split.take(torch.arange(7))[-1, 0].float().mean() > 200  # the red GIF


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_a_zip_member_that_unpacks_to_more_than_any_image_is_unreadable_not_read(tmp_path, monkeypatch, method):
    from slimssl.data import files

    monkeypatch.setattr(files, "MAX_MEMBER_BYTES", 4096)  # for a small test: 1 GiB
    folder = _tree(tmp_path / "d" / "train")
    with zipfile.ZipFile(tmp_path / "d.zip", "w", method) as z:
        for path in sorted(folder.rglob("*.png")):
            z.write(path, str(path.relative_to(tmp_path / "d")))
        z.writestr("train/cat/bomb.png", b"\0" * 100_000)  # deflated: ~100 bytes in the zip
    for loader in ("memory", "stream"):
        with pytest.raises(DataError, match=r"bomb\.png \(ValueError: the zip member unpacks to more than"):
            load_eval_split(str(tmp_path / "d.zip"), "train", loader=loader, resolution=8).take(torch.arange(7))
        assert len(load_eval_split(str(tmp_path / "d.zip"), "train", loader=loader, resolution=8,
                                   skip_unreadable=True)) == 6


@pytest.mark.parametrize("cpus, job, expected", [
    (16, {}, 8),  # at most 8
    (3, {}, 3),
    (16, {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, 2),  # 8 processes share the node's cores
    (4, {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, 1),  # never none: the memory loader runs none
    (16, {"LOCAL_WORLD_SIZE": "8"}, 8),  # exported to everything a job runs, outside torchrun: one process
])
def test_the_default_loader_workers_share_the_cpus_this_process_may_use(monkeypatch, cpus, job, expected):
    """A Slurm job's cpuset (or taskset) counts, not the machine's cores, and torchrun's processes share it."""
    import os

    from slimssl.data.views import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's, which a cpuset narrows
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in job.items():
        monkeypatch.setenv(name, value)
    assert default_workers() == expected


def test_a_split_the_cache_cannot_hold_is_not_keyed_nor_written_past_the_disk(tmp_path, monkeypatch, caplog):
    """An entry's key stats every file (8 s at ImageNet's size): not for a split over the cache's limit, nor with
    the cache off; and an entry is not written onto a disk that it would fill."""
    import shutil
    from collections import namedtuple

    from slimssl.data import decoded_cache

    root = tmp_path / "data"
    for i in range(4):
        (root / "c").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "c" / f"{i}.png")
    monkeypatch.setenv("SLIMSSL_CACHE", str(tmp_path / "cache"))
    keyed = []
    entry_key = decoded_cache.entry_key
    monkeypatch.setattr(decoded_cache, "entry_key", lambda *a: keyed.append(1) or entry_key(*a))
    for limit in ("0", str(4 * 3 * 8 * 8 / 2**30 * 0.99)):  # off; a little less than the split's 768 bytes
        monkeypatch.setenv("SLIMSSL_CACHE_GB", limit)
        assert load_dataset(str(root), resolution=8).images.shape == (4, 3, 8, 8)
    assert keyed == [] and not (tmp_path / "cache").exists()
    monkeypatch.setenv("SLIMSSL_CACHE_GB", "1")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - 2**29, 2**29))  # 0.5 GiB free
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        load_dataset(str(root), resolution=8)
    assert keyed == [1] and "its disk has 512.0 MiB free" in caplog.text
    assert not list((tmp_path / "cache").glob("*.pt"))


def test_packed_paths_take_their_own_lengths_and_index_as_a_list(tmp_path):
    """A numpy bytes array padded every path to the longest (one 260-byte path among ImageNet's made 46 MiB of
    paths 319 MiB); packed, they take their own bytes, and read back as they were, names that are not UTF-8 too."""
    import pickle

    from slimssl.data.files import PackedPaths, to_path

    names = ["a/1.jpg", "b/" + "x" * 300 + ".jpg", "c/caf\u00e9.png", b"d/\xff.jpg".decode("utf-8", "surrogateescape")]
    paths = PackedPaths(names * 1000)
    assert len(paths) == 4000 and paths.nbytes < 350 * 1000 + 8 * 4001 + 64  # not 4000 x 302 padded bytes
    assert [to_path(paths[i]) for i in range(4)] == names and to_path(paths[-1]) == names[-1]
    subset = paths[np.array([3, 1])]
    assert [to_path(subset[i]) for i in range(len(subset))] == [names[3], names[1]]
    assert [to_path(p) for p in (pickle.loads(pickle.dumps(subset))[i] for i in range(2))] == [names[3], names[1]]
    with pytest.raises(IndexError):
        paths[4000]
