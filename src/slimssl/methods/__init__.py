"""Self-supervised methods; each a small module with pure loss functions in ``losses``.

``METHODS`` maps each ``method.name`` to its class. A method of your own joins it with
:func:`register_method`, or, for the command line, through a ``slimssl.methods`` entry point of an installed
package (docs/extending.md).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ..errors import SlimsslError
from ..models.heads import Layer
from .base import Method, MethodOutput
from .byol import BYOL
from .mocov2 import MoCoV2
from .mocov3 import MoCoV3

METHODS: dict[str, type[Method]] = {m.name: m for m in (BYOL, MoCoV2, MoCoV3)}
ENTRY_POINT_GROUP = "slimssl.methods"
_plugins_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    """Make ``cls`` the method of ``method.name: <cls.name>``; returns ``cls``, so it works as a decorator.

    Registering a class again under its name replaces the earlier definition (a notebook cell run twice);
    a name taken by another class is an error.
    """
    from ..data.augment import RECIPES

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise SlimsslError(f"register_method takes a subclass of slimssl.methods.Method, got {cls!r}")
    where = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise SlimsslError(f"{where}.name must be a name such as 'simsiam' (letters, digits, _), got {cls.name!r}")
    if cls.loss is Method.loss:
        raise SlimsslError(f"{where} must implement loss(online, target)")
    if not (isinstance(cls.default_options, dict) and all(isinstance(k, str) and k.isidentifier()
                                                          for k in cls.default_options)):
        raise SlimsslError(f"{where}.default_options must be a dict of option names to default values, got "
                           f"{cls.default_options!r}")
    if cls.augment not in RECIPES:
        raise SlimsslError(f"{where}.augment must be one of the view recipes {', '.join(RECIPES)}, got {cls.augment!r}")
    taken = METHODS.get(cls.name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise SlimsslError(f"method name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                           f"give {where} another name")
    METHODS[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    """Register the methods that installed packages declare under the ``slimssl.methods`` entry-point group.
    Loaded once, and only when a name is not known yet, so that no plugin is imported otherwise."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP})"
        try:
            cls = ep.load()
        except Exception as e:  # any error of the plugin's import, reported as the plugin's
            raise SlimsslError(f"{where} failed to load: {type(e).__name__}: {e}") from e
        if getattr(cls, "name", None) != ep.name:
            raise SlimsslError(f"{where} loads {cls!r}, whose name is {getattr(cls, 'name', None)!r}; the entry "
                               "point's name must be the method's name")
        register_method(cls)
    _plugins_loaded = True  # only once all loaded: a broken plugin is reported again, not silently skipped


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name is an error that lists the known ones."""
    if name not in METHODS:
        _load_entry_points()
    if name not in METHODS:
        raise SlimsslError(f"unknown method {name!r}; known: {', '.join(METHODS)}. A method of your own must be "
                           f"registered first: slimssl.methods.register_method in Python, or a "
                           f"{ENTRY_POINT_GROUP!r} entry point of an installed package for the command line")
    return METHODS[name]


def build_method(cfg) -> Method:
    """The method named by a :class:`~slimssl.config.MethodConfig`."""
    return method_class(cfg.name)(cfg)


__all__ = ["BYOL", "METHODS", "Layer", "Method", "MethodOutput", "MoCoV2", "MoCoV3", "build_method", "method_class",
           "register_method"]
