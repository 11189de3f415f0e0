"""slimssl report: Markdown tables, JSON, accuracy-vs-MACs and gradient-norm plots, results.json merging."""

from __future__ import annotations

import json
import logging
import sys

import pytest

pytest.importorskip("matplotlib")

from slimssl.cli import main  # noqa: E402
from slimssl.eval.results import merge_results, read_results, run_dir_of  # noqa: E402
from slimssl.report.plot import PlotError, plot_accuracy_vs_macs  # noqa: E402
from slimssl.report.report import grad_norm_series, load_runs, report_markdown  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _row(name, width, params, macs, knn, linear=None):
    row = {"subnet": name, "width": width, "depths": [1, 1, 1, 1], "params": params, "macs": macs,
           "knn_top1": knn, "knn_top1_random_init": knn / 3}
    if linear is not None:
        row["linear_top1"] = linear
    return row


def write_runs(tmp_path):
    slim = {"run": "slim", "config": {"name": "slim"}, "resolution": 32, "subnets": [
        _row("w1p0_d1-1-1-1", 1.0, 77000, 1_040_000, 86.0, 88.0),
        _row("w0p75_d1-1-1-1", 0.75, 44000, 600_000, 80.0, 84.0),
        _row("w0p5_d1-1-1-1", 0.5, 19500, 273_000, 71.0, 75.0)]}
    single = {"run": "single_w0p5", "config": {"name": "single"}, "resolution": 32, "subnets": [
        _row("w0p5_d1-1-1-1", 0.5, 19500, 273_000, 69.0)]}
    dirs = []
    for doc in (slim, single):
        d = tmp_path / doc["run"]
        d.mkdir()
        (d / "results.json").write_text(json.dumps(doc))
        dirs.append(d)
    return dirs, [slim, single]


