"""Build a supernet from a config (a :class:`Config`, a path, or a shipped recipe name)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import Config, ConfigError, config_from_dict, load_config
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
