"""Checkpoints and the core CLI subcommands (export, profile, config)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml

from slimssl.checkpoint import CheckpointError, load_checkpoint, load_supernet, save_checkpoint
from slimssl.cli import main
from slimssl.config import config_from_dict, load_config
from slimssl.models.build import build_supernet

TINY = ["model.base_width=4"]


def make_checkpoint(path: Path, overrides=TINY, perturb=None):
    cfg = load_config("demo", list(overrides))
    torch.manual_seed(0)
    supernet = build_supernet(cfg)
    if perturb is not None:
        perturb(supernet)
    save_checkpoint(path, {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names,
                           "model": {"backbone." + k: v for k, v in supernet.state_dict().items()},
                           "epoch": 3})
    return cfg, supernet.eval()


def images(n=2, size=16, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def error_text(capsys, caplog) -> str:
    return capsys.readouterr().err + caplog.text


# ---- checkpoints --------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path, perturb_bn):
    path = tmp_path / "ck.pt"
    cfg, supernet = make_checkpoint(path, perturb=perturb_bn)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary files left behind
    data = load_checkpoint(path)
    assert data["config"] == cfg
    assert data["menu"] == cfg.subnet_menu().names
    assert data["epoch"] == 3
    model, loaded_cfg = load_supernet(path)
    assert loaded_cfg == cfg and not model.training
    x = images()
    for spec in supernet.menu:
        torch.testing.assert_close(model(x, subnet=spec), supernet(x, subnet=spec), rtol=0, atol=0)
    model2, _ = load_supernet(path, cfg)  # the same config is accepted
    torch.testing.assert_close(model2(x), supernet(x), rtol=0, atol=0)


def test_checkpoint_run_directory(tmp_path):
    cfg, _ = make_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert load_checkpoint(tmp_path)["config"] == cfg


def test_checkpoint_overwrite_is_replaced(tmp_path):
    path = tmp_path / "ck.pt"
    make_checkpoint(path)
    save_checkpoint(path, {"config": load_config("demo").model_dump(mode="json"), "menu": [], "model": {},
                           "epoch": 9})
    assert load_checkpoint(path)["epoch"] == 9


def test_load_supernet_with_other_menu_names_both(tmp_path):
    path = tmp_path / "ck.pt"
    cfg, _ = make_checkpoint(path)
    other = load_config("demo", [*TINY, "menu.widths=[1.0, 0.75]"])
    with pytest.raises(CheckpointError) as err:
        load_supernet(path, other)
    msg = str(err.value)
    for name in cfg.subnet_menu().names + other.subnet_menu().names:
        assert name in msg
    same_size = load_config("demo", [*TINY, "menu.widths=[1.0, 0.75, 0.25]"])
    with pytest.raises(CheckpointError) as err:
        load_supernet(path, same_size)
    assert "w0p75_d1-1-1-1" in str(err.value) and "w0p5_d1-1-1-1" in str(err.value)


def test_load_supernet_with_other_architecture(tmp_path):
    path = tmp_path / "ck.pt"
    make_checkpoint(path)
    with pytest.raises(CheckpointError, match="another architecture") as err:
        load_supernet(path, load_config("demo", ["model.base_width=8"]))
    assert str(err.value).splitlines()[1:] == ["  model.base_width: checkpoint 4, config 8"]  # only what differs


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(path)


def test_plain_tensor_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="tensor.pt"):
        load_checkpoint(path)
    torch.save({"model": {}}, path)  # a dict without the format marker
    with pytest.raises(CheckpointError):
        load_supernet(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "new.pt"
    cfg = load_config("demo")
    save_checkpoint(path, {"version": 99, "config": cfg.model_dump(mode="json"), "menu": [], "model": {}})
    with pytest.raises(CheckpointError, match="99"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pt does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="checkpoints is a folder without checkpoints/last.pt"):
        load_checkpoint(tmp_path / "run" / "checkpoints")  # a run's checkpoints folder, not the run
    make_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=f"the run directory is {tmp_path / 'run'}$"):
        load_checkpoint(tmp_path / "run" / "checkpoints")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(CheckpointError, match="expected a checkpoint file .* or a run directory"):
        load_checkpoint(tmp_path / "results.json")  # not a checkpoint at all


# ---- export -------------------------------------------------------------------------------------------

def test_cli_export_all_verify(tmp_path, config_dir, capsys):
    out = tmp_path / "exports"
    code = main(["export", "--config", str(config_dir / "demo.yaml"), "--random-init", "--all", "--verify",
                 "--out", str(out), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    names = load_config("demo").subnet_menu().names
    assert [r["subnet"] for r in rows] == names
    for row in rows:
        assert 0 <= row["max_abs_diff"] <= 1e-5
        folder = Path(row["path"])
        assert folder == out / row["subnet"]
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    info = json.loads((out / names[0] / "config.json").read_text())
    assert info["resolution"] == load_config("demo").data.resolution and len(info["mean"]) == 3


def test_cli_export_a_config_given_by_a_relative_path(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    code = main(["export", "--config", "src/slimssl/configs/demo.yaml", "--random-init", "--subnet", "0.5",
                 "--out", str(tmp_path), "--json", "--set", "model.base_width=4"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["subnet"] for r in rows] == ["w0p5_d1-1-1-1"]
    assert "max_abs_diff" not in rows[0]
    assert (tmp_path / "w0p5_d1-1-1-1" / "model.safetensors").is_file()


def test_cli_export_several_subnets_in_the_given_order(tmp_path, capsys):
    code = main(["export", "--config", "demo", "--random-init", "--subnet", "0.25", "w1p0_d1-1-1-1", "0.25",
                 "--out", str(tmp_path / "out"), "--json", "--set", "model.base_width=4"])
    assert code == 0
    assert [r["subnet"] for r in json.loads(capsys.readouterr().out)] == ["w0p25_d1-1-1-1", "w1p0_d1-1-1-1"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["w0p25_d1-1-1-1", "w1p0_d1-1-1-1"]
    # one impossible name among good ones: refused before anything is written
    assert main(["export", "--config", "demo", "--random-init", "--subnet", "0.5", "0.3", "--out",
                 str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


def test_cli_export_from_checkpoint(tmp_path, capsys, perturb_bn):
    path = tmp_path / "ck.pt"
    make_checkpoint(path, perturb=perturb_bn)
    code = main(["export", str(path), "--all", "--verify", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(r["max_abs_diff"] <= 1e-5 for r in rows)


def test_export_replaces_an_export_of_the_same_source_only(tmp_path, capsys, caplog, perturb_bn):
    path, out = tmp_path / "ck.pt", tmp_path / "out"
    make_checkpoint(path, perturb=perturb_bn)
    assert main(["export", str(path), "--subnet", "0.5", "--out", str(out)]) == 0
    weights = out / "w0p5_d1-1-1-1" / "model.safetensors"
    trained = weights.read_bytes()
    assert main(["export", str(path), "--subnet", "0.5", "--out", str(out)]) == 0  # the same run again: fine
    random_init = ["export", "--config", "demo", "--set", *TINY, "--random-init", "--all", "--out", str(out)]
    assert main(random_init) == 2  # would replace the trained export with random weights
    assert f"already holds an export of w0p5_d1-1-1-1 from {path.resolve()}" in error_text(capsys, caplog)
    assert weights.read_bytes() == trained and not (out / "w1p0_d1-1-1-1").exists()  # nothing written
    assert main([*random_init, "--overwrite"]) == 0
    assert weights.read_bytes() != trained


def test_export_knows_the_same_run_however_it_is_typed_and_another_run_typed_the_same(tmp_path, monkeypatch,
                                                                                       capsys, caplog, perturb_bn):
    out = tmp_path / "exported"
    make_checkpoint(tmp_path / "a" / "runs" / "demo" / "checkpoints" / "last.pt", perturb=perturb_bn)
    monkeypatch.chdir(tmp_path / "a")
    last = tmp_path / "a" / "runs" / "demo" / "checkpoints" / "last.pt"
    alias = tmp_path / "a" / "LAST.pt"  # a hard link stands in for another letter case on macOS' file system
    os.link(last, alias)
    for typed in ("runs/demo", "runs/demo/", str(tmp_path / "a" / "runs" / "demo"), "runs/demo/checkpoints/last.pt",
                  "./runs/../runs/demo/checkpoints/last.pt", "LAST.pt"):
        assert main(["export", typed, "--subnet", "0.5", "--out", str(out)]) == 0, typed
    info = json.loads((out / "w0p5_d1-1-1-1" / "config.json").read_text())
    assert info["source"] == str(alias.resolve())  # the latest export's
    assert main(["export", "runs/demo", "--subnet", "0.5", "--out", str(out)]) == 0
    trained = (out / "w0p5_d1-1-1-1" / "model.safetensors").read_bytes()
    # another run, typed the same way from another folder, does not replace the export
    make_checkpoint(tmp_path / "b" / "runs" / "demo" / "checkpoints" / "last.pt")
    monkeypatch.chdir(tmp_path / "b")
    assert main(["export", "runs/demo", "--subnet", "0.5", "--out", str(out)]) == 2
    assert f"already holds an export of w0p5_d1-1-1-1 from {last.resolve()}" in error_text(capsys, caplog)
    assert (out / "w0p5_d1-1-1-1" / "model.safetensors").read_bytes() == trained


def test_random_init_exports_name_the_config_file_or_the_shipped_config(tmp_path, monkeypatch, capsys, caplog):
    out = tmp_path / "exported"
    argv = ["export", "--random-init", "--set", *TINY, "--subnet", "0.5", "--out", str(out)]
    assert main([*argv, "--config", "demo"]) == 0
    info = json.loads((out / "w0p5_d1-1-1-1" / "config.json").read_text())
    assert info["source"] == "random init of shipped config demo.yaml with model.base_width=4"
    from slimssl.checkpoint import export_source  # the same overrides in another order: the same source

    assert export_source(None, "demo", ["train.seed=1", "model.base_width=4"]) == export_source(
        None, "demo", ["model.base_width=4", "train.seed=1"])
    weights = (out / "w0p5_d1-1-1-1" / "model.safetensors").read_bytes()
    assert main([*argv, "--config", "demo"]) == 0  # drawn from train.seed: the same weights again
    assert (out / "w0p5_d1-1-1-1" / "model.safetensors").read_bytes() == weights
    seeded = ["export", "--random-init", "--set", *TINY, "train.seed=1", "--subnet", "0.5", "--out", str(out)]
    assert main([*seeded, "--config", "demo"]) == 2  # another source: not replaced unasked
    assert "already holds an export of w0p5_d1-1-1-1 from random init of shipped config demo.yaml with " \
           "model.base_width=4;" in error_text(capsys, caplog)
    assert main([*seeded, "--config", "demo", "--overwrite"]) == 0
    assert (out / "w0p5_d1-1-1-1" / "model.safetensors").read_bytes() != weights
    for folder in ("a", "b"):  # two config files typed the same way from two folders
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "c.yaml").write_text(load_config("demo", TINY).to_yaml())
    monkeypatch.chdir(tmp_path / "a")
    assert main([*argv, "--config", "c.yaml", "--overwrite"]) == 0
    assert main([*argv, "--config", "./c.yaml"]) == 0  # the same file
    monkeypatch.chdir(tmp_path / "b")
    assert main([*argv, "--config", "c.yaml"]) == 2
    assert f"from random init of {(tmp_path / 'a' / 'c.yaml').resolve()}" in error_text(capsys, caplog)


@pytest.mark.parametrize("flags", [[], ["--all", "--subnet", "0.5"]])
def test_cli_export_needs_exactly_one_selection(tmp_path, flags, capsys, caplog):
    code = main(["export", "--config", "demo", "--random-init", "--out", str(tmp_path), *flags])
    assert code == 2
    assert "--subnet" in error_text(capsys, caplog)
    assert not any(tmp_path.iterdir())


def test_cli_export_without_random_init_is_refused(tmp_path, capsys, caplog):
    assert main(["export", "--config", "demo", "--all", "--out", str(tmp_path)]) == 2
    assert "--random-init" in error_text(capsys, caplog)


def test_cli_export_unknown_subnet_names_menu(tmp_path, capsys, caplog):
    code = main(["export", "--config", "demo", "--random-init", "--subnet", "0.3", "--out", str(tmp_path)])
    assert code == 2
    text = error_text(capsys, caplog)
    assert "w0p3_d1-1-1-1" in text
    for name in load_config("demo").subnet_menu().names:
        assert name in text


def test_cli_export_checkpoint_with_mismatched_config(tmp_path, capsys, caplog):
    path = tmp_path / "ck.pt"
    make_checkpoint(path)
    code = main(["export", str(path), "--config", "demo", "--set", "model.base_width=4",
                 "--set", "menu.widths=[1.0]", "--all", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "w0p25_d1-1-1-1" in error_text(capsys, caplog)



@pytest.mark.parametrize("argv, expected", [
    (["export", "--all", "--set", "model.base_width=8"], "--set changes a --config file"),
    (["export", "--all", "--random-init"], "--random-init exports a new supernet of --config"),
    (["profile", "--set", "model.base_width=8"], "--set changes a --config file"),
])
def test_cli_flags_a_checkpoint_would_ignore_are_refused(tmp_path, argv, expected, capsys, caplog):
    path = tmp_path / "ck.pt"
    make_checkpoint(path)
    command, *flags = argv
    out = ["--out", str(tmp_path / "o")] if command == "export" else []
    assert main([command, str(path), *flags, *out]) == 2
    assert expected in error_text(capsys, caplog)
    assert not (tmp_path / "o").exists()

# ---- profile ------------------------------------------------------------------------------------------

def test_cli_profile_resnet50_matches_paper_numbers(config_dir, capsys):
    code = main(["profile", "--config", str(config_dir / "imagenet_r50_slimclr_mocov2.yaml"),
                 "--resolution", "224", "--num-classes", "1000", "--json", "--no-latency"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    expected = {1.0: (25.56e6, 4.09e9), 0.75: (14.77e6, 2.32e9), 0.5: (6.92e6, 1.05e9), 0.25: (1.99e6, 0.28e9)}
    assert [r["width"] for r in rows] == list(expected)
    for row in rows:
        params, macs = expected[row["width"]]
        assert row["params"] == pytest.approx(params, rel=0.01), row
        assert row["macs"] == pytest.approx(macs, rel=0.01), row
        assert row["resolution"] == 224 and row["num_classes"] == 1000
        assert "latency_ms" not in row


def test_cli_profile_demo_with_latency(capsys):
    assert main(["profile", "--config", "demo", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"] > 0
    assert rows[0]["macs"] > rows[1]["macs"] > rows[2]["macs"] > 0
    assert all(r["latency_ms"] > 0 for r in rows)
    assert rows[0]["latency_settings"] == {"runs": 10, "warmup": 3, "batch": 1, "threads": torch.get_num_threads()}
    assert all(r["resolution"] == load_config("demo").data.resolution for r in rows)
    threads = torch.get_num_threads() + 1  # not the current count, whatever it is
    assert main(["profile", "--config", "demo", "--json", "--threads", str(threads)]) == 0
    assert {r["latency_settings"]["threads"] for r in json.loads(capsys.readouterr().out)} == {threads}
    assert torch.get_num_threads() == rows[0]["latency_settings"]["threads"]  # given back as it was


# ---- config -------------------------------------------------------------------------------------------

def test_cli_config_prints_resolved_yaml(capsys):
    assert main(["config", "--config", "demo", "--set", "train.epochs=3"]) == 0
    printed = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert printed == load_config("demo", ["train.epochs=3"])
    assert printed.train.epochs == 3


def test_cli_set_takes_several_overrides_per_flag_and_repeats(capsys):
    assert main(["config", "--config", "demo", "--set", "train.epochs=3", "optim.lr=0.2", "--set", "train.seed=7"]) == 0
    printed = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert (printed.train.epochs, printed.optim.lr, printed.train.seed) == (3, 0.2, 7)


def test_cli_set_swallowing_a_positional_says_so(tmp_path, capsys, caplog):
    assert main(["profile", "--config", "demo", "--set", "train.epochs=3", str(tmp_path)]) == 2
    assert "put a run directory or other positional argument before --set" in error_text(capsys, caplog)


def test_cli_config_list(capsys):
    assert main(["config", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]  # the names --config takes, each described
    assert "demo" in names and "imagenet_r50_slimclr_mocov2" in names
    assert any(line.startswith("demo ") and "digits" in line for line in lines)


def test_cli_config_list_refuses_a_config_it_would_ignore(capsys, caplog):
    assert main(["config", "--list", "--config", "demo", "--set", "train.epochs=3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "takes no --config, --set or --explain" in captured.err + caplog.text


def test_cli_config_unknown_key_returns_2(capsys, caplog):
    assert main(["config", "--set", "model.nope=1"]) == 2
    assert "model.nope" in error_text(capsys, caplog)


def test_cli_no_command_returns_2(capsys):
    assert main([]) == 2


@pytest.mark.parametrize("command", [["knn", "RUN"], ["export", "RUN", "--all", "--out", "exported"],
                                     ["profile", "--config", "demo"], ["reproduce", "--out", "runs"]])
def test_commands_other_than_pretrain_refuse_to_run_on_several_processes(command, monkeypatch, capsys, caplog):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets them for every process
    monkeypatch.setenv("RANK", "0")
    assert main(command) == 2
    text = capsys.readouterr().err + caplog.text
    assert f"slimssl {command[0]} runs on one process, but torchrun started 2" in text
    assert "only slimssl pretrain trains on several processes" in text


def test_world_size_without_a_rank_is_one_process_and_a_bad_one_is_named(tmp_path, monkeypatch, capsys, caplog):
    from slimssl.train import distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")  # as a cluster job may export it to everything it runs
    monkeypatch.delenv("RANK", raising=False)
    dist.init_from_env()  # joins no process group (it would wait for a second process, or fail without RANK)
    assert not dist.is_distributed() and dist.world_size() == 1
    assert main(["profile", "--config", "demo", "--set", "model.base_width=4", "--json"]) == 0
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["pretrain", "--out", str(tmp_path / "run")]) == 2 and not (tmp_path / "run").exists()
    assert "WORLD_SIZE must be the number of processes of the job (a positive int), got 'two'" in \
        capsys.readouterr().err + caplog.text


def test_python_evaluation_under_torchrun_warns_that_each_process_repeats_it(tmp_path, monkeypatch, caplog):
    import slimssl

    make_checkpoint(tmp_path / "ck.pt")
    slimssl.knn(tmp_path / "ck.pt", device="cpu", save=False, k=3)  # one process: no warning
    assert "torchrun" not in caplog.text
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rows = slimssl.knn(tmp_path / "ck.pt", device="cpu", save=False, k=3)
    assert len(rows) == 3  # it still runs (the demo's three widths): a script may call it on one rank alone
    assert "slimssl.knn() runs whole on each of the 2 processes torchrun started" in caplog.text


def test_a_task_of_several_that_srun_started_without_torchrun_is_told_it_trains_alone(tmp_path, monkeypatch, caplog):
    """`srun --ntasks=2 python -m slimssl pretrain` starts two runs, not one on two GPUs: each says so (with a shared
    --out, one was refused as if submitted twice, which hid the mistake)."""
    from slimssl.launch import warn_of_srun_tasks

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert main(["pretrain", "--out", str(tmp_path / "run"), "--max-steps", "1", "--set", "train.knn=false"]) == 0
    assert "this is task 1 of the 2 that srun started, and it trains a run of its own" in caplog.text
    assert "srun torchrun --nproc_per_node=GPUS" in caplog.text
    caplog.clear()
    for tasks, rank in (("1", None), ("2", "0")):  # one task; or a process torchrun started (srun torchrun)
        monkeypatch.setenv("SLURM_STEP_NUM_TASKS", tasks)
        if rank is not None:
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("WORLD_SIZE", "2")
        warn_of_srun_tasks()
    assert "srun" not in caplog.text


def test_an_unknown_flag_gets_the_usage_of_its_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["knn", "runs/x", "--bogus", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "usage: slimssl knn" in err and "slimssl knn: error: unrecognized arguments: --bogus 1" in err
    with pytest.raises(SystemExit):
        main(["--json", "knn", "runs/x"])  # an option of the command given before it
    assert "slimssl: error: unrecognized arguments: --json (options of knn go after the word knn)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["pretrain", "--epoch", "1"], "slimssl pretrain: error: unrecognized arguments: --epoch 1 (did you mean --epochs?)"),
    (["pretrain", "--max-step=3"], "unrecognized arguments: --max-step=3 (did you mean --max-steps?)"),
    (["--verb", "pretrain"], "slimssl: error: unrecognized arguments: --verb (did you mean --verbose?)"),
    (["knn", "runs/x", "--zzz"], "slimssl knn: error: unrecognized arguments: --zzz\n"),
    (["knn", "runs/x", "--set", "eval.knn_k=5"],  # pretrain's flag, not a misspelt --subnet
     "unrecognized arguments: --set eval.knn_k=5 (knn takes no --set: it evaluates with the config saved in the run"),
])
def test_a_prefix_of_an_option_is_refused_with_the_option_it_looks_like(argv, said, capsys):
    """No abbreviations: ``--epoch`` would silently mean ``--epochs`` today and something else once another
    option starts with it; a misspelt option names the closest one instead."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("command", [["profile"], ["export", "--all", "--out", "exported"]])
