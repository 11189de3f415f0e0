"""What an evaluation protocol is given, checked before any work: the data options, the model (a checkpoint or
a supernet in memory) and the numbers. The protocols themselves are in :mod:`.evaluate`."""

from __future__ import annotations

import dataclasses

import difflib
import functools
import inspect
import logging
import os
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Optional, TypedDict, TypeVar, Union

from ..launch import SEED_RANGE
from ..wording import named
from ..errors import UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("slimssl")


class DataKeywords(TypedDict, total=False):
    """The data keywords of the evaluation functions (``slimssl.knn(run, data=..., workers=...)``), for type
    checkers: the fields of :class:`DataOptions`, which checks them at run time."""

    data: Union[str, os.PathLike, None]  # None, as each of the others: the config's
    loader: Optional[Literal["memory", "stream"]]
    workers: Optional[int]
    skip_unreadable: bool
    crop_ratio: Optional[float]


@dataclass(frozen=True)
class DataOptions:
    """Where the evaluation images come from and how they are read (the data keywords of :mod:`.evaluate`);
    None: the config's."""

    data: str | None = None
    loader: str | None = None
    workers: int | None = None
    skip_unreadable: bool = False
    crop_ratio: float | None = None

    def __post_init__(self) -> None:  # checked before any work, and by type first ('a' < 1 would raise TypeError)
        problems = []
        if self.data is not None and (not isinstance(self.data, (str, os.PathLike)) or not str(self.data).strip()):
            problems.append(f"data must be a dataset name or path, got {self.data!r}")
        if self.loader not in (None, "memory", "stream"):
            problems.append(f"loader must be 'memory' or 'stream', got {self.loader!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, Integral)
                                         or self.workers < 0):
            problems.append(f"workers must be an int >= 0, got {self.workers!r}")
        if not isinstance(self.skip_unreadable, bool):
            problems.append(f"skip_unreadable must be True or False, got {self.skip_unreadable!r}")
        if self.crop_ratio is not None and (isinstance(self.crop_ratio, bool) or not isinstance(self.crop_ratio, Real)
                                            or not 0 < self.crop_ratio <= 1):
            problems.append(f"crop_ratio must be a number in (0, 1], got {self.crop_ratio!r}")
        if problems:
            raise UsageError("; ".join(problems))

    @classmethod
    def of(cls, keywords: dict, protocol=None) -> DataOptions:
        """The options among a protocol's ``**data`` keywords; a keyword that is none of them is an error that
        lists ``protocol``'s own keywords too (a misspelt ``k`` lands in ``**data``)."""
        unknown = sorted(set(keywords) - set(cls.__dataclass_fields__))
        if unknown:
            own = [name for name, p in inspect.signature(protocol).parameters.items()
                   if p.kind == p.KEYWORD_ONLY] if protocol else []
            known = [*own, *cls.__dataclass_fields__]
            close = {name for u in unknown for name in difflib.get_close_matches(u, known)}
            called = f"{protocol.__name__}() got " if protocol else ""
            raise TypeError(f"{called}unknown keyword(s) {', '.join(unknown)}"
                            + (f" (did you mean {', '.join(sorted(close))}?)" if close else "")
                            + (f"; its keywords are {', '.join(own)}, and" if own else ";")
                            + f" the data keywords are {', '.join(cls.__dataclass_fields__)}")
        return cls(**{k: str(v) if k == "data" and isinstance(v, os.PathLike) else v for k, v in keywords.items()})

    def source(self, cfg) -> str:
        """The data given (a registered dataset as a run records it), or the config's."""
        from ..data.registry import recorded_source

        return recorded_source(self.data) if self.data else cfg.data.source

    def refuse_output_in_data(self, cfg, folder, written: str, kept: str) -> None:
        """Refuse to write ``folder`` (exports, saved classifiers) inside the run's dataset or the one given: its
        folders would be read as classes of the next run on that data (``written``, ``kept``: for the message)."""
        from ..train.prepare import refuse_run_in_data

        for source in {cfg.data.source, self.data}:
            refuse_run_in_data(Path(folder), source, written, kept)

    def resolved_crop_ratio(self, cfg) -> float:
        return self.crop_ratio if self.crop_ratio is not None else cfg.eval.crop_ratio

    def settings(self, cfg) -> dict:
        """What every protocol records about its images in results.json."""
        return {"data": self.source(cfg), "resolution": cfg.data.resolution,
                "crop_ratio": self.resolved_crop_ratio(cfg)}

    def loader_of(self, cfg) -> str:
        """How the splits are read: the loader given, else the config's; a dataset held in memory cannot stream (a
        UsageError when asked to stream it, the config's stream falls back to memory)."""
        from ..data.registry import in_memory_only

        loader = self.loader or cfg.data.loader
        if loader == "stream" and in_memory_only(self.source(cfg)):
            if self.loader == "stream":
                raise UsageError(f"loader 'stream' (--loader stream) reads an ImageFolder folder or .zip, and "
                                 f"{self.source(cfg)!r} is a dataset held in memory (built-in or registered): use "
                                 "loader 'memory' (or pass a folder as data, --data)")
            return "memory"
        return loader

    def with_file_names(self, cfg) -> DataOptions:
        """These options with the streaming loader for a folder or .zip when no loader was given, so that its
        splits keep their files' names (a split decoded in memory keeps its pixels only); as they are otherwise."""
        from ..data.registry import in_memory_only

        if self.loader is None and not in_memory_only(self.source(cfg)):
            return dataclasses.replace(self, loader="stream")
        return self

    def train_crop_of(self, cfg, train_crop: str | None) -> str:
        """The random training crop: the one given, else the config's ``eval.train_crop``. ``whole`` needs the
        pictures of a streamed split: given, it is refused for a split decoded in memory before any is decoded;
        the config's falls back to ``resized`` then, with a log line, as the config's loader falls back."""
        from .supervised import whole_needs_stream

        crop = train_crop or cfg.eval.train_crop
        if crop == "whole" and self.loader_of(cfg) != "stream":
            if train_crop == "whole":
                raise UsageError(whole_needs_stream())
            log.info("the config's eval.train_crop whole crops the whole pictures of a streamed split; these are "
                     "decoded in memory, so the training crops are taken from the evaluation images (resized)")
            crop = "resized"
        return crop

    def load_split(self, cfg, split: str, device=None, labelled: bool = True):
        """``split`` at the config's resolution, decoded in memory or streamed. A dataset held in memory
        (built-in or registered) cannot stream: asked to, this is an error; a streaming config falls back to
        memory, with a log line. A split without labels is refused unless ``labelled`` is False."""
        from ..data.eval_images import load_eval_split
        from ..errors import DataError
        from ..data.views import default_workers

        source = self.source(cfg)
        loader = self.loader_of(cfg)
        if loader == "memory" and (self.loader or cfg.data.loader) == "stream":
            log.info("data %r is a dataset held in memory (built-in or registered): decoded in memory (the "
                     "checkpoint's data.loader stream reads folders and .zip files only)", source)
        if self.workers is not None and loader == "memory" and split == "train":  # every call reads it, once
            log.warning("workers %d (--workers): not used, since the splits are decoded in memory (the stream "
                        "loader's workers: --loader stream)", self.workers)
        workers = self.workers if self.workers is not None else cfg.data.workers
        workers = default_workers() if workers is None else workers
        crop_ratio = self.resolved_crop_ratio(cfg)
        try:
            images = load_eval_split(source, split, loader=loader, resolution=cfg.data.resolution, workers=workers,
                                     skip_unreadable=self.skip_unreadable or cfg.data.skip_unreadable,
                                     fake_size=cfg.data.fake_size, seed=cfg.train.seed,  # fake data as trained
                                     pin_memory=device is not None and device.type == "cuda",
                                     crop_ratio=crop_ratio)
        except ValueError as e:  # DataError: names the path and what was expected
            raise DataError(f"cannot load the {split} split of {source!r}: {e}") from None
        if images.labels is None and labelled:
            raise DataError(f"the {split} split of {source!r} has no labels (a folder without class sub-folders, or "
                             "images registered without labels); "
                             "evaluation needs a labelled dataset: pass one as data (--data)")
        log.info("%s split of %s: %d images, %s%s", split, source, len(images),
                 f"streamed by {workers} loader worker(s)" if loader == "stream" else "decoded in memory",
                 f", centre crop ratio {crop_ratio:g}" if crop_ratio != 1 else "")
        return images

    def load_splits(self, cfg, device=None):
        """The train and test splits, which must name the same classes. The test split, usually the smaller,
        is loaded first: a missing, unlabelled or unreadable one is found before the train split is decoded."""
        from ..data.datasets import check_same_classes
        from ..data.files import reuse_scans

        with reuse_scans():
            test = self.load_split(cfg, "test", device)
            train = self.load_split(cfg, "train", device)
        check_same_classes(train, test, self.source(cfg))
        return train, test


