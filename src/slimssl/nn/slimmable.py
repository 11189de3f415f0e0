"""What a slimmable model is, over its layers (layers.py): the scoped choice of its active sub-network, which
sub-networks it can run, whose BatchNorm statistics it holds, and their re-estimation (``recalibrate_bn``)."""

from __future__ import annotations

from contextlib import contextmanager
from numbers import Real
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import InputError
from .layers import SlimBatchNorm, SlimState
from .spec import SubnetError, SubnetLike, Subnets, SubnetSpec


def _shared_bn_batches(model: nn.Module) -> int:
    """How many batches the shared BatchNorm statistics have seen (its first layer's count): a recalibration
    resets the count, and every training forward adds one."""
    for layer in model.modules():
        if isinstance(layer, SlimBatchNorm) and layer.bns is None:
            return int(layer.bn.num_batches_tracked)
    return 0


class SlimmableMixin:
    """Scoped activation of a sub-network for a model that owns a :class:`SlimState`."""

    slim_state: SlimState
    # why only the menu's entries run, where that is so with shared BatchNorm too (an export rebuilt as a supernet
    # holds the weights of its one entry alone); None: any width and depth runs
    menu_only: str | None = None

    def resolve(self, subnet: SubnetLike | None) -> SubnetSpec:
        """Turn a spec, its text or a width (``0.5``: full depth) into a spec this model can run, or raise a
        clear error."""
        state = self.slim_state
        if subnet is None:  # the full network, or where only the menu runs, the largest of it
            return state.full if self.menu_only is None else state.menu.largest
        subnet = SubnetSpec.coerce(subnet, state.full.depths)
        subnet.check_fits(state.full.depths)
        if state.private_bn and subnet not in state.menu:  # its BatchNorm was never made
            raise SubnetError(f"sub-network {subnet.name} is not in the menu {state.menu.names}: with private "
                              "BatchNorm (model.bn: private) only the menu's entries have BatchNorm layers, made and "
                              "trained for each; pick one of them, or pretrain with model.bn: shared, where any width "
                              "and depth runs once its statistics are re-estimated")
        if self.menu_only is not None and subnet not in state.menu:
            raise SubnetError(f"sub-network {subnet.name}: {self.menu_only}")
        return subnet

    def resolve_many(self, subnets: Subnets) -> list[SubnetSpec]:
        """The menu (``subnets`` None or ``"all"``), or each of ``subnets`` (one alone too) resolved, in order and
        without repeats."""
        if subnets is None or (isinstance(subnets, str) and subnets == "all"):
            return list(self.slim_state.menu)
        names = [subnets] if isinstance(subnets, (str, Real, SubnetSpec, Mapping)) else list(subnets)
        if not names:
            raise SubnetError("no sub-network given: name at least one, or 'all' (the menu)")
        return list(dict.fromkeys(self.resolve(t) for t in names))

    def untrained_entries(self) -> list[str]:
        """The menu's entries whose private BatchNorm saw no training batch (read at the first BatchNorm, which
        every entry runs): never trained. None with shared BatchNorm, which keeps no such count per entry."""
        first = next((m for m in self.modules() if isinstance(m, SlimBatchNorm) and m.bns is not None), None)
        if first is None:
            return []
        return [name for name, bn in first.bns.items()
                if bn.num_batches_tracked is not None and int(bn.num_batches_tracked) == 0]

    def bn_statistics_estimated(self, subnet: SubnetLike | None) -> bool:
        """Whether the BatchNorm statistics are ``subnet``'s own: always with private BatchNorm; with shared
        BatchNorm, when :func:`recalibrate_bn` estimated them for it last and no training forward moved them, or
        when the menu has ``subnet`` alone and nothing was recalibrated (training ran no other width)."""
        state = self.slim_state
        if state.private_bn:
            return True
        spec = self.resolve(subnet)
        if state.bn_estimated is None:
            return list(state.menu) == [spec]
        return state.bn_estimated == (spec.name, _shared_bn_batches(self))

    def mark_bn_estimated(self, subnet: SubnetLike | None) -> None:
        """Record that the shared BatchNorm statistics are now ``subnet``'s own (what recalibrate_bn does, and
        what a checkpoint written by ``slimssl recalibrate`` holds)."""
        if not self.slim_state.private_bn:
            self.slim_state.bn_estimated = (self.resolve(subnet).name, _shared_bn_batches(self))

    @contextmanager
    def subnet(self, subnet: SubnetLike | None) -> Iterator[SubnetSpec]:
        """Run the model as ``subnet`` inside the block; the previous sub-network is restored on exit."""
        spec = self.resolve(subnet)
        previous = self.slim_state.active
        self.slim_state.active = spec
        try:
            yield spec
        finally:
            self.slim_state.active = previous