def test_a_run_directory_after_set_is_named_as_such(command, capsys, caplog):
    assert main([*command, "--set", "model.base_width=8", "runs/demo"]) == 2
    assert "--set expects KEY=VALUE, got 'runs/demo' (--set takes every word up to the next flag: put a run " \
           "directory" in error_text(capsys, caplog)


def test_verbose_debug_logging_is_slimssls_not_every_png_chunk(tmp_path, caplog):
    from PIL import Image

    from slimssl.cli import main

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with caplog.at_level(logging.DEBUG):
        assert main(["-v", "config"]) == 0
        Image.open(tmp_path / "a.png").load()  # PIL logs each chunk it reads at DEBUG
    assert not [record for record in caplog.records if record.name.startswith("PIL")]


def test_output_piped_into_a_reader_that_stops_early_exits_1_without_a_traceback():
    """`slimssl config | head -1`: the reader has gone before the output is written."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "slimssl", "config", "--config", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    proc.stdout.close()  # the reader stops at once
    with proc.stderr:
        errors = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in errors, errors


def test_a_file_the_machine_refuses_is_a_one_line_error_naming_it(tmp_path, monkeypatch, caplog):
    import errno

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "demo.yaml"))

    monkeypatch.setattr("slimssl.config.load.find_config", refused)
    assert main(["config", "--config", "demo"]) == 2
    assert f"slimssl config: error: {tmp_path / 'demo.yaml'}: Permission denied; free space, or fix the place's " \
           "permissions, then run the command again" in caplog.text


def test_import_of_a_file_named_like_a_folder_on_the_path_is_taken(tmp_path, monkeypatch):
    """A folder of that name (a run directory, say) is a namespace package to Python, not a module replaced."""
    import sys

    from slimssl.methods import METHODS

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "tinymethod.py").write_text("X = 1\n")
    (tmp_path / "tinymethod").mkdir()  # e.g. --out tinymethod
    monkeypatch.delitem(sys.modules, "tinymethod", raising=False)
    assert main(["--import", "plugins/tinymethod.py", "config", "--config", "demo"]) == 0
    assert sys.modules["tinymethod"].X == 1 and "tinymethod" not in METHODS


def test_a_flag_of_several_values_that_took_the_run_directory_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for argv in (["knn", "--subnet", "0.5", str(run)], ["finetune", "--label-fraction", "0.1", str(run), "--all"]):
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2
        assert f"({argv[1]} took {str(run)!r} as one of its values, as it takes every word up to the next flag: " \
               f"put {str(run)!r} before {argv[1]})" in capsys.readouterr().err


def test_a_misspelt_command_names_the_closest_one(capsys):
    with pytest.raises(SystemExit) as refused:
        main(["knnn", "runs/x"])
    assert refused.value.code == 2 and "(did you mean knn?)" in capsys.readouterr().err


def test_messages_name_flags_on_the_command_line_and_keywords_in_python(tmp_path, capsys, caplog):
    import slimssl
    from test_eval import make_checkpoint

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    assert main(["linear", str(run), "--train-crop", "resized", "--device", "cpu"]) == 2
    said = capsys.readouterr().err + caplog.text
    assert "--train-crop resized is the crop of the augmented probe; it needs --augment" in said
    assert "augment=True" not in said
    with pytest.raises(slimssl.UsageError, match="train_crop resized is the crop of the augmented probe; it needs "
                                                 "augment=True"):
        slimssl.linear_probe(run, train_crop="resized", device="cpu")
    caplog.clear()
    assert main(["knn", str(run), "--data", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "or one registered by a module given to --import)" in capsys.readouterr().err + caplog.text
    with pytest.raises(slimssl.SlimsslError, match="registered with slimssl.register_dataset in this process"):
        slimssl.knn(run, data=str(tmp_path / "nowhere"), device="cpu")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_schedulers_signal_while_python_exits_keeps_the_commands_exit_code(monkeypatch, name):
    """After the command (a stop it saved: exit 3, which a job script requeues on), a SIGTERM or SIGUSR1 during
    Python's own exit ends the process with that code, not the signal's (143, 138)."""
    import signal

    from slimssl import cli

    if not hasattr(signal, name):
        pytest.skip(f"no {name} on this platform")
    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    monkeypatch.setattr(cli, "main", lambda: 3)
    exits = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    try:
        with pytest.raises(SystemExit) as ended:
            cli.entry()
        assert ended.value.code == 3
        signal.getsignal(signum)(signum, None)  # what the signal would run now
        assert exits == [3]
    finally:
        signal.signal(signum, before)
