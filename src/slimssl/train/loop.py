"""Slimmable self-supervised pretraining: the loop.

One iteration: two augmented views (drawn from a generator seeded by (seed, step)), the full-size target
once, then every sub-network the policy draws, each with its own backward so activations are freed
(gradients accumulate), then one optimizer step and the EMA update. With ``train.micro_batches``, the batch is
run in parts: the target on each, then each sub-network on each part in turn, every part's backward adding to
the same gradients. Losses stay on the device and are
read every ``log_every`` steps, so the hot loop has no host synchronisation of its own (``train.nonfinite:
skip`` checks each step's losses, and ``train.grad_diagnostics_every`` reads its steps' norms: both wait for
the GPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..checkpoint import save_checkpoint
from ..wording import named, shell_quote
from ..config import Config, ConfigError, check_processes
from ..data.datasets import load_dataset, warn_of_shrunk_photos
from ..data.files import reuse_scans
from ..data.registry import recorded_source, registered_name
from ..data.views import build_view_source, two_view_augment
from ..layout import LAST, checkpoint_path
from ..devices import copy_by_dtype, pick_device, pick_dtype, synchronize, to_device_async
from ..errors import DataError, ExtensionError, SlimsslError, UnreadableImageError
from ..eval.results import ResultsError, read_results, results_header, results_lock, write_results
from ..methods import (BUILT_IN_METHODS, build_method, check_distillation, check_unread_distillation,
                       check_unread_settings, checked_momentum, checked_output, distill_outputs)
from ..models.build import build_supernet
from ..models.ssl import SSLModel
from ..report.profile import profile_supernet
from ..seeds import derived_generator
from ..slim.diagnostics import GradientImbalance
from ..slim.policy import SlimPolicy, check_every_entry_trains
from . import distributed as dist
from .compile import (CudaGraphWatch, compile_forward, graph_limit, refuse_cuda_graphs_with_micro_batches,
                      step_begins, uses_cuda_graphs)
from .metrics import RENUMBERED, LogWindow, MetricsLogger, bar_labels, output_spread, progress_bar
from .monitor import KnnMonitor
from .optim import build_optimizer, describe_lr, effective_lr, lr_at, scaled_lr
from .prepare import write_run_config
from .resume import TrainState, checkpoint_payload, restore
from .signals import Interrupted, SignalGuard, mark_stop_saved

# what a stop signal lets end once the run is trained (SignalGuard.finishing)
FINAL_EVALUATION = "its final kNN evaluation and results.json are finished"
log = logging.getLogger("slimssl")
DEVICE_SETTING = "train.device (--device)"  # how a device error names the setting
# seconds the end of pretraining waits for an evaluation's merge into results.json (which takes milliseconds)
FINAL_RESULTS_LOCK_SECONDS = 10


class NonFiniteLossError(SlimsslError):
    """A NaN or Inf loss; names the step and the sub-network (the command line prints it as one line: a
    diverging run is a setting to change, usually the learning rate)."""


def nonfinite_losses(means: dict) -> list[str]:
    """The sub-networks whose mean loss (a number or a 0-d tensor) is not finite."""
    return [name for name, v in means.items() if not math.isfinite(float(v))]


@dataclass
class StepResult:
    """What one training step leaves: the detached loss of every sub-network that ran (on the device, not
    read yet), its learning rate, and whether it was skipped (``train.nonfinite: skip``)."""

    losses: dict[str, torch.Tensor]
    lr: float
    skipped: bool = False
    spread: dict[str, torch.Tensor] = field(default_factory=dict)  # output_spread, at a step that ends a record


class Views:
    """A step's augmented views, one by one and stacked into one batch (stacked once, when a forward asks; the
    views are then parts of the stack, so that the images are held once)."""

    def __init__(self, each: tuple[torch.Tensor, ...]):
        self.each = tuple(each)
        self._stacked: torch.Tensor | None = None

    def stacked(self) -> torch.Tensor:
        if self._stacked is None:
            self._stacked = torch.cat(self.each)
            self.each = parts(self._stacked, len(self.each))
        return self._stacked


def micro_views(views: Sequence[torch.Tensor], n: int) -> list[Views]:
    """A step's views in ``n`` equal parts (``train.micro_batches``), each the same images of every view."""
    if n == 1:
        return [Views(views)]
    return [Views(each) for each in zip(*(parts(v, n) for v in views))]


