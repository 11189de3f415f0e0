"""Self-supervised methods; each a small module with pure loss functions in ``losses``.

``METHODS`` maps each ``method.name`` to its class. A method of your own joins it with
:func:`register_method`, or, for the command line, through a ``slimssl.methods`` entry point of an installed
package (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from importlib.metadata import entry_points
from typing import TypeVar

import torch

from ..errors import ExtensionError
from ..models.heads import Layer, check_layers
from .base import Method, MethodOutput
from .byol import BYOL
from .mocov2 import MoCoV2
from .mocov3 import MoCoV3

log = logging.getLogger("slimssl")

BUILT_IN_METHODS: tuple[type[Method], ...] = (BYOL, MoCoV2, MoCoV3)
METHODS: dict[str, type[Method]] = {m.name: m for m in BUILT_IN_METHODS}
ENTRY_POINT_GROUP = "slimssl.methods"
M = TypeVar("M", bound=type[Method])  # register_method as a decorator keeps the class's own type


def register_method(cls: M) -> M:
    """Make ``cls`` the method of ``method.name: <cls.name>``; returns ``cls``, so it works as a decorator.

    Registering a class again under its name replaces the earlier definition (a notebook cell run twice);
    a name taken by another class is an error.
    """
    from ..data.recipes import RECIPES

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ExtensionError(f"register_method takes a subclass of slimssl.methods.Method, got {cls!r}")
    where = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise ExtensionError(f"{where}.name must be a name such as 'simsiam' (letters, digits, _), got {cls.name!r}")
    if cls.loss is Method.loss:
        raise ExtensionError(f"{where} must implement loss(online, target)")
    if not (isinstance(cls.default_options, dict) and all(isinstance(k, str) and k.isidentifier()
                                                          for k in cls.default_options)):
        raise ExtensionError(f"{where}.default_options must be a dict of option names to default values, got "
                             f"{cls.default_options!r}")
    if cls.augment not in RECIPES:
        raise ExtensionError(f"{where}.augment must be one of the view recipes {', '.join(RECIPES)}, got "
                             f"{cls.augment!r}")
    for head in ("projector_layers", "predictor_layers"):  # as declared (static); other forms: when built
        if isinstance(inspect.getattr_static(cls, head), staticmethod):
            try:
                layers = getattr(cls, head)(64, 16)  # (hidden, out): sizes of our choosing
            except Exception:  # e.g. sizes it refuses: checked when built with the config's
                continue
            if layers is not None or head == "projector_layers":
                check_layers(layers, f"{where}.{head}")
    taken = METHODS.get(cls.name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ExtensionError(f"method name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                             f"give {where} another name")
    METHODS[cls.name] = cls
    return cls


def _load_entry_point(name: str) -> None:
    """Register the method that an installed package declares as ``name`` under the ``slimssl.methods``
    entry-point group, if one does. Only that package is imported: another plugin, broken or holding a name
    registered otherwise (a script's own class), is never touched."""
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        where = f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP})"
        try:
            cls = ep.load()
        except Exception as e:  # any error of the plugin's import, reported as the plugin's
            raise ExtensionError(f"{where} failed to load: {type(e).__name__}: {e}") from e
        if getattr(cls, "name", None) != ep.name:
            raise ExtensionError(f"{where} loads {cls!r}, whose name is {getattr(cls, 'name', None)!r}; the entry "
                                 "point's name must be the method's name")
        register_method(cls)
        return


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name is an error that lists the known ones."""
    if name not in METHODS:
        _load_entry_point(name)
    if name not in METHODS:
        unregistered = [c for c in _subclasses(Method) if getattr(c, "name", None) == name]
        if unregistered:  # imported (a script, --import) but never registered: the likeliest slip
            cls = unregistered[-1]
            raise ExtensionError(f"method {name!r} is declared by {cls.__module__}.{cls.__qualname__}, which is not "
                                 "registered: decorate the class with @slimssl.methods.register_method")
        installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} - set(METHODS))
        known = ", ".join([*METHODS, *installed])
        raise ExtensionError(f"unknown method {name!r}; known: {known}. A method of your own must be registered "
                             f"first: slimssl.methods.register_method in Python, `slimssl --import MODULE` for the "
                             f"command line, or a {ENTRY_POINT_GROUP!r} entry point of an installed package")
    return METHODS[name]


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def build_method(cfg) -> Method:
    """The method named by a :class:`~slimssl.config.MethodConfig`."""
    return method_class(cfg.name)(cfg)


def check_distillation(method: Method, teacher: str) -> None:
    """Warn where online distillation (``slim.teacher: online``) would use the base class's distill, made for
    the built-in contrastive methods' logits, on the outputs of a method of one's own that did not say it fits."""
    own = type(method).distill is Method.distill and not method.distill_on_logits
    if teacher == "online" and own:
        log.warning("slim.teacher is online and method %r does not override distill: the sub-networks are distilled "
                    "with the contrastive one (soft cross-entropy of cosine similarities over method.temperature), "
                    "which fits only if its distill_on are such logits: say so with distill_on_logits = True, or "
                    "override Method.distill (docs/extending.md)", method.name)


def check_unread_distillation(method: Method, slim) -> None:
    """Warn of ``slim.distill_*`` settings (``slim``: the config's SlimConfig) given another value than their
    default that the run never reads: each of them without online distillation (``slim.teacher: target``), and
    ``distill_temperature`` where the method's distillation takes none (BYOL's regression)."""
    if slim.teacher == "target":
        unread, why = ("distill_alpha", "distill_temperature", "distill_scale"), "slim.teacher is target (no " \
            "distillation term; online distils)"
    elif not _distill_reads_temperature(type(method)):
        unread, why = ("distill_temperature",), f"method {method.name!r} distils without a temperature"
    else:
        return
    for key in unread:
        value = getattr(slim, key)
        if value != type(slim).model_fields[key].get_default(call_default_factory=True):
            log.warning("slim.%s is %r, but %s: the setting changes nothing", key, value, why)


def _distill_reads_temperature(cls: type) -> bool:
    """What the class whose ``distill`` a method runs says of it: a subclass that overrides BYOL's distill reads
    the temperature unless it says otherwise (it does not inherit BYOL's False)."""
    owner = next(c for c in cls.__mro__ if "distill" in vars(c))
    return vars(owner).get("distill_reads_temperature", True)


def checked_output(method: Method, out) -> MethodOutput:
    """``out`` of ``method.loss``, refused with the method named where it breaks the contract (attributes only:
    nothing waits for the device)."""
    expected = "expected MethodOutput(loss, distill_on=None) whose loss is one number (a 0-d tensor, e.g. .mean())"
    if not isinstance(out, MethodOutput):
        raise ExtensionError(f"method {method.name!r}: loss() returned {type(out).__name__}; {expected}")
    loss = out.loss
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ExtensionError(f"method {method.name!r}: loss() returned a loss that is {what}; {expected}")
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise ExtensionError(f"method {method.name!r}: loss() returned a loss that does not depend on the online "
                             "network's outputs (detached, or computed under torch.no_grad()), so nothing would train")
    return out if loss.dim() == 0 else dataclasses.replace(out, loss=loss.reshape(()))  # [1] as well: one number


def checked_momentum(method: Method, progress: float) -> float:
    """``method.momentum(progress)``, refused outside [0, 1]: the target update would extrapolate."""
    m = method.momentum(progress)
    try:
        m = float(m)
    except (TypeError, ValueError):
        raise ExtensionError(f"method {method.name!r}: momentum({progress:g}) returned {m!r}; expected a number in "
                             "[0, 1]") from None
    if not 0.0 <= m <= 1.0:
        raise ExtensionError(f"method {method.name!r}: momentum({progress:g}) returned {m:g}; the target's update "
                             "target <- m * target + (1 - m) * online needs m in [0, 1]")
    return m


ALWAYS_READ = frozenset({"name", "options", "shuffle_bn"})  # method settings the training loop reads itself


def check_unread_settings(method: Method) -> None:
    """Warn of ``method`` settings given another value than their default that ``method`` never reads
    (``method.temperature`` for BYOL): the run would look configured as it is not."""
    # a subclass may read more than the class it extends; None, the default said again: any setting may be read
    if "settings_read" not in vars(type(method)) or method.settings_read is None:
        return
    cfg = method.cfg
    for key, field in type(cfg).model_fields.items():
        value = getattr(cfg, key)
        if key not in method.settings_read | ALWAYS_READ and value != field.get_default(call_default_factory=True):
            log.warning("method.%s is %r, but method %r does not read it: the setting changes nothing", key, value,
                        method.name)


def distill_outputs(method: Method, out: MethodOutput) -> list:
    """The full network's outputs that online distillation teaches with, which the loss must have returned."""
    if out.distill_on is None:
        raise ExtensionError(f"method {method.name!r} returned no distill_on from its loss, and slim.teacher: online "
                             "distils the sub-networks from the full network's: return the outputs to distil on "
                             "(MethodOutput(loss, distill_on=[...])), or set slim.teacher: target")
    return out.distill_on


__all__ = ["BUILT_IN_METHODS", "BYOL", "METHODS", "Layer", "Method", "MethodOutput", "MoCoV2", "MoCoV3",
           "build_method", "check_distillation", "check_unread_distillation", "check_unread_settings",
           "checked_momentum", "checked_output", "distill_outputs", "method_class", "register_method"]
