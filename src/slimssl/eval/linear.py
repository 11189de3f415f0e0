"""The switchable linear probe: one linear head per sub-network on a frozen supernet, trained jointly.

Protocol (fixed, so that numbers compare across runs): the backbone stays frozen in eval mode; every
sub-network gets its own ``nn.Linear`` (feature sizes differ with the width) and all heads are trained
together by one optimiser, each on its own sub-network's features. Without augmentation (the default) the
features are extracted once and cached in memory, so an epoch costs a few matrix products.

Recipe defaults, chosen for small data on a CPU and documented here:

* features are standardised per dimension with the train split's mean/std (a fixed affine map, i.e.
  BatchNorm-free; it makes one learning rate fit every width and every pretraining method);
* SGD, momentum 0.9, no weight decay, lr 0.1 with a per-step cosine schedule to 0, batch 256, 100 epochs;
* heads start from N(0, 0.01) weights and zero bias.

Options: ``distill`` (SlimCLR): sub-width heads minimise 0.5 CE + 0.5 soft CE to the full-width head's
detached predictions; ``shared_head``: one slimmable head, a weight [C, D_full] of which a sub-network
uses the leading ``D`` columns (the comparison of the SlimCLR paper); ``augment``: a random crop and a flip,
with the backbone run at every step. The crop (``train_crop``, also fine-tuning's) is ``pad``, CIFAR's
(padding 1/8 of the size, then a crop of the size), or ImageNet's RandomResizedCrop (8-100% of the area,
aspect 3/4-4/3): ``resized`` of the evaluation image, ``whole`` of the whole picture (a streamed split only). ``raw_features`` and ``milestones`` give the papers'
probes: the features as the backbone gives them, and the lr dropped tenfold at given epochs (with the
papers' lr, as it depends on the features' scale).

The backbone is fingerprinted (a hash of every parameter and buffer) before and after; a change raises
:class:`BackboneChangedError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import zlib
from dataclasses import dataclass
from typing import Generator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD
from ..data.eval_images import EvalImages
from ..devices import to_device_async
from ..errors import UsageError
from ..nn.modes import eval_mode
from ..nn.spec import Menu, SubnetSpec
from ..seeds import derived_generator
from . import (DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_MOMENTUM, PROBE_LR_DROP, check_milestones,
               check_train_crop)
from ..methods.losses import soft_cross_entropy
from .features import extract_subnet_features
from .knn import bank_storage
from .recalibrate import subnet_models
from .supervised import (augment_batch, check_crop_source, cosine_schedule, output_classes, require_labels,
                         step_schedule, topk_accuracy, training_images)

log = logging.getLogger("slimssl")

DISTILL_ALPHA = 0.5


class BackboneChangedError(RuntimeError):
    """The frozen backbone changed during an evaluation (a bug: it must stay bit-identical)."""


# ---- frozen-backbone check -----------------------------------------------------------------------------

def backbone_fingerprint(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every parameter and buffer (dtype, shape and bytes), by state-dict name."""
    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h = hashlib.sha256(f"{t.dtype}{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def check_backbone_unchanged(model: nn.Module, before: Mapping[str, str], what: str = "backbone") -> None:
    """Raise :class:`BackboneChangedError` naming the tensors that differ from ``before``."""
    after = backbone_fingerprint(model)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise BackboneChangedError(f"the frozen {what} changed during the evaluation: {shown}")


# ---- heads -------------------------------------------------------------------------------------------

class SwitchableLinear(nn.Module):
    """One independent linear classifier per sub-network (keyed by canonical name). Each head's initial weights
    come from ``seed`` and its sub-network's name alone: a width probed alone, or among other sub-networks in
    any order, starts from the same weights."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, init_std: float = 0.01, seed: int = 0):
        super().__init__()
        self.dims = dict(dims)
        self.heads = nn.ModuleDict({name: nn.Linear(d, num_classes) for name, d in self.dims.items()})
        for name, head in self.heads.items():
            own = derived_generator(seed, "probe_head", zlib.crc32(name.encode()))
            nn.init.normal_(head.weight, std=init_std, generator=own)
            nn.init.zeros_(head.bias)

    def weight_of(self, subnet: str) -> torch.Tensor:
        return self.heads[subnet].weight

    def forward(self, features: torch.Tensor, subnet: str) -> torch.Tensor:
        return self.heads[subnet](features)


class SharedSlimLinear(nn.Module):
    """One slimmable linear classifier: weight [C, D_full]; a sub-network with D features uses ``weight[:, :D]``
    (its features are the leading channels of the full width's) and the shared bias."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, init_std: float = 0.01, seed: int = 0):
        super().__init__()
        self.dims = dict(dims)
        full = max(self.dims.values())
        self.weight = nn.Parameter(torch.empty(num_classes, full))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.normal_(self.weight, std=init_std, generator=torch.Generator().manual_seed(seed))

    def weight_of(self, subnet: str) -> torch.Tensor:
        return self.weight[:, : self.dims[subnet]]

    def forward(self, features: torch.Tensor, subnet: str) -> torch.Tensor:
        return F.linear(features, self.weight_of(subnet), self.bias)


def make_heads(dims: Mapping[str, int], num_classes: int, shared: bool = False, seed: int = 0) -> nn.Module:
    if shared:
        return SharedSlimLinear(dims, num_classes, seed=seed)
    return SwitchableLinear(dims, num_classes, seed=seed)


def probe_loss(heads: nn.Module, features: Mapping[str, torch.Tensor], labels: torch.Tensor, *,
               distill: bool = False, teacher: str | None = None,
               weights: Mapping[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss of all heads (each on its own sub-network's ``features``) and their logits.

    ``distill``: every head other than ``teacher`` (default: the first of ``features``) minimises
    0.5 CE + 0.5 soft CE to the teacher head's detached softmax. ``weights`` scales each head's loss.
    """
    logits = {name: heads(f, name) for name, f in features.items()}
    teacher = teacher or next(iter(logits))
    distill = distill and teacher in logits
    total = 0.0
    for name, z in logits.items():
        loss = F.cross_entropy(z, labels)
        if distill and name != teacher:  # soft_cross_entropy detaches the teacher's logits
            loss = (1 - DISTILL_ALPHA) * loss + DISTILL_ALPHA * soft_cross_entropy(z, logits[teacher])
        w = 1.0 if weights is None else float(weights.get(name, 1.0))
        total = total + w * loss
    return total, logits


def probe_step(heads: nn.Module, optimizer: torch.optim.Optimizer, features: Mapping[str, torch.Tensor],
               labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """One optimiser step of the joint head training (see :func:`probe_loss` for ``kwargs``). Returns the
    summed loss as a detached 0-d tensor on the device: the step never waits for the GPU to read it."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = probe_loss(heads, features, labels, **kwargs)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---- the probe ---------------------------------------------------------------------------------------

def _epoch_batches(train: EvalImages, perm: torch.Tensor, batch_size: int, augment: bool, crop: str,
                   generator: torch.Generator) -> Generator[tuple[torch.Tensor, torch.Tensor | None], None, None]:
    """(indices, their uint8 images when augmenting, else None) of every step of an epoch; the images are
    read in the epoch's order, so a streamed train split is decoded once per epoch."""
    steps = perm.split(batch_size)
    if not augment:
        yield from ((idx, None) for idx in steps)
        return
    images = training_images(train, batch_size, perm, crop, generator)
    with contextlib.closing(images):  # closing: stop the loader workers
        yield from zip(steps, images)


def _statistics(features: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and deviation per dimension, summed on ``device`` wherever the features are kept (moved there one
    sub-network's at a time): the same numbers, and so the same probe, for features kept in host memory."""
    on_device = features.to(device)
    return on_device.mean(0), on_device.std(0).clamp_min(1e-6)


class _ProbeFeatures:
    """Every sub-network's features, standardised per dimension with the train split's mean and deviation (or
    ``raw_features``, as the backbone gives them): of the train split cached once (on the GPU, or in host memory
    when too large for it: ``bank_storage``), or (augmenting) computed by the frozen backbone at every step."""

    def __init__(self, models: Mapping[str, nn.Module], specs: Sequence[SubnetSpec], train: EvalImages, *,
                 augment: bool, crop: str, resolution: int, mean, std, batch_size: int, device: torch.device,
                 raw_features: bool = False):
        self.models, self.specs, self.augment, self.crop = models, specs, augment, crop
        self.resolution, self.mean, self.std, self.device = resolution, mean, std, device
        self.extract = dict(resolution=resolution, mean=mean, std=std, batch_size=batch_size, device=device)
        self.stats = self.cached = None
        if augment and raw_features:  # each step's features go to the heads as they are: nothing to cache or measure
            return
        store = bank_storage([models[s.name].feature_dim(s) for s in specs], len(train), device,
                             what="the linear probe's train features")
        features = extract_subnet_features(models, specs, train, store=store, **self.extract)
        if not raw_features:
            self.stats = {n: _statistics(f, device) for n, f in features.items()}
        if not augment:  # kept, standardised in place: a second copy of ImageNet's features would double their memory
            self.cached = self._standardized(features, in_place=True)

    def _standardized(self, features: dict[str, torch.Tensor], in_place: bool = False) -> dict[str, torch.Tensor]:
        if self.stats is None:
            return features
        if in_place:
            return {n: f.sub_(self.stats[n][0].to(f.device)).div_(self.stats[n][1].to(f.device))
                    for n, f in features.items()}
        return {n: (f - self.stats[n][0]) / self.stats[n][1] for n, f in features.items()}

    def of_batch(self, idx: torch.Tensor, images: torch.Tensor | None,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The features of the train images ``idx`` (on the device); ``images``: their uint8 pixels when
        augmenting."""
        if self.cached is not None:  # kept in host memory: gathered there, then moved
            return {n: f[idx.to(f.device)].to(self.device, non_blocking=True) for n, f in self.cached.items()}
        x = augment_batch(to_device_async(images, self.device), self.resolution, self.mean, self.std, generator, self.crop)
        with torch.no_grad():
            return self._standardized({s.name: self.models[s.name](x, subnet=s).float() for s in self.specs})

    def of_split(self, data: EvalImages) -> dict[str, torch.Tensor]:
        """The features of a whole split, without augmentation."""
        return self._standardized(extract_subnet_features(self.models, self.specs, data, **self.extract))


@dataclass(frozen=True)
class TrainedProbe:
    """A finished linear probe: ``results`` (``{subnet: {"top1": %, "top5": %}}`` on the test split), its
    ``heads``, and what each sub-network's classifier of images is made of."""

    results: dict[str, dict[str, float]]
    heads: nn.Module
    models: Mapping[str, nn.Module]  # the sub-network's network: the supernet, or a recalibrated copy of it
    specs: Sequence[SubnetSpec]
    stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None  # the standardisation (None: raw features)

    def classifiers(self) -> dict[str, nn.Module]:
        """Each sub-network exported with its head as ``fc`` (the standardisation folded into it): a classifier
        of images that scores the results. Exported from the networks as they are now: call it before training
        the supernet further."""
        return {s.name: probe_classifier(self.models[s.name], s, self.heads, self.stats) for s in self.specs}


def linear_probe_subnets(supernet, train, test, **options) -> dict[str, dict[str, float]]:
    """``{subnet: {"top1": %, "top5": %}}`` of :func:`train_linear_probe`, which takes the same arguments."""
    return train_linear_probe(supernet, train, test, **options).results


def train_linear_probe(supernet, train, test, *, resolution: int | None = None, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR,
                       batch_size: int = DEFAULT_BATCH_SIZE, distill: bool = False, shared_head: bool = False,
                       augment: bool = False, train_crop: str = "pad",
                       subnets: Sequence[SubnetSpec | str] | None = None, device="cpu", seed: int = 0,
                       feature_batch_size: int = 256, recalibrate_batches: int | None = None,
                       raw_features: bool = False, milestones: Sequence[int] | None = None) -> TrainedProbe:
    """Train one linear head per sub-network of ``supernet`` (frozen, eval mode) on ``train`` and measure them on
    ``test`` (labelled datasets, in memory or streamed: see ``data/eval_images.py``; the augmented probe reads the
    train split once per epoch). Features are standardised with the train split's mean and deviation, unless
    ``raw_features``; the heads train with SGD (:data:`PROBE_OPTIMIZER`), the lr along a cosine to 0, or times
    :data:`PROBE_LR_DROP` from each of the ``milestones`` epochs on.
    """
    milestones = _check_probe_inputs(train, test, epochs=epochs, batch_size=batch_size, lr=lr,
                                     train_crop=train_crop, milestones=milestones, augment=augment)
    device = torch.device(device)
    resolution = resolution or train.resolution
    specs = supernet.resolve_many(subnets or None)
    with eval_mode(supernet.to(device)):  # the caller's supernet is given back in its own mode
        fingerprints = {id(supernet): (supernet, backbone_fingerprint(supernet))}
        models = subnet_models(supernet, specs, train, recalibrate_batches=recalibrate_batches,
                               batch_size=feature_batch_size, resolution=resolution, mean=mean, std=std,
                               device=device, seed=seed)
        for model in models.values():
            fingerprints.setdefault(id(model), (model, backbone_fingerprint(model)))

        features = _ProbeFeatures(models, specs, train, augment=augment, crop=train_crop, resolution=resolution,
                                  mean=mean, std=std, batch_size=feature_batch_size, device=device,
                                  raw_features=raw_features)
        dims = {s.name: models[s.name].feature_dim(s) for s in specs}
        heads = make_heads(dims, output_classes(train, test), shared=shared_head, seed=seed).to(device)
        teacher = Menu(specs).largest.name  # of the distilled heads (SlimCLR: the full width), in any given order
        _train_heads(heads, features, train, epochs=epochs, lr=lr, batch_size=batch_size, distill=distill,
                     teacher=teacher, seed=seed, milestones=milestones)

        heads.eval()
        results = {}
        with torch.no_grad():
            for n, f in features.of_split(test).items():
                top1, top5 = topk_accuracy(heads(f, n), test.labels)
                results[n] = {"top1": top1, "top5": top5}
        for model, before in fingerprints.values():
            check_backbone_unchanged(model, before)
    return TrainedProbe(results, heads, models, specs, features.stats)


def probe_classifier(model: nn.Module, spec: SubnetSpec, heads: nn.Module,
                     stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None) -> nn.Module:
    """``spec`` of ``model`` exported (eval mode, on the CPU, float32) with its probe head as ``fc``: the head of
    standardised features ``W (f - mean) / std + b`` is the linear map ``(W / std) f + (b - W mean / std)``."""
    plain = model.export(spec).eval().to("cpu", torch.float32)
    weight = heads.weight_of(spec.name).detach().to("cpu", torch.float32)
    bias = heads.heads[spec.name].bias if isinstance(heads, SwitchableLinear) else heads.bias
    bias = bias.detach().to("cpu", torch.float32)
    if stats is not None:
        mean, std = (t.to("cpu", torch.float32) for t in stats[spec.name])
        weight = weight / std
        bias = bias - weight @ mean
    plain.fc = nn.Linear(plain.feature_dim, weight.shape[0])
    with torch.no_grad():
        plain.fc.weight.copy_(weight)
        plain.fc.bias.copy_(bias)
    return plain


def _check_probe_inputs(train, test, *, epochs: int, batch_size: int, lr: float, train_crop: str,
                        milestones: Sequence[int] | None, augment: bool) -> tuple[int, ...] | None:
    """Refuse what cannot be probed; returns the milestones as a tuple of ints (or None: the cosine)."""
    require_labels("the linear probe", train, test)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise UsageError(f"need epochs >= 1, batch_size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    check_train_crop(train_crop, default_allowed=False)
    if augment:
        check_crop_source(train_crop, train)
    return check_milestones(milestones, epochs)


def _train_heads(heads: nn.Module, features: _ProbeFeatures, train: EvalImages, *, epochs: int, lr: float,
                 batch_size: int, distill: bool, teacher: str, seed: int,
                 milestones: tuple[int, ...] | None = None) -> None:
    """Train all heads together with SGD (:data:`PROBE_OPTIMIZER`), the lr stepped at every step: along a cosine
    to 0, or dropped at the ``milestones`` epochs."""
    device = features.device
    optimizer = torch.optim.SGD(heads.parameters(), lr=lr, momentum=DEFAULT_MOMENTUM)  # PROBE_OPTIMIZER
    n_train = len(train)
    steps_per_epoch = math.ceil(n_train / batch_size)
    total = epochs * steps_per_epoch
    schedule = (cosine_schedule(optimizer, total) if milestones is None
                else step_schedule(optimizer, milestones, steps_per_epoch, PROBE_LR_DROP))
    gen = torch.Generator().manual_seed(seed)  # the epochs' orders and the augmentations' draws
    labels = train.labels.to(device)
    heads.train()
    for epoch in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        running = torch.zeros((), device=device)  # read once per logged epoch, not at every step
        for idx, images in _epoch_batches(train, perm, batch_size, features.augment, features.crop, gen):
            idx = idx.to(device, non_blocking=True)
            running += probe_step(heads, optimizer, features.of_batch(idx, images, gen), labels[idx],
                                  distill=distill, teacher=teacher)
            schedule.step()
        if epoch == 0 or (epoch + 1) % max(1, epochs // 5) == 0 or epoch + 1 == epochs:
            log.info("linear probe epoch %d/%d: loss %.4f (summed over %d head(s))", epoch + 1, epochs,
                     running.item() / steps_per_epoch, len(features.specs))
