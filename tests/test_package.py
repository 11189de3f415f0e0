"""The package surface: what ``import slimssl`` offers, and a command line that answers --help and
argument errors without importing torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import slimssl

# Runs in a fresh interpreter: this test process has imported torch long ago.
NO_TORCH = """
import sys
from slimssl.cli import main
try:
    code = main(sys.argv[1:])  # a usage error found by a command returns 2; argparse's exits
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "numpy", "pydantic") if m in sys.modules)
print("heavy:", ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["pretrain", "--help"], ["linear", "--help"],
                                  ["reproduce", "--help"], ["bench", "--help"], ["knn", "--no-such-flag"],
                                  ["export", "RUN", "--out", "exports"], ["profile"],  # said before any import
                                  ["config", "--list"], ["import-backbone", "--help"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    wide = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # argparse wraps the help at $COLUMNS
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, timeout=60,
                          env=wide)
    assert done.returncode == (0 if {"--help", "--version", "--list"} & set(argv) else 2), done.stderr
    assert "heavy: \n" in done.stdout, done.stdout.splitlines()[-1]
    if "--help" in argv:
        assert "usage: slimssl" in done.stdout
    if argv == ["pretrain", "--help"]:  # a command's help opens with the line `slimssl --help` gives it
        assert "\nslimmable self-supervised pretraining (default: the embedded demo)\n" in done.stdout
    if "--version" in argv:
        assert f"slimssl {slimssl.__version__}" in done.stdout
    if "--list" in argv:  # every shipped recipe, each with its description
        assert re.search(r"\ndemo +The embedded demo", done.stdout)
        assert re.search(r"^cifar10_r18_dspnet_byol +DSPNet recipe", done.stdout)


def typing_imports() -> dict[str, str]:
    """The names slimssl/__init__.py imports under TYPE_CHECKING (what type checkers and IDEs see), each with the
    module it names."""
    import ast

    tree = ast.parse(Path(slimssl.__file__).read_text(encoding="utf-8"))
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {alias.name: "." * node.level + node.module for node in block.body if isinstance(node, ast.ImportFrom)
            and node.module for alias in node.names}


def test_every_public_name_resolves_and_unknown_names_raise():
    for name in slimssl.__all__:
        assert getattr(slimssl, name).__name__ == name
    assert set(slimssl.__all__) <= set(dir(slimssl))
    assert sorted(slimssl.__all__) == sorted(slimssl._EXPORTS)  # the literal list that type checkers read is whole
    assert typing_imports() == {name: slimssl._EXPORTS[name] for name in slimssl.__all__}  # as IDEs read them
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slimssl.nope  # noqa: B018
    # a package, as the docs spell slimssl.methods.register_method (in a fresh interpreter: here it is imported)
    done = subprocess.run([sys.executable, "-c", "import slimssl; print(slimssl.methods.register_method.__name__)"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "register_method", done.stderr


def test_every_bad_input_error_is_a_slimssl_error():
    from slimssl.checkpoint import CheckpointError
    from slimssl.config import ConfigError
    from slimssl.data.files import DataError
    from slimssl.devices import DeviceError
    from slimssl.errors import UsageError
    from slimssl.eval.results import ResultsError
    from slimssl.export.files import ExportError
    from slimssl.nn.spec import SubnetError
    from slimssl.report.plot import PlotError

    for error in (CheckpointError, ConfigError, DataError, DeviceError, UsageError, ResultsError, ExportError,
                  SubnetError, PlotError):
        assert issubclass(error, slimssl.SlimsslError), error
    assert issubclass(slimssl.SlimsslError, ValueError)  # callers that caught ValueError still do
    public = [getattr(slimssl, name) for name in slimssl.__all__ if name.endswith("Error")]
    assert len(public) > 8 and all(issubclass(error, slimssl.SlimsslError) for error in public)
    with pytest.raises(slimssl.ConfigError, match="nosuch"):  # catchable by its public name
        slimssl.load_config("demo", ["train.nosuch=1"])


def test_help_names_the_environment_variables_with_their_real_defaults(monkeypatch):
    """The help text is written out (it must not import torch): it stays true to the code's defaults."""
    from slimssl.cli import build_parser
    from slimssl.data.datasets import data_root
    from slimssl.data.decoded_cache import DEFAULT_CACHE_GB, cache_dir
    from slimssl.train.distributed import DEFAULT_TIMEOUT_S

    for name in ("SLIMSSL_DATA", "SLIMSSL_CACHE", "SLIMSSL_CACHE_GB", "SLIMSSL_DIST_TIMEOUT", "SLIMSSL_DIST_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    lines = {line.split()[0]: line for line in build_parser().format_help().splitlines() if "  SLIMSSL_" in line}
    monkeypatch.setenv("HOME", os.path.join(os.sep, "home", "someone"))  # HOME=/ would make "/" of every path "~"
    home = os.path.expanduser("~")
    assert f"default {data_root().replace(home, '~', 1)})" in lines["SLIMSSL_DATA"]
    assert f"default {cache_dir().replace(home, '~', 1)})" in lines["SLIMSSL_CACHE"]
    assert f"default {DEFAULT_CACHE_GB:g}; 0: off" in lines["SLIMSSL_CACHE_GB"]
    assert f"default {DEFAULT_TIMEOUT_S:g})" in lines["SLIMSSL_DIST_TIMEOUT"]
    assert "default cpu:gloo,cuda:nccl with CUDA, else gloo" in lines["SLIMSSL_DIST_BACKEND"]
    source = Path(slimssl.__file__).parent
    read = {name for path in source.rglob("*.py") for name in re.findall(r"\bSLIMSSL_[A-Z_]+", path.read_text())}
    assert read == set(lines)  # every variable the code reads is listed, and only those


def test_importing_the_config_package_leaves_torch_unimported():
    """The config schema reads the architectures (models/arch.py) and view recipes without torch: a script or
    command that only imports slimssl.config does not wait for torch's import."""
    code = "import sys, slimssl.config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
