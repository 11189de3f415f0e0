"""The kNN monitor of a pretraining run: every sub-network's kNN top-1 on the run's own labelled splits, measured
as `slimssl knn` measures it (the same decoding, crop and settings), at random initialisation, every
``train.knn_every`` epochs and at the end. Every process of a multi-process run takes part: each one reads its
share of the images (:mod:`slimssl.eval.shard`), and all of them get the same accuracies."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from ..config import Config
from ..data.datasets import ImageDataset, check_same_classes
from ..data.eval_images import EvalImages, StreamedImages, load_eval_split
from ..errors import DataError, MissingSplitError
from ..data.registry import in_memory_only
from ..data.views import default_workers
from ..eval import recalibration_batches
from ..eval.inputs import DataOptions
from ..eval.knn import host_memory_shortfall, knn_of_subnets, knn_settings
from ..eval.shard import Shard
from . import distributed as dist

log = logging.getLogger("slimssl")


class Skipped(NamedTuple):
    """Why a process has no kNN monitor, and how loudly to say it (no labels or no test split: as planned)."""

    level: int
    why: str


class KnnMonitor:
    """kNN of a supernet's sub-networks with the train split as the bank and the test split as the queries."""

    def __init__(self, cfg: Config, bank: EvalImages, queries: EvalImages, device: torch.device):
        self.cfg, self.bank, self.queries, self.device = cfg, bank, queries, device
        self.shard = Shard.of_processes(len(bank), len(queries))
        # streamed splits with data.skip_unreadable: their unreadable files are found at the first kNN, each
        # process decoding its share, not when the run is built (a pass over ImageNet before the first step)
        self._unchecked = [s for s in (bank, queries) if isinstance(s, StreamedImages) and cfg.data.skip_unreadable]

    @classmethod
    def of_run(cls, cfg: Config, train: ImageDataset | None, device: torch.device) -> KnnMonitor | None:
        """The monitor of a run training on ``train`` (None: streamed, and so are the kNN images), or None, with a
        log line saying why, when its data cannot have one: pretraining needs neither labels nor a test split.
        Collective in a multi-process run: either every process has a monitor or none has, and rank 0 says why
        (the others log warnings only)."""
        if not cfg.train.knn:
            log.info("train.knn is false: no kNN evaluation during pretraining (slimssl knn RUN measures it later)")
            return None
        found = cls._of_data(cfg, train, device)
        every = dist.gather_objects(found if isinstance(found, Skipped) else (len(found.bank), len(found.queries)))
        skipped = [(rank, s) for rank, s in enumerate(every) if isinstance(s, Skipped)]
        if skipped:
            rank, (level, why) = skipped[0]  # one reason is enough: the processes read the same data
            log.log(level, "%s%s: kNN evaluation during pretraining is skipped", why,
                    f" (rank {rank})" if len(every) > 1 else "")
            return None
        if len(set(every)) > 1:  # each process reads its share of the same files: they must see the same ones
            log.warning("kNN evaluation is skipped: the processes see splits of different sizes (train, test): %s",
                        every)
            return None
        log.info("kNN evaluation during pretraining: %s test images, a bank of %s train images",
                 f"{len(found.queries):,}", f"{len(found.bank):,}")
        return found

    @classmethod
    def _of_data(cls, cfg: Config, train: ImageDataset | None, device: torch.device) -> KnnMonitor | Skipped:
        """This process's monitor, or why it has none."""
        d = cfg.data
        no_labels = Skipped(logging.INFO, "the training data has no labels")
        if train is not None and train.labels is None:
            return no_labels
        crop_ratio = cfg.eval.crop_ratio  # evaluation images, as `slimssl knn` decodes them
        workers = default_workers() if d.workers is None else d.workers

        def split(name: str, loader: str = d.loader) -> EvalImages:
            streamed = loader == "stream"  # unreadable files are found at the first kNN (__init__)
            return load_eval_split(d.source, name, loader=loader, resolution=d.resolution, workers=workers,
                                   skip_unreadable=d.skip_unreadable and not streamed, fake_size=d.fake_size,
                                   seed=cfg.train.seed, pin_memory=device.type == "cuda", crop_ratio=crop_ratio)

        try:
            test = split("test")
        except MissingSplitError as e:
            return Skipped(logging.INFO, f"no test split for kNN evaluation ({e})")
        except DataError as e:  # there is one, but it cannot be read: only the kNN monitor is lost
            return Skipped(logging.WARNING, f"the test split cannot be loaded ({e})")
        if test.labels is None:  # found now, not after the last epoch (the kNN of a recipe may be its final one)
            return Skipped(logging.WARNING, f"the test split of {test.name!r} has no labels (a folder without class "
                                            "sub-folders, or images registered without labels)")
        try:
            if train is not None and crop_ratio == 1:
                bank = train  # the training images in memory
            elif train is not None and dist.world_size() > 1 and not in_memory_only(d.source):
                # another copy of the split in every process's memory could exceed the machine's: each process
                # streams its share at each kNN instead (decoded alike: the same pixels)
                bank = split("train", "stream")
            else:
                bank = split("train")  # a streamed run's, or the train split at another ratio
            if bank.labels is None:
                return no_labels
            check_same_classes(bank, test, d.source)
        except DataError as e:
            return Skipped(logging.WARNING, str(e))
        return cls(cfg, bank, test, device)

    def memory_shortfall(self, backbone) -> str | None:
        """Why this process could not hold its share of the bank's features of every sub-network of ``backbone``
        (at the first kNN, which for a recipe may come after the last epoch), or None: they may fit on the GPU
        (half of it, as ``bank_storage`` asks), or in this machine's memory."""
        mine = self.shard.indices(len(self.bank))
        rows = len(self.bank) if mine is None else len(mine)
        menu = list(backbone.menu)
        need = rows * sum(backbone.feature_dim(spec) for spec in menu) * 4
        if self.device.type == "cuda" and need <= torch.cuda.get_device_properties(self.device).total_memory // 2:
            return None
        short = host_memory_shortfall(need)
        return short and f"the bank's features of {rows:,} train images for {len(menu)} sub-networks would {short}"

    def __call__(self, backbone) -> dict[str, float]:
        """kNN top-1 (%) of every sub-network of ``backbone``'s menu, by name (collective: see the module)."""
        if self._unchecked:
            for images in self._unchecked:
                mine = self.shard.indices(len(images))  # every process decodes its share; all drop the same files
                images.drop(index for found in dist.gather_objects(images.find_unreadable(mine)) for index in found)
            self._unchecked = []
            self.shard = Shard.of_processes(len(self.bank), len(self.queries))
        return knn_of_subnets(backbone, self.cfg, self.bank, self.queries, self.device, shard=self.shard)

    def settings(self, backbone) -> dict:
        """How the monitor measures, as ``slimssl knn`` records its own (its defaults)."""
        e = self.cfg.eval
        return knn_settings(self.cfg, DataOptions(), min(e.knn_k, len(self.bank.labels)), e.knn_temperature,
                            recalibration_batches(None, backbone.slim_state.private_bn))
