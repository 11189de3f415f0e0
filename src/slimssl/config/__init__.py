"""Typed configuration: YAML recipes validated by a schema, with ``--set key=value`` overrides.

- ``schema.py``: the sections of a recipe and the checks across them (:class:`Config`);
- ``load.py``: reading a recipe file or a shipped name, overrides, errors that name the file and the key;
- ``runs.py``: a config against another run's (``config_differences``), against the number of processes,
  and a sub-network's config as a network of its own (``standalone_config``).

The recipes themselves are YAML files in ``slimssl/configs/``.
"""

from .load import (PACKAGED, apply_override, check_assignment, check_overrides, config_from_dict, find_config,
                   load_config, packaged_configs)
from .runs import MACHINE_DEPENDENT, check_processes, config_differences, standalone_config
from .schema import (IMAGENET_MEAN, IMAGENET_STD, RECIPE_CROP_SCALE, Config, ConfigError, DataConfig, EvalConfig,
                     MenuConfig, MethodConfig, ModelConfig, OptimConfig, SlimConfig, TrainConfig, ViewChanges,
                     backbone_channels)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MACHINE_DEPENDENT", "PACKAGED", "RECIPE_CROP_SCALE", "Config",
           "ConfigError", "DataConfig", "EvalConfig", "MenuConfig", "MethodConfig", "ModelConfig", "OptimConfig",
           "SlimConfig", "TrainConfig", "ViewChanges", "apply_override", "backbone_channels", "check_assignment", "check_overrides",
           "check_processes", "config_differences", "config_from_dict", "find_config", "load_config",
           "packaged_configs", "standalone_config"]