def test_report_cli_plot_and_json(tmp_path, capsys):
    dirs, docs = write_runs(tmp_path)
    png = tmp_path / "acc.png"
    assert main(["report", *map(str, dirs), "--plot", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == docs
    assert png.read_bytes()[:8] == PNG

    assert main(["report", *map(str, dirs)]) == 0
    text = capsys.readouterr().out
    assert "## slim" in text and "## single_w0p5" in text and "linear_top1" in text  # '-' in the single run
    assert "macs: multiply-accumulates per image at the run's resolution; accuracies in %." in text
    assert "finetune" not in text  # no run was fine-tuned: no empty fine-tuning columns
    assert "w0p75_d1-1-1-1" in text and "88.00" in text


def test_runs_measured_with_other_settings_are_said_not_to_compare(tmp_path, capsys, caplog):
    dirs, docs = write_runs(tmp_path)
    knn = {"data": "digits", "resolution": 32, "crop_ratio": 1.0, "k": 200, "temperature": 0.1}
    for d, doc, k, crop in ((dirs[0], docs[0], 200, 1.0), (dirs[1], docs[1], 20, 0.875)):
        doc["protocols"] = {"knn": {**knn, "k": k, "crop_ratio": crop}}
        (d / "results.json").write_text(json.dumps(doc))
    assert main(["report", *map(str, dirs)]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("Settings that differ between these runs, whose numbers then do not compare across "
                                  "the tables: knn crop_ratio: slim 1.0, single_w0p5 0.875; knn k: slim 200, "
                                  "single_w0p5 20")
    assert "these runs were measured with other settings, so their numbers do not compare" in caplog.text
    docs[1]["protocols"]["knn"].update(k=200, crop_ratio=1.0)
    assert "Settings that differ" not in report_markdown(docs)  # the same settings: nothing to say


def test_plot_has_one_marker_per_subnet(tmp_path, caplog):
    _, docs = write_runs(tmp_path)
    fig = plot_accuracy_vs_macs(docs, "knn_top1", tmp_path / "p.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["slim", "single_w0p5"]
    assert [len(line.get_xdata()) for line in lines] == [3, 1]
    assert all(line.get_marker() not in (None, "None", "") for line in lines)
    # linear_top1 exists for the slimmable run only
    assert [len(line.get_xdata()) for line in plot_accuracy_vs_macs(docs, "linear_top1").axes[0].get_lines()] == [3]
    joined = plot_accuracy_vs_macs(docs + [dict(docs[1], run="single_w1")], join_singles="one by one")
    assert [line.get_label() for line in joined.axes[0].get_lines()] == ["slim", "one by one"]
    unfinished = dict(docs[1], run="single_w1", resolution=16, unfinished={"epochs": 50, "knn": 3})
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        joined = plot_accuracy_vs_macs(docs + [unfinished], join_singles="one by one")
    assert joined.axes[0].get_lines()[1].get_label() == "one by one (unfinished: single_w1)"
    assert "the runs joined were pretrained at other resolutions or on other data (single_w0p5: 32 px, single_w1: " \
           "16 px)" in caplog.text
    with pytest.raises(PlotError, match="knn_top1"):
        plot_accuracy_vs_macs(docs, "nonexistent")
    for not_a_number in ("subnet", "depths"):  # values that are no accuracy: said, not a traceback
        with pytest.raises(PlotError, match=rf"no run has values of '{not_a_number}'.*metrics found: knn_top1"):
            plot_accuracy_vs_macs(docs, not_a_number)


def test_plot_runs_draws_the_report_figure_from_run_directories(tmp_path, caplog):
    import slimssl

    dirs, _ = write_runs(tmp_path)
    (tmp_path / "still_pretraining").mkdir()  # no results.json yet: left out, as the report leaves it out
    png = tmp_path / "figures" / "acc.png"
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        fig = slimssl.plot_runs([*dirs, tmp_path / "still_pretraining"], path=png, join_singles="one by one")
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["slim", "one by one"]
    assert [len(line.get_ydata()) for line in fig.axes[0].get_lines()] == [3, 1]
    assert png.read_bytes()[:8] == PNG
    assert fig._repr_png_()[:8] == PNG  # how a notebook shows the cell's value, without pyplot or %matplotlib
    assert "still_pretraining has no results.json yet" in caplog.text
    one = slimssl.plot_runs(str(dirs[0]), "linear_top1")  # one run, by its path's text
    assert list(one.axes[0].get_lines()[0].get_ydata()) == [75.0, 84.0, 88.0]
    with pytest.raises(slimssl.SlimsslError, match="no run to plot"):
        slimssl.plot_runs([])
    with pytest.raises(slimssl.SlimsslError, match="does not exist"):
        slimssl.plot_runs(tmp_path / "typo")


def test_a_merge_kept_waiting_by_a_left_lock_says_so_instead_of_hanging(tmp_path, monkeypatch):
    """Where the file system has no locks, a killed merge leaves its lock file: the next merge names it."""
    from filelock import FileLock

    from slimssl.eval import results as results_mod

    monkeypatch.setattr(results_mod, "RESULTS_LOCK_SECONDS", 0.1)
    held = FileLock(str(tmp_path / ".results.json.lock"))
    held.acquire()
    try:
        with pytest.raises(results_mod.ResultsError, match=r"\.results\.json\.lock was held for 0.1 s: .*remove it"):
            merge_results(tmp_path, {"w1p0_d1-1-1-1": {"knn_top1": 50.0}})
        with pytest.raises(ValueError, match="if_stale must be 'raise' or 'warn', got 'wran'"), \
                results_mod.results_lock(tmp_path, if_stale="wran"):  # a slip does not run unlocked
            pass
        with results_mod.results_lock(tmp_path, 0.1, if_stale="warn"):  # the end of pretraining writes anyway
            pass
    finally:
        held.release()
    merge_results(tmp_path, {"w1p0_d1-1-1-1": {"knn_top1": 50.0}})  # free again: merged, and the lock let go
    merge_results(tmp_path, {"w1p0_d1-1-1-1": {"knn_top5": 90.0}})
    assert read_results(tmp_path)["subnets"][0]["knn_top5"] == 90.0


def test_a_width_by_depth_menu_gets_a_line_per_depth():
    """A line joins the widths of one depth: through every entry by MACs, it would zig-zag between depths."""
    rows = [{"subnet": f"w{w}_d{d}", "macs": macs, "knn_top1": acc} for w, d, macs, acc in [
        ("1p0", "3-4-6-3", 100, 80.0), ("0p5", "3-4-6-3", 30, 70.0),
        ("1p0", "2-2-2-2", 60, 75.0), ("0p5", "2-2-2-2", 20, 65.0)]]
    lines = plot_accuracy_vs_macs([{"run": "depths", "subnets": rows}]).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["depths, d3-4-6-3", "depths, d2-2-2-2"]
    assert [list(line.get_xdata()) for line in lines] == [[30.0, 100.0], [20.0, 60.0]]
    assert len({line.get_color() for line in lines}) == 1 and len({line.get_linestyle() for line in lines}) == 2


def test_table_shows_what_a_hand_edited_file_holds_and_rounds_up_units(tmp_path, capsys):
    from slimssl.report.table import human

    assert [human(n) for n in (999, 999_999, 1_234_567, 999_999_999)] == ["999", "1.00M", "1.23M", "1.00G"]
    d = tmp_path / "edited"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"subnets": [{"subnet": "w1p0_d1-1-1-1", "macs": "unknown"}]}))
    assert main(["report", str(d)]) == 0
    assert "| w1p0_d1-1-1-1 | -      | unknown |" in capsys.readouterr().out


def test_a_hand_edited_files_control_characters_are_shown_not_obeyed(tmp_path, capsys):
    """A terminal escape, a carriage return or a newline in results.json (a sub-network's name, the run's config
    name) reaches the terminal as text: it neither recolours nor rewrites the screen, nor splits a table row."""
    d = tmp_path / "edited"
    d.mkdir()
    doc = {"run": "r", "config": {"name": "demo\x1b]0;title\x07"},
           "subnets": [{"subnet": "w1\x1b[31mred\rover\nnext|cell", "macs": 5}]}
    (d / "results.json").write_text(json.dumps(doc))
    assert main(["report", str(d)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "| w1\\x1b[31mred\\rover\\nnext\\|cell |" in out and "demo\\x1b]0;title\\x07" in out


def test_plot_needs_matplotlib(tmp_path, monkeypatch):
    _, docs = write_runs(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.delitem(sys.modules, "slimssl.report.figure", raising=False)  # imported again, without matplotlib
    with pytest.raises(PlotError, match=r"pip install 'matplotlib>=3.6' \(the plot extra\)"):
        plot_accuracy_vs_macs(docs)


def test_grad_norm_plot(tmp_path, capsys, caplog):
    dirs, _ = write_runs(tmp_path)
    out = tmp_path / "grad.png"
    assert main(["report", str(dirs[0]), "--plot-grad", str(out), "--json"]) == 2  # no metrics.jsonl yet
    said = capsys.readouterr()
    assert "--set train.grad_diagnostics_every=N" in said.err + caplog.text  # says how to get the records
    assert not out.exists() and said.out == ""  # refused before the report: no output that looks complete
    records = [{"step": s, "loss": 1.0, "grad_norm": {"w1p0_d1-1-1-1": {"shared": 1.0 + s, "rest": 0.5},
                                                      "w0p5_d1-1-1-1": {"shared": 2.0, "rest": 0.1}}}
               for s in range(0, 50, 10)]
    lines = [json.dumps(r) for r in records] + ['{"step": 60, "loss": 0.5}', '{"cut off']
    (dirs[0] / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    series = grad_norm_series(dirs[0])
    assert series["w1p0_d1-1-1-1"]["step"] == [0, 10, 20, 30, 40]
    assert series["w0p5_d1-1-1-1"]["rest"] == [0.1] * 5
    assert main(["report", str(dirs[0]), "--plot-grad", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_plot_options_without_a_plot_are_said_to_change_nothing(tmp_path, capsys, caplog):
    dirs, _ = write_runs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert main(["report", str(dirs[0]), "--metric", "linear_top1", "--join-singles", "alone"]) == 0
    assert "--metric and --join-singles change only what --plot draws, and no --plot was given" in caplog.text


def test_runs_of_one_recipe_are_told_apart_by_their_folders(tmp_path, capsys, monkeypatch):
    """Pretraining named results.json's run after the recipe until 2026-12-05: runs of one recipe all read
    "demo", and the report gave them one heading and one plot series."""
    dirs = []
    for folder in ("lr0p1", "lr0p5", "old/lr0p1"):
        d = tmp_path / folder
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"run": "demo", "config": {"name": "demo"}, "resolution": 16,
                                                    "subnets": [_row("w1p0_d1-1-1-1", 1.0, 77000, 1_040_000, 86.0)]}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "grad_norm": {"w1p0_d1-1-1-1": {"shared": 1.0,
                                                                                            "rest": 0.5}}}) + "\n")
        dirs.append(str(d))
    drawn = {}
    monkeypatch.setattr("slimssl.report.plot.plot_grad_norms", lambda series, path: drawn.update(series))
    assert main(["report", *dirs, "--plot-grad", str(tmp_path / "grad.png")]) == 0
    text = capsys.readouterr().out
    # the same folder name twice: the paths as given
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        f"## {dirs[0]} (demo, 16 px)", "## lr0p5 (demo, 16 px)", f"## {dirs[2]} (demo, 16 px)"]
    assert sorted(drawn) == sorted([dirs[0], "lr0p5", dirs[2]])  # one series per run, none overwritten


def test_a_run_without_results_yet_is_left_out_with_a_warning(tmp_path, capsys, caplog):
    """As `slimssl report runs/*` catches a run still pretraining; with nothing else to report, it is an error."""
    dirs, _ = write_runs(tmp_path)
    training = tmp_path / "training"
    (training / "checkpoints").mkdir(parents=True)
    assert main(["report", str(dirs[0]), str(training), str(dirs[1])]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("## ")] == [
        "## slim (slim, 32 px)", "## single_w0p5 (single, 32 px)"]
    assert f"{training} has no results.json yet" in caplog.text
    assert main(["report", str(training)]) == 2
    assert "results.json does not exist" in caplog.text + capsys.readouterr().err


def _report_warnings(run, caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert main(["report", str(run)]) == 0
    return caplog.text


def test_results_of_a_run_trained_on_since_are_said_to_describe_an_earlier_network(tmp_path, capsys, caplog):
    """A finished run resumed with more epochs keeps its results.json until it ends again: a report of it then
    says which protocols' numbers describe an earlier epoch, until they are measured again."""
    dirs, _ = write_runs(tmp_path)
    doc = json.loads((dirs[0] / "results.json").read_text())
    doc = {**doc, "steps": 100, "config": {"train": {"epochs": 2}}, "protocols": {"knn": {}, "linear": {}}}
    (dirs[0] / "results.json").write_text(json.dumps(doc))
    records = "".join(json.dumps({"step": s, "epoch": s / 50, "loss": {}}) + "\n" for s in (50, 100))
    (dirs[0] / "metrics.jsonl").write_text(records)
    assert "earlier epoch" not in _report_warnings(dirs[0], caplog)
    (dirs[0] / "metrics.jsonl").write_text(records + json.dumps({"step": 125, "epoch": 2.5, "loss": {}}) + "\n")
    assert f"{dirs[0] / 'results.json'} holds values of the network at an earlier epoch than the run has trained " \
           "on to since, 2.5: knn at epoch 2, linear at epoch 2; they may not be those of its last checkpoint " \
           "(slimssl knn / linear RUN measures them again)" in _report_warnings(dirs[0], caplog)
    assert "## slim" in capsys.readouterr().out
    # slimssl knn RUN measured the checkpoint at epoch 2.5 (of the 3 the resume asked for): linear alone is stale
    (dirs[0] / "results.json").write_text(json.dumps({**doc, "unfinished": {"epochs": 3, "knn": 2.5}}))
    warnings = _report_warnings(dirs[0], caplog)
    assert "to since, 2.5: linear at epoch 2; they may not" in warnings and "(slimssl linear RUN" in warnings


def test_a_resume_with_another_batch_size_counts_its_steps_anew_without_staling_the_results(tmp_path, caplog):
    """Stopped at step 12 of 16 at batch 16, then finished at batch 32: its steps are 6 to 8, and results.json,
    written at the new end (step 8 of epoch 4), describes the last network, whatever the old step numbers."""
    dirs, _ = write_runs(tmp_path)
    doc = json.loads((dirs[0] / "results.json").read_text())
    doc = {**doc, "steps": 8, "config": {"train": {"epochs": 4}}, "protocols": {"knn": {}}}
    (dirs[0] / "results.json").write_text(json.dumps(doc))
    records = [{"step": s, "epoch": s / 4} for s in (4, 8, 12)] + [{"step": s, "epoch": s / 2} for s in (6, 8)]
    (dirs[0] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "earlier epoch" not in _report_warnings(dirs[0], caplog)


def test_a_damaged_metrics_file_is_named_not_a_traceback(tmp_path, capsys, caplog):
    dirs, _ = write_runs(tmp_path)
    (dirs[0] / "metrics.jsonl").write_bytes(b"\x00\xff\xfe binary junk\n[1, 2]\n")
    out = tmp_path / "grad.png"
    assert main(["report", str(dirs[0]), "--plot-grad", str(out)]) == 2
    text = capsys.readouterr().err + caplog.text
    assert "skipped 2 of 2 lines that are not JSON records" in text and "metrics.jsonl" in text
    assert "Traceback" not in text and not out.exists()


def test_results_merge_and_errors(tmp_path):
    dirs, docs = write_runs(tmp_path)
    merge_results(dirs[0], {"w0p5_d1-1-1-1": {"finetune_1pct_top1": 40.0}, "w0p25_d1-1-1-1": {"knn_top1": 50.0}},
                  protocol="finetune_1pct", settings={"seed": 0})
    data = read_results(dirs[0])
    rows = {r["subnet"]: r for r in data["subnets"]}
    assert rows["w0p5_d1-1-1-1"]["finetune_1pct_top1"] == 40.0
    assert rows["w0p5_d1-1-1-1"]["knn_top1"] == 71.0  # kept
    assert rows["w0p25_d1-1-1-1"] == {"subnet": "w0p25_d1-1-1-1", "knn_top1": 50.0}
    assert data["protocols"]["finetune_1pct"] == {"seed": 0} and data["config"] == docs[0]["config"]
    assert "40.00" in report_markdown(load_runs([dirs[0]]))
    assert run_dir_of(dirs[0] / "checkpoints" / "last.pt") == dirs[0]
    assert run_dir_of(tmp_path / "loose.pt") is None
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_values_measured_with_other_settings_keep_theirs(tmp_path, capsys):
    dirs, _ = write_runs(tmp_path)
    full, half = "w1p0_d1-1-1-1", "w0p5_d1-1-1-1"
    merge_results(dirs[0], {full: {"knn_top1": 70.0}, half: {"knn_top1": 60.0}}, protocol="knn", settings={"k": 200})
    merge_results(dirs[0], {half: {"knn_top1": 55.0}}, protocol="knn", settings={"k": 20})
    data = read_results(dirs[0])
    rows = {r["subnet"]: r for r in data["subnets"]}
    assert data["protocols"]["knn"] == {"k": 20}
    assert rows[full]["knn_top1"] == 70.0 and rows[full]["knn_settings"] == {"k": 200}  # measured with k=200
    report = report_markdown(load_runs([dirs[0]]))
    assert "Measured with other settings than the latest of their protocol" in report
    assert f"{full} (knn: k 200, not 20)" in report and "w0p75_d1-1-1-1 (knn: settings not recorded)" in report
    assert main(["report", str(dirs[0]), str(dirs[0]) + "/", "--json"]) == 0  # one folder twice: reported once
    assert len(json.loads(capsys.readouterr().out)) == 1
    assert rows[half]["knn_top1"] == 55.0 and "knn_settings" not in rows[half]
    assert rows["w0p75_d1-1-1-1"]["knn_settings"] == "not recorded"  # in the file before any protocols.knn
    # measured again with the protocol's settings: the row's own go; the same settings again add none
    merge_results(dirs[0], {full: {"knn_top1": 69.0}}, protocol="knn", settings={"k": 20})
    rows = {r["subnet"]: r for r in read_results(dirs[0])["subnets"]}
    assert "knn_settings" not in rows[full] and "knn_settings" not in rows[half]


def test_the_random_initialisations_knn_keeps_the_settings_it_was_measured_with(tmp_path):
    dirs, _ = write_runs(tmp_path)
    full, half = "w1p0_d1-1-1-1", "w0p5_d1-1-1-1"
    merge_results(dirs[0], {full: {"knn_top1": 70.0, "knn_top1_random_init": 20.0}}, protocol="knn",
                  settings={"k": 200})  # as pretraining measures both
    merge_results(dirs[0], {full: {"knn_top1": 66.0}}, protocol="knn", settings={"k": 20})
    row = next(r for r in read_results(dirs[0])["subnets"] if r["subnet"] == full)
    assert row["knn_random_init_settings"] == {"k": 200} and "knn_settings" not in row
    assert f"{full} (knn at random init: k 200, not 20)" in report_markdown(load_runs([dirs[0]]))
    # back to the settings it was measured with: nothing to say of it any more; the kNN of k 20 is apart now
    merge_results(dirs[0], {half: {"knn_top1": 50.0}}, protocol="knn", settings={"k": 200})
    rows = {r["subnet"]: r for r in read_results(dirs[0])["subnets"]}
    assert "knn_random_init_settings" not in rows[full] and rows[full]["knn_settings"] == {"k": 20}
    # and a row kept apart whose settings are the protocol's again has nothing to say either
    merge_results(dirs[0], {half: {"knn_top1": 51.0}}, protocol="knn", settings={"k": 20})
    rows = {r["subnet"]: r for r in read_results(dirs[0])["subnets"]}
    assert "knn_settings" not in rows[full] and rows[full]["knn_random_init_settings"] == {"k": 200}


def _merge_many(run_dir: str, protocol: str, times: int, start) -> None:
    start.wait()  # both processes merge at the same time
    for i in range(times):
        merge_results(run_dir, {"w0p5_d1-1-1-1": {f"{protocol}_{i}": float(i)}}, protocol=protocol, settings={})


def test_evaluations_merging_side_by_side_keep_each_others_values(tmp_path):
    import multiprocessing

    dirs, _ = write_runs(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    jobs = [ctx.Process(target=_merge_many, args=(str(dirs[0]), name, 100, start)) for name in ("knn", "linear")]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0, 0]
    data = read_results(dirs[0])
    half = next(r for r in data["subnets"] if r["subnet"] == "w0p5_d1-1-1-1")
    assert set(data["protocols"]) == {"knn", "linear"}
    assert all(f"{name}_{i}" in half for name in ("knn", "linear") for i in range(100))


def test_table_columns_group_fine_tuning_by_fraction(tmp_path, capsys):
    dirs, _ = write_runs(tmp_path)
    merge_results(dirs[1], {"w0p5_d1-1-1-1": {f"finetune_{p}pct_top{k}": 1.0 for p in (10, 1) for k in (5, 1)}},
                  protocol="finetune", settings={})
    assert main(["report", str(dirs[1])]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| subnet"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "subnet", "params", "macs", "knn_top1", "knn_top1_random_init", "finetune_1pct_top1",
        "finetune_1pct_top5", "finetune_10pct_top1", "finetune_10pct_top5"]  # never probed: no linear column


def test_table_shows_the_export_differences_that_verify_checks():
    """``export --verify`` fails on max_rel_diff: its table must not print a failing 2e-6 as 0.00."""
    from slimssl.report.table import markdown_table

    table = markdown_table([{"subnet": "w0p5", "max_abs_diff": 3.2e-6, "max_rel_diff": 2.1e-6,
                             "onnx_max_rel_diff": 4e-5}])
    assert table.splitlines()[-1].split("|")[2:5] == [" 3.2e-06      ", " 2.1e-06      ", " 4.0e-05           "]


def test_runs_of_one_network_each_joined_into_a_line_are_drawn_by_increasing_macs():
    pytest.importorskip("matplotlib")
    runs = [{"run": f"alone-{m}", "subnets": [{"subnet": "w1p0_d1-1-1-1", "macs": m, "knn_top1": v}]}
            for m, v in ((4e6, 50.0), (1e6, 40.0), (2e6, 45.0))]
    fig = plot_accuracy_vs_macs(runs, "knn_top1", join_singles="alone")
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [1e6, 2e6, 4e6] and list(line.get_ydata()) == [40.0, 45.0, 50.0]


def test_a_runs_table_says_how_each_protocol_measured(tmp_path, capsys):
    """A linear_top1 of a 1-epoch probe reads like one of 100 epochs in the table: the settings follow it."""
    dirs, docs = write_runs(tmp_path)
    protocols = {"knn": {"data": "cifar10", "k": 200, "temperature": 0.1},
                 "linear": {"data": "cifar10", "resolution": 32, "epochs": 1, "lr": 0.1, "augment": False,
                            "train_crop": None},
                 "finetune_1pct": {"recipe": {"epochs": 60, "base_lr": 0.0125}, "crop_ratio": [0.75, 1.5],
                                   "lr": 0.001953125}}
    (dirs[0] / "results.json").write_text(json.dumps({**docs[0], "protocols": protocols}))
    assert main(["report", str(dirs[0])]) == 0
    text = capsys.readouterr().out
    # in results.json's words, not Python's (True, None, {'epochs': ...}); a setting not used (None) left out
    assert "How each protocol measured (`protocols` in results.json): knn: k 200, temperature 0.1; linear: " \
           "epochs 1, lr 0.1, augment false; finetune_1pct: recipe (epochs 60, base_lr 0.0125), crop_ratio " \
           "[0.75, 1.5], lr 0.001953125" in text  # every digit that tells two values apart
    assert main(["report", str(dirs[1])]) == 0  # none recorded: nothing said
    assert "How each protocol measured" not in capsys.readouterr().out


def test_a_full_disk_while_a_plot_is_written_names_the_file_and_keeps_the_earlier_one(tmp_path, monkeypatch, capsys,
                                                                                       caplog):
    import errno

    from matplotlib.figure import Figure

    dirs, _ = write_runs(tmp_path)
    png = tmp_path / "acc.png"
    png.write_bytes(b"the earlier plot")

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file named

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with caplog.at_level(logging.ERROR, logger="slimssl"):
        assert main(["report", *map(str, dirs), "--plot", str(png)]) == 2
    assert f"slimssl report: error: {png}: No space left on device; free space" in caplog.text
    assert png.read_bytes() == b"the earlier plot"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_grad_norm_plot_of_runs_of_which_one_logged_them(tmp_path, capsys):
    dirs, _ = write_runs(tmp_path)
    records = [{"step": s, "loss": 1.0, "grad_norm": {"w1p0_d1-1-1-1": {"shared": 1.0, "rest": 0.5}}}
               for s in range(0, 30, 10)]
    (dirs[0] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "grad.png"
    assert main(["report", *map(str, dirs), "--plot-grad", str(out)]) == 0  # the other run has none: drawn without
    assert out.read_bytes()[:8] == PNG


def test_plot_draws_knn_top1_by_default(tmp_path, capsys, caplog):
    dirs, _ = write_runs(tmp_path)
    png = tmp_path / "acc.png"
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["report", *map(str, dirs), "--plot", str(png)]) == 0
    assert f"wrote {png} (knn_top1 against MACs)" in caplog.text
