"""Picking the sub-network to deploy within a budget of MACs or parameters (slimssl.pick_subnet, and
``slimssl export --max-macs``)."""

from __future__ import annotations

import json
import logging

import pytest

import slimssl
from slimssl.budget import parse_count
from slimssl.cli import main
from slimssl.errors import UsageError
from test_eval import make_checkpoint


def _row(name: str, macs: float, params: float, **values) -> dict:
    return {"subnet": name, "macs": macs, "params": params, **values}


def _run(tmp_path, rows: list[dict], **extra):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.pt", "epoch_0002.pt"):  # only their names matter here
        (run / "checkpoints" / name).write_bytes(b"")
    (run / "results.json").write_text(json.dumps({"subnets": rows, **extra}))
    return run


ROWS = [  # widths 1, .75, .5, .25 with depth variants: accuracy does not simply follow the cost
    _row("w1p0", 400e6, 11e6, knn_top1=80.0, linear_top1=85.0),
    _row("w0p75", 230e6, 6.3e6, knn_top1=79.0, linear_top1=84.0),
    _row("w0p75_shallow", 160e6, 5.0e6, knn_top1=79.5, linear_top1=83.0),
    _row("w0p5", 100e6, 2.8e6, knn_top1=75.0, linear_top1=80.0),
    _row("w0p25", 26e6, 0.7e6, knn_top1=66.0, linear_top1=70.0),
]


@pytest.mark.parametrize("text, value", [("300M", 3e8), ("1.5G", 1.5e9), ("11k", 11e3), ("2e6", 2e6),
                                         (" 7 ", 7.0), (5, 5.0), (2.5e6, 2.5e6), ("1T", 1e12)])
def test_counts_read_as_the_tables_print_them(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["0", "-1M", "abc", "1.2.3", "5X", "nan", "inf", "M", "", True])
def test_a_count_that_is_not_one_is_refused_with_examples(text):
    with pytest.raises(UsageError, match="expected a count > 0 such as 300M"):
        parse_count(text)


def test_the_most_accurate_that_fits_is_picked_by_the_probe_where_every_one_has_it(tmp_path):
    run = _run(tmp_path, ROWS)
    assert slimssl.pick_subnet(run, max_macs="250M")["subnet"] == "w0p75"  # linear: 84 over the shallow's 83
    assert slimssl.pick_subnet(run, max_macs="250M", metric="knn_top1")["subnet"] == "w0p75_shallow"  # 79.5
    picked = slimssl.pick_subnet(run / "checkpoints" / "last.pt", max_macs=250e6, max_params="5.5M")
    assert picked["subnet"] == "w0p75_shallow" and picked["picked_by"] == "linear_top1"  # both limits hold
    assert picked == {**ROWS[2], "picked_by": "linear_top1"}
    assert slimssl.pick_subnet(run, max_macs="1G")["subnet"] == "w1p0"
    assert slimssl.pick_subnet(run, max_params="1M")["subnet"] == "w0p25"


def test_knn_ranks_when_the_probe_did_not_measure_every_one_that_fits_and_ties_go_to_fewer_macs(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[1]["linear_top1"]
    rows[3]["knn_top1"] = 79.5  # as accurate as the shallow 0.75, for fewer MACs
    assert slimssl.pick_subnet(_run(tmp_path, rows), max_macs="250M") == {**rows[3], "picked_by": "knn_top1"}


def test_sub_networks_not_measured_are_left_out_with_a_warning_and_the_default_is_the_most_measured(tmp_path,
                                                                                                    caplog):
    rows = [dict(r) for r in ROWS] + [_row("w0p375", 60e6, 1.6e6, linear_top1=99.0),  # evaluated off the menu
                                      _row("w0p3", 40e6, 1.0e6, knn_top1=99.0)]
    for row in rows[3:5]:  # w0p5, w0p25: no probe
        del row["linear_top1"]
    run = _run(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        # knn: measured for 6 of the 7 that fit (linear: 4); w0p375, the best by its probe, has no kNN
        assert slimssl.pick_subnet(run, max_macs="1G")["subnet"] == "w0p3"
        assert "knn_top1 is not measured for w0p375, which fit too: left out of the choice" in caplog.text
        caplog.clear()
        picked = slimssl.pick_subnet(run, max_macs="1G", metric="linear_top1")
    assert picked["subnet"] == "w0p375" and picked["picked_by"] == "linear_top1"
    assert "linear_top1 is not measured for w0p5, w0p25, w0p3, which fit too" in caplog.text


def test_values_of_other_settings_or_an_earlier_network_are_compared_with_a_warning(tmp_path, caplog):
    rows = [dict(r) for r in ROWS]
    rows[3]["knn_settings"] = {"k": 20}  # w0p5 measured with another k than the run's protocol
    run = _run(tmp_path, rows, steps=100, config={"train": {"epochs": 2}}, protocols={"knn": {}, "linear": {}})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 50, "loss": {}}) + "\n"
                                               for s in (50, 100, 150)))
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert slimssl.pick_subnet(run, max_macs="150M", metric="knn_top1")["subnet"] == "w0p5"
    assert "knn_top1 of w0p5 was measured with other settings than the others' (their knn_settings" in caplog.text
    assert "holds values of the network at an earlier epoch than the run has trained on to since, 3: knn at epoch 2, " \
           "linear at epoch 2; they may not be those of its last checkpoint (slimssl knn / linear RUN" in caplog.text


