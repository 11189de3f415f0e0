"""Self-supervised methods; each a small module with pure loss functions in ``losses``."""

from .base import Method, MethodOutput
from .byol import BYOL
from .mocov2 import MoCoV2
from .mocov3 import MoCoV3

METHODS: dict[str, type[Method]] = {m.name: m for m in (BYOL, MoCoV2, MoCoV3)}


def build_method(cfg) -> Method:
    """The method named by a :class:`~slimssl.config.MethodConfig`."""
    return METHODS[cfg.name](cfg)


__all__ = ["BYOL", "METHODS", "Method", "MethodOutput", "MoCoV2", "MoCoV3", "build_method"]
