"""Image datasets as in-memory uint8 tensors.

Every source (a built-in name, an ImageFolder tree, or a ``.zip`` of one) is
decoded once into an ``ImageDataset`` holding ``uint8 [N, 3, H, W]`` images.
Augmentation then runs batched on the tensor (see ``augment.py``), so there is
no per-sample ``Dataset.__getitem__`` on the training path.

Decoded folder/zip trees are cached under ``$SLIMSSL_CACHE`` (default
``~/.cache/slimssl/decoded``) keyed by the file list with sizes and mtimes,
so a second load of an unchanged tree is a single file read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import SlimsslError

log = logging.getLogger("slimssl")

BUILTIN = ("digits", "cifar10", "cifar100", "fake")
SKIP_HINT = "pretrain: --set data.skip_unreadable=true; evaluation commands: --skip-unreadable"
SPLITS = ("train", "test", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_CACHE_VERSION = 1  # bump when the decoded output for the same files changes
_CHUNK = 256  # files per thread-pool task: amortises the executor overhead


class DataError(SlimsslError):
    """Bad dataset input: the message names the path and what was expected."""


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8 [N, 3, H, W], CPU
    labels: torch.Tensor | None  # int64 [N]; None when unlabelled
    classes: list[str] | None
    name: str
    split: str = "train"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return num_classes(self)

    # The evaluation interface, shared with the streamed ``StreamedImages`` (eval_images.py).

    @property
    def resolution(self) -> int:
        """The side the images were decoded at (their width)."""
        return int(self.images.shape[-1])

    def batches(self, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """uint8 [B, 3, H, W] batches of ``indices`` (default: all images), in that order."""
        if indices is None:
            yield from (batch for batch in self.images.split(batch_size) if len(batch))
            return
        for chunk in torch.as_tensor(indices, dtype=torch.int64).split(batch_size):
            if len(chunk):
                yield self.images[chunk]

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """The images at ``indices`` as one uint8 tensor (a copy)."""
        return self.images[torch.as_tensor(indices, dtype=torch.int64)]


def num_classes(ds: ImageDataset) -> int:
    """Number of classes, 0 for an unlabelled dataset."""
    return len(ds.classes) if ds.classes else 0


def check_same_classes(train, test, source: str) -> None:
    """A labelled train/test pair must name the same classes in the same order, or every label of the test
    split means another class than in the train split and accuracies are meaningless."""
    if train.classes and test.classes and list(train.classes) != list(test.classes):
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        detail = (f"only in train: {', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}"
                  if only_train or only_test else "the same names in another order")
        raise DataError(f"{source}: the train and test splits have different classes ({detail}); expected the "
                        "same class folders in both")


def load_dataset(
    source: str,
    split: str = "train",
    *,
    resolution: int | None = None,
    skip_unreadable: bool = False,
    fake_size: int = 256,
    seed: int = 0,
) -> ImageDataset:
    """Load ``source`` (a built-in name or a path) as an in-memory dataset."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {source!r}; expected one of {SPLITS}")
    if resolution is not None and resolution < 1:
        raise DataError(f"resolution must be a positive int, got {resolution!r}")
    if source == "digits":
        return _load_digits(split, resolution)
    if source in ("cifar10", "cifar100"):
        return _load_cifar(source, split, resolution)
    if source == "fake":
        return _load_fake(split, resolution or 32, fake_size, seed)
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(path):
        raise DataError(
            f"{source!r} is neither a known dataset name ({', '.join(BUILTIN)}) "
            f"nor an existing path (looked for {path})"
        )
    return _load_tree(path, split, resolution, skip_unreadable)


# ----------------------------------------------------------------- built-ins


def _load_digits(split: str, resolution: int | None) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    labels = raw.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    idx = train_idx if split == "train" else test_idx
    grey = torch.from_numpy(raw.images[idx]).float().unsqueeze(1) * (255.0 / 16.0)
    size = resolution or 32
    grey = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    images = grey.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return ImageDataset(
        images, torch.from_numpy(labels[idx]), [str(i) for i in range(10)], "digits", split
    )