def test_a_row_without_its_macs_loses_a_tie(tmp_path):
    rows = [_row("a", None, 1e6, knn_top1=50.0), _row("b", 2e6, 1e6, knn_top1=50.0)]
    assert slimssl.pick_subnet(_run(tmp_path, rows), max_params="2M")["subnet"] == "b"


def test_a_budget_nothing_fits_names_the_smallest(tmp_path):
    with pytest.raises(UsageError, match=r"no sub-network of .*run fits within 10,000,000 \(10.00M\) MACs and 100,000 "
                                         r"\(100.00k\) params: the smallest, w0p25, has 26,000,000 \(26.00M\) MACs and "
                                         r"700,000 \(700.00k\) params"):
        slimssl.pick_subnet(_run(tmp_path, ROWS), max_macs="10M", max_params="100k")


def test_a_budget_copied_from_a_rounded_table_says_what_its_rounding_left_out(tmp_path, caplog):
    rows = [_row("full", 4_042_752, 80_000, knn_top1=60.0), _row("half", 1_050_000, 19_572, knn_top1=50.0)]
    run = _run(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert slimssl.pick_subnet(run, max_macs="4.04M")["subnet"] == "half"  # 4.04M is 4,040,000
    assert "full is left out: 4,042,752 (4.04M) MACs > 4,040,000 (4.04M), over the budget only by the tables' " \
           "rounding; give the exact count to include it" in caplog.text
    assert slimssl.pick_subnet(run, max_macs=4_042_752)["subnet"] == "full"
    rows[0]["macs"] = 4_100_000  # 4.1M is that count exactly, not float's 4,099,999.9999999995
    assert slimssl.pick_subnet(_run(tmp_path / "exact", rows), max_macs="4.1M")["subnet"] == "full"
    with pytest.raises(UsageError, match=r"fits within 19,570 \(19.57k\) params: the smallest, half, has 19,572 "
                                         r"\(19.57k\) params"):  # not "within 19.57k: ... has 19.57k"
        slimssl.pick_subnet(run, max_params="19.57k")


def test_a_checkpoint_saved_after_the_results_is_warned_of_without_a_metrics_record(tmp_path, caplog):
    import torch

    run = _run(tmp_path, ROWS, steps=11, config={"train": {"epochs": 1}}, protocols={"knn": {}})
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "epoch": 10 / 11, "loss": {}}) + "\n")  # every 10
    torch.save({"train_state": {"step": 14}, "epoch": 14 / 11}, run / "checkpoints" / "last.pt")  # resumed, stopped
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        slimssl.pick_subnet(run, max_macs="150M")
    assert "an earlier epoch than the run has trained on to since, 1.27: knn at epoch 1;" in caplog.text


def test_an_unmeasured_or_unknown_metric_is_an_error_saying_what_was_measured(tmp_path):
    run = _run(tmp_path, ROWS)
    with pytest.raises(UsageError, match=r"finetune_10pct_top1 is not measured for any sub-network of .* that fits "
                                         r"within 150.00M MACs; measured: knn_top1, linear_top1 \(slimssl knn"):
        slimssl.pick_subnet(run, max_macs="150M", metric="finetune_10pct_top1")
    with pytest.raises(UsageError, match="metric must be an accuracy such as knn_top1"):
        slimssl.pick_subnet(run, max_macs="150M", metric="macs")  # would pick the largest


