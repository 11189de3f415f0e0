"""The kNN monitor of a pretraining run: every sub-network's kNN top-1 on the run's own labelled splits, measured
as `slimssl knn` measures it (the same decoding, crop and settings), at random initialisation, every
``train.knn_every`` epochs and at the end. Every process of a multi-process run takes part: each one reads its
share of the images (:mod:`slimssl.eval.shard`), and all of them get the same accuracies."""

from __future__ import annotations

import logging

import torch

from ..config import Config
from ..data.datasets import ImageDataset, check_same_classes
from ..data.eval_images import EvalImages, load_eval_split
from ..data.files import DataError, MissingSplitError
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

    @classmethod
    def of_run(cls, cfg: Config, train: ImageDataset | None, device: torch.device) -> KnnMonitor | None:
        """The monitor of a run training on ``train`` (None: streamed, and so are the kNN images), or None, with a
        log line saying why, when its data cannot have one: pretraining needs neither labels nor a test split.
        Collective in a multi-process run: either every process has a monitor or none has."""
        monitor = cls._of_data(cfg, train, device)
        if not dist.all_true(monitor is not None):
            if monitor is not None:
                log.warning("kNN evaluation is skipped: another process could not load its images (its log says why)")
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

        def split(name: str) -> EvalImages:
            return load_eval_split(d.source, name, loader=d.loader, resolution=d.resolution, workers=workers,
                                   skip_unreadable=d.skip_unreadable, fake_size=d.fake_size, seed=cfg.train.seed,
                                   pin_memory=device.type == "cuda", crop_ratio=crop_ratio)

        try:
            test = split("test")
        except MissingSplitError as e:
            log.info("no test split for kNN evaluation (%s): kNN is skipped", e)
            return None
        except DataError as e:  # there is one, but it cannot be read: only the kNN monitor is lost
            log.warning("the test split cannot be loaded (%s); kNN evaluation is skipped", e)
            return None
        try:
            # The training images in memory are the bank at ratio 1; another ratio decodes the train split once
            # more. A streamed run's bank is streamed too.
            bank = train if train is not None and crop_ratio == 1 else split("train")
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
        return knn_of_subnets(backbone, self.cfg, self.bank, self.queries, self.device, shard=self.shard)

    def settings(self, backbone) -> dict:
        """How the monitor measures, as ``slimssl knn`` records its own (its defaults)."""
        e = self.cfg.eval
        return knn_settings(self.cfg, DataOptions(), min(e.knn_k, len(self.bank.labels)), e.knn_temperature,
                            recalibration_batches(None, backbone.slim_state.private_bn))
