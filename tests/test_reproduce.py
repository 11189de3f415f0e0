"""``slimssl reproduce`` on tiny networks and fake data: the report, resuming across calls, refused mismatches."""

from __future__ import annotations

import json
import re
import logging
from pathlib import Path

import pytest
import torch

from slimssl.checkpoint import load_checkpoint
from slimssl.cli import main
from slimssl.config import load_config
from slimssl.reproduce import EXIT_CONTINUE
from slimssl.config import config_differences
from slimssl.config import MACHINE_DEPENDENT
from slimssl.reproduce.report import TIME_RATIO_GOAL, goals

RECIPES = ["cifar10_r18_dspnet_byol", "cifar10_r18_slimclr_mocov2"]
MENU = ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1"]
EPOCHS = 2
STEPS = EPOCHS * 32 // 8  # fake_size 32, batch 8
TINY = ["model.depths=[1,1,1,1]", "model.base_width=4", "menu.widths=[1.0,0.5]", "method.proj_hidden=32",
        "method.proj_dim=16", "method.pred_hidden=32", "method.queue_size=64", "model.bn_group_size=4",
        "data.resolution=8", "data.fake_size=32", "train.precision=fp32", "train.log_every=1", "eval.knn_k=5",
        "eval.batch_size=32"]


def reproduce_args(out: Path, recipes=RECIPES, epochs: int = EPOCHS, extra=()) -> list[str]:
    args = ["reproduce", "--recipes", ",".join(recipes), "--out", str(out), "--data", "fake", "--device", "cpu",
            "--epochs", str(epochs), "--batch-size", "8", "--probe-epochs", "2", *extra]
    for assignment in TINY:
        args += ["--set", assignment]
    return args


def reproduce(out: Path, recipes=RECIPES, epochs: int = EPOCHS, extra=()) -> int:
    return main(reproduce_args(out, recipes, epochs, extra))


