"""The image files of an ImageFolder folder or a ``.zip`` of one, seen as relative paths: listing,
``train/``/``test/`` splits, class folders, and readers of one file, for this process or a loader worker.

Nothing here decodes an image (``decode.py``); ``datasets.py`` decodes a split into memory, ``stream.py``
and ``eval_images.py`` have loader workers decode it batch by batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import struct
import threading
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from torch.utils.data import Dataset

from ..ambient import first_time
from ..wording import did_you_mean, named
from ..errors import DataError, MissingSplitError

log = logging.getLogger("slimssl")

BUILTIN = ("digits", "cifar10", "cifar100", "fake")  # names ``load_dataset`` resolves without files
SKIP_HINT = "pretrain: --set data.skip_unreadable=true; evaluation commands: --skip-unreadable"
SPLITS = ("train", "test", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _say_once(level: int, message: str, *args) -> None:
    """Log what scanning a folder finds once per call (``ambient.first_time``), not once for each split scanned."""
    text = message % args
    if first_time(text):
        log.log(level, text)


def check_source_and_resolution(source, resolution) -> None:
    """Refuse a source that is no name or path and a resolution that is no positive int up front: found later,
    inside the decoder, they would read as files that cannot be decoded."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise DataError(f"data source must be a dataset name or path, got {source!r}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise DataError(f"resolution must be a positive int, got {resolution!r}")


def existing_path(source: str) -> str:
    """The absolute path of a dataset ``source`` that is not a built-in name, or a DataError."""
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(path):
        from .registry import registered_names  # not at the top: the registry imports this module

        registered = named("by a module given to --import", "with slimssl.register_dataset in this process")
        # a bare name may be a misspelt dataset's; a path is the user's folder (an unmounted /data/cifar10 is no
        # hint to train on the downloaded CIFAR-10)
        bare = os.path.basename(source) == source
        raise DataError(f"{source!r} is neither a known dataset name ({', '.join(BUILTIN)}, or one registered "
                        f"{registered}) nor an existing path (looked for {path})"
                        f"{did_you_mean(source, [*BUILTIN, *registered_names()]) if bare else ''}")
    return path


@dataclass
class FileTree:
    """A directory or zip file seen as relative POSIX paths."""

    root: str  # absolute path, for messages and the cache key
    # relpath -> a zip member's (size, crc); None in a folder, whose files are not stat'ed while scanning (at
    # ImageNet's 1.33M files that took 3 of 4 s): only the memory loader's cache key needs them, for one split
    files: dict[str, tuple[int, int] | None]
    dirs: set[str]
    read: Callable[[str], bytes]
    members: dict[str, tuple[int, int, int, int]] | None = None  # a zip's relpath -> ZipMembers' row


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _has_image_extension(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_EXTENSIONS)


def _refuse_run_or_export(path: str) -> None:
    """A run directory or an exported sub-network given as data (two paths swapped on a command line): said as
    what it is, rather than read as a dataset of its few files."""
    from ..layout import is_export_dir, run_markers

    markers = run_markers(path)
    if markers:
        raise DataError(f"{path} is a run directory (it holds {' and '.join(markers)}), not a dataset; expected a "
                        "folder or .zip of images, or a dataset's name")
    if is_export_dir(path):
        raise DataError(f"{path} is an exported sub-network, not a dataset; expected a folder or .zip of images, "
                        "or a dataset's name")


def _scan_dir(root: str) -> FileTree:
    files: dict[str, None] = {}
    dirs: set[str] = set()
    stack = [("", (_identity(root),))]  # each folder with the folders above it: a link to one of them is a loop
    while stack:
        rel_dir, above = stack.pop()
        folder = os.path.join(root, rel_dir)
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise DataError(f"cannot list the folder {folder} ({exc.strerror or exc})") from exc
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if _hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir()
                identity = _identity(entry.path) if is_dir else None
                is_file = not is_dir and entry.is_file()
            except OSError as exc:
                if exc.errno != errno.ELOOP:  # a stale network mount (ESTALE, EIO): a class could silently go
                    raise DataError(f"cannot read {entry.path} ({exc.strerror or exc})") from exc
                if not _has_image_extension(entry.name):  # a link that leads to itself
                    _say_once(logging.WARNING, "%s cannot be followed (%s): skipped", entry.path, exc.strerror or exc)
                    continue
                is_dir, is_file = False, True  # an image that cannot be read: reported as unreadable, as dangling
            if is_dir:
                if identity in above:
                    _say_once(logging.WARNING, "%s links to a folder that holds it: not followed (a loop)",
                              entry.path)
                    continue
                dirs.add(rel)
                stack.append((rel, (*above, identity)))
            elif is_file or (entry.is_symlink() and _has_image_extension(entry.name)):  # dangling: an unreadable image
                files[rel] = None
    return FileTree(root, files, dirs, _folder_reader(root))


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _folder_reader(root: str) -> Callable[[str], bytes]:
    def read(rel: str) -> bytes:
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()

    return read


