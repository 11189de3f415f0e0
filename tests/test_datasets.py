import logging
import os
import pathlib
import re
import shutil
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from slimssl.data.datasets import ImageDataset, load_dataset
from slimssl.data.files import DataError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSSL_CACHE", str(tmp_path / "cache"))


def _save(path, color=(10, 20, 30), size=(8, 8), fmt=None, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, fmt)
    return path


def _class_tree(root, classes=("cat", "dog"), per_class=3):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _save(root / name / f"{i}.png", color=(c * 100, i * 10, 5))
    return root


def _zip_dir(src, dest, wrap=None):
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            zf.write(path, f"{wrap}/{rel}" if wrap else rel)
    return dest


def test_class_folders_give_labels(tmp_path):
    root = _class_tree(tmp_path / "data", classes=("b_dog", "a_cat"))
    ds = load_dataset(str(root))
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (6, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.classes == ["a_cat", "b_dog"]  # sorted like ImageFolder
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images[0, :, 0, 0].tolist() == [100, 0, 5]  # a_cat had class index 1 when written
    assert len(ds) == 6


def test_unlabelled_folder(tmp_path):
    for i in range(4):
        _save(tmp_path / "imgs" / f"{i}.jpg", color=(i, i, i))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    ds = load_dataset(str(tmp_path / "imgs"))
    assert ds.labels is None and ds.classes is None and len(ds) == 4
    with pytest.raises(DataError, match="train"):
        load_dataset(str(tmp_path / "imgs"), "test")


def test_train_test_layout_and_val_fallback(tmp_path):
    _class_tree(tmp_path / "d" / "train", per_class=3)
    _class_tree(tmp_path / "d" / "val", per_class=1)
    assert len(load_dataset(str(tmp_path / "d"), "train")) == 6
    test = load_dataset(str(tmp_path / "d"), "test")
    assert len(test) == 2 and test.labels.tolist() == [0, 1]


@pytest.mark.parametrize("zipped", [False, True])
def test_a_labelled_val_is_the_test_split_beside_a_test_folder_without_classes(tmp_path, zipped):
    """ImageNet as Kaggle ships it: train/<class>/, val/<class>/ and a flat test/ of unlabelled images."""
    _class_tree(tmp_path / "d" / "train", per_class=3)
    _class_tree(tmp_path / "d" / "val", per_class=2)
    for i in range(3):
        _save(tmp_path / "d" / "test" / f"{i}.jpg", color=(i, i, i))
    data = str(_zip_dir(tmp_path / "d", tmp_path / "d.zip") if zipped else tmp_path / "d")
    test = load_dataset(data, "test")
    assert len(test) == 4 and test.labels.tolist() == [0, 0, 1, 1]  # val/, not the 3 images of test/
    assert load_dataset(data, "val").labels.tolist() == [0, 0, 1, 1]
    shutil.rmtree(tmp_path / "d" / "val")  # a flat test/ alone is still the test split, without labels
    assert load_dataset(str(tmp_path / "d"), "test").labels is None


@pytest.mark.parametrize("wrap", [None, "wrapper"])
def test_zip_matches_folder(tmp_path, wrap):
    _class_tree(tmp_path / "d" / "train")
    _class_tree(tmp_path / "d" / "test", per_class=1)
    archive = _zip_dir(tmp_path / "d", tmp_path / "d.zip", wrap)
    for split in ("train", "test"):
        folder = load_dataset(str(tmp_path / "d"), split)
        zipped = load_dataset(str(archive), split)
        assert torch.equal(folder.images, zipped.images)
        assert torch.equal(folder.labels, zipped.labels) and folder.classes == zipped.classes


def test_modes_decode_to_rgb(tmp_path):
    d = tmp_path / "modes"
    _save(d / "grey.png", color=77, mode="L")
    _save(d / "rgba.png", color=(200, 100, 50, 0), mode="RGBA")  # alpha dropped, as torchvision's ImageFolder
    pal = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(d / "pal.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(d / "wide.png")
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(d / "wide_mid.tif")
    _save(d / "cmyk.jpg", color=(0, 0, 0, 0), mode="CMYK")
    _save(d / "bits.bmp", color=1, mode="1")
    ds = load_dataset(str(d))
    pixel = {name: ds.images[i, :, 3, 3].tolist()
             for i, name in enumerate(["bits", "cmyk", "grey", "pal", "rgba", "wide", "wide_mid"])}
    assert pixel["grey"] == [77, 77, 77]
    assert pixel["rgba"] == [200, 100, 50]
    assert pixel["pal"] == [0, 0, 255]
    assert pixel["wide"] == [255, 255, 255]  # scaled, not clipped
    assert pixel["wide_mid"] == [128, 128, 128]
    assert all(v >= 250 for v in pixel["cmyk"])  # no ink = white
    assert pixel["bits"] == [255, 255, 255]


def test_16_bit_and_float_pixels_are_scaled_to_0_255_exactly(tmp_path):
    """16-bit values are divided by 257 (65535 is 255, 257 * v is v); float values in [0, 1] are multiplied by 255,
    1.0 included."""
    d = tmp_path / "modes"
    d.mkdir()
    Image.fromarray(np.full((8, 8), 257 * 200, dtype=np.uint16)).save(d / "a_wide.png")
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(d / "b_float.tif")  # mode F
    ds = load_dataset(str(d))
    assert ds.images[0, :, 3, 3].tolist() == [200, 200, 200]
    assert ds.images[1, 0, 0, 0] == 0 and ds.images[1, 0, 7, 7] == 255
    assert ds.images[1, 0, 4, 0] == round(32 / 63 * 255)


def _truncated_tree(tmp_path):
    d = tmp_path / "t" / "cls"
    for i in range(3):
        _save(d / f"{i}.jpg", size=(16, 16), fmt="JPEG")
    good = (d / "0.jpg").read_bytes()
    (d / "1.jpg").write_bytes(good[: len(good) // 2])
    (d / "2.jpg").write_bytes(b"not an image at all")
    return tmp_path / "t"


def test_a_transparent_colour_is_ignored_alike_in_memory_and_streamed(tmp_path):
    from slimssl.data.decode import decode_full, decode_pixels

    path = _save(tmp_path / "keyed.png", color=(255, 255, 255))
    Image.open(path).save(path, transparency=(255, 255, 255))  # white marked transparent (a tRNS chunk)
    data = path.read_bytes()
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # torchvision's
    assert torch.equal(decode_full(data), expected) and torch.equal(decode_pixels(data, 8), expected)


def test_truncated_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"1\.jpg.*2 unreadable"):
        load_dataset(str(_truncated_tree(tmp_path)))


def test_a_file_that_is_no_image_is_named_without_python_internals(tmp_path):
    from slimssl.data.eval_images import StreamedImages

    d = tmp_path / "t" / "train" / "cls"
    _save(d / "0.png", size=(16, 16), fmt="PNG")
    (d / "1.png").write_bytes(b"not an image at all")
    (tmp_path / "t" / "test").mkdir()
    for read in (lambda: load_dataset(str(tmp_path / "t"), resolution=16),
                 lambda: StreamedImages(str(tmp_path / "t"), "train", resolution=16).take(torch.arange(2))):
        with pytest.raises(DataError) as err:
            read()
        assert "1.png" in str(err.value) and "cannot identify image file" in str(err.value)
        assert "BytesIO" not in str(err.value) and "0x" not in str(err.value)


def test_skip_unreadable_logs_count(tmp_path, caplog):
    root = _truncated_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        ds = load_dataset(str(root), skip_unreadable=True)
    assert len(ds) == 1 and ds.labels.tolist() == [0]
    assert "skipped 2 unreadable" in caplog.text and "2.jpg" in caplog.text


def test_bad_inputs_raise_named_errors(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_dataset(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="digits"):
        load_dataset("imagenet-foo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dataset(str(tmp_path / "empty"))
    _class_tree(tmp_path / "c")
    (tmp_path / "c" / "lonely").mkdir()
    (tmp_path / "c" / "lonely" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="lonely"):
        load_dataset(str(tmp_path / "c"))


def test_mixed_sizes_need_resolution(tmp_path):
    _save(tmp_path / "m" / "a.png", size=(8, 8))
    _save(tmp_path / "m" / "b.png", size=(12, 6))
    with pytest.raises(DataError, match=r"a\.png.*b\.png.*resolution"):
        load_dataset(str(tmp_path / "m"))
    ds = load_dataset(str(tmp_path / "m"), resolution=4)
    assert ds.images.shape == (2, 3, 4, 4)
    assert ds.images[1, :, 2, 2].tolist() == [10, 20, 30]


def test_a_split_too_large_to_decode_in_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    """ImageNet with the memory loader would decode for hours, then be killed: the size is checked first."""
    import slimssl.data.datasets as datasets

    root = _class_tree(tmp_path / "data")  # 6 images: 2.5 x 6 x 3 x 16 x 16 bytes while decoding at 16 px
    monkeypatch.setattr(datasets, "physical_memory", lambda: 11519)
    with monkeypatch.context() as m:
        m.setattr(datasets, "_decode_all", lambda *args: pytest.fail("decoded a split that cannot fit"))
        with pytest.raises(DataError, match=r"6 images of split 'train'.*while decoding, more than this machine's"
                                            r".*data.loader=stream"):
            load_dataset(str(root), resolution=16)
        for name, value in {"RANK": "0", "WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "3"}.items():
            m.setenv(name, value)  # torchrun: three processes here, each with its own copy
        monkeypatch.setattr(datasets, "physical_memory", lambda: 13823)
        with pytest.raises(DataError, match="with 3 processes each holding them"):
            load_dataset(str(root), resolution=16)
    monkeypatch.setattr(datasets, "physical_memory", lambda: 11520)  # just enough for one process
    assert load_dataset(str(root), resolution=16).images.shape == (6, 3, 16, 16)


def test_cache_hit_returns_equal_tensors(tmp_path):
    root = _class_tree(tmp_path / "data")
    first = load_dataset(str(root))
    assert len(os.listdir(tmp_path / "cache")) == 1
    (root / "cat" / "0.png").unlink()  # the cache must not serve the old listing
    os.utime(root / "cat")
    second = load_dataset(str(root))
    assert len(second) == 5 and len(os.listdir(tmp_path / "cache")) == 2
    again = load_dataset(str(root))
    assert torch.equal(second.images, again.images) and torch.equal(second.labels, again.labels)
    assert torch.equal(first.images[1:], again.images)


def test_cache_is_not_served_for_a_rewritten_image(tmp_path):
    """A file replaced in place (same name, same folders) is decoded again: its size and mtime are the key."""
    root = _class_tree(tmp_path / "data")
    first = load_dataset(str(root), resolution=8)
    image = root / "dog" / "2.png"
    _save(image, color=(250, 250, 250))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    second = load_dataset(str(root), resolution=8)
    assert not torch.equal(first.images[5], second.images[5]) and torch.equal(first.images[:5], second.images[:5])
    assert int(second.images[5].min()) >= 245
    assert torch.equal(load_dataset(str(root), resolution=8).images, second.images)  # now served from the cache


def _entries(cache):
    """The cache's entries (its own files: named by their key)."""
    return sorted(p.name for p in cache.glob("*.pt") if re.fullmatch(r"[0-9a-f]{32}\.pt", p.name))


def test_cache_drops_least_recently_used_splits_past_its_limit(tmp_path, monkeypatch):
    """A limit of two and a half entries keeps the two splits used last; a split whose images alone are bigger
    than the limit is not cached at all; 0 turns the cache off."""
    roots = [_class_tree(tmp_path / f"data{i}") for i in range(3)]
    cache = tmp_path / "cache"
    load_dataset(str(roots[0]), resolution=8)
    first = _entries(cache)
    entry_size = (cache / first[0]).stat().st_size  # about 3 kB: 6 * 192 bytes of images, and the file's own
    monkeypatch.setenv("SLIMSSL_CACHE_GB", str(2.5 * entry_size / 2**30))
    (cache / "my_model.pt").write_bytes(b"x" * 10 * entry_size)  # a user's file in the folder: never evicted
    stale, fresh = cache / f".{'0' * 32}.pt.abc.tmp", cache / f".{'1' * 32}.pt.def.tmp"  # killed / ongoing writes
    for partial in (stale, fresh):
        partial.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    load_dataset(str(roots[1]), resolution=8)
    second = (set(_entries(cache)) - set(first)).pop()
    for age, name in ((200, first[0]), (100, second)):  # roots[0] used first, as if long ago
        os.utime(cache / name, (time.time() - age, time.time() - age))
    load_dataset(str(roots[0]), resolution=8)  # a hit: now the more recently used of the two
    assert len(_entries(cache)) == 2
    load_dataset(str(roots[2]), resolution=8)
    assert len(_entries(cache)) == 2 and first[0] in _entries(cache) and second not in _entries(cache)
    assert (cache / "my_model.pt").is_file() and fresh.is_file() and not stale.exists()

    before = _entries(cache)
    load_dataset(str(roots[1]), resolution=48)  # 6 * 6912 bytes: over the limit by itself
    assert _entries(cache) == before

    monkeypatch.setenv("SLIMSSL_CACHE_GB", str(1.5 * entry_size / 2**30))  # lowered: the next hit trims to it
    load_dataset(str(roots[0]), resolution=8)
    assert _entries(cache) == first
    before = first

    monkeypatch.setenv("SLIMSSL_CACHE_GB", "0")
    off = load_dataset(str(roots[1]), resolution=16)
    assert _entries(cache) == before and off.images.shape == (6, 3, 16, 16)


@pytest.mark.parametrize("value", ["-1", "lots", "nan", "inf"])
def test_bad_cache_limit_is_named(tmp_path, monkeypatch, value):
    monkeypatch.setenv("SLIMSSL_CACHE_GB", value)
    with pytest.raises(DataError, match=r"\$SLIMSSL_CACHE_GB is .*a finite number >= 0 \(0 turns the cache off\)"):
        load_dataset(str(_class_tree(tmp_path / "data")))


def test_digits():
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 360 and train.classes == [str(i) for i in range(10)]
    assert train.images.max() == 255 and torch.equal(train.images[:, 0], train.images[:, 2])
    assert test.labels.bincount().min() >= 35  # stratified
    assert load_dataset("digits", resolution=16).images.shape[-1] == 16


def test_fake_is_deterministic():
    a, b = load_dataset("fake", fake_size=20, seed=3), load_dataset("fake", fake_size=20, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (20, 3, 32, 32) and int(a.labels.max()) < 10
    assert not torch.equal(a.images, load_dataset("fake", "test", fake_size=20, seed=3).images)
    assert load_dataset("fake", fake_size=2, resolution=16).images.shape == (2, 3, 16, 16)


def test_evaluation_of_a_run_on_fake_data_reads_the_images_it_trained_on():
    """Fake images depend on train.seed: an evaluation draws the run's, as its kNN monitor does."""
    from slimssl.config import config_from_dict
    from slimssl.eval.inputs import DataOptions

    cfg = config_from_dict({"data": {"source": "fake", "resolution": 8, "fake_size": 16}, "train": {"seed": 3}})
    train = DataOptions().load_split(cfg, "train")
    assert torch.equal(train.images, load_dataset("fake", resolution=8, fake_size=16, seed=3).images)
    assert not torch.equal(train.images, load_dataset("fake", resolution=8, fake_size=16, seed=0).images)


def test_a_damaged_zip_is_named_as_such(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DataError, match="images.zip is not a readable .zip"):
        load_dataset(str(path))


# the last two: a longer side of 40 * 47 / 30 = 62.67 px, which torchvision floors to 62
@pytest.mark.parametrize("size, resolution, ratio", [((300, 400), 224, 0.875), ((37, 50), 32, 1.0), ((64, 40), 24, 0.6),
                                                     ((30, 47), 40, 1.0), ((47, 30), 40, 1.0)])
def test_resize_center_crop_is_torchvisions_resize_then_center_crop(size, resolution, ratio):
    """Evaluation images (ImageNet: resize 256, centre crop 224) as torchvision's transforms make them."""
    from torchvision.transforms.v2 import functional as TF

    from slimssl.data.decode import resize_center_crop, resize_side

    assert resize_side(224, 0.875) == 256 and resize_side(32, 1.0) == 32
    assert resize_side(33, 0.55) == 60 and resize_side(110, 0.55) == 200  # 59.999... and 199.999... in floats
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = resize_center_crop(images, resolution, ratio)
    resized = TF.resize(images.float(), [resize_side(resolution, ratio)], antialias=True)
    theirs = TF.center_crop(resized, [resolution, resolution]).round().clamp(0, 255)
    assert ours.shape == (2, 3, resolution, resolution) and ours.is_contiguous()
    assert (ours.float() - theirs).abs().max() <= 1  # the same sizes and offsets; float rounding at .5 only


def test_a_split_is_resized_a_few_images_at_a_time_with_the_same_pixels(monkeypatch):
    """CIFAR-10 at 224 px resized whole took 30 GB of float copies; in chunks, each image comes out the same."""
    from slimssl.data import decode

    images = torch.randint(0, 256, (7, 3, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = decode.resize_center_crop(images, 16, 0.875)
    floats = []
    interpolate = decode.F.interpolate
    monkeypatch.setattr(decode.F, "interpolate", lambda x, **kw: floats.append(len(x)) or interpolate(x, **kw))
    monkeypatch.setattr(decode, "RESIZE_CHUNK_BYTES", 4 * 3 * 18 * 21 * 3)  # three resized images' floats
    assert torch.equal(decode.resize_center_crop(images, 16, 0.875), whole)
    assert floats == [3, 3, 1]
    assert decode.resize_center_crop(images[:0], 16, 0.875).shape == (0, 3, 16, 16)


def test_digits_at_a_crop_ratio_are_the_centre_of_a_larger_resize():
    whole = load_dataset("digits", "test", resolution=20)
    centre = load_dataset("digits", "test", resolution=16, crop_ratio=0.8)
    assert torch.equal(centre.images, whole.images[..., 2:18, 2:18])


# ---- layouts real users have --------------------------------------------------------------------------

def _split_tree(root, train="train", test="test"):
    _class_tree(root / train, per_class=2)
    _class_tree(root / test, per_class=1)
    return root


def _assert_splits(source, train_size=4, test_size=2):
    train, test = load_dataset(str(source), "train"), load_dataset(str(source), "test")
    assert (len(train), len(test)) == (train_size, test_size)
    assert train.classes == test.classes == ["cat", "dog"] and test.labels.tolist() == [0, 1]


def test_a_zip_written_with_backslashes_keeps_its_splits_and_classes(tmp_path):
    src = _split_tree(tmp_path / "d")
    archive = tmp_path / "windows.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # as PowerShell's Compress-Archive writes them
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            zf.write(path, str(path.relative_to(src)).replace("/", "\\"))
    _assert_splits(archive)


def test_split_folders_in_any_case(tmp_path):
    _assert_splits(_split_tree(tmp_path / "d", train="Train", test="TEST"))


def test_two_split_folders_differing_only_in_case_are_refused(tmp_path):
    _split_tree(tmp_path / "d", train="Train")
    _class_tree(tmp_path / "d" / "train", per_class=3)  # read from one, the other would be ignored
    with pytest.raises(DataError, match="Train/ and train/ differ only in letter case"):
        load_dataset(str(tmp_path / "d"), "train")


def test_a_folder_wrapping_the_dataset_is_read_like_the_zip_of_it(tmp_path):
    _split_tree(tmp_path / "d" / "cifar")  # how unzipping a zip of cifar/ leaves it
    (tmp_path / "d" / "README.txt").write_text("downloaded from ...")
    _assert_splits(tmp_path / "d")
    archive = _zip_dir(tmp_path / "d", tmp_path / "d.zip")  # the README beside the wrapper too
    _assert_splits(archive)


def test_files_of_other_kinds_in_class_folders_are_left_out_and_counted(tmp_path, caplog):
    root = _class_tree(tmp_path / "d")
    for name in ("cat/anim.gif", "cat/still.gif", "dog/notes.txt"):
        (root / name).write_bytes(b"GIF89a")
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert len(load_dataset(str(root))) == 6
    assert "left out 3 file(s) that are not images of the kinds read (.jpg, " in caplog.text
    assert ".gif 2, .txt 1" in caplog.text


def test_image_extensions_are_read_in_any_letter_case(tmp_path):
    """ImageNet's files end in .JPEG, a camera's in .JPG: both loaders read them."""
    from slimssl.data.eval_images import StreamedImages

    root = tmp_path / "d"
    for name, value in (("a/0.PNG", 10), ("a/1.png", 20), ("b/2.Png", 30)):
        _save(root / "train" / name, color=(value,) * 3)
    for ds in (load_dataset(str(root)), StreamedImages(str(root), "train", resolution=8)):
        assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 1]
    assert load_dataset(str(root)).images[:, 0, 0, 0].tolist() == [10, 20, 30]


def test_hidden_files_and_folders_are_neither_images_nor_classes(tmp_path):
    """Trees copied from a Mac hold ._ files (no images) and hidden folders: both loaders leave them out."""
    from slimssl.data.eval_images import StreamedImages

    root = _class_tree(tmp_path / "d" / "train", classes=("a", "b"), per_class=1).parent
    _save(root / "train" / "b" / ".hidden.png")
    (root / "train" / "b" / "._0.png").write_bytes(b"AppleDouble metadata, no image")
    _save(root / "train" / ".thumbs" / "t.png")
    for ds in (load_dataset(str(root)), StreamedImages(str(root), "train", resolution=8)):
        assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 1]


def test_a_zip_of_a_compression_method_python_cannot_read_is_named_once(tmp_path):
    archive = _zip_dir(_class_tree(tmp_path / "d"), tmp_path / "d.zip")
    raw = bytearray(archive.read_bytes())
    central = raw.find(b"PK\x01\x02")
    while raw[central + 46:central + 46 + 9] != b"cat/0.png":  # its central directory entry: method at +10
        central = raw.find(b"PK\x01\x02", central + 1)
    raw[central + 10:central + 12] = (9).to_bytes(2, "little")  # Deflate64, as Windows Explorer writes
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"d\.zip stores cat/0\.png with compression method 9 \(Deflate64, as Windows "
                                        r"Explorer writes large archives\), which Python's zipfile cannot read; unpack"):
        load_dataset(str(archive))


def test_a_zip_member_that_is_no_image_may_be_of_any_compression(tmp_path):
    root = _class_tree(tmp_path / "d")
    (root / "annotations.mat").write_bytes(b"never read")
    archive = _zip_dir(root, tmp_path / "d.zip")
    raw = bytearray(archive.read_bytes())
    central = raw.find(b"PK\x01\x02")
    while raw[central + 46:central + 46 + 15] != b"annotations.mat":
        central = raw.find(b"PK\x01\x02", central + 1)
    raw[central + 10:central + 12] = (9).to_bytes(2, "little")
    archive.write_bytes(bytes(raw))
    assert len(load_dataset(str(archive))) == 6


def test_a_folder_that_cannot_be_read_stops_the_load_rather_than_losing_a_class(tmp_path, monkeypatch):
    import errno

    from slimssl.data import files

    root = _class_tree(tmp_path / "d")
    identity = files._identity

    def stale(path):
        if path.endswith("dog"):
            raise OSError(errno.ESTALE, "Stale file handle")
        return identity(path)

    monkeypatch.setattr(files, "_identity", stale)
    with pytest.raises(DataError, match=r"cannot read .*dog \(Stale file handle\)"):
        load_dataset(str(root))


def test_a_chain_of_lone_folders_above_the_splits_is_unwrapped(tmp_path):
    _split_tree(tmp_path / "d" / "outer" / "inner")  # not read as one class "outer" mixing train and test
    _assert_splits(tmp_path / "d")
    _assert_splits(_zip_dir(tmp_path / "d", tmp_path / "d.zip"))


def test_a_dataset_one_folder_too_deep_is_refused_not_read_as_classes(tmp_path):
    _split_tree(tmp_path / "d" / "cifar")
    _split_tree(tmp_path / "d" / "other")  # two datasets side by side: no single wrapper
    with pytest.raises(DataError, match=r"cifar holds test/ and train/, so it is a dataset, not a class folder; "
                                        r"give .*cifar itself"):
        load_dataset(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"zip the folder cifar/ on its own, or unpack .*d\.zip"):
        load_dataset(str(_zip_dir(tmp_path / "d", tmp_path / "d.zip")))
    # the test split asked for first (as evaluation does), with a stray file beside the datasets
    (tmp_path / "d" / "preview.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"cifar holds test/ and train/, so it is a dataset"):
        load_dataset(str(tmp_path / "d"), "test")


@pytest.mark.parametrize("split", ["test", "val"])
def test_splits_without_train_are_refused_not_read_as_a_class(tmp_path, split):
    _class_tree(tmp_path / "d" / split, per_class=1)
    for asked in ("train", "test"):
        with pytest.raises(DataError, match=rf"holds {split}/ but no train/ folder; expected train/ beside it"):
            load_dataset(str(tmp_path / "d"), asked)


def test_a_zip_of_the_train_split_alone_is_a_train_split(tmp_path):
    _class_tree(tmp_path / "d" / "train", per_class=2)
    archive = _zip_dir(tmp_path / "d", tmp_path / "d.zip")
    assert load_dataset(str(archive)).classes == ["cat", "dog"]
    with pytest.raises(DataError, match="no test/ or val/ folder"):
        load_dataset(str(archive), "test")


def test_a_dataset_deeper_inside_a_class_folder_is_refused_and_a_classs_train_pictures_are_not(tmp_path):
    _split_tree(tmp_path / "d" / "outer" / "inner")
    _class_tree(tmp_path / "d" / "outer" / "other")  # so outer is no lone wrapper: a class of the folder d
    _class_tree(tmp_path / "d" / "vehicles")
    with pytest.raises(DataError, match=r"outer/inner holds test/ and train/, so it is a dataset, not images of the "
                                        r"class outer; give .*inner itself as the data"):
        load_dataset(str(tmp_path / "d"))
    shutil.rmtree(tmp_path / "d" / "outer")
    _class_tree(tmp_path / "d" / "vehicles" / "rail" / "train")  # pictures of trains, two folders down
    assert load_dataset(str(tmp_path / "d")).classes == ["vehicles"]


def test_what_a_scan_finds_is_said_once_in_each_call_of_a_sweep(tmp_path, caplog):
    """Said once per process, the warning reached the first run of a sweep's log only; said once per call now
    (inside slimssl.pretrain, knn, ...: ambient.apart_from_caller), once per process outside one."""
    from slimssl.ambient import apart_from_caller

    root = _class_tree(tmp_path / "d")
    os.symlink("..", root / "cat" / "loop")
    for call in range(2):
        caplog.clear()
        with apart_from_caller(), caplog.at_level(logging.WARNING, logger="slimssl"):
            load_dataset(str(root))
            load_dataset(str(root), resolution=8)  # scanned again, decoded again
        assert caplog.text.count("not followed (a loop)") == 1, call


def test_a_link_loop_is_followed_once_and_a_dangling_link_is_an_unreadable_image(tmp_path, caplog):
    root = _class_tree(tmp_path / "d")
    os.symlink("..", root / "cat" / "loop")
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert len(load_dataset(str(root))) == 6
    assert "links to a folder that holds it: not followed (a loop)" in caplog.text
    os.symlink(tmp_path / "gone.png", root / "dog" / "moved.png")
    with pytest.raises(DataError, match=r"cannot decode .*moved\.png"):
        load_dataset(str(root))
    assert len(load_dataset(str(root), skip_unreadable=True)) == 6


def test_a_link_that_leads_to_itself_is_skipped_or_an_unreadable_image(tmp_path, caplog):
    root = _class_tree(tmp_path / "d")
    os.symlink("selfloop", root / "dog" / "selfloop")  # ELOOP when followed
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert len(load_dataset(str(root))) == 6
    assert "selfloop cannot be followed (Too many levels of symbolic links): skipped" in caplog.text
    os.symlink("b.png", root / "cat" / "a.png")
    os.symlink("a.png", root / "cat" / "b.png")
    with pytest.raises(DataError, match=r"cannot decode .*a\.png"):
        load_dataset(str(root))
    assert len(load_dataset(str(root), skip_unreadable=True)) == 6


def test_a_split_may_link_to_the_class_folders_of_another(tmp_path):
    _class_tree(tmp_path / "d" / "train", per_class=2)
    (tmp_path / "d" / "test").mkdir()
    for name in ("cat", "dog"):  # a quick check on the train images themselves
        os.symlink(tmp_path / "d" / "train" / name, tmp_path / "d" / "test" / name)
    train, test = (load_dataset(str(tmp_path / "d"), split) for split in ("train", "test"))
    assert torch.equal(train.images, test.images) and test.labels.tolist() == [0, 0, 1, 1]


def test_file_names_that_are_not_utf8_stream_too(tmp_path):
    from slimssl.data.files import FileListDataset

    root = _class_tree(tmp_path / "d")
    raw = os.path.join(os.fsencode(root / "cat"), b"caf\xe9.png")  # a Latin-1 name, as old zips leave
    os.rename(root / "cat" / "0.png", raw)
    name = os.fsdecode(raw)[len(str(root)) + 1:]
    files = FileListDataset(str(root), [name])
    assert files.path(0) == os.fsdecode(raw) and files.read(name) == pathlib.Path(os.fsdecode(raw)).read_bytes()


def test_evaluation_finds_a_bad_test_split_before_decoding_the_train_split(tmp_path, monkeypatch):
    from slimssl.config import load_config
    from slimssl.eval.inputs import DataOptions

    loaded, load_split = [], DataOptions.load_split
    monkeypatch.setattr(DataOptions, "load_split", lambda self, cfg, split, device=None:
                        loaded.append(split) or load_split(self, cfg, split, device))
    cfg = load_config("demo")
    _class_tree(tmp_path / "no_test" / "train")
    with pytest.raises(DataError, match=r"cannot load the test split of .*no_test.*no test/ or val/ folder"):
        DataOptions(data=str(tmp_path / "no_test")).load_splits(cfg)
    assert loaded == ["test"]  # the train split was never decoded
    for i in range(2):
        _save(tmp_path / "loose" / "train" / f"{i}.png")
        _save(tmp_path / "loose" / "test" / f"{i}.png")
    with pytest.raises(DataError, match="the test split of .* has no labels"):
        DataOptions(data=str(tmp_path / "loose")).load_splits(cfg)
    _class_tree(tmp_path / "other" / "train")
    _class_tree(tmp_path / "other" / "test", classes=("cat", "cow"))
    with pytest.raises(DataError, match=r"different classes \(only in train: dog; only in test: cow\)"):
        DataOptions(data=str(tmp_path / "other")).load_splits(cfg)


def test_splits_naming_the_same_classes_in_another_order_are_refused():
    """Label 0 of one split would be another class than label 0 of the other."""
    from slimssl.data.datasets import check_same_classes

    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    train = ImageDataset(images, torch.tensor([0, 1]), ["cat", "dog"], "d", "train")
    test = ImageDataset(images, torch.tensor([0, 1]), ["dog", "cat"], "d", "test")
    check_same_classes(train, train, "d")
    with pytest.raises(DataError, match="the same names in another order"):
        check_same_classes(train, test, "d")


def test_pretraining_says_when_its_test_split_exists_but_cannot_be_read(tmp_path, caplog):
    from slimssl.config import config_from_dict
    from slimssl.train.loop import Trainer

    _split_tree(tmp_path / "d")
    (tmp_path / "d" / "test" / "cat" / "0.png").write_bytes(b"not an image")
    cfg = config_from_dict({"data": {"source": str(tmp_path / "d"), "resolution": 8},
                            "train": {"batch_size": 4, "device": "cpu"}})
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert Trainer(cfg, tmp_path / "run").knn_monitor is None
    assert any(r.levelno == logging.WARNING and "the test split cannot be loaded (cannot decode" in r.getMessage()
               for r in caplog.records)


def test_a_class_folder_without_images_names_the_extensions_and_what_it_holds(tmp_path):
    root = _class_tree(tmp_path / "d")
    _save(root / "bird" / "0.gif", fmt="GIF")
    with pytest.raises(DataError, match=r"class folder .*bird contains no images \(extensions: \.jpg, .*\); it "
                                        r"holds 1 other file\(s\), e\.g\. bird/0\.gif"):
        load_dataset(str(root))


def test_a_folder_holding_a_zip_alone_says_to_give_the_zip(tmp_path):
    (tmp_path / "d").mkdir()
    _zip_dir(_class_tree(tmp_path / "src"), tmp_path / "d" / "cifar.zip")
    with pytest.raises(DataError, match=r"contains no images .*it holds cifar\.zip: give that \.zip as the data"):
        load_dataset(str(tmp_path / "d"))


@pytest.mark.parametrize("source, resolution, expected", [
    (123, 16, "data source must be a dataset name or path, got 123"),
    ("digits", 16.5, "resolution must be a positive int, got 16.5"),
    ("digits", "16", "resolution must be a positive int, got '16'"),
])
def test_a_source_or_resolution_of_the_wrong_kind_is_named_not_read_as_unreadable_files(source, resolution, expected):
    from slimssl.data.eval_images import load_eval_split

    for loader in ("memory", "stream"):
        with pytest.raises(DataError, match=re.escape(expected)):
            load_eval_split(source, "train", loader=loader, resolution=resolution)


def test_class_names_in_decomposed_unicode_mean_the_same_classes(tmp_path):
    # a split copied from macOS spells "é" as "e" + a combining accent (NFD), which sorts before "fox", while the
    # composed "é" (NFC) sorts after it: read as they are, the two splits' labels would name each other's classes
    decomposed, composed = "e\u0301be\u0300ne", "\u00e9b\u00e8ne"
    _class_tree(tmp_path / "d" / "train", classes=(decomposed, "fox"), per_class=2)
    _class_tree(tmp_path / "d" / "test", classes=(composed, "fox"), per_class=1)
    train, test = load_dataset(str(tmp_path / "d"), "train"), load_dataset(str(tmp_path / "d"), "test")
    assert train.classes == test.classes == ["fox", composed]
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 1]
    assert torch.equal(train.images[2], test.images[1])  # the first image of "ébène" in both trees


def test_two_class_folders_spelt_alike_in_unicode_are_refused(tmp_path):
    _class_tree(tmp_path / "d", classes=("e\u0301", "\u00e9"), per_class=1)
    with pytest.raises(DataError, match="differ only in how Unicode composes their letters"):
        load_dataset(str(tmp_path / "d"))


def test_utf8_names_of_a_zip_without_the_utf8_flag_are_read_as_utf8(tmp_path):
    # Info-ZIP (zip -r on Linux and macOS) writes UTF-8 names without flag 0x800; written here with ASCII
    # stand-ins of the same length (no flag), whose bytes are then replaced by the UTF-8 name
    name = "\u00fcn\u00efc\u00f6d\u00e9"
    stand_in = "X" * len(name.encode("utf-8"))
    src = _class_tree(tmp_path / "d", classes=("cat", stand_in), per_class=2)
    archive = _zip_dir(src, tmp_path / "info-zip.zip")
    archive.write_bytes(archive.read_bytes().replace(stand_in.encode(), name.encode("utf-8")))
    assert not any(info.flag_bits & 0x800 for info in zipfile.ZipFile(archive).infolist())
    ds = load_dataset(str(archive))
    assert ds.classes == ["cat", name] and ds.labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("files, what", [(("config.yaml", "checkpoints/last.pt"), "is a run directory"),
                                         (("config.json", "model.safetensors"), "is an exported sub-network")])
def test_a_run_or_an_export_given_as_data_is_said_to_be_one(tmp_path, files, what):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=f"{what}.*, not a dataset; expected a folder or .zip of images"):
        load_dataset(str(tmp_path), "train")


@pytest.mark.parametrize("extra", ["config.json", "model.safetensors"])
def test_a_dataset_folder_holding_one_file_of_an_export_is_still_a_dataset(tmp_path, extra):
    """Only the two files together (config.json and model.safetensors) are an exported sub-network."""
    root = _class_tree(tmp_path / "data")
    (root / extra).write_bytes(b"{}")
    ds = load_dataset(str(root))
    assert ds.classes == ["cat", "dog"] and len(ds) == 6


@pytest.mark.parametrize("size, warned", [((48, 40), True), ((20, 16), False)])
def test_pretraining_in_memory_says_when_its_photos_are_much_larger_than_the_resolution(tmp_path, caplog, size,
                                                                                        warned):
    """They are kept as their centre square at data.resolution, so the random crops lose detail and the border."""
    from slimssl.config import config_from_dict
    from slimssl.train.loop import Trainer

    for cls in ("cat", "dog"):
        (tmp_path / "d" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", size, (40 * i, 80, 120)).save(tmp_path / "d" / "train" / cls / f"{i}.png")
    Image.new("RGB", size).save(tmp_path / "d" / "train" / "loose.png")  # outside the class folders: a note
    cfg = config_from_dict({"data": {"source": str(tmp_path / "d"), "resolution": 16},
                            "train": {"batch_size": 4, "device": "cpu", "knn": False}})
    with caplog.at_level(logging.INFO, logger="slimssl"):
        Trainer(cfg, tmp_path / "run").close()
    said = [r.getMessage() for r in caplog.records if "on their shorter side" in r.getMessage()]
    assert said == ([f"{tmp_path / 'd'}: the training photos are about 40 px on their shorter side, and data.loader: "
                     "memory keeps each as its centre square at data.resolution 16 px: the random crops never see "
                     "the border, and each has 2.5 times fewer pixels a side than the same crop of the photo. "
                     "data.loader: stream crops the photos themselves (--set data.loader=stream)"] if warned else [])
    # the listing's own notes are said once (a second listing for this check said them again)
    assert sum("ignoring 1 images outside the class folders" in r.getMessage() for r in caplog.records) == 1
