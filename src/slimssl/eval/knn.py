"""Weighted kNN classification on L2-normalised features (InstDisc protocol: k=200, T=0.1), of every sub-network:
what `slimssl knn` and the kNN during pretraining measure, and what they record of it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import physical_memory
from ..errors import DataError
from ..launch import processes_on_this_machine
from ..nn.spec import SubnetSpec
from .features import extract_subnet_features
from .recalibrate import subnet_models
from .shard import Shard
from .supervised import output_classes, require_labels

if TYPE_CHECKING:
    from .inputs import DataOptions


SIMILARITY_BYTES = 2**30  # the similarities of one chunk of queries to the whole bank, with their top-k work
log = logging.getLogger("slimssl")


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int | None = None, *,
                shard: Shard = Shard(), normalized: bool = False) -> torch.Tensor:
    """Class scores [Q, C] of each query: its k most cosine-similar bank entries vote with exp(sim / T), each
    query's votes divided by exp(its top similarity / T), which leaves its winner as it is and keeps a low T
    from overflowing float32 (1 / T > 88: every vote inf). ``chunk``: queries scored at once; by default at most
    1024, fewer for a large bank (ImageNet's 1.28M entries: 104), so that a chunk takes about 1 GiB.

    With a ``shard`` of several processes, ``bank`` is this process's part of the bank and ``queries`` are all
    of them: every process returns the scores against the whole bank (equal to one process's up to the order
    of equally similar entries at the k-th place). ``normalized``: ``bank`` and ``queries`` are float32 rows
    of unit length already (:func:`normalize_rows_`), which spares a copy of the bank (10 GB at ImageNet's size)."""
    if not normalized:
        bank = F.normalize(bank.float(), dim=1)
        queries = F.normalize(queries.float(), dim=1)
    size, largest = shard.size_and_largest(len(bank), bank.device)
    k = min(k, size)
    # from the largest part: every process must score the same chunks, since it merges each one with the others
    chunk = chunk or max(1, min(1024, SIMILARITY_BYTES // (8 * max(1, largest))))
    scores = []
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(min(k, len(bank)), dim=1)
        top_sim, top_labels = shard.nearest(top_sim, bank_labels[top_idx], k)
        votes = torch.zeros(len(top_sim), num_classes, device=bank.device)
        votes.scatter_add_(1, top_labels, ((top_sim - top_sim[:, :1]) / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def normalize_rows_(features: torch.Tensor) -> torch.Tensor:
    """``features`` (float32) scaled in place to rows of unit length, as ``F.normalize(features, dim=1)`` gives
    them, without a second copy of them."""
    return features.div_(features.norm(dim=1, keepdim=True).clamp_min_(1e-12))


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1, *, shard: Shard = Shard(),
                 normalized: bool = False) -> float:
    """Top-1 accuracy in percent (``shard``, ``normalized``: see :func:`knn_predict`)."""
    scores = knn_predict(bank, bank_labels.to(bank.device), queries, num_classes, k, temperature, shard=shard,
                         normalized=normalized)
    return (scores.argmax(1).cpu() == query_labels.cpu()).float().mean().item() * 100.0


def knn_eval_subnets(supernet, train, test, *, k: int, temperature: float, resolution: int, mean, std,
                     batch_size: int = 256, device="cpu", models: Mapping[str, nn.Module] | None = None,
                     specs: Sequence[SubnetSpec] | None = None, shard: Shard = Shard()) -> dict[str, float]:
    """kNN top-1 of every sub-network of ``specs`` (default: the menu): the train split is the bank, the test
    split the queries (datasets in memory or streamed, see ``data/eval_images.py``; each split is read once
    for all the entries). ``models`` evaluates each entry by name instead of the supernet (e.g.
    BatchNorm-recalibrated copies). With a ``shard`` of several processes, each one reads its part of both
    splits, and all of them return the same accuracies."""

    require_labels("kNN", train, test)
    num_classes = output_classes(train, test)  # as the linear probe counts them
    specs = list(supernet.menu) if specs is None else list(specs)
    kw = dict(resolution=resolution, mean=mean, std=std, batch_size=batch_size, device=device)
    mine = shard.indices(len(train))
    store = bank_storage([supernet.feature_dim(s) for s in specs], len(train if mine is None else mine), device)
    banks = extract_subnet_features(models or supernet, specs, train, indices=mine, store=store, **kw)
    queries = extract_subnet_features(models or supernet, specs, test, indices=shard.indices(len(test)), **kw)
    bank_labels = (train.labels if mine is None else train.labels[mine]).to(device)
    # each sub-network's bank on the device for its own search (a move when the bank is kept in host memory),
    # normalised where it is: these features are this function's own, and a normalised copy would double them
    return {spec.name: knn_accuracy(normalize_rows_(banks.pop(spec.name).to(device)), bank_labels,
                                    normalize_rows_(shard.gather_rows(queries.pop(spec.name), len(test))),
                                    test.labels, num_classes, k, temperature, shard=shard, normalized=True)
            for spec in specs}


def bank_storage(feature_dims: Sequence[int], count: int, device, what: str = "kNN: the bank's features"
                 ) -> torch.device:
    """Where the bank's features of every sub-network are kept while they are extracted: on the GPU, unless they
    would take more than half of its free memory (a four-width ResNet-50 on ImageNet's train split: 26 GB);
    then in host memory, each sub-network's moved to the GPU for its own search (10 GB at full width). Features
    that this machine's memory cannot hold are refused before they are extracted (an out-of-memory kill would
    come at the end of a pass over the split)."""
    device = torch.device(device)
    need = count * sum(feature_dims) * 4
    if device.type == "cuda":
        # blocks the allocator keeps for reuse (a run's training steps, before its final kNN) count as used
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        if need <= free // 2:
            return device
        log.info("%s (%.1f GB for %d sub-networks) are kept in host memory, %.1f GB of the GPU's being free; each "
                 "sub-network's go to the GPU in turn", what, need / 1e9, len(feature_dims), free / 1e9)
        device = torch.device("cpu")
    short = host_memory_shortfall(need)
    if short:
        raise DataError(f"{what} of {count:,} images for {len(feature_dims)} sub-networks {short}: evaluate fewer "
                        "sub-networks at once (slimssl knn or linear with --subnet NAME ...)")
    return device


def host_memory_shortfall(need: int) -> str | None:
    """How ``need`` bytes of features exceed this machine's memory, each of torchrun's processes on it holding
    its own (``take 26.2 GB, more than ...``); None where they fit, or where the system does not say."""
    total, processes = physical_memory(), processes_on_this_machine()
    if not total or need * processes <= total:
        return None
    held = f", in each of the {processes} processes on this machine," if processes > 1 else ","
    return f"take {need / 1e9:.1f} GB{held} more than this machine's memory ({total / 1e9:.1f} GB)"


def knn_of_subnets(supernet, cfg, train, test, device, *, specs=None, k: int | None = None,
                   temperature: float | None = None, batch_size: int | None = None,
                   recalibrate_batches: int | None = None, shard: Shard = Shard()) -> dict[str, float]:
    """kNN top-1 of every sub-network of ``specs`` (default: the menu) with ``cfg``'s evaluation settings where
    no other is given: what both `slimssl knn` and the kNN during pretraining measure. With shared BatchNorm,
    each one's statistics are re-estimated first (``recalibrate_batches``, automatic by default; every process
    of a ``shard`` does it alike)."""
    e, d = cfg.eval, cfg.data
    specs = list(supernet.menu) if specs is None else list(specs)
    image = dict(resolution=d.resolution, mean=d.mean, std=d.std, batch_size=batch_size or e.batch_size,
                 device=device)
    models = subnet_models(supernet, specs, train, recalibrate_batches=recalibrate_batches, **image)
    return knn_eval_subnets(supernet, train, test, k=e.knn_k if k is None else k,
                            temperature=e.knn_temperature if temperature is None else temperature,
                            models=models, specs=specs, shard=shard, **image)


def knn_settings(cfg, options: DataOptions, k: int, temperature: float, recalibrate_bn: int) -> dict:
    """What results.json records of a kNN evaluation (``protocols.knn``): the same for ``slimssl knn`` and for
    the kNN that ends pretraining, which is its default."""
    return {**options.settings(cfg), "k": k, "temperature": temperature, "bank": "train", "queries": "test",
            "recalibrate_bn": recalibrate_bn}