READABLE_ZIP_METHODS = {m for m in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA,
                                     getattr(zipfile, "ZIP_ZSTANDARD", None)) if m is not None}  # Python 3.14's
ZIP_METHOD_NAMES = {9: "Deflate64, as Windows Explorer writes large archives", 93: "Zstandard", 98: "PPMd"}
# A zip member larger than this, unpacked, is no image: a zip bomb (a few hundred KB that inflate to gigabytes in
# every reading thread) is an unreadable file, not a reason to run out of memory
MAX_MEMBER_BYTES = 1 << 30


def _refuse_large_member(size: int) -> None:
    if size > MAX_MEMBER_BYTES:
        raise ValueError(f"the zip member unpacks to more than {MAX_MEMBER_BYTES >> 20} MiB, which no image is "
                         "(a damaged or hostile archive)")


def open_zip(path: str, offsets: bool = False) -> FileTree:
    """The files of a .zip, read through one handle of this process; ``offsets``: with each member's place
    (``FileTree.members``), for readers that do not parse the zip again."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable .zip file ({exc})") from exc
    files, dirs, stored, members = {}, set(), {}, {}
    for info in archive.infolist():
        # Windows tools (PowerShell's Compress-Archive) separate folders by backslashes; some zips start with "./"
        name = _member_name(info).replace("\\", "/").rstrip("/")
        while name.startswith("./"):
            name = name[2:]
        if not name or _hidden(name):
            continue
        parts = name.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))  # implied parents
        if info.is_dir():
            dirs.add(name)
        else:
            # refused once here, or else each such image would be "unreadable"
            if info.compress_type not in READABLE_ZIP_METHODS and _has_image_extension(name):
                raise DataError(f"{path} stores {info.filename} with compression method {info.compress_type} "
                                f"({ZIP_METHOD_NAMES.get(info.compress_type, 'unknown')}), which Python's zipfile "
                                "cannot read; unpack the archive and give the folder, or zip it again with deflate")
            files[name] = (info.file_size, info.CRC)
            stored[name] = info.filename
            if offsets:
                method = -1 if info.flag_bits & 0x1 else info.compress_type  # encrypted: zipfile's to refuse
                members[name] = (info.header_offset, info.compress_size, method, info.CRC)
    prefix = _splits_prefix(files, dirs) or _wrapper_prefix(files, dirs)
    files, dirs = _under(prefix, files, dirs)

    def read(rel: str) -> bytes:
        _refuse_large_member(files[rel][0])  # zipfile reads as much as the index declares
        return archive.read(stored[prefix + rel])  # ZipFile reads are thread-safe

    members = _under(prefix, members, set())[0] if offsets else None
    return FileTree(path, files, dirs, read, members)


def _member_name(info: zipfile.ZipInfo) -> str:
    """A member's name as its folder had it. Info-ZIP (``zip -r`` on Linux and macOS) stores UTF-8 names without
    the flag that says so, and zipfile then reads them as cp437 (``ü`` as ``├╝``); a name that is not UTF-8
    read as cp437 is a true cp437 name, from an old DOS tool."""
    if info.flag_bits & 0x800 or info.filename.isascii():
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return info.filename


def _wrapper_prefix(files: dict, dirs: set[str]) -> str:
    """One top-level folder wrapping every image (``data.zip/data/...``, a README beside it or not) is
    skipped, unless it is a split (``train/`` alone is a dataset of one split)."""
    tops = {name.split("/")[0] for name in dirs} | {f.split("/")[0] for f in files if "/" in f}
    loose_images = any("/" not in f and _has_image_extension(f) for f in files)
    if len(tops) == 1 and not loose_images and next(iter(tops)).lower() not in SPLITS:
        return tops.pop() + "/"
    return ""


def _splits_prefix(files: dict, dirs: set[str]) -> str:
    """The folder that holds the split folders at the end of a chain of lone folders (``cifar10/`` of
    ``DIR/cifar10/{train,test}``, ``a/b/`` of ``a/b/{train,test}``), or ``""`` where there is none."""
    prefix = ""
    while not _split_dirs(dirs, prefix):
        step = _wrapper_prefix(*_under(prefix, files, dirs))
        if not step:
            return ""
        prefix += step
    return prefix


def _under(prefix: str, files: dict, dirs: set[str]) -> tuple[dict, set[str]]:
    """The files and folders below ``prefix``, their paths relative to it."""
    return ({f[len(prefix):]: v for f, v in files.items() if f.startswith(prefix)},
            {d[len(prefix):] for d in dirs if d.startswith(prefix)})


def _unwrapped(tree: FileTree) -> FileTree:
    """A folder holding only one folder that holds the splits (``DIR/cifar10/{train,test}``, as a zip of
    ``cifar10/`` unpacks), or a chain of such folders, is read as the folder of the splits, as the zip is."""
    prefix = _splits_prefix(tree.files, tree.dirs)
    inner = prefix.rstrip("/")
    if not prefix:
        return tree
    root = os.path.join(tree.root, inner)
    _say_once(logging.INFO, "%s holds only the folder %s: reading it", tree.root, inner)
    return FileTree(root, *_under(prefix, tree.files, tree.dirs), _folder_reader(root))


def _split_dirs(dirs: set[str], prefix: str = "") -> dict[str, str]:
    """The split folders directly under ``prefix``, by lower-case name (``Train/`` counts as ``train/``)."""
    found: dict[str, str] = {}
    for d in sorted(dirs):
        rest = d[len(prefix):] if d.startswith(prefix) else None
        if rest and "/" not in rest and rest.lower() in SPLITS:
            if rest.lower() in found:  # one of them would be ignored without a word
                raise DataError(f"the split folders {prefix}{found[rest.lower()]}/ and {prefix}{rest}/ differ only "
                                "in letter case, and a split is read from one folder; merge them into one")
            found[rest.lower()] = rest
    return found


def split_prefix(tree: FileTree, split: str) -> str:
    """``train/``, ``test/`` or ``val/`` if the tree has split folders, else ``""``."""
    splits = _split_dirs(tree.dirs)
    if splits and "train" not in splits:  # else read as a train split of one class, named "test"
        held = " and ".join(f"{name}/" for name in sorted(splits.values()))
        raise DataError(f"{tree.root} holds {held} but no train/ folder; expected train/ beside it (or give "
                        f"{os.path.join(tree.root, next(iter(splits.values())))} itself as a single train split)")
    if "train" not in splits:
        if split != "train":
            _refuse_nested_dataset(tree, "")  # a dataset one folder too deep: say that, not "no test split"
            raise MissingSplitError(
                f"{tree.root} has no train/ and test/ (or val/) sub-folders, so it is a "
                f"single 'train' split; cannot load split {split!r}"
            )
        return ""
    wanted = {"train": ["train"], "test": ["test", "val"], "val": ["val", "test"]}[split]
    present = [splits[name] for name in wanted if name in splits]
    # a labelled one first: ImageNet as Kaggle ships it has a flat test/ of unlabelled images beside val/<class>/
    for folder in sorted(present, key=lambda folder: not _has_class_folders(tree, folder)):
        return folder + "/"
    raise MissingSplitError(f"{tree.root} has no {' or '.join(w + '/' for w in wanted)} folder for split {split!r}")


def _has_class_folders(tree: FileTree, folder: str) -> bool:
    return any(d.startswith(f"{folder}/") for d in tree.dirs)


def _refuse_nested_dataset(tree: FileTree, prefix: str) -> None:
    """A dataset inside a class folder would be read as part of that class, its splits mixed (test images
    trained on): refused, saying where it is. A class's own sub-folder holds any split folder; deeper, a folder
    counts as a dataset when it holds train/ and test/ or val/ (a class folder may well hold a "train" of
    railway pictures)."""
    where = os.path.join(tree.root, prefix) if prefix else tree.root
    # the folders that hold a split folder, found in one pass: asked per class, 21k classes took minutes
    holding_splits = {d.rsplit("/", 1)[0] for d in tree.dirs if "/" in d and d.rsplit("/", 1)[1].lower() in SPLITS}
    for holder in sorted(h for h in holding_splits if h.startswith(prefix) and h != prefix.rstrip("/")):
        inside = holder[len(prefix):]
        nested = _split_dirs(tree.dirs, f"{holder}/")
        if "/" in inside and not ("train" in nested and ({"test", "val"} & set(nested))):
            continue
        if nested:
            held = " and ".join(sorted(f"{name}/" for name in nested.values()))
            inner = os.path.join(where, inside)
            fix = f"give {inner} itself as the data" if os.path.isdir(tree.root) else \
                f"zip the folder {holder}/ on its own, or unpack {tree.root} and give that folder"
            cls = inside.split("/")[0]
            raise DataError(f"{inner} holds {held}, so it is a dataset, not "
                            + ("a class folder" if inside == cls else f"images of the class {cls}") + f"; {fix}")


def list_split(tree: FileTree, prefix: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    """(image paths, labels or None, class names or None) under ``prefix``."""
    where = os.path.join(tree.root, prefix) if prefix else tree.root
    under = [f[len(prefix):] for f in tree.files if f.startswith(prefix)]
    if not under:
        raise DataError(f"{where} is empty; expected class sub-folders of images, or images")
    children = (d[len(prefix):] for d in tree.dirs if d.startswith(prefix))
    # ordered and named as Unicode's composed form (NFC): a split copied from macOS spells "ü" decomposed (NFD),
    # and its labels must still mean the classes of a split that spells it composed
    class_dirs = sorted((c for c in children if c and "/" not in c), key=_composed)
    if not class_dirs:
        paths = sorted(prefix + f for f in under if "/" not in f and _has_image_extension(f))
        if not paths:
            zips = sorted(f for f in under if f.lower().endswith(".zip"))
            inside_a_zip = not os.path.isdir(tree.root)  # a zip within a zip cannot be given as the data
            hint = (f"; it holds {zips[0]}: " + (f"unpack {tree.root} and give that .zip as the data" if inside_a_zip
                                                  else "give that .zip as the data")) if zips else ""
            raise DataError(f"{where} contains no images (extensions: {', '.join(IMAGE_EXTENSIONS)}){hint}")
        return paths, None, None
    _refuse_nested_dataset(tree, prefix)
    loose = [f for f in under if "/" not in f and _has_image_extension(f)]
    if loose:
        log.warning("%s: ignoring %d images outside the class folders (e.g. %s)", where, len(loose), loose[0])
    by_class: dict[str, list[str]] = {c: [] for c in class_dirs}
    ignored: dict[str, int] = {}  # by extension: a .gif among JPEGs is left out, as torchvision's ImageFolder does
    for f in under:
        if "/" in f and _has_image_extension(f):
            by_class[f.split("/", 1)[0]].append(prefix + f)
        elif "/" in f:
            suffix = os.path.splitext(f)[1].lower() or "(none)"
            ignored[suffix] = ignored.get(suffix, 0) + 1
    if ignored:
        _say_once(logging.INFO, "%s: left out %d file(s) that are not images of the kinds read (%s): %s", where,
                  sum(ignored.values()), ", ".join(IMAGE_EXTENSIONS),
                  ", ".join(f"{k} {n}" for k, n in sorted(ignored.items(), key=lambda kv: -kv[1])))
    paths, labels = [], []
    for label, cls in enumerate(class_dirs):
        if not by_class[cls]:
            others = sorted(f for f in under if f.startswith(cls + "/"))
            seen = f"; it holds {len(others)} other file(s), e.g. {others[0]}" if others else ""
            raise DataError(f"class folder {os.path.join(where, cls)} contains no images (extensions: "
                            f"{', '.join(IMAGE_EXTENSIONS)}){seen}")
        paths += sorted(by_class[cls])
        labels += [label] * len(by_class[cls])
    classes = [_composed(c) for c in class_dirs]
    if len(set(classes)) < len(classes):
        twins = sorted({c for c in classes if classes.count(c) > 1})
        raise DataError(f"{where} has class folders whose names differ only in how Unicode composes their letters "
                        f"({', '.join(twins)}); expected one folder per class: merge them")
    return paths, labels, classes


def _composed(name: str) -> str:
    return unicodedata.normalize("NFC", name)


# the scans made inside ``reuse_scans()``, by (path, offsets); None outside it
_SCANS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("slimssl_scans", default=None)


@contextlib.contextmanager
def reuse_scans():
    """Scan each folder or .zip once for all the splits loaded inside: listing ImageNet's 1.33M files takes
    seconds, once per split without this. Only for one command's loading, so a later call sees changed files."""
    token = _SCANS.set({})
    try:
        yield
    finally:
        _SCANS.reset(token)


