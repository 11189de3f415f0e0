"""The SSL model: slimmable online network (backbone, projector, predictor) and its full-size EMA target."""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
from torch import nn

from ..devices import copy_by_dtype
from ..errors import ExtensionError
from ..methods.base import Method
from ..nn.layers import bind_state
from ..nn.slimmable import SlimmableMixin
from .heads import SlimMLP
from .resnet import SlimResNet


def _declared(method: Method, head: str, hidden: int, out: int):
    """The layers ``method`` declares for ``head``; a declaration that cannot be called so (a head written as a
    plain function without @staticmethod, say) is an error that names the method and the head."""
    where = f"{type(method).__module__}.{type(method).__qualname__}.{head}"
    declared = getattr(method, head)
    try:
        inspect.signature(declared).bind(hidden, out)
    except ValueError:  # a callable without a signature to read: called as it is
        pass
    except TypeError as e:  # only the call's form: an error inside the function is the function's own
        raise ExtensionError(f"{where} cannot be called as ({hidden}, {out}): {e}; a head is declared as "
                             f"@staticmethod def {head}(hidden, out) returning a list of Layer "
                             "(docs/extending.md)") from e
    return declared(hidden, out)


class SSLModel(SlimmableMixin, nn.Module):
    """``online(x)`` runs the active sub-network; ``target(x)`` always runs the full EMA network.

    The backbone is ``self.backbone``: checkpoints keep it under ``backbone.``, which is what export and
    evaluation read. ``bn_group_size``: training BatchNorm (online and target) normalises groups of this many
    consecutive samples separately, as per-GPU BatchNorm would (None: the whole batch).
    """

    def __init__(self, backbone: SlimResNet, method: Method, bn: str = "private", divisor: int = 1,
                 bn_group_size: int | None = None):
        super().__init__()
        cfg = method.cfg
        self.backbone = backbone
        self.method = method
        self.slim_state = backbone.slim_state
        menu = backbone.menu
        # a head declared by a plain method (not static) is checked only now: the error names the method
        where = f"{type(method).__module__}.{type(method).__qualname__}"
        self.projector = SlimMLP(backbone.num_features,
                                 _declared(method, "projector_layers", cfg.proj_hidden, cfg.proj_dim),
                                 menu, bn, divisor, where=f"{where}.projector_layers")
        # the predictor follows the projector, whatever its last layer's width; its output is compared with the
        # target's, which is the projector's
        predictor = _declared(method, "predictor_layers", cfg.pred_hidden, self.projector.out_dim)
        self.predictor = None if predictor is None else SlimMLP(self.projector.out_dim, predictor, menu, bn, divisor,
                                                                where=f"{where}.predictor_layers")
        if self.predictor is not None and self.predictor.out_dim != self.projector.out_dim:
            raise ExtensionError(f"{where}.predictor_layers ends in {self.predictor.out_dim} features, but the loss "
                                 f"compares the predictor's outputs with the target's, the projector's "
                                 f"{self.projector.out_dim}: end the predictor in Layer(out)")
        bind_state(self, self.slim_state)
        self.slim_state.bn_group_size = bn_group_size  # before the copy, so the target's state has it too
        # A method whose loss reads no target output (views_used()[1] empty: SimCLR, Barlow Twins) gets no
        # target: no copy to keep in memory, update and save. Otherwise one deepcopy of both modules, so the
        # copies share one (always full-size) state of their own.
        self.target: nn.ModuleDict | None = None
        self._target_pairs: tuple[list, ...] | None = None  # the tensors update_target reads and writes, found once
        if method.views_used()[1]:
            self.target = copy.deepcopy(nn.ModuleDict({"backbone": self.backbone, "projector": self.projector}))
            self.target.requires_grad_(False)

    @contextlib.contextmanager
    def views_in_one_batch(self, views: int):
        """Forwards inside take ``views`` views of one image batch stacked into one batch. Training BatchNorm
        (online and target) normalises each view on its own, so the outputs are those of the views run one by
        one, up to rounding, from fewer and larger kernels (launches bound a GPU step on small images)."""
        states = [self.slim_state] + ([self.target["backbone"].slim_state] if self.target is not None else [])
        before = [state.views for state in states]
        for state in states:
            state.views = views
        try:
            yield
        finally:
            for state, count in zip(states, before):
                state.views = count

    def named_online_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimiser trains: everything but the EMA target."""
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("target.")]

    def online_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_online_parameters()]

    def online(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.backbone(x))
        return z if self.predictor is None else self.predictor(z)

    @torch.no_grad()
    def target_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target["projector"](self.target["backbone"](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.online(x)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, for weights; buffers are copied (MoCo and BYOL
        leave the target's own: training never reads them, as the target normalises with its batch's statistics,
        but copied, they make the target a network that evaluates like the online one)."""
        if self._target_pairs is None:  # walking the modules each step cost a GPU step about 1.5 ms of host time
            online = nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})
            # the modules' own tensor objects (no_grad here): a p.data = ... reaches them, and a deepcopy of the
            # model maps them to the copy's
            self._target_pairs = (list(online.parameters()), list(self.target.parameters()),
                                  list(online.buffers()), list(self.target.buffers()))
        src, dst, src_buffers, dst_buffers = self._target_pairs
        torch._foreach_lerp_(dst, src, 1.0 - momentum)
        copy_by_dtype(dst_buffers, src_buffers)

    def _apply(self, fn, recurse=True):
        self._target_pairs = None  # .to(), .cuda(), channels_last: buffers are replaced by new tensors
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._target_pairs = None  # assign=True puts the given tensors in place of the modules' own
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
