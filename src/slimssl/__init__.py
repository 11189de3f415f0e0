"""slimssl: slimmable self-supervised pretraining.

Pretrain one network once (BYOL or MoCo), then cut it into a family of pretrained sub-networks of
different widths and depths.
"""

from .checkpoint import load_checkpoint, load_supernet
from .config import Config, load_config
from .export import export_subnet, load_exported
from .models.build import build_supernet
from .models.plain import PlainResNet
from .models.resnet import SlimResNet
from .nn.layers import recalibrate_bn
from .nn.spec import Menu, SubnetSpec

__version__ = "0.1.0"
__all__ = [
    "Config", "Menu", "PlainResNet", "SlimResNet", "SubnetSpec", "build_supernet", "export_subnet",
    "load_checkpoint", "load_config", "load_exported", "load_supernet", "recalibrate_bn",
]
