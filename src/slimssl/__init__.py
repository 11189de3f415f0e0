"""slimssl: slimmable self-supervised pretraining.

Pretrain one network once (BYOL or MoCo), then cut it into a family of pretrained sub-networks of
different widths and depths.

The names below load on first use (PEP 562), so ``import slimssl`` and ``slimssl --help`` do not wait for
torch to import.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Config": ".config", "load_config": ".config",
    "load_checkpoint": ".checkpoint", "load_supernet": ".checkpoint",
    "export_subnet": ".export.files", "load_exported": ".export.files", "save_exported": ".export.files",
    "verify_export": ".export.files", "export_run": ".export.run", "import_backbone": ".export.imported",
    "pick_subnet": ".budget",
    "build_supernet": ".models.build",
    "PlainResNet": ".models.plain",
    "SlimResNet": ".models.resnet",
    "recalibrate_bn": ".nn.slimmable", "recalibrate_checkpoint": ".eval.recalibrate",
    "Menu": ".nn.spec", "SubnetSpec": ".nn.spec",
    "SlimsslError": ".errors", "UsageError": ".errors",
    # what a caller may catch: every bad-input error is a SlimsslError; these say which input
    "ConfigError": ".config", "SubnetError": ".nn.spec", "InputError": ".errors",
    "CheckpointError": ".checkpoint", "DataError": ".errors", "DeviceError": ".devices",
    "ExportError": ".errors", "ExtensionError": ".errors", "NonFiniteLossError": ".train.loop",
    "Interrupted": ".train.signals",
    "pretrain": ".train.pretrain", "PretrainRun": ".train.pretrain",
    "profile": ".report.profile", "plot_runs": ".report.plot",
    "knn": ".eval.evaluate", "linear_probe": ".eval.evaluate", "finetune": ".eval.evaluate", "embed": ".eval.embed",
    "register_dataset": ".data.registry", "unregister_dataset": ".data.registry",
}
__all__ = [  # the names of _EXPORTS, written out for type checkers
    "CheckpointError", "Config", "ConfigError", "DataError", "DeviceError", "ExportError", "ExtensionError",
    "InputError", "Interrupted", "Menu", "NonFiniteLossError", "PlainResNet", "PretrainRun", "SlimResNet",
    "SlimsslError", "SubnetError", "SubnetSpec", "UsageError", "build_supernet", "embed", "export_run",
    "export_subnet", "finetune", "import_backbone", "knn", "linear_probe", "load_checkpoint", "load_config",
    "load_exported", "load_supernet", "pick_subnet", "plot_runs", "pretrain", "profile", "recalibrate_bn",
    "recalibrate_checkpoint", "register_dataset", "save_exported", "unregister_dataset", "verify_export",
]


if not TYPE_CHECKING:  # a type checker that saw it would take any name, a misspelt one too, as Any
    def __getattr__(name: str) -> Any:
        if name not in _EXPORTS:
            if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
                return importlib.import_module(f".{name}", __name__)  # slimssl.methods.register_method, as documented
            raise AttributeError(f"module 'slimssl' has no attribute {name!r}")
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from . import methods as methods, slim as slim  # submodules the docs use: slimssl.methods.register_method
    from .budget import pick_subnet
    from .checkpoint import CheckpointError, load_checkpoint, load_supernet
    from .config import Config, ConfigError, load_config
    from .data.registry import register_dataset, unregister_dataset
    from .devices import DeviceError
    from .errors import DataError, ExportError, ExtensionError, InputError, SlimsslError, UsageError
    from .eval.embed import embed
    from .eval.evaluate import finetune, knn, linear_probe
    from .eval.recalibrate import recalibrate_checkpoint
    from .export.files import export_subnet, load_exported, save_exported, verify_export
    from .export.imported import import_backbone
    from .export.run import export_run
    from .models.build import build_supernet
    from .models.plain import PlainResNet
    from .models.resnet import SlimResNet
    from .nn.slimmable import recalibrate_bn
    from .nn.spec import Menu, SubnetError, SubnetSpec
    from .report.plot import plot_runs
    from .report.profile import profile
    from .train.loop import NonFiniteLossError
    from .train.signals import Interrupted
    from .train.pretrain import PretrainRun, pretrain