def data_root() -> str:
    """Where torchvision datasets are downloaded to."""
    return os.path.expanduser(os.environ.get("SLIMSSL_DATA", "~/.cache/slimssl/data"))


def _load_cifar(name: str, split: str, resolution: int | None) -> ImageDataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = data_root()
    try:
        ds = cls(root, train=split == "train", download=True)
    except Exception as exc:  # no network, bad archive, unwritable root, ...
        raise DataError(
            f"could not load or download {name} under {root} ({exc}); set $SLIMSSL_DATA, "
            f"or pass the path to an ImageFolder tree (or .zip) instead of {name!r}"
        ) from exc
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    if resolution is not None and resolution != images.shape[-1]:
        images = resize_center_crop(images, resolution)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageDataset(images, labels, list(ds.classes), name, split)


def _load_fake(split: str, resolution: int, size: int, seed: int) -> ImageDataset:
    # A different stream for the held-out split so train and test differ.
    gen = torch.Generator().manual_seed(seed + (0 if split == "train" else 1_000_003))
    images = torch.randint(0, 256, (size, 3, resolution, resolution), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (size,), dtype=torch.int64, generator=gen)
    return ImageDataset(images, labels, [str(i) for i in range(10)], "fake", split)


def resize_center_crop(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize uint8 [N,3,H,W] so the shorter side is ``resolution``, then center crop."""
    h, w = images.shape[-2:]
    if (h, w) == (resolution, resolution):
        return images
    scale = resolution / min(h, w)
    new_h, new_w = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    x = F.interpolate(images.float(), size=(new_h, new_w), mode="bilinear",
                      align_corners=False, antialias=True)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    x = x[..., top : top + resolution, left : left + resolution]
    return x.round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------ folder and zip


@dataclass
class _Tree:
    """A directory or zip file seen as relative POSIX paths."""

    root: str  # absolute path, for messages and the cache key
    files: dict[str, tuple[int, int]]  # relpath -> (size, mtime_ns or crc)
    dirs: set[str]
    read: Callable[[str], bytes]


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_EXTENSIONS)


def _scan_dir(root: str) -> _Tree:
    files: dict[str, tuple[int, int]] = {}
    dirs: set[str] = set()
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir)) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if _hidden(entry.name):
                    continue
                if entry.is_dir():
                    dirs.add(rel)
                    stack.append(rel)
                elif entry.is_file():
                    st = entry.stat()
                    files[rel] = (st.st_size, st.st_mtime_ns)

    def read(rel: str) -> bytes:
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()

    return _Tree(root, files, dirs, read)


def _scan_zip(path: str) -> _Tree:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable .zip file ({exc})") from exc
    files, dirs = {}, set()
    for info in archive.infolist():
        name = info.filename.rstrip("/")
        if not name or _hidden(name):
            continue
        parts = name.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))  # implied parents
        if info.is_dir():
            dirs.add(name)
        else:
            files[name] = (info.file_size, info.CRC)
    prefix = _wrapper_prefix(files, dirs)
    files = {k[len(prefix):]: v for k, v in files.items()}
    dirs = {d[len(prefix):] for d in dirs if d.startswith(prefix) and d != prefix.rstrip("/")}

    def read(rel: str) -> bytes:
        return archive.read(prefix + rel)  # ZipFile reads are thread-safe

    return _Tree(path, files, dirs, read)


def _wrapper_prefix(files: dict, dirs: set[str]) -> str:
    """One top-level folder wrapping everything (``data.zip/data/...``) is skipped."""
    tops = {name.split("/")[0] for name in list(files) + list(dirs)}
    if len(tops) == 1 and not any("/" not in f for f in files):
        return tops.pop() + "/"
    return ""


def _split_prefix(tree: _Tree, split: str) -> str:
    """``train/``, ``test/`` or ``val/`` if the tree has split folders, else ``""``."""
    top_dirs = {d for d in tree.dirs if "/" not in d}
    if "train" not in top_dirs:
        if split != "train":
            raise DataError(
                f"{tree.root} has no train/ and test/ (or val/) sub-folders, so it is a "
                f"single 'train' split; cannot load split {split!r}"
            )
        return ""
    wanted = {"train": ["train"], "test": ["test", "val"], "val": ["val", "test"]}[split]
    for name in wanted:
        if name in top_dirs:
            return name + "/"
    raise DataError(f"{tree.root} has no {' or '.join(w + '/' for w in wanted)} folder for split {split!r}")


def _list_split(tree: _Tree, prefix: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    """(image paths, labels or None, class names or None) under ``prefix``."""
    where = os.path.join(tree.root, prefix) if prefix else tree.root
    under = [f[len(prefix):] for f in tree.files if f.startswith(prefix)]
    if not under:
        raise DataError(f"{where} is empty; expected class sub-folders of images, or images")
    children = (d[len(prefix):] for d in tree.dirs if d.startswith(prefix))
    class_dirs = sorted(c for c in children if c and "/" not in c)
    if not class_dirs:
        paths = sorted(prefix + f for f in under if "/" not in f and _is_image(f))
        if not paths:
            raise DataError(f"{where} contains no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        return paths, None, None
    loose = [f for f in under if "/" not in f and _is_image(f)]
    if loose:
        log.warning("%s: ignoring %d images outside the class folders (e.g. %s)", where, len(loose), loose[0])
    by_class: dict[str, list[str]] = {c: [] for c in class_dirs}
    for f in under:
        if "/" in f and _is_image(f):
            by_class[f.split("/", 1)[0]].append(prefix + f)
    paths, labels = [], []
    for label, cls in enumerate(class_dirs):
        if not by_class[cls]:
            raise DataError(f"class folder {os.path.join(where, cls)} contains no images")
        paths += sorted(by_class[cls])
        labels += [label] * len(by_class[cls])
    return paths, labels, class_dirs


def scan_tree(path: str) -> _Tree:
    """The image files of an ImageFolder folder or .zip (not decoded), or a DataError saying what is wrong."""
    if os.path.isdir(path):
        tree = _scan_dir(path)
    elif zipfile.is_zipfile(path):
        tree = _scan_zip(path)
    else:
        what = "is not a readable .zip (damaged or cut short?)" if path.lower().endswith(".zip") else \
            "is a file but not a .zip"
        raise DataError(f"{path} {what}; expected a folder of images or a .zip of one")
    if not tree.files:
        raise DataError(f"{path} is empty; expected class sub-folders of images, or images")
    return tree


def _load_tree(path: str, split: str, resolution: int | None, skip_unreadable: bool) -> ImageDataset:
    tree = scan_tree(path)
    prefix = _split_prefix(tree, split)
    paths, labels, classes = _list_split(tree, prefix)
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    key = _cache_key(tree, split, resolution, skip_unreadable, paths)

    cached = _cache_load(key)
    if cached is None:
        images, kept, skipped = _decode_all(tree, paths, resolution, skip_unreadable)
        cached = {"images": images, "kept": kept, "skipped": skipped}
        _cache_save(key, cached)
    images, kept, skipped = cached["images"], cached["kept"], cached["skipped"]
    if skipped:
        log.warning("%s: skipped %d unreadable files (%s%s)", path, len(skipped),
                    ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
    label_t = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)[kept]
    return ImageDataset(images, label_t, classes, name, split)


# ----------------------------------------------------------------- decoding


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit data: scale the full range down instead of clipping at 255.
        wide = np.asarray(img).astype(np.float32)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        wide = np.asarray(img, dtype=np.float32)
        scale = 255.0 if wide.size and wide.max() <= 1.0 else 1.0  # [0,1] floats or 0..255
        grey = np.clip(np.rint(wide * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Composite onto black so fully transparent pixels do not leak stale colour.
        rgba = np.asarray(img.convert("RGBA")).astype(np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
        return rgb.astype(np.uint8)
    return np.array(img.convert("RGB"))  # a writable copy, as torch.from_numpy wants


def _jpeg_op():
    """torchvision's libjpeg-turbo op (~2x faster than PIL here) as (op, RGB mode), or None.

    Called as a raw op to skip the Python wrapper, which warns on every call
    that torchvision's decoders are deprecated; PIL remains the fallback.
    """
    try:
        from torchvision.io import ImageReadMode

        return torch.ops.image.decode_jpeg, ImageReadMode.RGB.value
    except (ImportError, AttributeError, RuntimeError):
        return None


_JPEG = _jpeg_op()


def _decode_one(data: bytes) -> torch.Tensor:
    """Bytes -> uint8 [3, H, W]; raises on truncated or non-image data."""
    if _JPEG is not None and data[:2] == b"\xff\xd8":
        op, rgb = _JPEG
        try:
            return op(torch.frombuffer(bytearray(data), dtype=torch.uint8), rgb, False)
        except RuntimeError:
            pass  # let PIL decode it or produce the error
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return torch.from_numpy(_to_rgb(img)).permute(2, 0, 1)


def decode_resized(data: bytes, resolution: int | None) -> torch.Tensor:
    """Bytes -> uint8 [3, R, R] as a decoded dataset holds it (``resize_center_crop`` to ``resolution``; the
    native size when None). Streamed evaluation decodes with this too, so both see the same pixels."""
    img = _decode_one(data)
    return img if resolution is None else resize_center_crop(img[None], resolution)[0]


def _decode_chunk(tree: _Tree, paths: list[str], resolution: int | None) -> list[torch.Tensor | str]:
    """Decode ``paths``; an unreadable file yields its error message instead."""
    out: list[torch.Tensor | str] = []
    for rel in paths:
        try:
            out.append(decode_resized(tree.read(rel), resolution))
        except Exception as exc:  # any decoder failure means "unreadable file"
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def _decode_all(tree: _Tree, paths: list[str], resolution: int | None, skip_unreadable: bool):
    """Decode with a thread pool (decoders release the GIL); returns (images, kept idx, skipped)."""
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    workers = min(len(chunks), 2 * (os.cpu_count() or 1), 32)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = [r for chunk in pool.map(lambda c: _decode_chunk(tree, c, resolution), chunks) for r in chunk]

    kept = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
    skipped = [paths[i] for i, r in enumerate(results) if not isinstance(r, torch.Tensor)]
    if skipped and not skip_unreadable:
        first = results[paths.index(skipped[0])]
        raise DataError(
            f"cannot decode {os.path.join(tree.root, skipped[0])} ({first}); "
            f"{len(skipped)} unreadable file(s) in total; to skip them set data.skip_unreadable: true "
            f"({SKIP_HINT}, or load_dataset(..., skip_unreadable=True))"
        )
    if not kept:
        raise DataError(f"{tree.root}: none of the {len(paths)} image files could be decoded")
    _check_sizes(tree, paths, results, kept)
    images = torch.stack([results[i] for i in kept])
    return images, torch.as_tensor(kept, dtype=torch.int64), skipped


def _check_sizes(tree: _Tree, paths: list[str], results: list, kept: list[int]) -> None:
    first = kept[0]
    shape = results[first].shape
    for i in kept:
        if results[i].shape != shape:
            raise DataError(
                f"images differ in size: {os.path.join(tree.root, paths[first])} is "
                f"{shape[2]}x{shape[1]} but {os.path.join(tree.root, paths[i])} is "
                f"{results[i].shape[2]}x{results[i].shape[1]}; pass resolution=... to resize them"
            )


# -------------------------------------------------------------------- cache


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("SLIMSSL_CACHE", "~/.cache/slimssl/decoded"))


def _cache_key(tree: _Tree, split: str, resolution, skip_unreadable: bool, paths: list[str]) -> str:
    listing = [[p, *tree.files[p]] for p in paths]
    if not os.path.isdir(tree.root):  # a zip: its own size/mtime too
        st = os.stat(tree.root)
        listing.append(["<zip>", st.st_size, st.st_mtime_ns])
    blob = json.dumps([_CACHE_VERSION, tree.root, split, resolution, skip_unreadable, listing])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _cache_load(key: str) -> dict | None:
    path = os.path.join(cache_dir(), key + ".pt")
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or from an incompatible version: decode again
        log.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None


def _cache_save(key: str, payload: dict) -> None:
    directory = cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        # Temp file in the same folder + os.replace: readers never see a partial file.
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, os.path.join(directory, key + ".pt"))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:  # a read-only cache must not break loading
        log.warning("could not write decoded-image cache in %s (%s)", directory, exc)