@torch.no_grad()
def recalibrate_bn(model: nn.Module, subnet: SubnetLike, batches: Iterable[torch.Tensor],
                   device: torch.device | str | None = None) -> None:
    """Re-estimate, in place, the BatchNorm running statistics of ``subnet`` from ``batches`` of input images.

    Needed in shared-BN mode before evaluating a sub-network, since the shared statistics belong to
    whichever widths ran last. Statistics are a plain average over the batches (momentum None), each batch's of
    all its images (not of the groups of ``model.bn_group_size``, which imitate training on several GPUs), so a
    supernet trained with groups or without is measured alike. Only what ``subnet`` runs changes: the channels
    beyond its width and the layers beyond its depth keep their statistics, which belong to other sub-networks.
    """
    if not isinstance(getattr(model, "_orig_mod", model), SlimmableMixin):  # torch.compile's wrapper forwards
        raise SubnetError(f"recalibrate_bn takes a slimmable supernet (slimssl.build_supernet, load_supernet), got "
                          f"{type(model).__name__}; a plain model's BatchNorm statistics are re-estimated by "
                          "torch.optim.swa_utils.update_bn(batches, model)")
    if isinstance(batches, torch.Tensor):  # iterating it would feed one image at a time, each refused as 3-d
        raise InputError(f"recalibrate_bn takes an iterable of batches of images, got one tensor of shape "
                         f"{list(batches.shape)}: pass [images] for one batch, or a DataLoader")
    with model.subnet(subnet) as spec:
        layers = [layer for layer in model.modules() if isinstance(layer, SlimBatchNorm)
                  and (layer.bns is None or spec.name in layer.bns)]  # private: blocks within its depth
        norms = [layer.norm_for(spec) for layer in layers]
        momenta = [bn.momentum for bn in norms]
        saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in norms]
        channels: dict[int, int] = {}  # id(norm) -> the channels the sub-network ran through it
        hooks = [layer.register_forward_pre_hook(
            lambda _, inputs, key=id(bn): channels.__setitem__(key, inputs[0].shape[1]))
            for layer, bn in zip(layers, norms)]
        was_training = model.training
        slim_state = getattr(model, "_orig_mod", model).slim_state
        group_size, slim_state.bn_group_size = slim_state.bn_group_size, None
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over all batches
            bn.train()
        count, done = 0, False
        try:
            for images in batches:
                if isinstance(images, (tuple, list)):
                    images = images[0]
                try:
                    model(images if device is None else images.to(device))
                except ValueError as e:  # torch's own names no setting
                    if "more than 1 value per channel" not in str(e):
                        raise
                    raise SubnetError(f"recalibrate_bn of {spec.name} got a batch of {len(images)} image(s), whose "
                                      "smallest feature map leaves BatchNorm one value per channel: give larger "
                                      "batches (eval.batch_size, --eval-batch-size)") from None
                count += 1
            if count == 0:
                raise SubnetError(f"recalibrate_bn of {spec.name} got no batches; expected at least one batch of "
                                  "input images")
            done = True
            model.mark_bn_estimated(spec)
        finally:
            slim_state.bn_group_size = group_size
            for hook in hooks:
                hook.remove()
            for bn, momentum, state in zip(norms, momenta, saved):
                bn.momentum = momentum
                used = channels.get(id(bn)) if done else None  # failed or empty: keep what was found
                if used is None:  # not run by this sub-network (or no recalibration): as it was
                    bn.load_state_dict(state)
                elif bn.running_mean is not None:  # the shared BatchNorm's channels of wider sub-networks
                    bn.running_mean[used:] = state["running_mean"][used:]
                    bn.running_var[used:] = state["running_var"][used:]
            model.train(was_training)
