"""Edge cases of reading results and planning reproductions: a results.json that
is not one (a folder, a list, a row without its name), a budget over rows that lack the counts, and the
reproduction's refusal of a recipe given twice or of streamed data."""

from __future__ import annotations

import json

import pytest

import slimssl
from slimssl.cli import main
from slimssl.errors import UsageError
from slimssl.eval.results import ResultsError, merge_results, read_results
from slimssl.reproduce.plan import plan_jobs


def _run(tmp_path, results) -> object:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")  # only its place matters here
    if results is not None:
        (run / "results.json").write_text(json.dumps(results))
    return run


@pytest.mark.parametrize("content, match", [
    ([{"subnet": "w1p0_d1-1-1-1"}], "does not hold a results object with a 'subnets' list"),
    ({"subnets": {"w1p0_d1-1-1-1": {}}}, "does not hold a results object with a 'subnets' list"),
    ({"subnets": [{"knn_top1": 50.0}]}, r"subnets\[0\] has no 'subnet' name"),
    ({"subnets": [{"subnet": "w1p0_d1-1-1-1"}, "w0p5"]}, r"subnets\[1\] has no 'subnet' name"),
    ({"subnets": [], "protocols": [1]}, "'protocols' is a list; expected an object"),
    (json.loads("[" * 500 + "]" * 500), "does not hold a results object"),  # deep, but within the parser's reach
])
def test_a_results_file_that_is_not_one_is_refused_naming_the_file(tmp_path, capsys, caplog, content, match):
    run = _run(tmp_path, content)
    with pytest.raises(ResultsError, match=match) as caught:
        read_results(run)
    assert str(run / "results.json") in str(caught.value)
    assert main(["report", str(run)]) == 2  # one line on stderr, not a traceback
    assert str(run / "results.json") in capsys.readouterr().err + caplog.text
    with pytest.raises(ResultsError, match=match):  # an evaluation does not merge into it (and lose it)
        merge_results(run, {"w1p0_d1-1-1-1": {"knn_top1": 1.0}}, protocol="knn", settings={})
    assert json.loads((run / "results.json").read_text()) == content


def test_a_folder_named_results_json_is_refused(tmp_path):
    run = _run(tmp_path, None)
    (run / "results.json").mkdir()
    with pytest.raises(ResultsError, match="results.json is not a file"):
        read_results(run)


def test_a_budget_over_results_without_counts_says_so(tmp_path):
    run = _run(tmp_path, {"subnets": [{"subnet": "w1p0_d1-1-1-1", "knn_top1": 50.0, "params": 100},
                                      {"subnet": "w0p5_d1-1-1-1", "knn_top1": 40.0, "params": 30}]})
    with pytest.raises(UsageError, match="results.json holds no sub-network with its macs"):
        slimssl.pick_subnet(run, max_macs="1M")
    assert slimssl.pick_subnet(run, max_params=50)["subnet"] == "w0p5_d1-1-1-1"  # the counts it has still work


def test_a_reproduction_refuses_a_recipe_named_twice(tmp_path):
    with pytest.raises(UsageError, match="--recipes names the same recipe twice"):
        plan_jobs(["cifar10_r18_dspnet_byol", "cifar10_r18_dspnet_byol.yaml"], tmp_path, ["data.source=fake"])


def test_a_reproduction_refuses_streamed_data(tmp_path):
    with pytest.raises(UsageError, match="data.loader is 'stream', but the reproduction is built for data decoded "
                                         "in memory"):
        plan_jobs(["cifar10_r18_dspnet_byol"], tmp_path, ["data.loader=stream"])
    assert [job.kind for job in plan_jobs(["cifar10_r18_dspnet_byol"], tmp_path, [])][:2] == ["slim", "alone"]


def test_a_results_file_nested_deeper_than_the_json_parser_goes_is_refused_naming_the_file(tmp_path, capsys):
    run = _run(tmp_path, None)
    (run / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ResultsError, match="results.json is not readable JSON .*RecursionError"):
        read_results(run)
    assert main(["report", str(run)]) == 2
