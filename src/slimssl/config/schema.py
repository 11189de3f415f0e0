"""The config schema: one pydantic model per section of a recipe, and the checks across sections.

Every section forbids unknown keys, so a typo is an error that names the key and the file instead of a
setting that silently does nothing.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_serializer,
                      model_validator)
from pydantic_core import PydanticCustomError

from ..data.recipes import RECIPE_CROP_SCALE, RECIPES
from ..errors import SlimsslError
from ..launch import DEVICE_PATTERN, DEVICES, SEED_RANGE, unsupported_device_hint
from ..models.arch import ARCHS, subnet_channels
from ..nn.spec import WIDTH_DECIMALS, Menu, SubnetError, SubnetSpec

if TYPE_CHECKING:
    from ..methods import Method


class ConfigError(SlimsslError):
    """A configuration that cannot be used; the message names the file, the key and what is allowed."""


Positive = Annotated[float, Field(gt=0)]
Blocks = Annotated[int, Field(ge=1)]  # a stage's residual blocks
Beta = Annotated[float, Field(ge=0, lt=1)]  # an Adam moment decay


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # data.mean and data.std by default


class Section(BaseModel):
    # inf and nan are no setting's value (nan already fails every bound, inf passes a lower one)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """true/false where a number is expected is a mistake (pydantic's lax mode would read true as 1)."""
        if _bool_for_number(value, cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError("bool_for_number", "true or false where a number is expected")
        return value


def _bool_for_number(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is, or holds in its list or tuple, a bool where ``annotation`` wants a number
    (``int``, ``float | None``, ``list[float]``, ``tuple[float, float]``, ``list[list[int]]``, ...)."""
    kinds = _kinds(annotation)
    if isinstance(value, bool):
        return bool({int, float} & set(kinds)) and bool not in kinds
    if not isinstance(value, (list, tuple)):
        return False
    for kind in kinds:
        if get_origin(kind) in (list, tuple):
            items = [a for a in get_args(kind) if a is not Ellipsis]
            if items:
                per_item = items if len(items) == len(value) else items[:1] * len(value)
                return any(_bool_for_number(v, t) for v, t in zip(value, per_item))
    return False


def _kinds(annotation: Any) -> tuple:
    """The types a field accepts: a union's members, with ``Annotated`` metadata dropped."""
    if get_origin(annotation) in (Union, UnionType):
        return tuple(k for member in get_args(annotation) for k in _kinds(member))
    if get_origin(annotation) is Annotated:
        return _kinds(get_args(annotation)[0])
    return (annotation,)


def _empty_is_none(value):
    """An empty list where null means the default: the default too (as earlier versions read it)."""
    return None if isinstance(value, list) and not value else value


class ModelConfig(Section):
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = Field(
        default="resnet18", description="the supernet's full network: basic blocks (18, 34) or bottlenecks (50, 101)")
    depths: list[Blocks] | None = Field(default=None, description="blocks per stage; default (null or []): the arch's")
    base_width: int = Field(
        default=64, gt=0, description="stem channels; stage i has base_width * 2**i (x4 for bottleneck)")
    stem: Literal["cifar", "imagenet"] = Field(
        default="imagenet", description="cifar: one 3x3 convolution and no max-pool (small images); imagenet: a 7x7 "
        "convolution of stride 2 and a max-pool")
    bn: Literal["private", "shared"] = Field(
        default="private", description="private: every menu entry has BatchNorm of its own (affine and statistics); "
        "shared: one full-width BatchNorm sliced to each width, whose statistics evaluation re-estimates per "
        "sub-network")
    bn_group_size: int | None = Field(
        default=None, gt=1, description="pretraining BatchNorm statistics over groups of this many consecutive "
        "samples, as if each group were on its own GPU (null: each process's whole batch). Emulates per-GPU BatchNorm "
        "on one GPU, keeps results independent of the number of processes, and gives MoCo's shuffle-BN its groups")
    channel_divisor: int = Field(
        default=1, ge=1, description="a narrower width's channels are rounded to a multiple of this (e.g. 8, for "
        "tensor cores); 1: floor(channels x width), as SlimCLR")
    zero_init_residual: bool = Field(
        default=False, description="each residual block's last BatchNorm starts at zero, so the block starts as the "
        "identity (torchvision's option)")

    _no_depths_is_the_default = field_validator("depths", mode="before")(_empty_is_none)

    @property
    def block(self) -> str:
        return ARCHS[self.arch][0]

    @property
    def full_depths(self) -> tuple[int, ...]:
        return tuple(self.depths) if self.depths else ARCHS[self.arch][1]


class MenuConfig(Section):
    widths: list[float] = Field(default_factory=lambda: [1.0], description="width multipliers in (0, 1]")
    depths: list[Annotated[list[Blocks], Field(min_length=1)]] | None = Field(
        default=None, description="per-stage depths crossed with widths; default (null or []): full")
    subnets: list[str] = Field(default_factory=list, description="extra entries by name, e.g. w0p5_d1-1-1-1")

    _no_depths_is_the_default = field_validator("depths", mode="before")(_empty_is_none)

    @model_validator(mode="after")
    def _check_repeats(self) -> "MenuConfig":
        kept = [round(w, WIDTH_DECIMALS) for w in self.widths]  # what a sub-network's name keeps of a width
        repeated = sorted({w for w in kept if kept.count(w) > 1}, reverse=True)
        if repeated:  # a typo, most likely: the menu would silently have fewer entries than the list
            raise ValueError(f"menu.widths lists {', '.join(f'{w:g}' for w in repeated)} more than once (widths "
                             f"are kept to {WIDTH_DECIMALS} decimals): {self.widths}")
        return self


def known_or_stored(name: str, info: ValidationInfo, lookup, key: str) -> str:
    """``name`` when ``lookup`` (which raises a SlimsslError for a name not registered) knows it, or when the
    config is a stored one (a checkpoint's, read for its backbone: evaluation and export need no method or rule)."""
    try:
        lookup(name)
    except SlimsslError as e:
        if (info.context or {}).get("stored"):
            return name
        raise ValueError(f"{key}: {e}") from None
    return name


class MethodConfig(Section):
    name: str = Field(
        default="byol", description="byol, mocov2, mocov3, or a method registered with slimssl.methods.register_method")
    proj_hidden: int = Field(
        default=4096, gt=0, description="hidden units of the projector at full width (a sub-network's heads shrink "
        "with its width)")
    proj_dim: int = Field(
        default=256, gt=0, description="output size of the projector and predictor: the embedding the loss compares")
    # 0 is no size, but a method without a predictor never read it: its runs said 0 and stay readable (the heads
    # refuse a size below 1 when they are built)
    pred_hidden: int = Field(
        default=4096, ge=0, description="hidden units of the predictor at full width (BYOL, MoCo v3; MoCo v2 has none)")
    temperature: float = Field(default=0.2, gt=0, description="temperature of the contrastive loss (MoCo v2, MoCo v3)")
    momentum: float = Field(default=0.996, ge=0, le=1, description="EMA of the target / key encoder (base value)")
    momentum_schedule: Literal["cosine", "constant"] = Field(
        default="cosine", description="cosine: the momentum rises from method.momentum to 1 over training, as BYOL; "
        "constant: it stays at method.momentum")
    queue_size: int = Field(default=65536, ge=0, description="MoCo v2 queue of full-width keys")
    symmetric: bool = Field(
        default=True, description="MoCo v2's loss over both views (false: the first view's queries and the second's "
        "keys only); BYOL's and MoCo v3's are always symmetric")
    shuffle_bn: bool = Field(
        default=False, description="MoCo's shuffle-BN: the target (key) network sees the batch in a random order, so a "
        "query and its positive key are normalised with statistics of different groups of samples; needs several "
        "BatchNorm groups (model.bn_group_size, or several processes)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="the settings of a method of your own, by name (its Method.default_options "
        "lists them with their defaults); the built-in methods have none")

    @field_validator("name")
    @classmethod
    def _known_method(cls, name: str, info: ValidationInfo) -> str:
        from ..methods import method_class

        return known_or_stored(name, info, method_class, "method.name")

    def registered(self) -> type[Method] | None:
        """The method class of ``name``, or None for a method not registered in this process (a stored config,
        read with ``config_from_dict(..., stored=True)``)."""
        from ..methods import METHODS

        return METHODS.get(self.name)

    @model_validator(mode="after")
    def _mocov2_has_a_queue(self) -> "MethodConfig":
        if self.name == "mocov2" and self.queue_size < 1:  # only the positive left: the loss is 0, nothing learnt
            raise ValueError(f"method.queue_size: MoCo v2 contrasts each query with the keys in its queue, so it "
                             f"needs at least 1 (the CIFAR recipe keeps 4096); got {self.queue_size}")
        return self

    @model_validator(mode="after")
    def _symmetric_where_it_matters(self) -> "MethodConfig":
        method = self.registered()
        if not self.symmetric and method is not None and method.symmetric_only:  # else accepted, and nothing changes
            raise ValueError(f"method.symmetric: false has no effect on {self.name}, whose loss is always symmetric "
                             "(mocov2 has the asymmetric form); remove the setting")
        return self

    @model_validator(mode="after")
    def _known_options(self) -> "MethodConfig":
        if self.registered() is None:  # an unregistered method's options: checked once it is registered
            return self
        defaults = self.registered().default_options
        for key, value in self.options.items():
            if key not in defaults:
                allowed = ", ".join(defaults) or "none"
                raise ValueError(f"method.options.{key}: unknown option of method {self.name!r} (its options: "
                                 f"{allowed})")
            value = self.options[key] = _as_kind(value, defaults[key])
            if not _same_kind(value, defaults[key]):
                raise ValueError(f"method.options.{key}: expected {type(defaults[key]).__name__} like its default "
                                 f"{defaults[key]!r}, got {value!r}")
        return self


def _as_kind(value: Any, default: Any) -> Any:
    """``value`` read as its default's kind where it is written another way: 1 for a float (the method reads
    1.0), 1e-3 for a float (which YAML reads as a string), a list for a tuple (YAML and JSON have no tuple)."""
    if isinstance(default, float) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return value
            return number if math.isfinite(number) else value  # nan and inf are no setting's value
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _same_kind(value: Any, default: Any) -> bool:
    """Whether ``value`` may replace ``default``: anything for a default of None, an int for a float, else the
    same type (a bool is no int here)."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


class SlimConfig(Section):
    sampling: Literal["all", "sandwich"] = Field(
        default="all", description="the sub-networks trained each step: all menu entries, or sandwich: the largest, "
        "the smallest and num_random drawn between them (in the menu's order: by width, then by blocks in all; with "
        "menu.subnets the narrowest entry is the smallest even where a wider one is shallower)")
    num_random: int = Field(
        default=2, ge=0, description="sandwich: random sub-networks between the largest and the smallest (0 with "
        "private BatchNorm: only for a menu of those two, the others would never train)")
    random_space: Literal["menu", "space"] = Field(
        default="menu", description="where sandwich's random sub-networks come from: the menu's entries, or space: any "
        "width (on a 0.05 grid) and depth between the menu's smallest and largest (needs model.bn: shared)")
    teacher: Literal["target", "online"] = Field(
        default="target", description="target: no distillation term, the target network's outputs are every "
        "sub-network's teacher through the SSL loss (DSPNet); online: each step's first sub-network, the full one, is "
        "the teacher of the others' distillation term (SlimCLR's online distillation)")
    distill_alpha: float = Field(
        default=0.5, ge=0, le=1, description="teacher: online: a student's loss is (1 - distill_alpha) x its SSL loss "
        "+ distill_alpha x distill_scale x the distillation loss")
    distill_temperature: float = Field(
        default=1.0, gt=0, description="online distillation of contrastive methods: temperature on the cosine "
        "similarities, loss scaled by its square")
    distill_scale: float = Field(
        default=1.0, gt=0, description="a student's loss is (1 - distill_alpha) x its SSL loss + distill_alpha x "
        "distill_scale x the distillation loss (which the temperature's square already scales); e.g. 25 with "
        "distill_temperature 0.2 distils MoCo v3's own logits at tau 0.2 unscaled, as SlimCLR's MoCo v3 code does at "
        "tau 1")
    loss_weights: str = Field(
        default="uniform", description="uniform: every loss weighs 1; slimclr: the full network's loss weighs 1 + the "
        "sum of the widths of the other sub-networks trained in the step (with sampling: sandwich, those drawn in "
        "it), the others 1; or a rule registered with slimssl.slim.register_loss_weights")
    slow_start: float = Field(default=0.0, ge=0, lt=1, description="fraction of training before sub-networks join")
    slow_start_lr: float | None = Field(
        default=None, gt=0, description="a new base lr (as optim.lr, at its reference_batch) for the schedule's rest "
        "once the sub-networks join (SlimCLR); null: unchanged")

    @field_validator("slow_start_lr", mode="before")
    @classmethod
    def _stored_zero_was_unset(cls, value, info: ValidationInfo):
        # before 0 was refused, a run's 0 was read as null and it trained on at optim.lr: its checkpoint still is
        if (info.context or {}).get("stored") and value == 0 and not isinstance(value, bool):
            return None
        return value

    @field_validator("loss_weights")
    @classmethod
    def _known_loss_weights(cls, name: str, info: ValidationInfo) -> str:
        from ..slim.weights import loss_weights_rule

        return known_or_stored(name, info, loss_weights_rule, "slim.loss_weights")


Probability = Annotated[float, Field(ge=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]


class ViewChanges(Section):
    """Changes to the augmentation recipe's views (``data.views``); a key left unset keeps the recipe's value."""

    crop_ratio: tuple[Positive, Positive] | None = Field(
        default=None, description="aspect ratio range (min, max) of the random resized crop; the recipes' 3/4-4/3")
    jitter_p: Probability | None = Field(default=None, description="probability of the colour jitter")
    brightness: NonNegative | None = Field(default=None, description="the colour jitter's brightness strength")
    contrast: NonNegative | None = Field(default=None, description="the colour jitter's contrast strength")
    saturation: NonNegative | None = Field(default=None, description="the colour jitter's saturation strength")
    hue: float | None = Field(default=None, ge=0, le=0.5, description="the colour jitter's hue strength")
    grayscale_p: Probability | None = Field(default=None, description="probability of converting the view to grayscale")
    blur_p: Probability | None = Field(default=None, description="probability of a Gaussian blur (wins over data.blur)")
    blur_sigma: tuple[Positive, Positive] | None = Field(
        default=None, description="the blur's sigma range (min, max), in pixels; the recipes' 0.1-2")
    solarize_p: Probability | None = Field(default=None, description="probability of solarizing the view")

    @model_serializer(mode="wrap")
    def _only_changes(self, handler) -> dict:
        """config.yaml lists the changes made, not every key of the recipe left alone."""
        return {key: value for key, value in handler(self).items() if value is not None}

    @model_validator(mode="after")
    def _ranges_in_order(self) -> "ViewChanges":
        for key in ("crop_ratio", "blur_sigma"):
            value = getattr(self, key)
            if value is not None and value[0] > value[1]:
                raise ValueError(f"{key}: must be (min, max) with min <= max, got {list(value)}")
        return self


class DataConfig(Section):
    source: str = Field(
        default="digits", min_length=1, description="the dataset: digits, cifar10, cifar100, fake, a registered "
        "name, or the path of an ImageFolder tree or a .zip of one (what --data sets)")
    resolution: int = Field(default=32, gt=0, description="side of the training views and evaluation images, in pixels")
    augment: Literal[RECIPES] | None = Field(
        default=None, description="default: the method's")  # type: ignore[valid-type]
    crop_scale: tuple[float, float] | None = Field(
        default=None, description="random resized crop area range (min, max), 0 < min <= max <= 1; default: the "
        "augmentation recipe's (MoCo v2: 0.2-1; BYOL and MoCo v3: 0.08-1)")
    crop_interpolation: Literal["bilinear", "bicubic"] = Field(
        default="bilinear", description="how the views' random resized crops are resized to data.resolution: bilinear "
        "(torchvision's default, as MoCo's code) or bicubic (BYOL's paper, solo-learn)")
    flip_p: float = Field(default=0.5, ge=0, le=1, description="horizontal flip probability (0 for digits or text)")
    blur: bool | None = Field(
        default=None, description="Gaussian blur where the augmentation recipe has it (true) or nowhere (false); "
        "default: the recipe's above 64 px, none at 64 px or less")
    mean: tuple[float, float, float] = Field(
        default=IMAGENET_MEAN, description="per RGB channel, subtracted from images scaled to [0, 1]")
    std: tuple[Positive, Positive, Positive] = Field(
        default=IMAGENET_STD, description="per RGB channel, divides them next")
    skip_unreadable: bool = Field(
        default=False, description="an image that cannot be decoded is replaced by the next readable one and logged "
        "(false: the run stops with an error naming the file)")
    fake_size: int = Field(default=256, gt=0, description="number of random images of source: fake")
    loader: Literal["memory", "stream"] = Field(
        default="memory", description="memory: decode the dataset once into a uint8 tensor (GPU when it fits); stream: "
        "loader workers decode each step's files (a folder or .zip too large for memory; kNN streams the splits too)")
    workers: int | None = Field(
        default=None, ge=0, description="decoding worker processes per training process wherever files are streamed: "
        "loader stream, the kNN monitor's train split on several processes, evaluations with --loader stream "
        "(default: the CPUs this process may use, as a Slurm cpuset allows, shared by torchrun's processes on the "
        "machine, 1 to 8, decided when the run starts); the memory loader runs none")
    views: list[ViewChanges] = Field(
        default_factory=list, max_length=2, description="changes to the augmentation recipe's views: one entry "
        "changes both views, two change the first and the second (e.g. [{brightness: 0.8, contrast: 0.8, "
        "saturation: 0.8, hue: 0.2}] for SimCLR's stronger jitter); applied after crop_scale, flip_p and blur")
    # crop_scale was filled in from the augmentation recipe, not given: a changed method re-resolves it
    _crop_scale_resolved: bool = PrivateAttr(False)

    @field_validator("views", mode="before")
    @classmethod
    def _one_change_for_both_views(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value  # views: {hue: 0.2} reads as [{hue: 0.2}]

    @field_validator("views")
    @classmethod
    def _one_way_to_write_each_change(cls, views: list[ViewChanges]) -> list[ViewChanges]:
        """No change is [], the same change to both views one entry: equal settings compare equal on resume."""
        if all(view == ViewChanges() for view in views):
            return []
        return views[:1] if len(views) == 2 and views[0] == views[1] else views

    def __eq__(self, other: object) -> bool:  # equal values are equal configs, however crop_scale was set
        if not isinstance(other, DataConfig):
            return NotImplemented
        return self.__dict__ == other.__dict__

    @model_validator(mode="after")
    def _check_crop_scale(self) -> "DataConfig":
        if self.crop_scale is None:
            return self
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.crop_scale must be (min, max) with 0 < min <= max <= 1, got {list(self.crop_scale)}")
        return self


class OptimConfig(Section):
    name: Literal["sgd", "lars", "adamw"] = Field(
        default="sgd", description="sgd (with momentum), lars (SGD with a per-layer trust ratio) or adamw")
    lr: float = Field(default=0.05, gt=0, description="base lr at reference_batch")
    lr_scaling: Literal["linear", "none"] = Field(
        default="linear", description="linear: the peak lr is lr x train.batch_size / reference_batch; none: lr itself")
    reference_batch: int = Field(default=256, gt=0, description="the batch size lr is given for")
    weight_decay: float = Field(default=1e-4, ge=0, description="weight decay (adamw: decoupled from the gradient)")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="momentum of sgd and lars")
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.999), description="adamw's decay rates of its moment estimates")
    warmup_epochs: float = Field(default=0.0, ge=0, description="epochs of linear warm-up to the peak lr")
    schedule: Literal["cosine", "constant"] = Field(
        default="cosine", description="the lr after the warm-up: a cosine decay to min_lr_ratio x the peak, or "
        "constant")
    min_lr_ratio: float = Field(
        default=0.0, ge=0, le=1, description="the cosine schedule's last lr, as a fraction of the peak")
    no_decay_1d: bool = Field(default=True, description="no weight decay (and no LARS adaptation) on biases and norms")
    trust_coefficient: float = Field(
        default=0.001, gt=0, description="LARS: a layer's gradient is scaled by lr x this x |w| / |g|")
    lars_clip: bool = Field(
        default=False, description="LARS: scale by min(trust_coefficient x |w| / |g|, lr) instead (LARC's clipping)")


class TrainConfig(Section):
    epochs: int = Field(default=10, gt=0, description="passes over the training split")
    batch_size: int = Field(
        default=256, ge=2, description="total batch over all processes (BatchNorm needs two samples)")
    micro_batches: int = Field(
        default=1, ge=1, description="gradient accumulation: each process runs its share of the batch in this many "
        "equal parts, one after another, and takes one optimiser step on their summed gradients: the same batch and "
        "lr in less memory. BatchNorm normalises one part at a time, and MoCo v3's negatives are one part's keys "
        "(docs/distributed.md)")
    seed: int = Field(
        default=0, description="seed of the initial weights, the views and the sub-networks drawn: the same seed and "
        "settings train the same run on the same machine")
    device: str = Field(
        default="auto", description="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, or cuda:N (one "
        "process)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="autocast dtype of the forward passes; auto: bf16 on a GPU that has it, else fp32")
    channels_last: bool = Field(
        default=True, description="channels-last memory format on a GPU (faster convolutions in bf16); no effect on "
        "the CPU")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        default="off", description="torch.compile the forward passes, one graph per sub-network (reduce-overhead, "
        "max-autotune: also CUDA graphs); the first step of each sub-network pays the compilation")
    sync_bn: bool = Field(
        default=False, description="multi-GPU: BatchNorm statistics over the total batch (each sub-network's private "
        "BatchNorm synchronised separately; needs CUDA)")
    log_every: int = Field(
        default=10, gt=0, description="steps between records of the losses in metrics.jsonl and TensorBoard (each one "
        "reads them from the device)")
    checkpoint_every: int = Field(
        default=0, ge=0, description="epochs between kept epoch_XXXX.pt checkpoints (0: none; last.pt is written every "
        "epoch regardless). A ResNet-18 checkpoint is ~180 MiB")
    save_every_minutes: float = Field(
        default=0, ge=0, description="minutes between saves of last.pt within an epoch, at a logged step (0: at the "
        "end of each epoch only): a run killed without notice (SIGKILL, out of memory, a lost node) trains again at "
        "most this much plus train.log_every steps. Resumes as exactly as a stop signal's save")
    knn: bool = Field(
        default=True, description="kNN of every sub-network during pretraining: at random initialisation "
        "(eval.knn_random_init), every train.knn_every epochs and at the end (false: none; `slimssl knn RUN` measures "
        "it later)")
    knn_every: int = Field(default=0, ge=0, description="epochs between online kNN evaluations (0: only at the end)")
    grad_diagnostics_every: int = Field(
        default=0, ge=0, description="steps between SlimCLR gradient-imbalance records in metrics.jsonl (0: off)")
    nonfinite: Literal["error", "skip"] = Field(
        default="error", description="a NaN/Inf loss stops the run (error) or its step is skipped and counted (skip)")

    @field_validator("seed")
    @classmethod
    def _seed_of_64_bits(cls, value: int) -> int:
        if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
            raise PydanticCustomError("seed", "Input should be an integer that fits 64 bits")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, value):  # reported as a field's error: with its key and input
            raise PydanticCustomError("device", f"Input should be {DEVICES}{unsupported_device_hint(value)}")
        return value

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_off_as_yaml_reads_it(cls, value: Any) -> Any:
        # YAML reads a bare off (compile: off in a file, --set train.compile=off) as false
        return "off" if value is False else value


class EvalConfig(Section):
    knn_k: int = Field(default=200, gt=0, description="neighbours in the weighted kNN vote")
    knn_temperature: float = Field(
        default=0.1, gt=0, description="temperature of the kNN vote's weights, exp(similarity / T)")
    batch_size: int = Field(
        default=256, gt=0, description="images per forward pass in evaluations (kNN, probes' features, BatchNorm "
        "re-estimation)")
    knn_random_init: bool = Field(default=True, description="kNN of the untrained network too, as a baseline")
    crop_ratio: float = Field(
        default=1.0, gt=0, le=1, description="evaluation images: the shorter side is resized to data.resolution / "
        "crop_ratio and the centre data.resolution square kept (ImageNet's protocol: 0.875, resize 256, crop 224)")
    train_crop: Literal["pad", "resized", "whole"] = Field(
        default="pad", description="the random crop of fine-tuning and of `linear --augment`, with a flip: pad (CIFAR: "
        "pad by 1/8 of the size, crop the size), or ImageNet's RandomResizedCrop of 8-100% of the area, of the "
        "evaluation image (resized) or of the whole picture (whole: a streamed split only; one decoded in memory "
        "takes resized)")


class Config(Section):
    """A whole run's settings, section by section, as a recipe's YAML file holds them.

    ``Config()`` holds the defaults of every setting (BYOL on a ResNet-18 of one width); the functions that
    take a config (``load_config``, ``build_supernet``, ``pretrain``) default to the ``demo`` recipe instead.
    ``slimssl config --config NAME`` prints a recipe resolved; ``config_from_dict`` and ``load_config``
    turn pydantic's errors into a :class:`ConfigError` that names the file and the key."""

    name: str = Field(default="run", description="the recipe's name, shown in logs and reports")
    model: ModelConfig = Field(default_factory=ModelConfig)
    menu: MenuConfig = Field(default_factory=MenuConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    slim: SlimConfig = Field(default_factory=SlimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _resolve_crop_scale(self) -> "Config":
        if self.data.crop_scale is None:  # resolved here, so that a run's config.yaml says what it used
            self.data.crop_scale = RECIPE_CROP_SCALE[self.view_recipe()]
            self.data._crop_scale_resolved = True
        return self

    def view_recipe(self) -> str:
        """The augmentation recipe of the run's views: ``data.augment``, or else the method's own."""
        from ..methods import method_class

        return self.data.augment or method_class(self.method.name).augment

    def revalidated(self, overrides: Sequence[str] | None = None) -> "Config":
        """A new Config from this one's values with ``overrides`` applied, checked again as a whole: fields
        assigned one by one are checked only within their section, and a crop range resolved from the
        augmentation recipe follows a changed method."""
        from .load import config_from_dict

        data = self.model_dump(mode="json")
        if self.data._crop_scale_resolved:
            data["data"]["crop_scale"] = None
        # a checkpoint's config of a method or loss weights not registered here stays readable (config_from_dict's
        # stored)
        from ..slim.weights import LOSS_WEIGHTS

        stored = self.method.registered() is None or self.slim.loss_weights not in LOSS_WEIGHTS
        return config_from_dict(data, repr(self.name), overrides, stored=stored)

    @model_validator(mode="after")
    def _check_across_sections(self) -> "Config":
        try:
            menu = self.subnet_menu()
        except SubnetError as e:
            raise ValueError(f"menu: {e}") from None
        full = SubnetSpec(1.0, self.model.full_depths)
        if full not in menu:
            raise ValueError(
                f"menu: must contain the full network {full.name}, because the target/teacher always runs at "
                f"full size: width 1.0 in menu.widths with the model's depths {list(full.depths)} in menu.depths "
                f"(or menu.depths unset), or {full.name} in menu.subnets; got menu {menu.names}")
        self._check_widths_differ(menu)
        if self.train.sync_bn and self.model.bn != "private":
            raise ValueError("train.sync_bn needs model.bn: private: shared BatchNorm is sliced per width by slimssl "
                             "itself and cannot be synchronised")
        if self.train.sync_bn and (self.model.bn_group_size or self.method.shuffle_bn):
            raise ValueError("train.sync_bn normalises over the total batch, which model.bn_group_size and "
                             "method.shuffle_bn are meant to split: use either sync_bn or grouped BatchNorm")
        if self.model.bn_group_size and self.train.batch_size % self.model.bn_group_size:
            raise ValueError(f"model.bn_group_size {self.model.bn_group_size} must divide train.batch_size "
                             f"{self.train.batch_size} ({group_size_hint(self.train.batch_size, self.method.shuffle_bn)})")
        if self.slim.random_space == "space" and self.model.bn == "private":
            raise ValueError(
                "slim.random_space: 'space' draws sub-networks outside the menu, which have no private "
                "BatchNorm; use model.bn: shared (and recalibrate BN before evaluation) or random_space: menu")
        return self

    def _check_widths_differ(self, menu: Menu) -> None:
        """Two widths that round to the same channels everywhere (a small base_width, a large channel_divisor)
        would train one network under two names."""
        m = self.model
        seen: dict[tuple, float] = {}
        for width in sorted({spec.width for spec in menu}, reverse=True):
            channels = tuple(backbone_channels(m, width))
            if channels in seen:
                raise ValueError(f"menu: widths {seen[channels]:g} and {width:g} give the same channels "
                                 f"{list(channels)} (stem, then each stage's inner and output channels) with model.base_width "
                                 f"{m.base_width} and model.channel_divisor {m.channel_divisor}, so they are one "
                                 "network; drop one, or raise base_width or lower channel_divisor")
            seen[channels] = width

    def subnet_menu(self) -> Menu:
        """The desired sub-networks: widths crossed with depths, plus any named entries."""
        full = self.model.full_depths
        depth_list = [tuple(d) for d in self.menu.depths] if self.menu.depths else [full]
        specs = [SubnetSpec(w, d) for w, d in itertools.product(self.menu.widths, depth_list)]
        specs += [SubnetSpec.parse(name, full) for name in self.menu.subnets]
        for spec in specs:
            spec.check_fits(full)
        return Menu(specs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython's display: the recipe as YAML, not one long line
        printer.text(f"Config {self.name!r}:\n{self.to_yaml().rstrip()}")


def group_size_hint(batch: int, shuffle_bn: bool) -> str:
    """What model.bn_group_size may be for ``batch`` samples (per process): the largest sizes that make
    several groups, and null (one group) unless shuffle-BN needs several."""
    sizes = [d for d in range(2, batch) if batch % d == 0][-3:]
    hint = f"e.g. {', '.join(map(str, sizes))}" if sizes else f"{batch} samples cannot form two groups of 2 or more"
    return hint + ("" if shuffle_bn else ", or null for one group")


def backbone_channels(model: ModelConfig, width: float) -> list[int]:
    """The channels of the backbone at ``width``: the stem's, then each stage's inner and output channels (the
    same for basic blocks), as the supernet builds them."""
    stem, mids, outs = subnet_channels(model.block, model.base_width, width, model.channel_divisor,
                                       len(model.full_depths))
    return [stem, *mids, *outs]