def scan_tree(path: str, offsets: bool = False) -> FileTree:
    """The image files of an ImageFolder folder or .zip (not decoded), or a DataError saying what is wrong;
    ``offsets``: a zip's members located too (``open_zip``)."""
    scans = _SCANS.get()
    if scans is None:
        return _scan_tree(path, offsets)
    if (path, offsets) not in scans:
        scans[path, offsets] = _scan_tree(path, offsets)
    return scans[path, offsets]


def _scan_tree(path: str, offsets: bool) -> FileTree:
    if os.path.isdir(path):
        _refuse_run_or_export(path)
        tree = _unwrapped(_scan_dir(path))
    elif zipfile.is_zipfile(path):
        tree = open_zip(path, offsets)
    else:
        what = "is not a readable .zip (damaged or cut short?)" if path.lower().endswith(".zip") else \
            "is a file but not a .zip"
        raise DataError(f"{path} {what}; expected a folder of images or a .zip of one")
    if not tree.files:
        raise DataError(f"{path} is empty; expected class sub-folders of images, or images")
    return tree


@dataclass
class ImageFiles:
    """The image files of one split of an ImageFolder folder or .zip (nothing decoded)."""

    root: str  # absolute path of the folder or .zip
    paths: list[str]  # relative to ``root``, class by class, sorted
    labels: list[int] | None  # None for a folder without class sub-folders
    classes: list[str] | None
    read: Callable[[str], bytes] | None  # a reader of one path, for this process (None: ``members`` read it)
    members: np.ndarray | None = None  # a zip's: ZipMembers' rows, aligned with ``paths``