def run_dirs(out: Path, recipe: str) -> list[Path]:
    return [out / recipe / "slim", *(out / recipe / f"alone-{name}" for name in MENU)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """Both recipes reproduced in one call without a time budget."""
    out = tmp_path_factory.mktemp("straight")
    assert reproduce(out) == 0
    return out


def test_report_of_a_reproductions_folder_points_to_its_runs(straight, capsys, caplog):
    assert main(["report", str(straight)]) == 2
    assert f"{straight} holds a reproduction, whose runs are its sub-folders: read {straight / 'reproduction.md'}" \
        in capsys.readouterr().err + caplog.text


def test_full_reproduction_writes_the_comparison(straight, capsys):
    doc = json.loads((straight / "reproduction.json").read_text())
    assert doc["complete"] and [r["recipe"] for r in doc["recipes"]] == RECIPES
    assert doc["software"]["torch"] == torch.__version__ and doc["devices"]
    (trained_with,) = doc["pretraining_software"]  # recorded by the runs, for a report written elsewhere later
    assert trained_with.startswith("slimssl ") and f"torch {torch.__version__}" in trained_with
    assert f"- Software of the pretraining: {trained_with}" in (straight / "reproduction.md").read_text()
    for recipe in doc["recipes"]:
        assert [row["subnet"] for row in recipe["rows"]] == MENU
        for row in recipe["rows"]:
            assert row["params"] > 0 and row["macs"] > 0
            for key in ("knn_slim", "knn_alone", "linear_slim", "linear_alone"):
                assert 0 <= row[key] <= 100, (recipe["recipe"], row["subnet"], key)
            assert row["knn_delta"] == pytest.approx(row["knn_slim"] - row["knn_alone"])
        t = recipe["time"]
        assert t["slim_pretrain_seconds"] > 0 and t["alone_pretrain_seconds"] > 0
        assert t["ratio"] == pytest.approx(t["slim_pretrain_seconds"] / t["alone_pretrain_seconds"])
        # (a) is the slimmable run's seconds, (b) the sum of the runs alone, each as its timing.json counts it
        seconds = {run.name: json.loads((run / "timing.json").read_text())["pretrain_seconds"]
                   for run in run_dirs(straight, recipe["recipe"])}
        assert t["slim_pretrain_seconds"] == pytest.approx(seconds.pop("slim"))
        assert len(seconds) == len(MENU) and t["alone_pretrain_seconds"] == pytest.approx(sum(seconds.values()))
        assert len(recipe["goals"]) == 2 * len(MENU) + 1 and all(g["held"] is not None for g in recipe["goals"])
        # every run is an ordinary run directory: config, checkpoint, results with kNN and the probe
        for run in run_dirs(straight, recipe["recipe"]):
            assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
            assert not list((run / "checkpoints").glob("epoch_*.pt"))
            results = json.loads((run / "results.json").read_text())
            assert results["steps"] == STEPS and results["protocols"]["linear"]["epochs"] == 2
            # only the final kNN: periodic ones would take call time (the recipes say every 10 epochs)
            assert results["config"]["train"]["knn_every"] == 0
            timing = json.loads((run / "timing.json").read_text())
            assert timing["step"] == STEPS and timing["chunks"] == EPOCHS and timing["pretrain_seconds"] > 0
            # one call trained it: one first step, timed apart and part of the pretraining seconds
            assert timing["calls"] == 1 and 0 < timing["first_step_seconds"] < timing["pretrain_seconds"]
    text = (straight / "reproduction.md").read_text()
    assert "| subnet | params | MACs | kNN slim | kNN alone | Δ | linear slim | linear alone | Δ |" in text
    assert f"goal: at most {TIME_RATIO_GOAL:.2f}" in text
    assert "| run | steps | pretraining | of which first steps | calls | img/s | device |" in text
    for row in ("slim", *(f"alone-{name}" for name in MENU)):
        assert f"| {row} | {STEPS} | " in text  # each run's steps, seconds and throughput
    assert len(list(straight.glob("*_vs_macs.png"))) == 2 * len(RECIPES)

    # again on the finished folder: nothing retrained, the report rewritten
    ckpt = straight / RECIPES[0] / "slim" / "checkpoints" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    assert reproduce(straight, extra=["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipes"][0]["rows"] == doc["recipes"][0]["rows"]
    assert ckpt.stat().st_mtime_ns == before


def test_resume_across_calls_matches_a_straight_run(straight, tmp_path, capsys):
    recipe = RECIPES[1]  # MoCo v2 with slow start: a queue and a schedule that must continue exactly
    out = tmp_path / "resumed"
    assert reproduce(out, [recipe], extra=["--time-budget", "0", "--json"]) == EXIT_CONTINUE
    status = json.loads(capsys.readouterr().out)
    assert {k: status[k] for k in ("complete", "jobs_done", "jobs_total")} == \
        {"complete": False, "jobs_done": 0, "jobs_total": 3}
    assert [(j["run"], j["pretrained"], j["probed"], j["steps_trained"]) for j in status["jobs"]] == \
        [(f"{recipe}/{d.name}", False, False, STEPS // EPOCHS if d.name == "slim" else 0)
         for d in run_dirs(out, recipe)]  # where each run stands, from its small files
    assert status["jobs"][0]["pretrain_seconds"] > 0
    slim = out / recipe / "slim"
    assert load_checkpoint(slim)["train_state"]["step"] == STEPS // EPOCHS  # one epoch: one unit of work
    calls, code = 1, EXIT_CONTINUE
    while code == EXIT_CONTINUE and calls < 20:
        code = reproduce(out, [recipe], extra=["--time-budget", "0"])
        calls += 1
    assert code == 0
    assert calls == 3 * (EPOCHS + 1)  # per run: an epoch per call, then the probe
    for resumed, reference in zip(run_dirs(out, recipe), run_dirs(straight, recipe)):
        a, b = load_checkpoint(resumed), load_checkpoint(reference)
        assert a["train_state"]["step"] == b["train_state"]["step"] == STEPS
        differ = [k for k in b["model"] if not torch.equal(a["model"][k], b["model"][k])]
        assert not differ, f"{resumed.name} differs from the straight run in {differ[:5]}"
        timing = json.loads((resumed / "timing.json").read_text())
        assert timing["chunks"] == EPOCHS and timing["calls"] == EPOCHS  # an epoch per call: a first step each
    rows = json.loads((out / "reproduction.json").read_text())["recipes"][0]["rows"]
    reference = json.loads((straight / "reproduction.json").read_text())["recipes"][1]["rows"]
    assert [r["subnet"] for r in rows] == MENU
    for got, want in zip(rows, reference):
        for key in ("knn_slim", "knn_alone", "linear_slim", "linear_alone"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["subnet"], key)


def test_results_carried_without_checkpoints_finish_the_reproduction(straight, tmp_path, caplog):
    """Finished runs need only their small files; an unfinished run whose checkpoint is gone starts again."""
    import shutil

    recipe = RECIPES[1]
    out = tmp_path / "carried"
    for _ in range(EPOCHS + 2):  # the slim run (an epoch per call, then its probe), then one epoch of the next
        assert reproduce(out, [recipe], extra=["--time-budget", "0"]) == EXIT_CONTINUE
    slim, partial = run_dirs(out, recipe)[:2]
    finished_files = {name: (slim / name).read_text() for name in ("results.json", "timing.json", "metrics.jsonl")}
    assert json.loads((partial / "timing.json").read_text())["chunks"] == 1
    for run in run_dirs(out, recipe):  # what comes back from a machine without the (large) checkpoints
        shutil.rmtree(run / "checkpoints", ignore_errors=True)

    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert reproduce(out, [recipe]) == 0
    assert f"{recipe}/{partial.name}: not finished and has no checkpoint" in caplog.text
    assert {name: (slim / name).read_text() for name in finished_files} == finished_files  # not retrained
    assert not (slim / "checkpoints").exists()
    timing = json.loads((partial / "timing.json").read_text())
    assert timing["chunks"] == EPOCHS and timing["step"] == STEPS  # counted once, from the restart
    records = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["step"] == 0 for r in records) == 1  # the lost run's log is gone
    rows = json.loads((out / "reproduction.json").read_text())["recipes"][0]["rows"]
    reference = json.loads((straight / "reproduction.json").read_text())["recipes"][1]["rows"]
    for got, want in zip(rows, reference):
        for key in ("knn_slim", "knn_alone", "linear_slim", "linear_alone"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["subnet"], key)


def test_a_run_that_lost_its_checkpoint_starts_again_with_the_settings_of_this_call(tmp_path, caplog):
    """A run that starts again (its checkpoint stayed on another machine) may start with other settings (e.g.
    train.compile for a slow GPU); a run that goes on keeps the settings it was started with."""
    import shutil

    recipe, out = RECIPES[0], tmp_path / "carried"
    assert reproduce(out, [recipe], extra=["--time-budget", "0"]) == EXIT_CONTINUE  # one epoch of the slim run
    slim = out / recipe / "slim"
    changed = ["--time-budget", "0", "--set", "train.seed=1"]
    assert reproduce(out, [recipe], extra=changed) == 2  # it could go on: the change is refused
    assert "holds a run started with other settings" in caplog.text
    assert "train.seed: saved 0, now 1" in caplog.text and "a setting the recipe itself has changed" in caplog.text
    shutil.rmtree(slim / "checkpoints")
    assert reproduce(out, [recipe], extra=changed) == EXIT_CONTINUE
    assert load_config(slim / "config.yaml").train.seed == 1
    assert load_checkpoint(slim)["train_state"]["step"] == STEPS // EPOCHS  # trained from the start again


def test_finished_runs_without_checkpoints_are_never_removed_by_a_call_with_other_settings(straight, tmp_path,
                                                                                          caplog):
    import shutil

    recipe, out = RECIPES[0], tmp_path / "carried"
    shutil.copytree(straight / recipe, out / recipe, ignore=shutil.ignore_patterns("checkpoints"))
    before = {p: p.read_bytes() for p in (out / recipe).rglob("*") if p.is_file()}
    assert reproduce(out, [recipe], extra=["--probe-epochs", "3"]) == 2
    assert "was probed with other settings than this call's" in caplog.text
    assert reproduce(out, [recipe], extra=["--set", "train.seed=1"]) == 2
    assert "holds a run started with other settings" in caplog.text
    assert {p: p.read_bytes() for p in (out / recipe).rglob("*") if p.is_file()} == before


def test_the_report_is_written_and_printed_where_the_locale_lacks_its_characters(straight, tmp_path, ascii_locale):
    """The table's Δ is not in Windows' cp1252 (nor in ASCII): reproduction.md is UTF-8 on every platform, and a
    redirected stdout that cannot encode a character escapes it."""
    import shutil
    import subprocess
    import sys

    out = tmp_path / "copy"
    shutil.copytree(straight, out)
    (out / "reproduction.md").unlink()
    proc = subprocess.run([sys.executable, "-m", "slimssl", *reproduce_args(out)], env=ascii_locale,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert "| kNN alone | Δ |" in (out / "reproduction.md").read_text(encoding="utf-8")
    assert b"| kNN alone | \\u0394 |" in proc.stdout


def test_other_settings_on_an_existing_folder_are_refused(straight, capsys, caplog):
    with caplog.at_level(logging.ERROR, logger="slimssl"):
        assert reproduce(straight, epochs=EPOCHS + 1) == 2
    message = capsys.readouterr().err + caplog.text
    assert "train.epochs: saved 2, now 3" in message and str(straight / RECIPES[0] / "slim") in message


def test_other_probe_settings_on_an_existing_folder_are_refused(straight, capsys, caplog):
    """A run whose checkpoint did not travel cannot be probed again: other probe settings are an error, and
    nothing in the folder changes."""
    before = {p: p.read_text() for p in straight.rglob("*.json")}
    with caplog.at_level(logging.ERROR, logger="slimssl"):
        assert reproduce(straight, extra=["--probe-epochs", "3"]) == 2
    message = capsys.readouterr().err + caplog.text
    assert "probed with other settings" in message and "epochs: saved 2, now 3" in message
    assert {p: p.read_text() for p in straight.rglob("*.json")} == before


def test_a_signal_outside_the_training_loop_exits_3_and_the_next_call_continues(tmp_path, monkeypatch):
    import os
    import signal

    from slimssl.reproduce import run as run_module

    recipe, out = RECIPES[0], tmp_path / "signalled"
    probe = run_module.linear_probe

    def signalled_probe(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler stops the call at once
        return probe(*args, **kwargs)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(run_module, "linear_probe", signalled_probe)
    assert reproduce(out, [recipe]) == 3
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    slim = run_dirs(out, recipe)[0]
    assert json.loads((slim / "results.json").read_text())["steps"] == STEPS  # pretrained, kept
    assert "linear" not in json.loads((slim / "results.json").read_text()).get("protocols", {})
    monkeypatch.undo()
    assert reproduce(out, [recipe]) == 0


def test_a_signal_while_a_checkpoint_is_read_stops_the_call_and_blames_no_file(tmp_path, monkeypatch, capsys,
                                                                             caplog):
    """A stop signal inside a reader that takes any Exception for a bad file (torch.load of the probe's checkpoint)
    still exits 3, without calling the checkpoint unreadable; the next call removes what killed writes left."""
    import os
    import signal

    recipe, out = RECIPES[0], tmp_path / "reading"
    load = torch.load

    def signalled_load(path, *args, **kwargs):
        if str(path).endswith("last.pt"):
            os.kill(os.getpid(), signal.SIGTERM)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", signalled_load)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert reproduce(out, [recipe]) == 3
    assert "not a readable slimssl checkpoint" not in capsys.readouterr().err + caplog.text
    monkeypatch.undo()
    slim = run_dirs(out, recipe)[0]
    left = [slim / "checkpoints" / ".last.pt.k1ll.tmp", slim / ".timing.json.k1ll.tmp",
            out / ".reproduction.json.k1ll.tmp"]
    for path in left:  # as a SIGKILL inside atomic_write leaves them
        path.write_bytes(b"half")
    (out / ".notes.k1ll.tmp").write_text("the user's")  # not a file the reproduction writes: kept
    assert reproduce(out, [recipe]) == 0
    assert not any(path.exists() for path in left) and (out / ".notes.k1ll.tmp").exists()


def test_a_second_reproduction_in_the_same_folder_is_refused_before_it_touches_a_run(tmp_path, capsys, caplog):
    """Planning restarts runs whose checkpoint is gone and removes killed writes: a second call in the same
    --out would do that to the first one's runs in progress."""
    from test_fault_tolerance import HeldByAnotherProcess

    out = tmp_path / "busy"
    out.mkdir()
    other = HeldByAnotherProcess(out)
    try:
        with caplog.at_level(logging.ERROR, logger="slimssl"):
            assert reproduce(out, [RECIPES[0]]) == 2
    finally:
        other.kill()
    assert f"is training in {out} now" in capsys.readouterr().err + caplog.text
    assert [p.name for p in out.iterdir()] == [".train.lock"]
    # a run of the reproduction that `slimssl pretrain` trains now, in its first epoch: not taken for leftovers
    slim = run_dirs(out, RECIPES[0])[0]
    slim.mkdir(parents=True)
    (slim / "config.yaml").write_text("name: in training\n")
    (slim / "metrics.jsonl").write_text("{}\n")
    other = HeldByAnotherProcess(slim)
    try:
        assert reproduce(out, [RECIPES[0]]) == 2
    finally:
        other.kill()
    assert (slim / "config.yaml").read_text() == "name: in training\n" and (slim / "metrics.jsonl").exists()


def test_a_sandwich_that_never_trains_some_entries_is_refused_before_any_run(tmp_path, capsys, caplog):
    """Training refuses it; a reproduction refuses it while planning, not hours later when its run's turn comes.
    A folder it made for nothing is removed."""
    out = tmp_path / "new"
    args = reproduce_args(out, [RECIPES[1], RECIPES[0]]) + ["--set", "menu.widths=[1.0,0.5,0.25]", "--set",
                                                             "slim.sampling=sandwich", "--set", "slim.num_random=0"]
    with caplog.at_level(logging.ERROR, logger="slimssl"):
        assert main(args) == 2
    assert "w0p5_d1-1-1-1 would never be trained" in capsys.readouterr().err + caplog.text
    assert not out.exists()


def test_steps_lost_to_a_hard_stop_are_not_timed(tmp_path, monkeypatch, caplog):
    """A second signal inside a step stops without saving: timing.json keeps the seconds of the saved steps
    only, so the steps trained again are counted once."""
    from slimssl.train.loop import Trainer

    recipe, out = RECIPES[0], tmp_path / "hard"
    step_once = Trainer.train_step

    def stopped(self, step):
        if step == STEPS // EPOCHS + 1:  # in the second epoch, after the first epoch's checkpoint
            raise KeyboardInterrupt
        return step_once(self, step)

    monkeypatch.setattr(Trainer, "train_step", stopped)
    assert reproduce(out, [recipe]) == 3
    slim = run_dirs(out, recipe)[0]
    timing = json.loads((slim / "timing.json").read_text())
    assert timing["step"] == load_checkpoint(slim / "checkpoints" / "last.pt")["train_state"]["step"] == STEPS // EPOCHS
    assert timing["chunks"] == 1
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert reproduce(out, [recipe]) == 0
    assert "timing.json reached step" not in caplog.text
    assert json.loads((slim / "timing.json").read_text())["chunks"] == EPOCHS


def test_a_kill_after_the_last_checkpoint_keeps_the_seconds_of_its_steps(tmp_path, monkeypatch, caplog):
    """Killed in the final kNN, after last.pt: the seconds of the saved steps were counted with it."""
    from slimssl.train.loop import Trainer

    recipe, out = RECIPES[0], tmp_path / "late"
    knn_once = Trainer.knn

    def killed(self):
        if self.state.step == self.total_steps:
            raise KeyboardInterrupt
        return knn_once(self)

    monkeypatch.setattr(Trainer, "knn", killed)
    assert reproduce(out, [recipe]) == 3
    slim = run_dirs(out, recipe)[0]
    timing = json.loads((slim / "timing.json").read_text())
    assert timing["step"] == load_checkpoint(slim / "checkpoints" / "last.pt")["train_state"]["step"] == STEPS
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert reproduce(out, [recipe]) == 0
    assert "timing.json reached step" not in caplog.text


def test_a_stop_signal_during_an_epochs_checkpoint_stops_the_call(tmp_path, monkeypatch):
    import os
    import signal

    from slimssl.train.loop import Trainer

    recipe, out = RECIPES[0], tmp_path / "signalled"
    assert reproduce(out, [RECIPES[1]]) == 0 and (out / "reproduction.md").is_file()  # an earlier, finished call
    assert list(out.glob("*_vs_macs.png"))
    (out / "acc_vs_macs.png").write_bytes(b"a plot of the user's own (slimssl report --plot)")
    save_once = Trainer.save

    def signalled(self, name="last.pt", any_rank=False):
        if self.state.step == STEPS // EPOCHS:  # the first epoch's checkpoint, the end of the call's first unit
            os.kill(os.getpid(), signal.SIGTERM)
        return save_once(self, name, any_rank)

    monkeypatch.setattr(Trainer, "save", signalled)
    assert reproduce(out, [RECIPES[1], recipe]) == 3  # not forgotten by the next unit, which would train on
    assert not (out / "reproduction.md").exists()  # the earlier call's report would look current
    assert [p.name for p in out.glob("*_vs_macs.png")] == ["acc_vs_macs.png"]  # and so would its plots
    slim = run_dirs(out, recipe)[0]
    assert load_checkpoint(slim / "checkpoints" / "last.pt")["train_state"]["step"] == STEPS // EPOCHS
    assert json.loads((slim / "timing.json").read_text())["step"] == STEPS // EPOCHS
    (out / "reproduction.md").write_text("my notes")  # not a reproduction's: kept by the next call that stops
    monkeypatch.undo()
    assert reproduce(out, [RECIPES[1], recipe], extra=["--time-budget", "0"]) == EXIT_CONTINUE
    assert (out / "reproduction.md").read_text() == "my notes" and (out / "acc_vs_macs.png").is_file()


def test_bad_data_met_mid_run_saves_the_steps_trained_in_a_timed_run_too(tmp_path, monkeypatch):
    from slimssl.data.files import DataError
    from slimssl.reproduce.timing import TimedTrainer
    from slimssl.train.loop import Trainer

    step_once = Trainer.train_step

    def unreadable(self, step):
        if step == 2:
            raise DataError("cannot decode some/file.png")
        return step_once(self, step)

    monkeypatch.setattr(Trainer, "train_step", unreadable)
    cfg = load_config(RECIPES[0], [*TINY, "data.source=fake", "train.device=cpu", "train.batch_size=8"])
    trainer = TimedTrainer(cfg, tmp_path / "run")
    with pytest.raises(DataError, match="the 2 steps trained so far are saved"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["train_state"]["step"] == 2


def test_only_machine_dependent_defaults_may_differ_on_resume():
    saved = load_config(RECIPES[0], ["data.workers=8"])
    now = load_config(RECIPES[0], ["data.workers=2"])
    assert config_differences(saved, now, ignore=MACHINE_DEPENDENT) == []
    assert config_differences(saved, now) == ["data.workers: saved 8, now 2"]
    assert config_differences(saved, load_config(RECIPES[0], ["data.workers=2", "train.batch_size=256"]),
                              ignore=MACHINE_DEPENDENT) == ["train.batch_size: saved 512, now 256"]


def test_goals_say_by_how_much_they_miss():
    rows = [{"subnet": "w1p0", "knn_slim": 89.0, "knn_alone": 90.5, "linear_slim": 92.0, "linear_alone": 92.5},
            {"subnet": "w0p5", "knn_slim": 80.0, "knn_alone": 81.0, "linear_slim": 88.0, "linear_alone": 87.0}]
    result = {(g["goal"].split(":")[0], g["subnet"]): g for g in goals(rows, 0.7)}
    assert result[("knn", "w1p0")]["held"] is False and result[("knn", "w1p0")]["short_by"] == pytest.approx(0.5)
    assert result[("linear", "w1p0")]["held"] is True and result[("linear", "w1p0")]["short_by"] == 0
    assert result[("knn", "w0p5")]["short_by"] == pytest.approx(1.0)
    assert result[("linear", "w0p5")]["held"] is True
    time_goal = result[(f"pretraining time slimmable / one-by-one <= {TIME_RATIO_GOAL:.2f}", None)]
    assert time_goal["held"] is False and time_goal["short_by"] == pytest.approx(0.1)
    assert goals(rows, None)[-1]["held"] is None  # not measured is not "held"
    # exactly 1 point behind, in float32 percentages as kNN gives them (80.05 and 81.05 are 80.0499954 and 81.0500030)
    f32 = [float(torch.tensor(c, dtype=torch.float32) / 10000 * 100) for c in (8005, 8105)]
    edge = [{**rows[0], "knn_slim": f32[0], "knn_alone": f32[1]}, rows[1]]
    assert goals(edge, 0.5)[0]["held"] is True and goals(edge, 0.5)[0]["short_by"] == 0


def test_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    import slimssl.report.plot as plot
    from slimssl.reproduce.report import plot_recipe

    def no_matplotlib(*args, **kwargs):
        raise plot.PlotError("plotting needs matplotlib: pip install 'matplotlib>=3.6' (the plot extra)")

    monkeypatch.setattr(plot, "_figure", no_matplotlib)
    rows = [{"subnet": "w1p0", "macs": 100, "knn_slim": 50.0, "knn_alone": 51.0, "linear_slim": 60.0,
             "linear_alone": 61.0}]
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert plot_recipe({"recipe": "r", "rows": rows}, tmp_path) == []
    assert "needs matplotlib" in caplog.text and not list(tmp_path.iterdir())


@pytest.mark.parametrize("damaged, expected", [("config.yaml", "is not valid YAML"),
                                               ("timing.json", "is not a readable timing record"),
                                               ("results.json", "is not readable JSON")])
def test_a_damaged_file_of_an_earlier_call_is_named(straight, tmp_path, damaged, expected, capsys, caplog):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(straight / RECIPES[0], out / RECIPES[0])
    path = out / RECIPES[0] / "slim" / damaged
    path.write_text("{ [ not what it was")
    assert reproduce(out, [RECIPES[0]]) == 2
    message = capsys.readouterr().err + caplog.text
    assert str(path) in message and expected in message and "Traceback" not in message


def test_a_run_whose_config_yaml_says_slow_start_lr_0_is_read_as_it_trained(straight, tmp_path, capsys):
    """Before 0 was refused, slow_start_lr 0 was read as null: a reproduction whose runs wrote it continues."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(straight / RECIPES[1], out / RECIPES[1])
    path = out / RECIPES[1] / "slim" / "config.yaml"
    assert "slow_start_lr: null" in path.read_text()
    path.write_text(path.read_text().replace("slow_start_lr: null", "slow_start_lr: 0"))
    assert reproduce(out, [RECIPES[1]]) == 0, capsys.readouterr().err
    assert (out / "reproduction.md").is_file()


def test_a_run_measured_again_with_other_knn_settings_is_not_compared(straight, tmp_path, caplog):
    """Runs in --out are ordinary run directories: `slimssl knn RUN --k 3` may have measured one again since.
    The report refuses to compare it with the others (it used to, under a header naming the recipe's k)."""
    import shutil

    import slimssl

    out = tmp_path / "copy"
    shutil.copytree(straight / RECIPES[0], out / RECIPES[0])
    text = (straight / "reproduction.md").read_text()
    assert "kNN k=5, T=0.1, centre crop ratio 1.0." in text and "at 8 px (MACs per image at that size)" in text
    slimssl.knn(out / RECIPES[0] / "slim", k=3, device="cpu")
    assert reproduce(out, [RECIPES[0]]) == 2
    assert f"{RECIPES[0]}: the kNN numbers of its runs do not compare" in caplog.text
    assert "'k': 3" in caplog.text and "measure each run again alike (slimssl knn RUN" in caplog.text
    slimssl.knn(out / RECIPES[0] / "slim", device="cpu")  # measured again with its defaults: compared again
    assert reproduce(out, [RECIPES[0]]) == 0


def test_times_that_do_not_cover_the_runs_or_mix_devices_give_the_time_goal_no_verdict(straight, tmp_path, caplog):
    """A run copied without its timing.json counted 0 s, and the time goal read "held" at a ratio of 0.00."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(straight / RECIPES[0], out / RECIPES[0])
    slim, alone = run_dirs(out, RECIPES[0])[:2]
    (slim / "timing.json").unlink()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert reproduce(out, [RECIPES[0]]) == 0
    assert f"the pretraining times are not compared: timing.json covers fewer steps than the run trained: " \
           f"{RECIPES[0]}/slim (0 of {STEPS} steps)" in caplog.text
    doc = json.loads((out / "reproduction.json").read_text())
    time_goal = doc["recipes"][0]["goals"][-1]
    assert time_goal["goal"].startswith("pretraining time") and time_goal["held"] is None
    assert not doc["all_goals_held"]
    text = (out / "reproduction.md").read_text()
    assert "**not compared**: timing.json covers fewer steps" in text and "All goals hold" not in text

    shutil.copy(straight / RECIPES[0] / "slim" / "timing.json", slim / "timing.json")
    timing = json.loads((alone / "timing.json").read_text())
    (alone / "timing.json").write_text(json.dumps({**timing, "devices": ["NVIDIA H200"]}))
    assert reproduce(out, [RECIPES[0]]) == 0
    doc = json.loads((out / "reproduction.json").read_text())
    assert doc["recipes"][0]["goals"][-1]["held"] is None
    assert "pretrained on different devices" in doc["recipes"][0]["time"]["not_compared"]
    (alone / "timing.json").write_text(json.dumps({**timing, "steps_not_timed": 2}))  # trained, never timed
    assert reproduce(out, [RECIPES[0]]) == 0
    assert f"{RECIPES[0]}/{alone.name} ({STEPS - 2} of {STEPS} steps)" in \
        json.loads((out / "reproduction.json").read_text())["recipes"][0]["time"]["not_compared"]


def test_a_goal_without_a_verdict_keeps_all_goals_from_holding(straight, tmp_path, monkeypatch):
    """Every other goal held, the time goal without a verdict (not compared): not "all goals hold"."""
    import shutil

    import slimssl.reproduce.report as report

    out = tmp_path / "copy"
    shutil.copytree(straight / RECIPES[0], out / RECIPES[0])
    real = report.goals
    monkeypatch.setattr(report, "goals", lambda rows, ratio: [
        {**g, "held": None if g["goal"].startswith("pretraining time") else True} for g in real(rows, ratio)])
    assert reproduce(out, [RECIPES[0]]) == 0
    doc = json.loads((out / "reproduction.json").read_text())
    assert not doc["all_goals_held"] and "All goals hold" not in (out / "reproduction.md").read_text()


def test_steps_saved_but_never_timed_are_counted_and_the_time_goal_says_so(tmp_path):
    """A call killed between a checkpoint and its timing write leaves steps trained that no seconds cover."""
    out = tmp_path / "untimed"
    assert reproduce(out, [RECIPES[0]], extra=["--time-budget", "0"]) == EXIT_CONTINUE  # the slim run's first epoch
    slim = run_dirs(out, RECIPES[0])[0]
    timing = json.loads((slim / "timing.json").read_text())
    (slim / "timing.json").write_text(json.dumps({**timing, "step": 0, "pretrain_seconds": 0.0}))  # as if killed
    assert reproduce(out, [RECIPES[0]]) == 0
    assert json.loads((slim / "timing.json").read_text())["steps_not_timed"] == STEPS // EPOCHS
    doc = json.loads((out / "reproduction.json").read_text())
    assert f"{RECIPES[0]}/slim ({STEPS - STEPS // EPOCHS} of {STEPS} steps)" in doc["recipes"][0]["time"]["not_compared"]


def test_a_probe_records_what_the_linear_command_records(straight, tmp_path):
    """The reproduction's probe is `slimssl linear RUN --epochs N` with its defaults: a run probed either way
    holds the same settings, so the reproduction counts a run probed by the command as probed."""
    import shutil

    import slimssl

    run = tmp_path / "slim"
    shutil.copytree(straight / RECIPES[1] / "slim", run)
    by_reproduce = json.loads((run / "results.json").read_text())["protocols"]["linear"]
    slimssl.linear_probe(run, epochs=2, device="cpu", data="fake")
    by_command = json.loads((run / "results.json").read_text())["protocols"]["linear"]
    assert by_command == by_reproduce


@pytest.mark.parametrize("layout, expected", [
    ("split", "the train split of '.*' has no labels \\(no class sub-folders, or none registered\\)"),
    ("classes", "cannot use --data '.*': .* has no train/ and test/ \\(or val/\\) sub-folders"),
])
def test_data_the_evaluation_cannot_use_is_refused_before_any_pretraining(tmp_path, layout, expected, caplog):
    from PIL import Image

    data = tmp_path / "data"
    folders = ["train", "test"] if layout == "split" else ["a", "b"]  # unlabelled splits; classes, no test split
    for folder in folders:
        (data / folder).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(data / folder / f"{i}.png")
    out = tmp_path / "out"
    args = ["reproduce", "--recipes", RECIPES[0], "--out", str(out), "--data", str(data), "--device", "cpu"]
    assert main(args) == 2
    assert re.search(expected, caplog.text)
    assert not any(out.rglob("*.pt")) and not any(out.rglob("metrics.jsonl"))  # nothing was trained


@pytest.mark.parametrize("test_split, expected", [
    (False, "cannot use --data 'mine': dataset 'mine' was registered without a test split"),
    (True, "the train split of 'mine' has no labels"),
])
def test_registered_images_the_evaluation_cannot_use_are_refused_before_any_pretraining(tmp_path, test_split,
                                                                                         expected, caplog):
    import numpy as np

    import slimssl

    images, labels = np.zeros((16, 8, 8, 3), np.uint8), np.arange(16) % 2
    if test_split:  # unlabelled splits
        slimssl.register_dataset("mine", images, test=images)
    else:
        slimssl.register_dataset("mine", (images, labels))
    out = tmp_path / "out"
    try:
        assert main(["reproduce", "--recipes", RECIPES[0], "--out", str(out), "--data", "mine", "--device",
                     "cpu"]) == 2
    finally:
        slimssl.unregister_dataset("mine")
    assert expected in caplog.text
    assert not any(out.rglob("*.pt")) and not any(out.rglob("metrics.jsonl"))  # nothing was trained


@pytest.mark.parametrize("recipes", [["cifar10_r18_dspnet_byol,cifar10_r18_slimclr_mocov2"],
                                     ["cifar10_r18_dspnet_byol", "cifar10_r18_slimclr_mocov2"]])
def test_a_setting_a_later_recipe_cannot_train_with_is_refused_before_anything_trains(tmp_path, capsys, caplog,
                                                                                      recipes):
    """At batch 64, MoCo v2's BatchNorm groups of 64 leave shuffle-BN one group: refused by the first call, naming
    the run, rather than after the BYOL runs trained (with a folder that then refuses the fixed settings). The
    recipes may be comma- or space-separated."""
    out = tmp_path / "out"
    assert main(["reproduce", "--data", "fake", "--out", str(out), "--batch-size", "64", "--recipes", *recipes]) == 2
    text = capsys.readouterr().err + caplog.text
    assert "of cifar10_r18_slimclr_mocov2/slim" in text and "method.shuffle_bn needs" in text
    assert "smaller than the per-process batch 64 that divides it (e.g. 8, 16, 32)" in text
    assert not any(out.rglob("metrics.jsonl"))  # nothing trained


def test_timing_counts_up_to_the_checkpoints_step_and_each_device_once(caplog):
    from slimssl.reproduce.timing import JobTiming

    timing = JobTiming(pretrain_seconds=10.0, step=8)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        timing.align_to(4, "r/slim")  # an older slimssl counted steps the next call trains again
    assert (timing.pretrain_seconds, timing.step) == (5.0, 4) and "scaled by 0.500" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        timing.align_to(6, "r/slim")  # saved, never timed: counted as such
    assert (timing.steps_not_timed, timing.step) == (2, 6) and "are not counted" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        timing.align_to(6, "r/slim")  # aligned already: nothing to say, nothing counted twice
    assert caplog.text == "" and (timing.pretrain_seconds, timing.steps_not_timed) == (5.0, 2)
    for device in ("H100", "H100", "CPU"):
        timing.note_call(device, "torch 2.11")
    assert (timing.devices, timing.software) == (["H100", "CPU"], ["torch 2.11"])


def test_a_reproduction_is_not_made_in_or_inside_a_run(straight, capsys, caplog):
    run = straight / RECIPES[0] / "slim"
    for out, said in ((run, "is a run directory"), (run / "more", f"is inside the run {run.resolve()}")):
        assert reproduce(out, [RECIPES[0]]) == 2
        assert f"{said} (checkpoints/last.pt); a reproduction's runs go in a folder of their own" in \
            capsys.readouterr().err + caplog.text
    assert not (run / "more").exists()


def test_timing_aligned_at_its_own_step_says_nothing_and_not_timed_steps_add_up(caplog):
    from slimssl.reproduce.timing import JobTiming

    timing = JobTiming(pretrain_seconds=10.0, step=8, steps_not_timed=2)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        timing.align_to(8, "r/slim")
    assert caplog.text == "" and (timing.pretrain_seconds, timing.step, timing.steps_not_timed) == (10.0, 8, 2)
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        timing.align_to(11, "r/slim")
    assert timing.steps_not_timed == 5 and "are not counted" in caplog.text


def test_an_earlier_report_names_no_file_to_remove_but_its_own_plots(tmp_path):
    """A reproduction.json copied from elsewhere, or written by hand, may list any file among its plots: only files
    named as a reproduction names its plots go with it."""
    from slimssl.reproduce.command import _remove_earlier_report

    (tmp_path / "my_notes.txt").write_text("the user's own")
    (tmp_path / "demo_knn_top1_vs_macs.png").write_bytes(b"a plot")
    (tmp_path / "reproduction.json").write_text(json.dumps({"complete": True, "recipes": [
        {"recipe": "demo", "plots": ["my_notes.txt", "demo_knn_top1_vs_macs.png", ["not", "a", "name"]]}]}))
    _remove_earlier_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_notes.txt"]