def load_model(checkpoint, device: str | torch.device = "auto", config=None, data: str | None = None):
    """Supernet (on the device), its config, the device, and the epochs the checkpoint was trained for (None for a
    supernet in memory or an export). ``checkpoint`` is a checkpoint file or run directory (eval mode), an exported
    sub-network's folder (evaluated on ``data``, which it does not record: ``eval/exported.py``), or a supernet
    in memory (``SlimResNet``, with its ``config``; moved to the device, its mode left to the protocols, which
    evaluate in eval mode and give it back in its own mode and on its own device: :func:`gives_back_device`)."""
    import torch

    from ..checkpoint import open_checkpoint, pretraining_unfinished
    from ..layout import is_export_dir
    from .exported import supernet_of_export
    from .results import epoch_floor
    from ..devices import pick_device
    from ..models.build import as_config, check_config_is_the_supernets
    from ..models.resnet import SlimResNet

    torch_device = pick_device(device, setting="device (--device)")
    if is_export_dir(checkpoint):
        if config is not None:
            raise UsageError("an exported sub-network is evaluated with the inputs its config.json records; "
                             "config= is for a supernet in memory")
        if data is None:
            raise UsageError(f"{checkpoint} is an exported sub-network, which does not record the data it was "
                             f"trained on: give the data to evaluate it on ({named('--data DATA', 'data=')})")
        supernet, cfg = supernet_of_export(checkpoint, data)
        log.info("%s: the exported %s, evaluated as exported (its BatchNorm statistics too); its results are "
                 "%s, not saved", checkpoint, supernet.menu.largest.name, named("printed", "returned"))
        return supernet.to(torch_device), cfg, torch_device, None
    if isinstance(checkpoint, SlimResNet):
        if config is None:
            raise UsageError("a supernet in memory is evaluated with its config: pass config= (a Config, a dict of "
                             "sections, or a recipe name or path)")
        cfg = as_config(config)
        check_config_is_the_supernets(checkpoint, cfg)
        dtypes = {p.dtype for p in checkpoint.parameters() if p.is_floating_point()}
        if dtypes - {torch.float32}:  # images are fed in float32, as a run trains
            raise UsageError(f"the supernet's weights are {', '.join(sorted(map(str, dtypes)))}; the evaluations run a "
                             "float32 supernet, as pretraining trains one: pass supernet.float()")
        return checkpoint.to(torch_device), cfg, torch_device, None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise UsageError(f"expected a checkpoint file or run directory (str, Path or PretrainRun), or a SlimResNet "
                         f"supernet; got {type(checkpoint).__name__}")
    if config is not None:  # its results would be merged into the run as if measured with the run's settings
        raise UsageError("a checkpoint is evaluated with the config saved in it; config= is for a supernet in "
                         "memory (the data keywords, k, epochs, ... change what the evaluation does)")
    supernet, cfg, _, trained = open_checkpoint(checkpoint)
    epoch = trained.get("trained_epochs")
    if pretraining_unfinished(trained):
        log.warning("%s holds epoch %g of %d: pretraining has not finished (a run's results.json marks what is "
                    "measured on it unfinished)", checkpoint, epoch_floor(epoch), cfg.train.epochs)
    return supernet.to(torch_device).eval(), cfg, torch_device, epoch


