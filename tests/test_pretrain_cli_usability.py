"""`slimssl pretrain` as a user meets it: relative --data paths, a folder named like a shipped config, a retry
after a run that failed before its first checkpoint, --json when stopped early, and --resume's messages."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import slimssl
from slimssl.checkpoint import load_checkpoint
from slimssl.cli import main
from slimssl.wording import shell_quote
from slimssl.config import PACKAGED, ConfigError, config_from_dict, find_config, load_config
from slimssl.train.loop import NonFiniteLossError, Trainer
from slimssl.train.signals import EXIT_INTERRUPTED
from slimssl.train.prepare import prepare_run
from test_pretrain import tiny as tiny_recipe

DIVERGE = "optim.lr=1e12"  # the loss is NaN within the first two steps


def tiny() -> dict:
    """A fresh tiny BYOL recipe, widths 1 and 0.5: 32 fake images in batches of 8, 4 steps per epoch, 8 in all."""
    return tiny_recipe("byol", widths=[1.0, 0.5])


TINY = tiny()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSSL_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def error_text(capsys, caplog) -> str:
    return capsys.readouterr().err + caplog.text


def image_folder(root: Path, per_class: int = 8) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 20, 40 if c == "a" else 200, 90)).save(root / c / f"{i}.png")
    return root


def saved_source(run: Path) -> str:
    return load_checkpoint(run)["config"].data.source


# ---- 1. a relative --data path is stored absolute ------------------------------------------------------

def test_relative_data_path_is_stored_absolute_and_resumes_from_anywhere(tmp_path, config, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    data = image_folder(work / "tiny")
    image_folder(elsewhere / "tiny", per_class=1)  # same name, other images (too few for a batch)
    run = tmp_path / "run"
    monkeypatch.chdir(work)
    assert main(["pretrain", "--config", str(config), "--data", "tiny", "--out", str(run), "--max-steps", "1"]) == 0
    assert saved_source(run) == str(data)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["source"] == str(data)
    # from another working directory, without --data: the same folder, not the one named alike here
    monkeypatch.chdir(elsewhere)
    assert main(["pretrain", "--resume", str(run), "--max-steps", "2"]) == 0
    assert saved_source(run) == str(data) and load_checkpoint(run)["train_state"]["step"] == 2
    # the same relative --data from the original directory is the same source: no "config differs"
    monkeypatch.chdir(work)
    assert main(["pretrain", "--resume", str(run), "--data", "tiny", "--max-steps", "3"]) == 0
    assert saved_source(run) == str(data) and load_checkpoint(run)["train_state"]["step"] == 3


def test_builtin_names_and_missing_paths_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake").mkdir()  # a folder named like a built-in dataset: the name still means the dataset
    cfg = prepare_run(tiny(), tmp_path / "a").cfg
    assert cfg.data.source == "fake"
    given = config_from_dict({**tiny(), "data": {**TINY["data"], "source": "./tiny.zip"}})
    (tmp_path / "tiny.zip").write_bytes(b"")
    cfg = prepare_run(given, tmp_path / "b").cfg
    assert cfg.data.source == str(tmp_path / "tiny.zip")
    assert given.data.source == "./tiny.zip"  # the caller's Config is left alone
    cfg = prepare_run(tiny(), tmp_path / "c", overrides=["data.source=missing"]).cfg
    assert cfg.data.source == "missing"  # the error at load time names it as the user wrote it


def test_a_missing_data_path_is_said_before_a_run_folder_is_made(tmp_path, config, capsys, caplog):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--data", str(tmp_path / "nowhere"), "--out", str(run)]) == 2
    assert "is neither a known dataset name" in error_text(capsys, caplog)
    assert not run.exists() and "removed what this run had written" not in caplog.text


def test_a_data_folder_whose_name_reads_as_yaml_is_the_folder_and_python_takes_the_flags_as_keywords(tmp_path,
                                                                                                      config):
    data = image_folder(tmp_path / "set #1 📷")  # unquoted YAML would end the name at " #", read "2024" as a number
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--data", str(data), "--out", str(run), "--max-steps", "1"]) == 0
    assert saved_source(run) == str(data)
    numbered = image_folder(tmp_path / "2024")
    done = slimssl.pretrain(config, tmp_path / "py", data=numbered, epochs=3, batch_size=16, device="cpu",
                            overrides=["train.batch_size=4"], max_steps=1)  # the keyword wins over the override
    saved = yaml.safe_load((tmp_path / "py" / "config.yaml").read_text())
    assert (saved["data"]["source"], saved["train"]["epochs"], saved["train"]["batch_size"], saved["train"]["device"]) \
        == (str(numbered), 3, 16, "cpu")
    assert repr(done) == f"PretrainRun(run_dir={str(tmp_path / 'py')!r}, step=1/3)"  # 16 images: 1 step an epoch
    supernet, cfg = done.load_supernet()
    assert cfg.train.epochs == 3 and supernet.menu.names == cfg.subnet_menu().names
    for keyword, bad, expected in (("epochs", 0, "an int >= 1"), ("batch_size", 2.5, "an int >= 1"),
                                   ("seed", 1.5, "an int that fits 64 bits")):
        with pytest.raises(slimssl.UsageError, match=f"^{keyword} must be {expected}, got {bad}$"):
            slimssl.pretrain(config, tmp_path / "bad", **{keyword: bad})
    with pytest.raises(ConfigError, match=r"train.batch_size: Input should be greater than or equal to 2"):
        slimssl.pretrain(config, tmp_path / "bad", batch_size=1)  # the config's own bound
    assert not (tmp_path / "bad").exists()


def test_batch_size_has_a_flag_that_wins_over_set(tmp_path, config):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--set", "train.batch_size=4",
                 "--batch-size", "16", "--max-steps", "1"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 16


def test_the_seed_has_a_flag_and_a_keyword_that_win_over_set(tmp_path, config, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--set", "train.seed=4", "--seed", "7",
                 "--max-steps", "1"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 7
    done = slimssl.pretrain(config, tmp_path / "py", overrides=["train.seed=4"], seed=2**63 - 1, max_steps=1)
    assert done.load_supernet()[1].train.seed == 2**63 - 1
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", str(config), "--seed", "1.5"])
    assert "--seed: expected an integer that fits 64 bits" in capsys.readouterr().err


def test_a_run_directory_inside_the_dataset_is_refused(tmp_path, config, capsys, caplog):
    """Its checkpoints/ and tb/ would become classes of the next run on that folder."""
    data = image_folder(tmp_path / "images")
    for out in (data, data / "runs" / "r1"):
        assert main(["pretrain", "--config", str(config), "--data", str(data), "--out", str(out)]) == 2
        assert f"{out} is inside the dataset {data}: the run's files" in error_text(capsys, caplog)
    assert sorted(p.name for p in data.iterdir()) == ["a", "b"]
    assert main(["pretrain", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1"]) == 0  # beside it: fine


def test_a_resume_or_a_reproduction_in_the_dataset_is_refused(tmp_path, config, capsys, caplog):
    """As pretrain --out: a resume given --data around its run, or reproduce --out inside its --data."""
    run = tmp_path / "d" / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--max-steps", "1"]) == 0
    data = image_folder(tmp_path / "d")  # the run's folder now lies in a dataset
    assert main(["pretrain", "--resume", str(run), "--data", str(data)]) == 2
    assert f"{run} is inside the dataset {data}: the run's files" in error_text(capsys, caplog)
    data = image_folder(tmp_path / "images")
    assert main(["reproduce", "--recipes", str(config), "--data", str(data), "--out", str(data / "rep"),
                 "--epochs", "1", "--device", "cpu"]) == 2
    assert f"{data / 'rep' / 'tiny' / 'slim'} is inside the dataset {data}" in error_text(capsys, caplog)
    assert sorted(p.name for p in data.iterdir()) == ["a", "b"]


def test_a_run_finished_by_a_resume_that_lowered_its_epochs_has_results_that_are_not_stale(tmp_path, config, caplog):
    """Stopped at epoch 3 of 4, then resumed with 2 epochs, it ends at once: results.json describes epoch 3, the
    last checkpoint, and neither report nor a budget export says otherwise, before or after a new kNN."""
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--epochs", "4", "--max-steps", "12"]) == 0
    assert main(["pretrain", "--resume", str(run), "--epochs", "2"]) == 0
    for again in ([], ["knn", str(run)]):
        if again:
            assert main(again) == 0
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="slimssl"):
            assert main(["report", str(run)]) == 0
            assert main(["export", str(run), "--max-macs", "1G", "--out", str(tmp_path / "e"), "--overwrite"]) == 0
        assert "earlier epoch" not in caplog.text, again


def test_a_finished_run_says_where_it_is_and_what_comes_next(tmp_path, config, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["pretrain", "--config", str(config), "--out", str(run), "--set", "train.epochs=1"]) == 0
    where = shell_quote(run)
    assert f"done: the run is in {where} (results.json, checkpoints/last.pt); next: slimssl linear {where}, " \
           f"slimssl export {where} --all --out DIR, slimssl report {where}" in caplog.text
    # no kNN asked for: the run's (labelled) data still serves the probe
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "r2"), "--set", "train.epochs=1",
                     "train.knn=false"]) == 0
    assert f"next: slimssl linear {shell_quote(tmp_path / 'r2')}, slimssl export" in caplog.text
    # a run whose data gave no kNN (no test split) is probed on data given to the probe
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "r3"), "--set", "train.epochs=1",
                     "--data", str(image_folder(tmp_path / "images"))]) == 0
    assert f"next: slimssl linear {shell_quote(tmp_path / 'r3')} --data DATA (labelled, with a test split" \
        in caplog.text


# ---- 2. a folder named like a shipped config -----------------------------------------------------------

def test_a_folder_named_like_a_shipped_config_does_not_hide_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # as `slimssl pretrain --out demo` makes it
    assert find_config("demo") == Path(str(PACKAGED / "demo.yaml"))
    assert main(["config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == load_config(PACKAGED / "demo.yaml").model_dump(mode="json")
    cfg = prepare_run(None, tmp_path / "run").cfg  # `slimssl pretrain` without --config
    assert cfg == load_config(PACKAGED / "demo.yaml")
    # a path to a folder is still refused, shipped name or not
    for folder in (tmp_path / "demo", tmp_path / "other"):
        folder.mkdir(exist_ok=True)
        with pytest.raises(ConfigError, match="is a directory; expected a YAML file"):
            find_config(folder)


def test_a_missing_path_is_refused_not_read_as_the_shipped_config_of_its_name(tmp_path, monkeypatch):
    """`--config configs/demo.yaml` from a folder without it used to train the shipped demo without a word."""
    monkeypatch.chdir(tmp_path)
    for missing in ("configs/demo.yaml", "my/demo"):
        with pytest.raises(ConfigError, match=rf"config file '{missing}' does not exist \(the shipped one of that "
                                              r"name is 'demo(\.yaml)?', without a folder\); shipped configs: "):
            find_config(missing)
    assert find_config("demo.yaml") == Path(str(PACKAGED / "demo.yaml"))  # a bare name is still the shipped one
    with pytest.raises(ConfigError, match=r"config file 'demo.yml' does not exist \(did you mean demo\?\); shipped "
                                          r"configs: "):
        find_config("demo.yml")


# ---- 3. a run that fails before its first checkpoint can be retried in the same folder -----------------

def test_a_run_failing_before_its_first_checkpoint_leaves_the_folder_reusable(tmp_path, config):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError):
        slimssl.pretrain(config, run, overrides=[DIVERGE])
    assert not run.exists()  # made by the call, emptied, removed
    # a folder that was there keeps what it held
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(NonFiniteLossError):
        slimssl.pretrain(config, kept, overrides=[DIVERGE])
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    # the obvious retry works
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--max-steps", "1"]) == 0
    assert load_checkpoint(run)["train_state"]["step"] == 1


def test_a_failure_after_a_checkpoint_removes_nothing(tmp_path, config):
    run = tmp_path / "run"
    slimssl.pretrain(config, run, max_steps=1)
    before = {p.name for p in run.iterdir()}
    last = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(NonFiniteLossError):
        slimssl.pretrain(out=run, resume=True, overrides=[DIVERGE])
    assert {p.name for p in run.iterdir()} == before
    assert (run / "checkpoints" / "last.pt").read_bytes() == last


# ---- 4. --json prints one document whenever the command succeeds --------------------------------------

def test_json_when_stopped_early_and_when_interrupted(tmp_path, config, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--max-steps", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"run_dir": str(run), "finished": False, "step": 1, "total_steps": 8, "subnets": []}

    original = Trainer.train_step

    def train_step(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert main(["pretrain", "--resume", str(run), "--json"]) == EXIT_INTERRUPTED
    doc = json.loads(capsys.readouterr().out)
    assert (doc["finished"], doc["step"], doc["total_steps"], doc["subnets"]) == (False, 3, 8, [])


# ---- 5. --resume's messages ----------------------------------------------------------------------------

@pytest.fixture
def saved_run(tmp_path) -> Path:
    run = tmp_path / "run"
    Trainer(config_from_dict(tiny()), run).fit(max_steps=1)
    return run


def test_resume_given_the_checkpoint_file_names_the_run_directory(saved_run, capsys, caplog):
    last = saved_run / "checkpoints" / "last.pt"
    assert main(["pretrain", "--resume", str(last)]) == 2
    text = error_text(capsys, caplog)
    assert "--resume takes the run directory" in text and f"--resume {shell_quote(saved_run)}" in text
    assert "last.pt/checkpoints" not in text
    with pytest.raises(slimssl.SlimsslError, match=f"out='{saved_run}'"):
        slimssl.pretrain(out=last, resume=True)


def test_cli_messages_name_flags_and_python_messages_name_arguments(tmp_path, saved_run, config, capsys, caplog):
    other = tmp_path / "other.yaml"  # a config of other settings than the run's
    other.write_text(yaml.safe_dump({**TINY, "optim": {"lr": 0.5}}))
    cli_runs = [["pretrain", "--resume"],  # no run directory
                ["pretrain", "--resume", str(saved_run), "--config", str(other)],
                ["pretrain", "--config", str(config), "--out", str(saved_run)]]  # already holds a run
    for argv in cli_runs:
        assert main(argv) == 2
        text = error_text(capsys, caplog)
        caplog.clear()
        assert "resume=True" not in text and "out=" not in text and "config=None" not in text
        assert "--resume" in text or "--config" in text
    python_calls = [{"resume": True}, {"config": other, "out": saved_run, "resume": True},
                    {"config": config, "out": saved_run}]
    for kwargs in python_calls:
        with pytest.raises(slimssl.SlimsslError) as err:
            slimssl.pretrain(**kwargs)
        assert "--" not in str(err.value)


def test_resume_and_out_naming_two_folders_is_an_error(tmp_path, saved_run, capsys, caplog):
    other = tmp_path / "r9"
    assert main(["pretrain", "--resume", str(saved_run), "--out", str(other)]) == 2
    text = error_text(capsys, caplog)
    assert str(saved_run) in text and str(other) in text
    assert not other.exists()
    # the same folder, spelled otherwise, is fine
    assert main(["pretrain", "--resume", str(saved_run), "--out", f"{saved_run}/.", "--max-steps", "2"]) == 0
    assert load_checkpoint(saved_run)["train_state"]["step"] == 2


# ---- 6. --auto-resume: one command that starts a run and then continues it ------------------------------

def test_auto_resume_starts_a_run_then_continues_it_exactly(tmp_path, config):
    run = tmp_path / "run"
    again = ["pretrain", "--config", str(config), "--out", str(run), "--auto-resume"]
    assert main([*again, "--max-steps", "3"]) == 0  # nothing there yet: a new run
    assert load_checkpoint(run)["train_state"]["step"] == 3
    assert main([*again, "--max-steps", "5"]) == 0  # the same command again: continues from step 3
    assert load_checkpoint(run)["train_state"]["step"] == 5
    assert main(again) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 9))  # each step logged once: each call took up where the last one stopped
    reference = slimssl.pretrain(load_config(config), tmp_path / "reference")
    assert reference.finished
    final, expected = load_checkpoint(run)["model"], load_checkpoint(tmp_path / "reference")["model"]
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_auto_resume_refuses_a_run_started_with_other_settings(tmp_path, config, capsys, caplog):
    run = tmp_path / "run"
    again = ["pretrain", "--config", str(config), "--out", str(run), "--auto-resume"]
    assert main([*again, "--max-steps", "1"]) == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    assert main([*again, "--set", "optim.lr=0.123"]) == 2
    text = error_text(capsys, caplog)
    assert f"optim.lr: saved {TINY['optim']['lr']!r}, now 0.123" in text and "--resume RUN_DIR" in text
    assert (run / "checkpoints" / "last.pt").read_bytes() == before  # the saved run is untouched
    with pytest.raises(slimssl.SlimsslError, match="optim.lr") as err:
        slimssl.pretrain(load_config(config), run, overrides=["optim.lr=0.123"], resume="auto")
    assert "--" not in str(err.value)


def test_auto_resume_needs_a_run_directory_and_excludes_resume(tmp_path, config, capsys, caplog):
    assert main(["pretrain", "--config", str(config), "--auto-resume"]) == 2
    assert "--out RUN_DIR" in error_text(capsys, caplog)
    with pytest.raises(slimssl.SlimsslError, match="out=RUN_DIR"):
        slimssl.pretrain(load_config(config), resume="auto")
    with pytest.raises(slimssl.SlimsslError, match="True, False or 'auto'"):
        slimssl.pretrain(load_config(config), tmp_path / "run", resume="yes")
    with pytest.raises(SystemExit) as refused:  # argparse: not allowed with --resume
        main(["pretrain", "--resume", str(tmp_path / "run"), "--auto-resume"])
    assert refused.value.code == 2
    assert not (tmp_path / "run").exists()


def test_a_run_or_an_export_is_not_made_inside_another_run(tmp_path, saved_run, config, capsys, caplog):
    """A run's checkpoints/ folder (or any folder of it) given as --out would mix two runs' files."""
    before = sorted(p.relative_to(saved_run) for p in saved_run.rglob("*"))
    for inside in (saved_run / "checkpoints", saved_run / "mine"):
        assert main(["pretrain", "--config", str(config), "--out", str(inside)]) == 2
        assert f"is inside the run {saved_run.resolve()} (checkpoints/last.pt), whose files are that run's own; " \
               "choose an --out outside it" in error_text(capsys, caplog)
        caplog.clear()
    for out, said in ((saved_run, "is a run directory"), (saved_run / "checkpoints", "is inside the run")):
        assert main(["export", str(saved_run), "--all", "--out", str(out)]) == 2
        assert said in error_text(capsys, caplog) and "export to a folder outside it" in error_text(capsys, caplog)
    assert sorted(p.relative_to(saved_run) for p in saved_run.rglob("*")) == before


def test_exports_are_not_written_into_the_dataset(tmp_path, config, capsys, caplog):
    """Their folders would be read as classes of the next run on that data (the run's own, or --data's)."""
    data = image_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--data", str(data), "--out", str(run), "--max-steps", "1"]) == 0
    before = sorted(data.rglob("*"))
    for out in (data, data / "a"):
        assert main(["export", str(run), "--all", "--out", str(out)]) == 2
        assert f"{out} is inside the dataset {data}: the exports' folders would be mixed into the data; keep " \
               "exports outside the dataset's folder" in error_text(capsys, caplog)
        caplog.clear()
    other = image_folder(tmp_path / "other")
    assert main(["export", str(run), "--all", "--out", str(other / "x"), "--data", str(other)]) == 2
    assert f"is inside the dataset {other}" in error_text(capsys, caplog)
    for command in (["linear", str(run)], ["finetune", str(run), "--all", "--label-fraction", "0.5"]):
        caplog.clear()  # nor the classifiers that linear and finetune save
        assert main([*command, "--epochs", "1", "--device", "cpu", "--save-models", str(data / "probes")]) == 2
        assert "the classifiers' folders would be mixed into the data; keep saved models outside" \
            in error_text(capsys, caplog)
    assert sorted(data.rglob("*")) == before and not (other / "x").exists()


def test_what_marks_a_folder_as_a_run(tmp_path):
    """A project of one's own may hold a config.yaml and a checkpoints/ folder: no run. A run in its first epoch
    has no checkpoint yet, but its config.yaml and its lock or metrics."""
    from slimssl.layout import enclosing_run, is_run_dir, run_markers

    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.yaml").write_text("lr: 0.1\n")
    assert not is_run_dir(project) and enclosing_run(project / "runs" / "a") is None
    (project / "results.json").write_text("{}")
    assert run_markers(project) == ["config.yaml", "results.json"]
    starting = tmp_path / "starting"
    starting.mkdir()
    (starting / "config.yaml").write_text("name: demo\n")
    (starting / ".train.lock").write_text("")
    assert is_run_dir(starting) and enclosing_run(starting / "nested") == starting.resolve()


def test_fine_tuned_models_may_be_kept_inside_the_run(tmp_path, saved_run, capsys):
    """--save-models RUN/models was accepted before the inside-a-run refusals, which are for new runs and exports."""
    assert main(["finetune", str(saved_run), "--subnet", "0.5", "--label-fraction", "0.5", "--epochs", "1",
                 "--device", "cpu", "--save-models", str(saved_run / "models")]) == 0
    assert (saved_run / "models" / "w0p5_d1-1-1-1_50pct_seed0" / "model.safetensors").is_file()


def test_a_config_beside_its_metrics_marks_a_run_in_its_first_epoch(tmp_path):
    from slimssl.layout import enclosing_run, is_run_dir, run_markers

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: demo\n")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    assert run_markers(run) == ["config.yaml", "metrics.jsonl"]
    assert is_run_dir(run) and enclosing_run(run / "checkpoints") == run.resolve()


def test_a_run_is_not_made_inside_another_run_from_python_either(saved_run, config):
    before = sorted(p.relative_to(saved_run) for p in saved_run.rglob("*"))
    with pytest.raises(slimssl.UsageError, match=r"is inside the run .*\(checkpoints/last\.pt\), whose files are "
                                                 r"that run's own; choose an out folder outside it"):
        prepare_run(load_config(config), saved_run / "checkpoints")
    assert sorted(p.relative_to(saved_run) for p in saved_run.rglob("*")) == before


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's writer, left
def test_callbacks_get_every_record_of_metrics_jsonl_as_it_is_written(tmp_path, config, caplog):  # on tb/ removed
    records = []

    def keep(record):
        records.append(record)
        record["step"] = -1  # its own copy: the file, and any other callback, keep theirs

    later = []
    run = slimssl.pretrain(config, tmp_path / "run", callbacks=[keep, later.append])
    written = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert later == written and len(records) == len(written) and all(r["step"] == -1 for r in records)
    assert any("loss" in r and "lr" in r for r in later) and any("knn_top1" in r for r in later)
    for bad in (print, [print, "log"], 5):
        with pytest.raises(slimssl.SlimsslError, match="callbacks must be a list of functions"):
            slimssl.pretrain(config, tmp_path / "bad", callbacks=bad)
    assert not (tmp_path / "bad").exists()

    def failing(record):
        raise RuntimeError("the tracker is down")

    given = []
    with caplog.at_level(logging.WARNING, logger="slimssl"):  # a generator is read once; a failing one is dropped
        run = slimssl.pretrain(config, tmp_path / "fails", callbacks=(f for f in (failing, given.append)))
    assert run.finished and len(given) == len(written)  # the others still get every record
    assert caplog.text.count("gets no more records") == 1 and "failing failed, and gets no" in caplog.text
    assert "the tracker is down" in caplog.text  # its traceback


def test_a_log_file_gets_the_progress_bar_at_its_interval_not_at_every_logged_step(tmp_path, config, capsys):
    """Without a terminal (a job's log file) the bar is drawn every 30 s: a run of seconds that logs at each of its
    8 steps draws it at its start and its end, not at every record; each draw on a line of its own, and the log's
    messages on theirs (after a carriage return, a message was glued to the bar, and the draws made one line)."""
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    drawn = [line for line in err.splitlines() if "step" in line and "|" in line]
    assert 1 <= len(drawn) <= 3, drawn
    assert "\r" not in err and all(line.lstrip().startswith(("0%", "100%")) for line in drawn), drawn


def test_a_message_logged_while_the_bar_is_open_gets_a_line_of_its_own_in_a_log_file(monkeypatch):
    import io

    from slimssl.train.metrics import progress_bar

    log_file = io.StringIO()  # no terminal
    monkeypatch.setattr("sys.stderr", log_file)
    handler = logging.StreamHandler(log_file)
    logging.getLogger("slimssl").addHandler(handler)
    try:
        with progress_bar(0, 4, True) as bar:
            bar.update(2)
            bar.refresh()
            logging.getLogger("slimssl").warning("epoch 1 kNN: w1p0=50.00")
            bar.update(2)
    finally:
        logging.getLogger("slimssl").removeHandler(handler)
    lines = log_file.getvalue().splitlines()
    assert [line.split("|")[0].strip() if "|" in line else line for line in lines] == \
        ["0%", "50%", "epoch 1 kNN: w1p0=50.00", "100%"], lines


def test_a_seed_that_does_not_fit_64_bits_is_a_usage_error(tmp_path, config, capsys, caplog):
    huge = str(2**64)
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run"), "--set",
                 f"train.seed={huge}"]) == 2
    assert "train.seed" in error_text(capsys, caplog) and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as refused:
        main(["linear", str(tmp_path / "run"), "--seed", huge])
    assert refused.value.code == 2 and "an integer that fits 64 bits" in capsys.readouterr().err
    with pytest.raises(slimssl.SlimsslError, match="seed must be an int that fits 64 bits"):
        slimssl.linear_probe(tmp_path / "run", seed=2**64)


def test_pretrain_gives_the_callers_random_state_back(tmp_path, config):
    """The run seeds torch's generator with train.seed; the caller's draws after it are the ones they would have
    made without it."""
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    run = slimssl.pretrain(config, tmp_path / "run", max_steps=1)
    assert run.step == 1 and torch.equal(torch.rand(4), expected)


def test_a_misspelt_dataset_or_recipe_name_gets_the_closest_known_one(tmp_path, capsys, caplog):
    import numpy as np

    import slimssl

    assert main(["pretrain", "--data", "cifar1O", "--out", str(tmp_path / "a")]) == 2
    assert "'cifar1O' is neither a known dataset name" in error_text(capsys, caplog)
    assert "(did you mean cifar10?)" in error_text(capsys, caplog)
    slimssl.register_dataset("my_digits", (np.zeros((4, 8, 8, 3), np.uint8), np.arange(4) % 2))
    try:
        with pytest.raises(slimssl.DataError, match=r"\(did you mean my_digits\?\)"):
            slimssl.pretrain(tiny(), tmp_path / "b", data="my_digit")
    finally:
        slimssl.unregister_dataset("my_digits")
    assert main(["pretrain", "--config", "cifar10_r18_dspnet_bol", "--out", str(tmp_path / "c")]) == 2
    assert "(did you mean cifar10_r18_dspnet_byol?)" in error_text(capsys, caplog)
    caplog.clear()
    assert main(["pretrain", "--config", "nothing_like_any", "--out", str(tmp_path / "d")]) == 2
    # a path is the user's own file or folder, missing: no hint towards a shipped recipe or a downloaded dataset
    assert main(["pretrain", "--config", str(tmp_path / "demo_big.yaml"), "--out", str(tmp_path / "e")]) == 2
    assert main(["pretrain", "--data", str(tmp_path / "cifar10"), "--out", str(tmp_path / "f")]) == 2
    assert "does not exist" in error_text(capsys, caplog) and "is neither" in error_text(capsys, caplog)
    assert "did you mean" not in error_text(capsys, caplog)
