"""slimssl ships py.typed, so a user's type checker reads its annotations: the calls the docs show (and README's
whole API example) must check, and a mistake the annotations can see must be reported (mypy, the dev extra;
skipped without it)."""

import re
import textwrap

import pytest

from conftest import REPO_ROOT

USER_CODE = textwrap.dedent('''
    import torch

    import slimssl
    from slimssl.config import TrainConfig
    from slimssl.methods import Method, MethodOutput

    config = slimssl.Config()  # docs/config.md: every default
    train = TrainConfig(epochs=5)
    spec = slimssl.SubnetSpec.coerce({"subnet": "w0p5"})  # a row of results names its sub-network
    custom = slimssl.SubnetSpec(0.5, [2, 2, 2, 2])  # depths as a config lists them
    slimssl.register_dataset("mine", ([], []), classes=("cat", "dog"))
    slimssl.methods.register_method


    def use(run: slimssl.PretrainRun) -> None:
        supernet, cfg = run.load_supernet()
        reveal_type(supernet)
        reveal_type(cfg)
        reveal_type(slimssl.knn)
        slimssl.knn(run, [0.25, 0.5])  # a run stands for its directory
        slimssl.linear_probe(run, data="cifar10", loader="stream", workers=2)  # the data keywords
        workers: int | None = None
        slimssl.knn(run, workers=workers, crop_ratio=None)  # None: the config's
        best = slimssl.pick_subnet(run, max_macs="2M")
        slimssl.export_run(run, "deploy", best)


    class Mine(Method):  # docs/extending.md: a method of one's own, its hooks annotated
        name = "mine"

        def loss(self, online: list[torch.Tensor], target: list[torch.Tensor]) -> MethodOutput:
            p1, p2 = online
            return MethodOutput((p1 - target[1]).pow(2).mean(), distill_on=[p1, p2])


    slimssl.pretrian("demo")  # wrong: misspelt
    slimssl.knn("runs/demo", k="200")  # wrong: k is a number
    slimssl.knn("runs/demo", dta="cifar10")  # wrong: misspelt data keyword
''')


def readme_api_example() -> str:
    """README.md's Python API example (the block tests/test_docs.py runs)."""
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), flags=re.S | re.M)
    (example,) = [b for b in blocks if "import slimssl" in b and "register_dataset" not in b]
    return example


def test_the_documented_calls_type_check_and_mistakes_are_reported(tmp_path, monkeypatch):
    api = pytest.importorskip("mypy.api")
    (tmp_path / "user.py").write_text(USER_CODE)
    (tmp_path / "readme.py").write_text(readme_api_example())
    monkeypatch.setenv("MYPYPATH", str(REPO_ROOT / "src"))  # this checkout, however slimssl is installed
    out, err, _ = api.run([str(tmp_path / "user.py"), str(tmp_path / "readme.py"), "--ignore-missing-imports",
                           "--follow-imports=silent", "--no-error-summary", "--cache-dir", str(tmp_path / "cache")])
    assert "readme.py:" not in out, out  # the README's example checks as written
    lines = USER_CODE.splitlines()
    said = {}
    for line, kind, text in re.findall(r"user\.py:(\d+): (\w+): (.*)", out):
        said.setdefault(lines[int(line) - 1].strip(), []).append(f"{kind}: {text}")
    errors = {code: [m for m in messages if m.startswith("error")] for code, messages in said.items()}
    assert {code for code, found in errors.items() if found} == {
        'slimssl.pretrian("demo")  # wrong: misspelt', 'slimssl.knn("runs/demo", k="200")  # wrong: k is a number',
        'slimssl.knn("runs/demo", dta="cifar10")  # wrong: misspelt data keyword'}, (out, err)
    assert "SlimResNet" in said["reveal_type(supernet)"][0] and "Config" in said["reveal_type(cfg)"][0]
    assert "k: int | None" in said["reveal_type(slimssl.knn)"][0]  # the signature, not (*Any, **Any)
