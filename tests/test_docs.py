"""The documentation's examples stay true: every ``slimssl`` command line in README.md and docs/*.md parses
with today's flags and names a shipped config, and the README's Python API example runs as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from slimssl.cli import build_parser
from slimssl.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
pytestmark = pytest.mark.skipif(not DOCS[0].is_file(), reason="the documentation is not beside the tests")


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def slimssl_commands(block: str) -> list[list[str]]:
    """The arguments after ``slimssl`` (or ``-m slimssl``) of each command in a shell block. Commands that use
    shell variables are left out: their words are only known when the shell runs them."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if "$" in part or not words:
                continue
            if words[0] == "slimssl":
                commands.append(words[1:])
            elif "-m" in words and words[words.index("-m") + 1:][:1] == ["slimssl"]:
                commands.append(words[words.index("-m") + 2:])
    return commands


EXAMPLES = [pytest.param(words, id=f"{path.name}: slimssl {' '.join(words)}"[:90])
            for path in DOCS for block in code_blocks(path, "bash") for words in slimssl_commands(block)]


def test_the_docs_hold_command_examples():
    assert len(EXAMPLES) >= 15  # a change to the extraction that finds nothing would pass every case below


@pytest.mark.parametrize("words", EXAMPLES)
def test_documented_command_parses_and_names_a_shipped_config(words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output paths are checked for writability as they are parsed
    parser = build_parser()
    args = parser.parse_args(words)
    assert args.command == next(word for word in words if word in parser.commands)
    if getattr(args, "config", None):  # a renamed recipe or key fails here (a method --import'ed is not known here)
        load_config(args.config, [] if args.imports else getattr(args, "set", None) or [])


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    from slimssl import load_exported

    (example,) = [b for b in code_blocks(DOCS[0], "python") if "import slimssl" in b and "register_dataset" not in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md (Python API)", "exec"), namespace)  # its own assert checks the export
    assert (tmp_path / "exported" / "w0p5_d2-2-2-2" / "model.safetensors").is_file()
    assert namespace["run"].finished and (tmp_path / "runs" / "demo" / "results.json").is_file()
    assert namespace["same"].state_dict().keys() == namespace["plain"].state_dict().keys()
    assert namespace["config"].name == "demo" and namespace["config"].train.epochs == 2
    cfg, recorded = namespace["config"], load_exported(namespace["folder"]).metadata  # export_subnet(config=...)
    assert (recorded["resolution"], recorded["crop_ratio"], recorded["mean"]) == \
        (cfg.data.resolution, cfg.eval.crop_ratio, list(cfg.data.mean))


def test_extending_example_registers_trains_and_evaluates_a_method(tmp_path, monkeypatch):
    from slimssl.methods import METHODS

    example = code_blocks(REPO_ROOT / "docs" / "extending.md", "python")[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(METHODS, "simsiam", None)  # removed again after the test, whatever the example does
    from slimssl.cli import main

    (tmp_path / "simsiam.py").write_text(example)
    assert main(["--import", "simsiam.py", "config", "--set", "method.name=simsiam"]) == 0  # registers, trains nothing
    assert METHODS["simsiam"].__module__ == "simsiam" and not (tmp_path / "runs").exists()
    del METHODS["simsiam"]
    namespace: dict = {"__name__": "__main__"}
    exec(compile(example, "docs/extending.md (SimSiam)", "exec"), namespace)
    assert METHODS["simsiam"] is namespace["SimSiam"]
    run, rows = namespace["run"], namespace["rows"]
    assert run.finished and load_config(run.run_dir / "config.yaml").method.name == "simsiam"
    assert [r["subnet"] for r in rows] == [s["subnet"] for s in run.results["subnets"]]
    model = torch.load(run.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    linears = [k for k in model if k.startswith(("projector.", "predictor.")) and k.endswith(".weight")
               and model[k].dim() == 2]
    assert len(linears) == 5  # SimSiam's heads (three projector layers, two predictor layers), not the demo's


def test_extending_loss_weights_example_registers_a_rule_that_weighs_the_run(tmp_path, monkeypatch):
    import slimssl
    from slimssl.slim import LOSS_WEIGHTS, policy
    from slimssl.slim.weights import weigh

    _, example = code_blocks(REPO_ROOT / "docs" / "extending.md", "python")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(LOSS_WEIGHTS, "by_width", None)  # removed again after the test
    del LOSS_WEIGHTS["by_width"]
    real = slimssl.pretrain
    monkeypatch.setattr(slimssl, "pretrain", lambda *a, **kw: real(*a, **kw, max_steps=2))  # two steps are enough
    from slimssl.cli import main

    (tmp_path / "by_width.py").write_text(example)  # imported as the page says: registers, trains nothing
    assert main(["--import", "by_width.py", "config", "--set", "slim.loss_weights=by_width"]) == 0
    assert LOSS_WEIGHTS["by_width"].__module__ == "by_width" and not (tmp_path / "runs").exists()
    del LOSS_WEIGHTS["by_width"]
    weighed = []
    monkeypatch.setattr(policy, "weigh", lambda *a: weighed.append(a) or weigh(*a))
    namespace: dict = {"__name__": "__main__"}
    exec(compile(example, "docs/extending.md (loss weights)", "exec"), namespace)
    assert LOSS_WEIGHTS["by_width"] is namespace["by_width"]
    run = namespace["run"]
    assert run.step == 2 and load_config(run.run_dir / "config.yaml").slim.loss_weights == "by_width"
    assert [(name, progress) for name, _, progress in weighed] == [("by_width", 0.0), ("by_width", 1 / run.total_steps)]
    specs = weighed[0][1]
    assert weigh("by_width", specs, 0.5) == [s.width + 0.5 * (1 - s.width) for s in specs]


def test_the_readme_module_map_names_every_module_and_no_other():
    """README.md's Development section names each module of src/slimssl in its package's entry (each package's
    command(s).py together), and no file that is not there: a module added, moved or removed is described where
    the next person looks."""
    section = DOCS[0].read_text().split("## Development", 1)[1].split("The tests run on the CPU", 1)[0]
    entries = re.split(r"\n- ", section)
    package = REPO_ROOT / "src" / "slimssl"
    modules = [p.relative_to(package) for p in package.rglob("*.py") if p.name != "__init__.py"]
    misplaced = []
    for module in modules:
        where = [e for e in entries if f"`{module.parent}/`" in e] if module.parts[:-1] else entries
        said_generally = module.parts[:-1] and module.name in ("command.py", "commands.py")  # "each package's"
        if not said_generally and not any(f"`{module.name}`" in e for e in where):
            misplaced.append(str(module))
    assert misplaced == [], "modules the README's module map leaves out of their package's entry"
    named = set(re.findall(r"`([a-z0-9_]+\.py)`", section))
    assert named - {m.name for m in modules} == set(), "files the README's module map names that are not there"