def list_labelled_files(source: str, split: str = "train") -> ImageFiles:
    """The files, labels and classes of ``split`` of an ImageFolder folder or .zip, or a DataError."""
    from .registry import in_memory_only  # not at the top: the registry imports this module

    if in_memory_only(source):
        raise DataError(f"data.loader: stream reads an ImageFolder folder or .zip, and {source!r} is a dataset "
                        f"held in memory (built-in or registered); use data.loader: memory (--set "
                        f"data.loader=memory) for it")
    tree = scan_tree(existing_path(source), offsets=True)
    paths, labels, classes = list_split(tree, split_prefix(tree, split))
    if tree.members is None:
        return ImageFiles(tree.root, paths, labels, classes, tree.read)  # tree.root: the inner folder of a wrapper
    # a zip's members are read from their offsets: the zip's index (1.28M entries: ~1 GB) is not kept
    members = np.array([tree.members[p] for p in paths], dtype=np.int64).reshape(-1, 4)
    return ImageFiles(tree.root, paths, labels, classes, None, members)


def open_reader(root: str) -> Callable[[str], bytes]:
    """A reader of paths under ``root`` for this process: a .zip is reopened, because a zip handle
    inherited through fork shares its file offset with the parent and the other workers."""
    return _folder_reader(root) if os.path.isdir(root) else open_zip(root).read


