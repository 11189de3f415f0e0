"""The kNN monitor of a pretraining run: every sub-network's kNN top-1 on the run's own labelled splits, measured
as `slimssl knn` measures it (the same decoding, crop and settings), at random initialisation, every
``train.knn_every`` epochs and at the end."""

from __future__ import annotations

import logging

import torch

from ..config import Config
from ..data.datasets import ImageDataset, check_same_classes, load_dataset
from ..data.files import DataError, MissingSplitError
from ..eval import recalibration_batches
from ..eval.inputs import DataOptions
from ..eval.knn import knn_of_subnets, knn_settings

log = logging.getLogger("slimssl")


class KnnMonitor:
    """kNN of a supernet's sub-networks with the train split as the bank and the test split as the queries."""

    def __init__(self, cfg: Config, bank: ImageDataset, queries: ImageDataset, device: torch.device):
        self.cfg, self.bank, self.queries, self.device = cfg, bank, queries, device

    @classmethod
    def of_run(cls, cfg: Config, train: ImageDataset | None, device: torch.device) -> KnnMonitor | None:
        """The monitor of a run training on ``train`` (None: streamed), or None, with a log line saying why,
        when its data cannot have one: pretraining needs neither labels nor a test split."""
        if train is None:
            log.info("data.loader is stream: kNN evaluation during pretraining is skipped (it needs the images "
                     "decoded in memory)")
            return None
        if train.labels is None:
            log.info("the training data has no labels: kNN evaluation is skipped")
            return None
        d = cfg.data
        crop_ratio = cfg.eval.crop_ratio  # evaluation images, as `slimssl knn` decodes them

        def split(name: str) -> ImageDataset:
            return load_dataset(d.source, name, resolution=d.resolution, skip_unreadable=d.skip_unreadable,
                                fake_size=d.fake_size, seed=cfg.train.seed, crop_ratio=crop_ratio)

        try:
            test = split("test")
        except MissingSplitError as e:
            log.info("no test split for kNN evaluation (%s): kNN is skipped", e)
            return None
        except DataError as e:  # there is one, but it cannot be read: only the kNN monitor is lost
            log.warning("the test split cannot be loaded (%s); kNN evaluation is skipped", e)
            return None
        try:
            check_same_classes(train, test, d.source)
        except DataError as e:
            log.warning("%s; kNN evaluation is skipped", e)
            return None
        # The training images are the bank at ratio 1; another ratio decodes the train split once more.
        return cls(cfg, train if crop_ratio == 1 else split("train"), test, device)

    def __call__(self, backbone) -> dict[str, float]:
        """kNN top-1 (%) of every sub-network of ``backbone``'s menu, by name."""
        return knn_of_subnets(backbone, self.cfg, self.bank, self.queries, self.device)

    def settings(self, backbone) -> dict:
        """How the monitor measures, as ``slimssl knn`` records its own (its defaults)."""
        e = self.cfg.eval
        return knn_settings(self.cfg, DataOptions(), min(e.knn_k, len(self.bank.labels)), e.knn_temperature,
                            recalibration_batches(None, backbone.slim_state.private_bn))