F = TypeVar("F", bound=Callable)


def gives_back_device(protocol: F) -> F:
    """Decorates a protocol that takes a supernet in memory as its first argument: the protocol moves it to the
    evaluation's device (``load_model``), and this moves it back where it was after, errors included (as the
    protocols give back its mode), so that a caller's CPU supernet is not left on the GPU."""
    @functools.wraps(protocol)
    def protocol_giving_back_device(checkpoint, *args, **kwargs):
        tensors = [*checkpoint.parameters(), *checkpoint.buffers()] if hasattr(checkpoint, "parameters") else []
        if not tensors:
            return protocol(checkpoint, *args, **kwargs)
        where = tensors[0].device
        try:
            return protocol(checkpoint, *args, **kwargs)
        finally:
            checkpoint.to(where)

    return protocol_giving_back_device  # type: ignore[return-value]  # the signature of protocol


def in_memory(checkpoint) -> bool:
    """Whether a protocol was given a supernet rather than a file: its results are returned, not saved."""
    return not isinstance(checkpoint, (str, os.PathLike))


def saves_results(checkpoint) -> bool:
    """Whether a protocol's results can be saved with ``checkpoint``: not for a supernet in memory or an export."""
    from ..layout import is_export_dir

    return not in_memory(checkpoint) and not is_export_dir(checkpoint)


def check_numbers(**values) -> None:
    """Each keyword must be None (the default) or a number in its range: positive, >= 0 for ``recalibrate_bn``,
    any int for ``seed`` (a bad value would otherwise fall back to the default or fail deep inside torch)."""
    for name, value in values.items():
        if value is None:
            continue
        if name == "seed":
            if isinstance(value, bool) or not isinstance(value, Integral) or not SEED_RANGE[0] <= value < SEED_RANGE[1]:
                raise UsageError(f"seed must be an int that fits 64 bits, got {value!r}")
            continue
        real = name in ("temperature", "lr")
        least = 0 if name == "recalibrate_bn" else 1
        kind_ok = not isinstance(value, bool) and isinstance(value, Real if real else Integral)  # NumPy's too
        if not (kind_ok and (value > 0 if real else value >= least)):  # the type first: "a" > 0 would raise
            kind = "a number > 0" if real else f"an int >= {least}"
            raise UsageError(f"{name} must be {kind}, got {value!r}")


def check_flags(**values) -> None:
    """Each keyword must be True or False: a string such as "no" would read as true."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, got {value!r}")