class PackedPaths:
    """File paths as one bytes buffer and the offsets of each path in it: two numpy arrays, which forked workers
    read without touching refcounts (a list of str would be copied into every worker page by page), and each
    path takes its own length (a numpy bytes array pads every path to the longest: one path of 260 bytes among
    ImageNet's 1.28M made 46 MiB of paths 319 MiB)."""

    def __init__(self, paths: Iterable[str | bytes]):
        encoded = [p if isinstance(p, bytes) else _to_bytes(p) for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        """The path at ``index`` (bytes), or the paths at an array of indices (a PackedPaths)."""
        if isinstance(index, (int, np.integer)):
            i = range(len(self))[index]  # negative indices as a list takes them; out of range: IndexError
            return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes()
        return PackedPaths([self[int(i)] for i in np.asarray(index).reshape(-1)])

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes


class FileListDataset(Dataset):
    """The files of a folder or .zip, readable from any loader worker: the base of the workers' datasets."""

    def __init__(self, root: str, paths: Sequence[str] | PackedPaths, read: Callable[[str], bytes] | None = None,
                 members: np.ndarray | None = None):
        # PackedPaths, not a list of str: forked workers read them without touching refcounts, so their pages
        # stay shared instead of being copied into every worker (1.28M paths for ImageNet). A zip's members are
        # located the same way (ZipMembers), so no worker parses the zip's index again.
        self.root = root
        self.paths = paths if isinstance(paths, PackedPaths) else PackedPaths(paths)
        self._read, self._read_pid = read, os.getpid()
        self.members = None if members is None else ZipMembers(root, members)

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:  # spawned workers open their own reader
        return {**self.__dict__, "_read": None, "_read_pid": None}

    def path(self, index: int) -> str:
        return os.path.join(self.root, to_path(self.paths[index]))

    def relative(self, index: int) -> str:
        """The path of file ``index`` relative to ``root``."""
        return to_path(self.paths[index])

    def read_at(self, index: int) -> bytes:
        """The bytes of file ``index``."""
        if self.members is not None and self.members.readable(index):
            return self.members.read(index)
        return self.read(to_path(self.paths[index]))

    def read(self, rel: str) -> bytes:
        if self._read is None or self._read_pid != os.getpid():  # a .zip handle inherited through fork is not safe
            self._read, self._read_pid = open_reader(self.root), os.getpid()
        return self._read(rel)

    def subset_members(self, keep: np.ndarray) -> np.ndarray | None:
        """The zip member rows of the files at ``keep`` (None for a folder), for a subset of this dataset."""
        return None if self.members is None else self.members.rows[keep]


class ZipMembers:
    """Reads members of a .zip from where its index says they are (one int64 row per file: header offset,
    compressed size, method, CRC), through a handle of the reading process. Stored and deflated members are
    read here; any other method (and an encrypted member) goes through zipfile, which says what it is."""

    HEADER = struct.Struct("<4s22xHH")  # a local file header: signature, ..., name and extra field lengths

    def __init__(self, root: str, rows: np.ndarray):
        self.root, self.rows = root, rows
        self._file, self._pid, self._lock = None, os.getpid(), threading.Lock()

    def __getstate__(self) -> dict:
        return {"root": self.root, "rows": self.rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["rows"])

    def close(self) -> None:
        """Close the handle this process read through (a later read opens another), once reads in flight in other
        threads are done."""
        with getattr(self, "_lock", None) or contextlib.nullcontext():  # None: an object whose __init__ never ran
            file, self._file = getattr(self, "_file", None), None
            if file is not None:
                file.close()

    __del__ = close  # a dataset dropped after an evaluation closes its zip, rather than leave it to a warning

    def readable(self, index: int) -> bool:
        return int(self.rows[index, 2]) in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)

    def read(self, index: int) -> bytes:
        offset, size, method, crc = (int(v) for v in self.rows[index])
        signature, name_length, extra_length = self.HEADER.unpack(self._pread(self.HEADER.size, offset))
        if signature != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"no local file header at offset {offset} (a damaged zip)")
        if method == zipfile.ZIP_STORED:
            _refuse_large_member(size)
        data = self._pread(size, offset + self.HEADER.size + name_length + extra_length)
        if method == zipfile.ZIP_DEFLATED:  # inflated up to one byte past the limit, whatever the index declares
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, MAX_MEMBER_BYTES + 1)
            _refuse_large_member(len(data))
        if zlib.crc32(data) != crc:
            raise zipfile.BadZipFile("Bad CRC-32: the member is damaged")
        return data

    def _handle(self):
        """This process's handle (one inherited through fork is not used), opened once even when threads ask
        together: one opened twice would be closed under the first reader."""
        if self._pid != os.getpid():  # forked: the parent's handle and lock (perhaps held by a thread not copied)
            inherited, self._file, self._pid, self._lock = self._file, None, os.getpid(), threading.Lock()
            if inherited is not None:
                inherited.close()  # this process's copy of the descriptor: the parent's stays open
        with self._lock:
            if self._file is None:
                self._file = open(self.root, "rb")
            return self._file

    def _pread(self, size: int, offset: int) -> bytes:
        handle = self._handle()
        if hasattr(os, "pread"):
            data = os.pread(handle.fileno(), size, offset)
        else:  # Windows: one position per handle
            with self._lock:
                handle.seek(offset)
                data = handle.read(size)
        if len(data) < size:
            raise zipfile.BadZipFile(f"the zip ends within a member at offset {offset} (cut short?)")
        return data


# Paths as UTF-8 bytes, with undecodable bytes of a file name (a Latin-1 name listed by os.scandir) carried as
# they are: whatever the locale, every name round-trips, a zip member's and a folder's alike.
def _to_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def to_path(raw: bytes) -> str:
    """A path of :class:`FileListDataset`'s ``paths`` as text."""
    return raw.decode("utf-8", "surrogateescape")