def test_what_cannot_be_picked_from_says_why(tmp_path):
    run = _run(tmp_path, ROWS)
    with pytest.raises(UsageError, match="give a budget: max_macs and/or max_params"):
        slimssl.pick_subnet(run)
    with pytest.raises(UsageError, match="is not a run directory or its checkpoints/last.pt"):
        slimssl.pick_subnet(run / "checkpoints" / "epoch_0002.pt", max_macs="1G")
    with pytest.raises(UsageError, match="other does not exist; expected a run directory"):
        slimssl.pick_subnet(tmp_path / "other", max_macs="1G")
    (tmp_path / "new" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UsageError, match="results.json does not exist"):
        slimssl.pick_subnet(tmp_path / "new", max_macs="1G")


def test_values_measured_before_pretraining_ended_are_picked_from_with_a_warning(tmp_path, caplog):
    run = _run(tmp_path, ROWS, unfinished={"epochs": 50, "linear": 10.0})
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert slimssl.pick_subnet(run, max_macs="150M")["subnet"] == "w0p5"
    assert "measured before pretraining ended (linear at epoch 10 of 50)" in caplog.text
    assert "picked w0p5 within 150.00M MACs: linear_top1 80.00, 100.00M MACs, 2.80M params (2 of 5" in caplog.text


def test_export_takes_a_budget_and_exports_what_the_runs_own_measurements_pick(tmp_path, capsys):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["knn", str(run), "--device", "cpu", "--json"]) == 0  # real measurements into results.json
    measured = {row["subnet"]: row for row in json.loads(capsys.readouterr().out)}
    full, half = measured["w1p0_d1-1-1-1"], measured["w0p5_d1-1-1-1"]
    out = tmp_path / "exports"
    assert main(["export", str(run), "--max-macs", str(int(full["macs"]) - 1), "--out", str(out), "--json",
                 "--verify"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["subnet"], row["picked_by"], row["knn_top1"]) == (half["subnet"], "knn_top1", half["knn_top1"])
    assert row["macs"] == half["macs"] and row["max_abs_diff"] < 1e-4
    assert [p.name for p in out.iterdir()] == [half["subnet"]]
    # with room for the full width too: the more accurate of the two
    assert main(["export", str(run), "--max-macs", "1G", "--out", str(tmp_path / "e2"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert full["knn_top1"] != half["knn_top1"]  # (equal ones would go to the half width, tested above)
    assert row["subnet"] == (full if full["knn_top1"] > half["knn_top1"] else half)["subnet"]
    # in Python, the row picked is what export_run and the evaluations take, as they take its name
    best = slimssl.pick_subnet(run, max_macs=int(full["macs"]) - 1)
    (exported,) = slimssl.export_run(run, tmp_path / "e3", best)
    assert exported["subnet"] == half["subnet"]
    assert [r["subnet"] for r in slimssl.knn(run, [best, full], device="cpu", save=False)] == [half["subnet"],
                                                                                                full["subnet"]]


@pytest.mark.parametrize("argv, message", [
    (["--max-macs", "1G", "--all"], "give exactly one of --subnet NAME [NAME ...], --all, or a budget"),
    (["--subnet", "0.5", "--max-params", "1M"], "give exactly one of --subnet"),
    (["--all", "--metric", "knn_top1"], "--metric ranks the sub-networks that fit a budget"),
    (["--max-macs", "1G"], "results.json does not exist"),  # nothing measured yet
    (["--config", "demo", "--random-init", "--max-macs", "1G"], "--random-init exports the initial weights, which"),
])
def test_export_refuses_a_budget_it_cannot_use(tmp_path, capsys, caplog, argv, message):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["export", str(run), "--out", str(tmp_path / "e"), *argv]) == 2
    assert message in capsys.readouterr().err + caplog.text
    assert not (tmp_path / "e").exists()


def test_export_reads_a_budget_as_the_tables_print_counts(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path), "--out", str(tmp_path / "e"), "--max-macs", "3Q"])
    assert exit_info.value.code == 2
    assert "argument --max-macs: expected a count > 0 such as 300M" in capsys.readouterr().err
