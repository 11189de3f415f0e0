"""Build a supernet from a config (a :class:`Config`, a path, or a shipped recipe name)."""

from __future__ import annotations

from pathlib import Path

from ..config import Config, load_config
from .resnet import SlimResNet


def as_config(config: Config | str | Path | None) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def build_supernet(config: Config | str | Path | None = None) -> SlimResNet:
    """The slimmable backbone of ``config`` (default: the demo recipe), randomly initialised."""
    cfg = as_config(config)
    m = cfg.model
    return SlimResNet(block=m.block, depths=m.full_depths, base_width=m.base_width, stem=m.stem,
                      menu=cfg.subnet_menu(), bn=m.bn, channel_divisor=m.channel_divisor,
                      zero_init_residual=m.zero_init_residual)
