"""Build a supernet from a config (a :class:`Config`, a path, or a shipped recipe name)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import Config, ConfigError, config_from_dict, load_config
from ..errors import UsageError
from .resnet import SlimResNet


def as_config(config: Config | dict | str | Path | None, overrides: Sequence[str] | None = None) -> Config:
    """A Config from itself, a dict of sections, or a YAML path or shipped name (None: the demo recipe),
    with ``overrides`` (``"section.key=value"`` strings) applied."""
    if isinstance(config, Config):
        return config.revalidated(overrides)  # a Config changed by assignment is checked as a whole here
    if isinstance(config, dict):
        return config_from_dict(config, "<dict>", overrides)
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, overrides)
    raise ConfigError(f"expected a Config, a dict of config sections, or a YAML path or shipped name; got "
                      f"{type(config).__name__}")


def build_supernet(config: Config | dict | str | Path | None = None, overrides: Sequence[str] | None = None
                   ) -> SlimResNet:
    """The slimmable backbone of ``config`` (default: the demo recipe) with ``overrides`` (as ``--set``
    takes them), randomly initialised."""
    cfg = as_config(config, overrides)
    m = cfg.model
    return SlimResNet(block=m.block, depths=m.full_depths, base_width=m.base_width, stem=m.stem,
                      menu=cfg.subnet_menu(), bn=m.bn, channel_divisor=m.channel_divisor,
                      zero_init_residual=m.zero_init_residual)


def check_config_is_the_supernets(supernet, cfg) -> None:
    """Refuse a config whose architecture or menu is not the supernet's (its resolution and data would not be)."""
    m = cfg.model
    wanted = {"block": m.block, "depths": tuple(m.full_depths), "base_width": m.base_width, "stem": m.stem,
              "channel_divisor": m.channel_divisor, "private BatchNorm": m.bn == "private",
              "menu": cfg.subnet_menu().names}
    held = {"block": supernet.block, "depths": tuple(supernet.depths), "base_width": supernet.base_width,
            "stem": supernet.stem, "channel_divisor": supernet.slim_state.divisor,
            "private BatchNorm": supernet.slim_state.private_bn, "menu": supernet.menu.names}
    differ = [f"{key}: supernet {held[key]!r}, config {wanted[key]!r}" for key in wanted if held[key] != wanted[key]]
    if differ:
        raise UsageError("config= is not this supernet's config:\n  " + "\n  ".join(differ))
