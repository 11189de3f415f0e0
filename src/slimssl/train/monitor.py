"""The kNN monitor of a pretraining run: every sub-network's kNN top-1 on the run's own labelled splits, measured
as `slimssl knn` measures it (the same decoding, crop and settings), at random initialisation, every
``train.knn_every`` epochs and at the end. Every process of a multi-process run takes part: each one reads its
share of the images (:mod:`slimssl.eval.shard`), and all of them get the same accuracies."""

from __future__ import annotations

import logging

import torch

from ..config import Config
from ..data.datasets import ImageDataset, check_same_classes
from ..data.eval_images import EvalImages, StreamedImages, load_eval_split
from ..data.files import BUILTIN, DataError, MissingSplitError
from ..data.views import default_workers
from ..eval import recalibration_batches
from ..eval.inputs import DataOptions
from ..eval.knn import knn_of_subnets, knn_settings
from ..eval.shard import Shard
from . import distributed as dist

log = logging.getLogger("slimssl")


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
        Collective in a multi-process run: either every process has a monitor or none has."""
        if not cfg.train.knn:
            log.info("train.knn is false: no kNN evaluation during pretraining (slimssl knn RUN measures it later)")
            return None
        monitor = cls._of_data(cfg, train, device)
        sizes = dist.gather_objects(None if monitor is None else (len(monitor.bank), len(monitor.queries)))
        if None in sizes:
            if monitor is not None:
                log.warning("kNN evaluation is skipped: another process could not load its images (its log says why)")
            return None
        if len(set(sizes)) > 1:  # each process reads its share of the same files: they must see the same ones
            log.warning("kNN evaluation is skipped: the processes see splits of different sizes (train, test): %s",
                        sizes)
            return None
        return monitor

    @classmethod
    def _of_data(cls, cfg: Config, train: ImageDataset | None, device: torch.device) -> KnnMonitor | None:
        d = cfg.data
        if train is not None and train.labels is None:
            log.info("the training data has no labels: kNN evaluation is skipped")
            return None
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
            log.info("no test split for kNN evaluation (%s): kNN is skipped", e)
            return None
        except DataError as e:  # there is one, but it cannot be read: only the kNN monitor is lost
            log.warning("the test split cannot be loaded (%s); kNN evaluation is skipped", e)
            return None
        try:
            if train is not None and crop_ratio == 1:
                bank = train  # the training images in memory
            elif train is not None and dist.world_size() > 1 and d.source not in BUILTIN:
                # another copy of the split in every process's memory could exceed the machine's: each process
                # streams its share at each kNN instead (decoded alike: the same pixels)
                bank = split("train", "stream")
            else:
                bank = split("train")  # a streamed run's, or the train split at another ratio
            if bank.labels is None:
                log.info("the training data has no labels: kNN evaluation is skipped")
                return None
            check_same_classes(bank, test, d.source)
        except DataError as e:
            log.warning("%s; kNN evaluation is skipped", e)
            return None
        return cls(cfg, bank, test, device)

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