def joined(outputs: list[list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
    """Outputs per micro-batch, each a list over the views, as one batch per view (None for a view left out)."""
    if len(outputs) == 1:
        return outputs[0]
    return [None if each[0] is None else torch.cat(each) for each in zip(*outputs)]


def check_joinable(method, prepared, parts: int) -> None:
    """Refuse, naming the method, prepared target outputs that cannot be joined over micro-batches (``joined``):
    each entry must be a batch, a tensor whose first dimension runs over samples, or None."""
    for view, out in enumerate(prepared):
        if out is not None and not (isinstance(out, torch.Tensor) and out.dim() >= 1):
            what = f"a {out.dim()}-d tensor" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise ExtensionError(f"method {method.name!r}: prepare_target returned {what} at position {view}; with "
                                 f"train.micro_batches {parts}, after_step gets each of its outputs joined over the "
                                 "micro-batches along the first dimension, so each must be a batch of the part's "
                                 "samples (or None): keep per-step values on the method instead, or set "
                                 "train.micro_batches=1")


def mean_of(values: list[torch.Tensor]) -> torch.Tensor:
    """The mean of 0-d tensors, the one itself for one (no kernel)."""
    return values[0] if len(values) == 1 else torch.stack(values).mean()


def parts(batch: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``batch`` split into ``n`` equal parts along its first dimension, as slices: each may be changed in place,
    as a tensor of its own could (torch refuses that on the outputs of ``chunk``)."""
    size = batch.shape[0] // n
    return [batch[i * size:(i + 1) * size] for i in range(n)]


class Trainer:
    """One pretraining run in one process: data, model, optimiser and the loop over steps."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False,
                 callbacks: Sequence[Callable[[dict], Any]] = ()):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self._open = contextlib.ExitStack()  # what close() ends besides the loader and the writer
        self.callbacks = tuple(callbacks)  # each given every record of metrics.jsonl (rank 0): pretrain(callbacks=)
        self.device = pick_device(cfg.train.device, setting=DEVICE_SETTING)
        self.dtype = pick_dtype(cfg.train.precision, self.device)
        self.world = dist.world_size()
        check_processes(cfg, self.world, repr(cfg.name))  # also the BatchNorm groups of this batch
        refuse_cuda_graphs_with_micro_batches(cfg.train.compile, cfg.train.micro_batches, self.device)
        torch.manual_seed(cfg.train.seed)
        # the order below is part of a run's numbers: each stage may draw from the seeded generator
        self._setup_data()
        self._setup_model()
        self._check_knn_memory()
        self._setup_optimisation()
        self.state = TrainState()
        self.window = LogWindow()  # the steps since the last metrics record
        self.last_saved_step: int | None = None  # the step last.pt holds, so it is not written twice
        self._last_save_time = time.perf_counter()  # of last.pt, or of the start of training: train.save_every_minutes
        self.signal_received: int | None = None  # a stop signal that arrived as fit() ended the run
        self._resumed_lr: dict | None = None  # the effective lr last.pt was trained with, when resuming
        self._resumed_metrics_bytes: int | None = None  # metrics.jsonl's length when last.pt was saved
        # the step of the checkpoint resumed from, as its run counted them (another batch or size of the training
        # set renumbers them)
        saved_step = self._load(checkpoint_path(self.run_dir)) if resume else None
        # the step a resumed run continues from, until its first fit (none after a renumbering: its records
        # in metrics.jsonl count other steps)
        self._resumed_at = self.state.step if resume and self.state.step == saved_step else None
        dist.broadcast_module(self.model)  # every rank starts from rank 0's weights and buffers
        log.info("%s", self.lr_summary())
        if cfg.train.micro_batches > 1:
            per_process = cfg.train.batch_size // self.world
            log.info("train.micro_batches %d: each process runs its %d images of a step in parts of %d, and takes one "
                     "optimiser step on their gradients", cfg.train.micro_batches, per_process,
                     per_process // cfg.train.micro_batches)
        if dist.is_main():  # the run's first file (a failed resume has changed nothing yet): it marks the folder a
            self.run_dir.mkdir(parents=True, exist_ok=True)  # run's, for a start killed from here on
            write_run_config(self.run_dir, cfg, self.effective_lr())
        self.metrics = self._open_metrics(saved_step)

    def close(self) -> None:
        """Stop what runs beside the steps: streaming loader workers and TensorBoard's writer thread (a run that
        finishes closes its writer itself; one stopped early, by ``max_steps`` or a signal, would keep it, one per
        resume in a process that resumes often), and give back dynamo's graph limit (``train.compile``)."""
        self.view_source.close()
        self.metrics.close()
        self._open.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_metrics(self, saved_step: int | None) -> MetricsLogger:
        """metrics.jsonl and TensorBoard (rank 0), with what a resumed run records first: a change of batch or of
        the training set's size, which renumbers the steps, and a changed learning rate."""
        metrics = MetricsLogger(self.run_dir, enabled=dist.is_main(), resumed_at=saved_step,
                                saved_bytes=self._resumed_metrics_bytes, callbacks=self.callbacks)
        try:
            if saved_step is not None and saved_step != self.state.step:
                metrics.write({"step": self.state.step, "epoch": self.state.step / self.steps_per_epoch,
                               RENUMBERED: {"from": saved_step, "batch_size": self.cfg.train.batch_size,
                                            "steps_per_epoch": self.steps_per_epoch}})
            if self._resumed_lr != self.effective_lr():  # a resume with the same lr would repeat the record
                metrics.write({"step": self.state.step, "effective_lr": self.effective_lr()})
        except BaseException:  # (a full disk, a callback's error) no Trainer to close it: TensorBoard's writer
            metrics.close()  # lets go of tb/ now, which a failed start removes
            raise
        return metrics

    # ---- setup --------------------------------------------------------------------------------------

    def _setup_data(self) -> None:
        """The training images (none with the streaming loader), the kNN images, and the two-view source."""
        cfg = self.cfg
        stream = cfg.data.loader == "stream"  # loader workers decode each step's files: nothing held in memory
        with reuse_scans():  # the train, kNN and stream listings: one scan of the data
            self.train_data = None if stream else load_dataset(
                cfg.data.source, "train", resolution=cfg.data.resolution, skip_unreadable=cfg.data.skip_unreadable,
                fake_size=cfg.data.fake_size, seed=cfg.train.seed)
            if not stream and dist.is_main():
                warn_of_shrunk_photos(cfg.data.source, cfg.data.resolution)
            if not stream and len(self.train_data) < cfg.train.batch_size:
                raise DataError(f"dataset {self.train_data.name!r} has {len(self.train_data)} images, fewer than "
                                f"train.batch_size {cfg.train.batch_size}")
            self.knn_monitor = KnnMonitor.of_run(cfg, self.train_data, self.device)
            self.augment = two_view_augment(cfg)
            self.view_source = build_view_source(cfg, self.augment, self.train_data, rank=dist.rank(),
                                                 world=self.world, device=self.device)
        self.steps_per_epoch = self.view_source.steps_per_epoch
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        # what was found: a folder of ImageNet's size takes seconds to list, and a wrong folder shows here first
        log.info("training set %s: %s images, %d steps per epoch of %d", cfg.data.source,
                 f"{self.view_source.sharding.num_images:,}", self.steps_per_epoch, cfg.train.batch_size)
        if self.world > 1:
            self._check_same_data()

    def _check_same_data(self) -> None:
        """Every process must train on the same images: on sets of other sizes they would wait for each other at
        different steps. Registered images are compared by their fingerprint (a path may differ between nodes)."""
        source = registered_name(self.cfg.data.source) and recorded_source(self.cfg.data.source)
        seen = dist.gather_objects((self.view_source.sharding.num_images, source))
        if len(set(seen)) > 1:
            listed = "; ".join(f"rank {rank}: {count} images" + (f" of {src}" if src else "")
                               for rank, (count, src) in enumerate(seen))
            raise DataError(f"the processes see different training sets ({listed}); every process must read the "
                            "same data")

    def _check_knn_memory(self) -> None:
        """Skip, at the start, a kNN monitor whose features could not be held: found at its first kNN, after the
        last epoch for a recipe, it would end the run in an error. Every process decides alike (any one's lack)."""
        if self.knn_monitor is None:
            return
        short = [why for why in dist.gather_objects(self.knn_monitor.memory_shortfall(self.model.backbone)) if why]
        if short:
            log.warning("%s: kNN evaluation during pretraining is skipped (slimssl knn RUN --subnet NAME ... measures "
                        "some sub-networks at a time later)", short[0])
            self.knn_monitor = None

    def _setup_model(self) -> None:
        """The supernet with its method's heads and target on the device, converted and compiled as configured."""
        cfg = self.cfg
        self.model = SSLModel(build_supernet(cfg), build_method(cfg.method), cfg.model.bn,
                              cfg.model.channel_divisor, cfg.model.bn_group_size).to(self.device)
        if dist.is_main():
            check_distillation(self.model.method, cfg.slim.teacher)
            check_unread_distillation(self.model.method, cfg.slim)
            check_unread_settings(self.model.method)
        if self.model.target is not None:  # a schedule outside [0, 1] fails before the first update
            for progress in (0.0, 1.0):
                checked_momentum(self.model.method, progress)
        if cfg.train.sync_bn:
            self._convert_sync_bn()
        if self.device.type == "cuda" and cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._compile_forwards()
        # what a forward pass changes besides activations: restored when train.nonfinite=skip skips a step,
        # from a copy made before each step into buffers allocated once
        self._bn_buffers = [b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                            for b in m.buffers()]
        self._bn_backup = ([torch.empty_like(b) for b in self._bn_buffers] if cfg.train.nonfinite == "skip"
                           else None)

    def _setup_optimisation(self) -> None:
        """Which sub-networks run each step, the learning rates, the optimiser, the loss scaler and the gradient
        all-reduce."""
        cfg = self.cfg
        self.policy = SlimPolicy(cfg.slim, self.model.backbone.menu, self.total_steps, cfg.train.seed)
        check_every_entry_trains(cfg)
        if cfg.slim.slow_start and self.policy.join_step == 0 and dist.is_main():
            log.warning("slim.slow_start %g of %d steps is less than a step: the sub-networks train from the "
                        "first step%s", cfg.slim.slow_start, self.total_steps,
                        ", and slim.slow_start_lr is not used" if cfg.slim.slow_start_lr else "")
        if self.policy.join_step >= self.total_steps > 0 and len(self.model.backbone.menu) > 1:
            # they would be evaluated and exported as pretrained, as initialised
            raise ConfigError(f"slim.slow_start {cfg.slim.slow_start} of {self.total_steps} steps leaves no step "
                              "for the sub-networks but the full one: lower it (0.5: the second half of the run)")
        self.warmup_steps = int(cfg.optim.warmup_epochs * self.steps_per_epoch)
        if self.warmup_steps >= self.total_steps > 0 and dist.is_main():  # a recipe's 10 epochs in a short run
            log.warning("optim.warmup_epochs %g is as long as the run (train.epochs %d): the lr only rises, to "
                        "%.0f%% of its peak, and never decays; lower optim.warmup_epochs for a short run",
                        cfg.optim.warmup_epochs, cfg.train.epochs, 100 * self.total_steps / self.warmup_steps)
        self.peak_lr = scaled_lr(cfg.optim.lr, cfg.optim, cfg.train.batch_size)
        self.late_peak_lr = (scaled_lr(cfg.slim.slow_start_lr, cfg.optim, cfg.train.batch_size)
                             if cfg.slim.slow_start_lr else self.peak_lr)
        self.optimizer = build_optimizer(cfg.optim, self.model.named_online_parameters(), self.peak_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # multi-process: one gradient all-reduce per step, no DDP wrapper (why: train/distributed.py)
        self.grad_sync = dist.GradientSync(self.model.online_parameters())

    def _compile_forwards(self) -> None:
        """train.compile: the online forward specialised per sub-network, the target's once."""
        mode = self.cfg.train.compile
        # random sub-networks from the whole space (not only the menu) each get a graph the first time
        graphs = 64 if self.cfg.slim.random_space == "space" else len(self.model.backbone.menu)
        self.online_forward = compile_forward(self.model.online, mode)
        self.target_forward = compile_forward(self.model.target_forward, mode)
        if mode != "off":
            self._open.enter_context(graph_limit(graphs))  # given back by close()
            log.info("compiling the forward passes with torch.compile (mode %s): the first step of every "
                     "sub-network is slow", mode)
        # a CUDA-graph output is overwritten by the graph's next replay: keep copies of what outlives it
        self._keep = (lambda t: t.clone()) if uses_cuda_graphs(mode) else (lambda t: t)
        self.cuda_graphs = CudaGraphWatch(mode)  # checked at every record: a capture skipped is said at once

    def _convert_sync_bn(self) -> None:
        """train.sync_bn: every private BatchNorm (each sub-network's, heads and target included) becomes a
        SyncBatchNorm, so a sub-network's statistics are over the total batch of the processes."""
        if self.world > 1 and self.device.type != "cuda":
            raise ConfigError("train.sync_bn needs CUDA tensors (torch's SyncBatchNorm); this run is on "
                             f"{self.device.type} with {self.world} processes: set train.sync_bn=false")
        self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

    def effective_lr(self) -> dict:
        """The peak learning rate(s) after scaling by the total batch, with how they were obtained."""
        return effective_lr(self.cfg, self.world, joins_late=self.policy.join_step > 0)

    def lr_summary(self) -> str:
        return "; ".join(describe_lr(self.effective_lr()))

    # ---- checkpoints --------------------------------------------------------------------------------

    def save(self, name: str = LAST, any_rank: bool = False) -> Path | None:
        """Write a checkpoint from rank 0, every rank calling (``any_rank``: from this process alone, which then
        saves its own BatchNorm statistics and losses; every rank holds the same weights)."""
        window = self.window
        if self.world > 1 and not any_rank:  # first: every process then checks the same numbers, all stop or none
            self._average_bn_statistics()
            window = self.window.averaged_over_processes()
        self._check_finite(window)
        if name == LAST:
            self.last_saved_step, self._last_save_time = self.state.step, time.perf_counter()
        if not (dist.is_main() or any_rank):
            return None
        return save_checkpoint(checkpoint_path(self.run_dir, name), checkpoint_payload(self, window))

    def _save_unless_saved(self, any_rank: bool = False) -> None:
        """``save`` the last checkpoint unless it holds this step already (the end of an epoch may have saved it)."""
        if self.last_saved_step != self.state.step:
            self.save(any_rank=any_rank)

    def _average_bn_statistics(self) -> None:
        """Every process's BatchNorm running statistics, which each takes from its own samples, replaced by their
        mean over the processes: the checkpoint and the kNN (every process's share) then see all the samples (with
        model.bn_group_size, exactly what one process sees), and a resume on another number of processes
        continues them. The update of a running statistic is linear, so averaging now or only at the end gives
        the same statistics, up to float rounding (a run stopped and resumed averaged at one more step)."""
        floating = [b for b in self._bn_buffers if b.is_floating_point()]
        if floating:
            flat = dist.all_reduce_mean(torch.cat([b.reshape(-1) for b in floating]))
            torch._foreach_copy_(floating, list(flat.split([b.numel() for b in floating])))

    def _check_finite(self, window: LogWindow) -> None:
        """Never save a non-finite network, or a NaN loss to be logged after a resume, over a good checkpoint:
        a NaN loss since the last metrics record (which checks the losses) may have reached the weights, or
        (fp16: the loss scaler skipped the step) only the losses, perhaps of one process only. A step skipped
        by train.nonfinite=skip leaves the weights and BatchNorm statistics as they were, and its losses out
        of the window."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        bad = nonfinite_losses(window.means())
        if finite and not (bad and self.cfg.train.nonfinite == "error"):
            return
        cause = f" after a non-finite loss of sub-network {bad[0]}" if bad else ""
        what = "weights" if not finite else "losses to log"
        raise self._nonfinite_error(f"the {what} at step {self.state.step} are not finite{cause}")

    def _nonfinite_error(self, what: str) -> NonFiniteLossError:
        last = checkpoint_path(self.run_dir)
        kept = f"the last good checkpoint is kept: {last}" if last.is_file() else "no checkpoint had been written yet"
        method = self.model.method
        own = "" if type(method) in BUILT_IN_METHODS else f" (or check method {method.name!r}'s loss: a log of 0, say)"
        skip = ("; train.nonfinite=skip (set) skips only the steps whose loss is not finite, and these weights went "
                "non-finite through finite losses" if self.cfg.train.nonfinite == "skip" else
                ", or set train.nonfinite=skip to skip such steps and count them")
        return NonFiniteLossError(f"{what}; {kept}. Lower optim.lr{own}{skip}")

    def _load(self, path: Path) -> int:
        """Continue from the checkpoint at ``path``; returns its step, as the saved run counted them."""
        resumed = restore(path, self.cfg, self.model, self.optimizer, self.scaler,
                          num_images=self.view_source.sharding.num_images, device=self.device)
        self.state, self.window, self._resumed_lr = resumed.state, resumed.window, resumed.effective_lr
        self._resumed_metrics_bytes = resumed.metrics_bytes
        self._keep_joined()
        if self.state.step:  # the lr of the last step trained, by this run's schedule: a resume that trains no step
            self.set_lr(self.state.step - 1)  # (stopped at the last one) saves the optimiser state of a straight run
        log.info("resumed from %s at step %d", path, self.state.step)
        return resumed.saved_step

    def _keep_joined(self) -> None:
        """Sub-networks that joined before the checkpoint keep training: a resume with more epochs moves the slow
        start's join step (a fraction of the steps) later, which would send them out again."""
        joined = self.state.joined_at
        if joined is None or self.policy.join_step <= min(joined, self.state.step):
            return
        if dist.is_main():
            log.info("the sub-networks joined at step %d: they keep training (this schedule's slow start would let "
                     "them in at step %d)", joined, self.policy.join_step)
        self.policy.join_step = min(joined, self.state.step)

    # ---- evaluation ---------------------------------------------------------------------------------

    def knn(self) -> dict[str, float]:
        """Every sub-network's kNN top-1 on the run's data, as `slimssl knn` measures it; {} without a monitor.
        Collective: every process calls it, and gets the same values."""
        if not self.knn_monitor:
            return {}
        # an unreadable file of a streamed split: the error says how to resume (every kNN comes after a save, or
        # before the first step, so nothing more is written)
        try:
            return self.knn_monitor(self.model.backbone)
        except DataError as e:
            raise self._saved_before(e) from None

    # ---- the step -----------------------------------------------------------------------------------

    def views(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's two augmented views at ``step``, on the training device."""
        return self.view_source(step)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def set_lr(self, step: int) -> float:
        joined_late = self.cfg.slim.slow_start_lr and self.policy.joined(step) and self.policy.join_step > 0
        peak = self.late_peak_lr if joined_late else self.peak_lr
        lr = lr_at(step, self.total_steps, self.warmup_steps, peak, self.cfg.optim.min_lr_ratio,
                   self.cfg.optim.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def key_forward(self, view: torch.Tensor, step: int, index: int, part: int = 0) -> torch.Tensor:
        """The full-size target's outputs for one view (of micro-batch ``part``); with ``method.shuffle_bn``,
        computed on the global batch (the processes' micro-batch ``part``) in an order drawn from (seed, step, view,
        and the part with ``train.micro_batches``), so its BatchNorm groups differ from the online's."""
        if not self.cfg.method.shuffle_bn:
            return self.target_forward(view)
        # drawn on the CPU: a GPU's random permutation may depend on its model, and every rank must agree
        parts_count = self.cfg.train.micro_batches
        gen = derived_generator(self.cfg.train.seed, "shuffle_bn", step, index, *((part,) if parts_count > 1 else ()))
        size = self.cfg.train.batch_size // parts_count  # of the processes' micro-batches together
        order = to_device_async(torch.randperm(size, generator=gen), self.device)
        return dist.shuffled_forward(self.target_forward, view, order)

    def target_outputs(self, views: Views, step: int, part: int, used: tuple[int, ...]) -> list[torch.Tensor | None]:
        """The full-size target's outputs for the views in ``used`` of one micro-batch, as the losses take them."""
        with self.autocast():
            if self.cfg.method.shuffle_bn:  # each view's keys in an order of their own
                target = [self._keep(self.key_forward(v, step, i, part)) if i in used else None
                          for i, v in enumerate(views.each)]
            else:
                target = self._forward_views(self.target_forward, views, used)
        prepared = self.model.method.prepare_target(target)
        if self.cfg.train.micro_batches > 1:  # after_step gets them joined: found now, before any backward
            check_joinable(self.model.method, prepared, self.cfg.train.micro_batches)
        return prepared

    def train_step(self, step: int) -> StepResult:
        """One iteration: forward, backward and update of every sub-network the policy plans for ``step``."""
        # evaluations give the model back in the mode they found it in (eval_mode), so this walk of its hundreds
        # of modules, about a millisecond of host time that a launch-bound GPU step waits for, is rarely needed
        if not (self.model.training and self.model.backbone.training):
            self.model.train()
        skip_mode = self.cfg.train.nonfinite == "skip"
        if skip_mode:  # a NaN forward writes NaN into the BatchNorm statistics before the loss shows it
            copy_by_dtype(self._bn_backup, self._bn_buffers)
        lr = self.set_lr(step)
        micro = micro_views(self.views(step), self.cfg.train.micro_batches)
        step_begins(self.cfg.train.compile)
        method = self.model.method
        online_views, target_views = method.views_used()  # an asymmetric loss leaves one view out per side
        targets = [self.target_outputs(views, step, part, target_views) for part, views in enumerate(micro)]
        if self.state.joined_at is None and self.policy.joined(step):
            self.state.joined_at = self.policy.join_step
        losses, spread = self._backward_subnets(step, micro, online_views, targets)
        bad = (~torch.isfinite(torch.stack(list(losses.values())))).any().float() if skip_mode else None
        self.grad_sync(bad)  # the step's one all-reduce (multi-process); the flag rides along
        # reading the flag is the one host sync of this mode, by request
        if skip_mode and self.grad_sync.any_flag():
            self._skip_step(step)
            return StepResult(losses, lr, skipped=True, spread=spread)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.model.target is not None:
            self.model.update_target(checked_momentum(method, step / max(1, self.total_steps)))
        method.after_step(joined(targets))
        return StepResult(losses, lr, spread=spread)

    def _backward_subnets(self, step: int, micro: list[Views], online_views,
                          targets) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Forward and backward of each sub-network the policy plans for ``step``, in its order (a teacher
        before its students), on every micro-batch in turn, the gradients accumulating; their losses (the mean
        over the micro-batches), still on the device, and at a step that ends a metrics record, their outputs'
        spread (``output_spread``, the mean over the micro-batches)."""
        method, slim = self.model.method, self.cfg.slim
        teacher_out: list = [None] * len(micro)  # per micro-batch
        losses, spread = {}, {}
        measure = self.record_due(step + 1)
        diagnose = self.grad_diagnostics(step)
        # each micro-batch's share of the gradient: their sum is the gradient of the mean loss over the batch
        weight_of_part = 1 / len(micro)
        for task in self.policy.plan(step):
            part_losses, part_spreads = [], []
            for part, views in enumerate(micro):
                with self.model.subnet(task.spec), self.autocast():
                    online = self._forward_views(self.online_forward, views, online_views)
                    out = checked_output(method, method.loss(online, targets[part]))
                    loss = out.loss
                    if task.distill:
                        kd = method.distill(out.distill_on, teacher_out[part], slim.distill_temperature)
                        loss = (1 - slim.distill_alpha) * loss + slim.distill_alpha * slim.distill_scale * kd
                    if task.teacher:
                        teacher_out[part] = [t.detach() for t in distill_outputs(method, out)]
                weight = task.weight * weight_of_part
                weighted = loss if weight == 1 else loss * weight  # (x 1 is two kernels that change nothing)
                self.scaler.scale(weighted).backward()  # outside autocast, as PyTorch recommends
                part_losses.append(loss.detach().float())
                measured = output_spread(online) if measure else None
                if measured is not None:
                    part_spreads.append(measured)
            losses[task.spec.name] = mean_of(part_losses)
            if part_spreads:
                spread[task.spec.name] = mean_of(part_spreads)
            if diagnose is not None:  # what the sub-network's backward passes on every micro-batch added
                diagnose.after_backward(task.spec.name)
        if diagnose is not None and dist.is_main():
            self.metrics.write({"step": step + 1, "grad_norm": diagnose.record})
        return losses, spread

    def _forward_views(self, forward, views: Views, used: tuple[int, ...]) -> list[torch.Tensor | None]:
        """``forward``'s outputs for the views in ``used``, None for the others. All of them run as one batch
        when all are used (``SSLModel.views_in_one_batch``: BatchNorm still normalises each on its own)."""
        n = len(views.each)
        if n > 1 and set(used) >= set(range(n)):
            with self.model.views_in_one_batch(n):
                return parts(self._keep(forward(views.stacked())), n)
        return [self._keep(forward(v)) if i in used else None for i, v in enumerate(views.each)]

    def _skip_step(self, step: int) -> None:
        """``train.nonfinite: skip``: drop the step's gradients and restore the BatchNorm statistics its forward
        passes moved, and count it."""
        self.optimizer.zero_grad(set_to_none=True)
        copy_by_dtype(self._bn_buffers, self._bn_backup)
        self.state.skipped_steps += 1
        if dist.is_main():
            log.warning("step %d: non-finite loss, step skipped (%d so far)", step, self.state.skipped_steps)

    def grad_diagnostics(self, step: int):
        """SlimCLR's gradient-imbalance probe on this step, when ``train.grad_diagnostics_every`` asks."""
        every = self.cfg.train.grad_diagnostics_every
        if not every or step % every:
            return None

        probe = GradientImbalance(self.model.backbone, self.model.backbone.menu.smallest,
                                  self.cfg.model.channel_divisor)
        # fp16: the gradients carry the loss scale (reading it syncs with the host, on this step only)
        probe.start(self.scaler.get_scale() if self.scaler.is_enabled() else 1.0)
        return probe

    # ---- the loop -----------------------------------------------------------------------------------

    def fit(self, max_steps: int | None = None) -> dict:
        finished, results = self._finished_already()
        if finished:
            log.info("this run finished at step %d already: nothing to train, and its results.json (with the "
                     "evaluations merged into it) is kept", self.state.step)
            return results
        end = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        if self.state.step >= end and end < self.total_steps:  # nothing saved either: the run stays as it was
            # below the run's step, a slip (max_steps counts from the run's start, not the call's): said at warning
            # level, which Python shows without logging set up; at it, the call that reached it again
            flag = named("--max-steps", "max_steps")
            log.log(logging.WARNING if max_steps < self.state.step else logging.INFO,
                    "this run is at step %d already: %s %d trains nothing (%s counts from the run's start)",
                    self.state.step, flag, max_steps, flag)
            return {}
        # inside the guard: a stop signal during the first kNN stops the run after its first step, with a checkpoint
        with SignalGuard() as guard:
            self._train_until(end, guard)
            results = {}
            if self.state.step >= self.total_steps:
                # the final evaluation, inside the guard too: a stop signal during it lets it end (the run is
                # trained, and its results are written whole; the last step set guard.finishing), and the caller
                # hears of it
                results = self.finish()
        self.signal_received = guard.received  # one that came while the run ended: for a caller to act on
        return results

    def _train_until(self, end: int, guard: SignalGuard) -> None:
        """Train to step ``end``, with the evaluations due before and between; saved at the end. Closing the
        source stops loader workers, closing the bar ends its line before any error is printed."""
        with contextlib.closing(self.view_source):
            # a stop signal lets these end, and a step after them (a checkpoint holds a step)
            guard.in_flight = ("the kNN at random initialisation and the first step" if self.state.step == 0 else
                               "the kNN due before the next step, and that step")
            self._evaluations_before_training()
            guard.in_flight = "the first step" if self.state.step == 0 else "the current step"
            self._save_missing_epoch_checkpoint()
            # the bar starts after them: its rate and time left are the steps' (the kNN at random initialisation
            # would make the first step look minutes long), and the log lines above stay on lines of their own
            with progress_bar(self.state.step, end, dist.is_main()) as progress:
                self._train_steps(end, guard, progress)

    def _train_steps(self, end: int, guard: SignalGuard, progress) -> None:
        """The steps up to ``end`` and what comes due between them, then the save of the last."""
        timed, tick = 0, time.perf_counter()  # the steps this process ran since the last record, for img/s
        self._last_save_time = time.perf_counter()  # the minutes between saves count training (not the first kNN)
        while self.state.step < end:
            step = self.state.step
            try:
                result = self.train_step(step)
            except DataError as e:  # an unreadable file met by streaming, before this step changed anything
                raise self._saved_before(e) from None
            self.window.add(result.losses, result.lr, trained=not result.skipped)
            timed += 1
            self.state.step += 1
            progress.update(1)
            guard.in_flight = "the current step"
            epoch_done = self.state.step % self.steps_per_epoch == 0
            scheduled = self.record_due(self.state.step)
            stopping, save_due = self._agreed(guard.received is not None, self._save_due(), scheduled)
            if self.state.step >= self.total_steps:  # trained: a signal from here on lets the final evaluation end
                guard.finishing = FINAL_EVALUATION
            if scheduled:  # the GPU's queued work belongs to these steps (the record syncs anyway)
                synchronize(self.device)
                self._log(timed, time.perf_counter() - tick, progress, result.spread)
                timed, tick = 0, time.perf_counter()
            if epoch_done:
                if self._knn_due(self.state.step):  # minutes on a large split: a signal lets it end, and a step
                    guard.in_flight = "this epoch's kNN and the next step"
                self._end_of_epoch()
                # its checkpoint and kNN are not training: img/s leaves them out, and so do the minutes to a save
                tick = self._last_save_time = time.perf_counter()
            if stopping:
                raise self._stopped(guard)
            if save_due and not epoch_done:  # train.save_every_minutes
                self.save()
                log.debug("saved %s at step %d (train.save_every_minutes)", checkpoint_path(self.run_dir),
                          self.state.step)
                tick = time.perf_counter()
        self._save_unless_saved()  # inside the guard: a signal during it is a flag, not an exception mid-write
        # a signal during the end of the last step (its epoch's save or kNN) stops here, as one in the loop
        # does, rather than being forgotten by the next call to fit
        if self.state.step < self.total_steps and self._agreed(guard.received is not None, False, True)[0]:
            raise self._stopped(guard)

    def _stopped(self, guard: SignalGuard) -> Interrupted:
        """Save what is not saved yet (the steps since the last record, logged after the resume) and say so."""
        self._save_unless_saved()
        mark_stop_saved()
        cause = (signal.Signals(guard.received).name if guard.received is not None
                 else "a stop signal to another process")
        return Interrupted(f"stopped by {cause} at step {self.state.step}; "
                           f"checkpoint saved in {checkpoint_path(self.run_dir)}")

    def _evaluations_before_training(self) -> None:
        """kNN at random initialisation (a new run), or, for a run resumed at the end of an epoch, that epoch's
        kNN when the run that saved the checkpoint was stopped before it could log it."""
        resumed_at, self._resumed_at = self._resumed_at, None
        # every process evaluates (its share) and gets the same result: any of them may save a checkpoint
        if self.state.step == 0 and not self.state.knn_random_init and self.cfg.eval.knn_random_init:
            self.state.knn_random_init = self.knn()
            if self.state.knn_random_init:
                log.info("kNN at random initialisation: %s", _fmt(self.state.knn_random_init))
        elif (resumed_at and resumed_at % self.steps_per_epoch == 0 and self._knn_due(resumed_at)
              and not dist.broadcast_object(dist.is_main() and self.metrics.has_record(resumed_at, "knn_top1"))):
            self._epoch_knn()  # (metrics.jsonl is rank 0's)

    def _saved_before(self, error: DataError) -> DataError:
        """``error`` (bad data met in the middle of training), after the steps trained so far are saved: by
        the process that met it, as rank 0 may be waiting for it in the step's all-reduce."""
        if self.state.step == 0:
            return error  # nothing trained: the failed start is cleaned up as any other
        self._save_unless_saved(any_rank=True)
        resume = f"slimssl pretrain --resume {shell_quote(self.run_dir)}"
        when = ("with --set data.skip_unreadable=true, or once the file is replaced"
                if isinstance(error, UnreadableImageError) else "once the data is fixed")
        return type(error)(f"{error}\nthe {self.state.step} steps trained so far are saved in "
                           f"{checkpoint_path(self.run_dir)}: continue with {resume} ({when})")

    def _agreed(self, received: bool, save_due: bool, scheduled: bool) -> tuple[bool, bool]:
        """Whether every process stops after this step (``received``: this one got a stop signal), and whether
        they all save it (``save_due``: this one's clock says train.save_every_minutes have passed). One process
        acts at once, on a save at a scheduled log step. Several act together at the next scheduled log step,
        where they meet anyway: a signal reaches them at different moments, their clocks differ, and a process
        that stopped alone would leave the others waiting in the next step's all-reduce, with no checkpoint
        written."""
        if self.world == 1:
            return received, save_due and scheduled
        if not scheduled:
            return False, False
        flags = torch.tensor([float(received), float(save_due)], device=self.device)
        stop, save = (dist.all_reduce_mean(flags) > 0).tolist()  # the record of this step syncs anyway
        return stop, save

    def record_due(self, steps_done: int) -> bool:
        """Whether the step that makes ``steps_done`` ends a metrics record: every ``train.log_every`` steps and
        at the end of every epoch."""
        return steps_done % self.cfg.train.log_every == 0 or steps_done % self.steps_per_epoch == 0

    def _save_due(self) -> bool:
        minutes = self.cfg.train.save_every_minutes
        return bool(minutes) and time.perf_counter() - self._last_save_time >= 60 * minutes

    def _log(self, timed_steps: int, seconds: float, progress, spread: dict[str, torch.Tensor]) -> None:
        """One metrics record for the window of steps since the last one (every process at the same step):
        each sub-network's mean loss over the steps that ran it and the ``spread`` of its outputs at the last one,
        averaged over the processes, the last lr, throughput, and the non-finite check."""
        window, self.window = self.window, LogWindow()
        local = window.means()  # the same names on every rank: the draws are
        means, spreads = {}, {}
        if local or spread:
            stacked = dist.all_reduce_mean(torch.stack([*local.values(), *spread.values()])).tolist()
            means = dict(zip(local, stacked))  # the one sync per record
            spreads = dict(zip(spread, stacked[len(local):]))
        bad = nonfinite_losses(means)
        if bad and self.cfg.train.nonfinite == "error":
            last = self.state.step - 1  # 0-based, as the step of a skipped-step warning
            raise self._nonfinite_error(f"non-finite loss of sub-network {bad[0]} within steps "
                                        f"{last - window.steps + 1}..{last}")
        record = {"step": self.state.step, "epoch": self.state.step / self.steps_per_epoch, "lr": window.lr,
                  "img_per_s": timed_steps * self.cfg.train.batch_size / max(seconds, 1e-9), "loss": means}
        if spreads:
            record["spread"] = spreads
        if self.model.target is not None:  # its EMA coefficient at the record's last step: a method's own schedule
            record["momentum"] = float(self.model.method.momentum((self.state.step - 1) / max(1, self.total_steps)))
        if self.state.skipped_steps:
            record["skipped_steps"] = self.state.skipped_steps
        self.metrics.write(record)
        if dist.is_main():
            self.cuda_graphs.check()
        progress.set_postfix_str(" ".join(f"{k}={v:.3f}" for k, v in zip(bar_labels(list(means)), means.values()))
                                 + f" img/s={record['img_per_s']:.0f}", refresh=False)  # drawn at the bar's interval

    def _end_of_epoch(self) -> None:
        self.save()
        name = self._epoch_checkpoint_due()
        if name:  # after last.pt: a run stopped in between resumes from last.pt, which writes this copy then
            self.save(name)  # (the other way round, a first epoch stopped there left no last.pt to resume from)
        if self._knn_due(self.state.step):
            self._epoch_knn()

    def _epoch_checkpoint_due(self) -> str | None:
        """The name of the ``epoch_XXXX.pt`` that the end of every ``train.checkpoint_every``-th epoch writes, but
        the last one's (last.pt is that), when the run is at such an end; else None."""
        epoch, rest = divmod(self.state.step, self.steps_per_epoch)
        every = self.cfg.train.checkpoint_every
        if rest or not every or epoch % every or not 0 < epoch < self.cfg.train.epochs:
            return None
        return f"epoch_{epoch:04d}.pt"

    def _save_missing_epoch_checkpoint(self) -> None:
        """A resumed run at an epoch's end writes its epoch_XXXX.pt if it is missing: the last epoch of a run
        that this resume gives more epochs, which was written as last.pt only. Rank 0 decides for all: the
        others may not see its files, and the save is collective."""
        name = self._epoch_checkpoint_due() if self.state.step else None
        missing = bool(name) and dist.is_main() and not checkpoint_path(self.run_dir, name).is_file()
        if name and self.world > 1:
            missing = dist.broadcast_object(missing)
        if missing:
            self.save(name)

    def _knn_due(self, step: int) -> bool:
        """Whether the end of epoch at ``step`` evaluates kNN (train.knn_every; the last epoch's is the final one)."""
        epoch, every = step // self.steps_per_epoch, self.cfg.train.knn_every
        return bool(every) and epoch % every == 0 and epoch < self.cfg.train.epochs

    def _epoch_knn(self) -> None:
        result = self.knn()
        if result:
            epoch = self.state.step // self.steps_per_epoch
            self.metrics.write({"step": self.state.step, "epoch": epoch, "knn_top1": result})
            log.info("epoch %d kNN: %s", epoch, _fmt(result))

    def _finished_already(self) -> tuple[bool, dict]:
        """Whether this resumed run had already finished (its results.json has the same number of steps), and
        those results (rank 0; {} elsewhere). Rank 0 reads the file and tells the others, so that every process
        returns together instead of the others waiting in the first kNN, a collective, for a rank 0 that has left."""
        results = self._finished_results() if dist.is_main() else {}
        finished = bool(results)
        if self.world > 1:
            finished = dist.broadcast_object(finished)
        return finished, results

    def _finished_results(self) -> dict:
        if self.state.step < self.total_steps:
            return {}
        try:
            results = read_results(self.run_dir)
        except ResultsError:
            return {}
        return results if results.get("steps") == self.state.step else {}

    def finish(self) -> dict:
        """Final evaluation (every process) and results.json (main process)."""
        knn = self.knn()
        if not dist.is_main():
            return {}
        backbone = self.model.backbone
        rows = profile_supernet(backbone, self.cfg.data.resolution, latency=False)
        for row in rows:
            row["knn_top1"] = knn.get(row["subnet"])
            row["knn_top1_random_init"] = self.state.knn_random_init.get(row["subnet"])
        # a run stopped after this record, before results.json, has it already
        if knn and not self.metrics.has_record(self.state.step, "knn_top1"):
            # the epoch trained: past train.epochs when a resume lowered them below where the run stood
            self.metrics.write({"step": self.state.step, "epoch": self.state.step / self.steps_per_epoch,
                                "knn_top1": knn})
        results = {**results_header(self.run_dir, self.cfg), "steps": self.state.step,
                   "effective_lr": self.effective_lr(), "skipped_steps": self.state.skipped_steps, "subnets": rows}
        if knn:
            results["protocols"] = {"knn": self.knn_monitor.settings(backbone)}
        # under the evaluations' lock: a `slimssl knn` merging at this moment would otherwise write its older copy
        # back over these results; a lock left by a killed merge only delays them
        with results_lock(self.run_dir, FINAL_RESULTS_LOCK_SECONDS, if_stale="warn"):
            _warn_of_dropped_evaluations(self.run_dir)
            write_results(self.run_dir, results)
        self.metrics.close()
        return results


def _warn_of_dropped_evaluations(run_dir: Path) -> None:
    """A run trained on past its earlier end (more epochs) replaces its results.json: the evaluations of the
    earlier network (linear probe, fine-tuning) no longer describe it, so they go, with a word."""
    try:
        earlier = read_results(run_dir, missing_ok=True).get("protocols", {})
    except ResultsError:
        return
    dropped = sorted(p for p in earlier if p != "knn")
    if dropped:
        log.warning("results.json held evaluations of the network as it was at an earlier end (%s); they do not "
                    "describe the network trained on, so they are dropped: run them again", ", ".join(dropped))


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.2f}" for k, v in values.items())
