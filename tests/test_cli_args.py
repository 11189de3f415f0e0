"""Numbers and output paths on the command line: argparse refuses a bad one with exit 2 and a line naming the
flag and what it expects, before anything is loaded (so the checkpoint named here need not even exist)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from slimssl.cli import main

CKPT = "no-such-run"


@pytest.mark.parametrize("argv, expected", [
    (["knn", CKPT, "--k", "-5"], "argument --k: expected an integer > 0, got -5"),
    (["knn", CKPT, "--k", "0"], "argument --k: expected an integer > 0, got 0"),  # 0 no longer means 'default'
    (["knn", CKPT, "--temperature", "nan"], "argument --temperature: expected a number > 0, got nan"),
    (["knn", CKPT, "--eval-batch-size", "-1"], "argument --eval-batch-size: expected an integer > 0"),
    (["knn", CKPT, "--recalibrate-bn", "-1"], "argument --recalibrate-bn: expected an integer >= 0"),
    (["linear", CKPT, "--epochs", "0"], "argument --epochs: expected an integer > 0"),
    (["linear", CKPT, "--lr", "inf"], "argument --lr: expected a number > 0, got inf"),
    (["linear", CKPT, "--batch-size", "two"], "argument --batch-size: expected an integer > 0, got 'two'"),
    # the flag named, not a --set the user never typed
    (["pretrain", "--batch-size", "1"], "argument --batch-size: expected an integer >= 2 (BatchNorm needs two "
                                        "images a batch), got 1"),
    (["finetune", CKPT, "--subnet", "0.5", "--label-fraction", "0"],
     "expected a fraction of the labels in (0, 1], such as 0.1 for 10%, got 0"),
    (["finetune", CKPT, "--subnet", "0.5", "--label-fraction", "10"], "such as 0.1 for 10%, got 10"),
    (["finetune", CKPT, "--subnet", "0.5", "--label-fraction", "0.1", "--out", "run/checkpoints/last.pt"],
     "argument --out: expected a .json file, got 'run/checkpoints/last.pt'"),
    (["recalibrate", CKPT, "--subnet", "0.5", "--out", "new.json"], "argument --out: expected a .pt or .pth file"),
    (["recalibrate", CKPT, "--subnet", "0.5", "--out", "x.pt", "--batches", "0"], "argument --batches"),
    (["report", CKPT, "--plot", "acc.txt"], "argument --plot: expected a .png or .pdf or .svg file"),
    (["bench", "--steps", "0"], "argument --steps: expected an integer > 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    (["bench", "--profile", "run/checkpoints/last.pt"], "argument --profile: expected a .txt file"),
    (["pretrain", "--epochs", "0"], "argument --epochs: expected an integer > 0"),
    (["pretrain", "--max-steps", "-3"], "argument --max-steps: expected an integer > 0"),
    (["reproduce", "--out", "r", "--time-budget", "nan"], "argument --time-budget: expected a number >= 0"),
    (["reproduce", "--out", "r", "--probe-epochs", "0"], "argument --probe-epochs: expected an integer > 0"),
    (["profile", CKPT, "--resolution", "-4"], "argument --resolution: expected an integer > 0"),
    (["profile", CKPT, "--num-classes", "-3"], "argument --num-classes: expected an integer >= 0"),
    (["export", CKPT, "--all", "--out", "x", "--tolerance", "-1"], "argument --tolerance: expected a number >= 0"),
    (["pretrain", "--data", ""], "argument --data: expected a dataset name or path, got an empty string"),
    (["knn", CKPT, "--data", " "], "argument --data: expected a dataset name or path, got an empty string"),
    (["pretrain", "--out", ""], "argument --out: expected a folder, got an empty string"),
])
def test_bad_numbers_and_output_files_exit_2_naming_the_flag(argv, expected, capsys):
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_outputs_of_the_wrong_kind_of_path(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept\n")
    a_folder = tmp_path / "table.txt"
    a_folder.mkdir()
    for argv, expected in [
        (["pretrain", "--out", str(a_file)], "is a file; expected a folder"),
        (["export", CKPT, "--all", "--out", str(a_file)], "is a file; expected a folder"),
        (["reproduce", "--out", str(a_file)], "is a file; expected a folder"),
        (["bench", "--profile", str(a_folder)], "is a directory; expected a .txt file"),
        (["finetune", CKPT, "--subnet", "0.5", "--label-fraction", "0.1", "--out", str(a_file / "r.json")],
         "is a file, not a folder"),
        (["pretrain", "--out", str(a_file / "run")], "is a file, not a folder"),
    ]:
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2 and expected in capsys.readouterr().err
    assert a_file.read_text() == "kept\n"


def test_output_paths_the_machine_refuses_are_the_options_errors(tmp_path, capsys):
    """A name too long for the file system, or a link to nothing, is said as the option's error (exit 2), not as
    a traceback from deep in the command."""
    too_long = str(tmp_path / ("a" * 300))
    (tmp_path / "dangling").symlink_to(tmp_path / "gone" / "x")
    (tmp_path / "loopA").symlink_to("loopB")
    (tmp_path / "loopB").symlink_to("loopA")
    (tmp_path / "chain").symlink_to("dangling")  # a link to a link to nothing: no loop
    for argv, expected in [
        (["pretrain", "--out", too_long], f"argument --out: cannot use {too_long!r}: File name too long"),
        (["export", CKPT, "--all", "--out", too_long], "argument --out: cannot use"),
        (["report", CKPT, "--plot", too_long + ".png"], "argument --plot: cannot use"),
        (["pretrain", "--out", str(tmp_path / "dangling")], f"is a link to {str(tmp_path / 'gone' / 'x')!r}, which "
                                                           "does not exist"),
        (["report", CKPT, "--plot", str(tmp_path / "loopA" / "p.png")], "is a link to 'loopB', a loop of links"),
        (["report", CKPT, "--plot", str(tmp_path / "chain" / "p.png")], "is a link to 'dangling', which does not "
                                                                          "exist"),
    ]:
        with pytest.raises(SystemExit) as refused:
            main(argv)
        err = capsys.readouterr().err
        assert refused.value.code == 2 and expected in err and "Traceback" not in err, argv


def test_a_run_directory_that_is_a_loop_of_links_is_said_not_to_exist(tmp_path, caplog):
    (tmp_path / "loopA").symlink_to("loopB")
    (tmp_path / "loopB").symlink_to("loopA")
    with caplog.at_level(logging.ERROR, logger="slimssl"):
        assert main(["report", str(tmp_path / "loopA")]) == 2  # not Path.resolve()'s RuntimeError
    assert f"run directory {tmp_path / 'loopA'} does not exist" in caplog.text


def test_a_path_the_machine_refuses_while_a_command_runs_is_named_without_a_traceback(monkeypatch, caplog):
    import errno

    from slimssl import config as config_module

    def refuse(*args, **kwargs):
        raise OSError(errno.ENAMETOOLONG, "File name too long", "some/very/long/name")

    monkeypatch.setattr(config_module, "load_config", refuse)
    with caplog.at_level(logging.ERROR, logger="slimssl"):
        assert main(["config", "--config", "demo"]) == 2
    assert "slimssl config: error: some/very/long/name: File name too long; choose another path" in caplog.text


def test_reproduce_needs_a_recipe(tmp_path, capsys, caplog):
    assert main(["reproduce", "--recipes", ",, ,", "--out", str(tmp_path / "r")]) == 2
    assert "names no recipe" in capsys.readouterr().err + caplog.text


def test_an_output_folder_without_write_permission_is_refused(tmp_path, monkeypatch, capsys):
    import os

    from slimssl import cli_args

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # the tests may run as root, which may write anywhere: the permission answer is stubbed for this folder
    monkeypatch.setattr(cli_args.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    for argv in (["pretrain", "--out", str(locked / "run")], ["reproduce", "--out", str(locked)],
                 ["finetune", CKPT, "--subnet", "0.5", "--label-fraction", "0.1", "--out", str(locked / "r.json")]):
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2
        assert f"no permission to write in {str(locked)!r}" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


def test_a_suggested_command_quotes_paths_for_the_users_shell(monkeypatch):
    """cmd.exe takes single quotes as part of a path: on Windows a path is double-quoted, and only when needed."""
    import sys

    from slimssl.wording import shell_quote

    assert shell_quote(Path("runs/my run")) == "'runs/my run'" and shell_quote("runs/demo") == "runs/demo"
    monkeypatch.setattr(sys, "platform", "win32")
    assert shell_quote("runs\\demo-20261205-214900") == "runs\\demo-20261205-214900"
    assert shell_quote("C:\\my runs\\demo") == '"C:\\my runs\\demo"'
    assert shell_quote("runs\\R&D (new)") == '"runs\\R&D (new)"'  # & would end cmd.exe's command


def test_label_fraction_one_is_every_label():
    from slimssl.cli_args import label_fraction

    assert label_fraction("1") == 1.0 and label_fraction("0.01") == 0.01
