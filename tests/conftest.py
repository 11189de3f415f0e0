"""Shared fixtures for the core tests: tiny supernets and BatchNorm perturbation."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "src" / "slimssl" / "configs"  # the shipped recipes (configs/ links to them)

# The test machine has two cores shared with other jobs; intra-op threads then spin against each other
# and make tiny forward passes 100x slower. One thread keeps the suite fast and deterministic.
torch.set_num_threads(1)

# The suite decodes hundreds of tiny datasets, each under its own temporary path: they go to a cache of this
# session (removed at exit), not the user's. The processes the tests start inherit it.
_DECODED_CACHE = tempfile.TemporaryDirectory(prefix="slimssl-tests-cache-")
os.environ["SLIMSSL_CACHE"] = _DECODED_CACHE.name
os.environ.pop("SLIMSSL_CACHE_GB", None)


def pytest_unconfigure(config):
    _DECODED_CACHE.cleanup()  # said, not left to the interpreter's exit (which warns under -W error)


def _perturb_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise every BatchNorm's running statistics and affine parameters (so that exports and
    sub-network comparisons are not trivially equal to an identity-normalised network)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


@pytest.fixture
def perturb_bn():
    return _perturb_bn


@pytest.fixture
def config_dir() -> Path:
    return CONFIG_DIR


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def ascii_locale() -> dict[str, str]:
    """The environment of a process whose locale encodes text as ASCII: it stands in for Windows, where files
    opened without an encoding, and a redirected stdout, use the locale's code page (cp1252), not UTF-8."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    return env


# The slowest file first: run in parallel (pytest -n auto --dist loadfile), the demo (minutes) then overlaps
# everything else instead of starting last on a busy worker.
SLOW_FIRST = ("test_demo.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in SLOW_FIRST)  # stable: the rest keep their order


@pytest.fixture
def register():
    """``slimssl.register_dataset`` whose names are forgotten after the test (the registry is per process)."""
    import slimssl

    names = []

    def register_(name, *args, **kwargs):
        names.append(name)
        slimssl.register_dataset(name, *args, **kwargs)

    yield register_
    for name in dict.fromkeys(names):
        slimssl.unregister_dataset(name)
