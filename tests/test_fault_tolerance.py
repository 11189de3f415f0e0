"""Fault tolerance and bad input: a run is never lost, and every error says what is wrong.

Atomic checkpoints, SIGTERM/SIGINT save-and-resume (exactly), NaN/Inf losses, bad datasets through
``slimssl pretrain --data``, config and checkpoint errors through the CLI (exit code 2), and runs that
fail without touching the checkpoints already saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import stat
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

import slimssl
from slimssl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from slimssl.cli import main
from slimssl.wording import shell_quote
from slimssl.config import ConfigError, check_processes, config_from_dict, load_config
from slimssl.errors import SlimsslError
from slimssl.methods.base import MethodOutput
from slimssl.models.build import build_supernet
from slimssl.train import loop
from slimssl.train.loop import NonFiniteLossError, Trainer
from slimssl.train.monitor import KnnMonitor
from slimssl.train import signals
from slimssl.train.signals import EXIT_INTERRUPTED, Interrupted, SignalGuard

TINY = {
    "name": "tiny",
    "model": {"arch": "resnet18", "depths": [1, 1, 1, 1], "base_width": 4, "stem": "cifar"},
    "menu": {"widths": [1.0, 0.5]},
    "method": {"name": "byol", "proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
    "data": {"source": "fake", "resolution": 8, "fake_size": 64},
    "train": {"batch_size": 16, "epochs": 3, "log_every": 1, "device": "cpu", "precision": "fp32"},
}  # 64 images / batch 16: 4 steps per epoch, 12 steps in all
FULL, HALF = "w1p0_d1-1-1-1", "w0p5_d1-1-1-1"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSSL_CACHE", str(tmp_path / "cache"))


def tiny(**sections) -> dict:
    data = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def write_config(path: Path, data: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(data or TINY))
    return path


def error_text(capsys, caplog) -> str:
    return capsys.readouterr().err + caplog.text


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir)["model"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def poison_loss(monkeypatch, trainer: Trainer, bad_steps, subnet_index: int = 1, weights: bool = True) -> None:
    """Make the loss of the ``subnet_index``-th sub-network of each step in ``bad_steps`` NaN: with
    ``weights``, NaN gradients too (so the weights become NaN), else only the loss value (a NaN added)."""
    method = trainer.model.method
    original = method.loss
    calls: dict[int, int] = {}

    def loss(online, target):
        out = original(online, target)
        step = trainer.state.step
        calls[step] = calls.get(step, -1) + 1
        if step in bad_steps and calls[step] == subnet_index:
            nan = torch.tensor(float("nan"))
            return MethodOutput(out.loss * nan if weights else out.loss + nan, out.distill_on)
        return out

    monkeypatch.setattr(method, "loss", loss)


def signal_at(monkeypatch, step_to_signal: int, signum: int) -> None:
    """Deliver ``signum`` to this process while step ``step_to_signal`` is running."""
    original = Trainer.train_step

    def train_step(self, step):
        if step == step_to_signal:
            os.kill(os.getpid(), signum)
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", train_step)


# ---- atomic checkpoints -------------------------------------------------------------------------------

def _full_disk_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def _partial_save(exc):
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise exc
    return save


def test_atomically_written_files_get_the_permissions_of_ordinary_ones(tmp_path):
    """Not the temporary file's 0600, which would hide a run's results from the other users of a machine."""
    config = write_config(tmp_path / "tiny.yaml", tiny(train={"epochs": 1}))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run)]) == 0
    ordinary = (run / "config.yaml").stat().st_mode & 0o777  # written with open(): the umask decides
    assert (run / "results.json").stat().st_mode & 0o777 == ordinary
    assert (run / "checkpoints" / "last.pt").stat().st_mode & 0o777 == ordinary


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_file_rewritten_atomically_keeps_the_permissions_it_was_given_and_a_symlink_is_not_written_through(
        tmp_path):
    from slimssl.atomic import write_json_atomic

    private = tmp_path / "results.json"
    write_json_atomic(private, {"a": 1})
    private.chmod(0o600)  # a user's results made private
    write_json_atomic(private, {"a": 2})
    assert private.stat().st_mode & 0o777 == 0o600 and json.loads(private.read_text()) == {"a": 2}
    target, link = tmp_path / "elsewhere.json", tmp_path / "linked.json"
    target.write_text("{}")
    target.chmod(0o640)
    link.symlink_to(target)
    write_json_atomic(link, {"b": 1})
    assert target.read_text() == "{}" and not link.is_symlink()  # the link is replaced, its target untouched
    assert link.stat().st_mode & 0o777 == 0o666 & ~_umask()  # a new file's permissions, not the target's


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("failure", ["disk_full", "killed", "rename"])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoints" / "last.pt"
    cfg = config_from_dict(TINY)
    good = {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names,
            "model": {"w": torch.arange(4.0)}, "epoch": 1}
    save_checkpoint(path, good)
    before = path.read_bytes()
    if failure == "disk_full":  # as torch.save reports it: a RuntimeError whose context is the OSError
        monkeypatch.setattr(torch, "save", _full_disk_save)
        expected, match = CheckpointError, f"cannot write the checkpoint {path}: No space left on device; the"
    elif failure == "killed":
        monkeypatch.setattr(torch, "save", _partial_save(KeyboardInterrupt()))
        expected, match = KeyboardInterrupt, None
    else:
        def replace(src, dst):
            raise OSError(13, "Permission denied")
        monkeypatch.setattr(os, "replace", replace)
        expected, match = CheckpointError, "cannot write the checkpoint .*: Permission denied"
    with pytest.raises(expected, match=match):
        save_checkpoint(path, {**good, "model": {"w": torch.zeros(4)}, "epoch": 2})
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert path.read_bytes() == before
    data = load_checkpoint(path)
    assert data["epoch"] == 1 and torch.equal(data["model"]["w"], torch.arange(4.0))


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    """The new content is fsynced before the rename, and the folder after it, so a power cut leaves either
    checkpoint whole (the rename alone may reach the disk before the data it points to)."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", "dir" if _is_dir_fd(fd) else "file"))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    cfg = config_from_dict(TINY)
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"config": cfg.model_dump(mode="json"),
                                                           "menu": cfg.subnet_menu().names, "model": {}})
    assert events == [("fsync", "file"), ("replace", "last.pt"), ("fsync", "dir")]


def _is_dir_fd(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def test_a_checkpoint_held_open_by_a_reader_on_windows_is_replaced_once_it_is_free(tmp_path, monkeypatch):
    """Windows refuses to rename over a file another process has open (slimssl knn reading last.pt): the save
    tries again for a while, and gives up with the error and the earlier file whole when it stays open."""
    import slimssl.atomic

    path = tmp_path / "checkpoints" / "last.pt"
    cfg = config_from_dict(TINY)
    payload = {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names, "model": {}}
    save_checkpoint(path, {**payload, "epoch": 1})
    replace, refusals = os.replace, []

    def held_open(times):
        def attempt(src, dst):
            if len(refusals) < times:
                refusals.append(dst)
                raise PermissionError(13, "The process cannot access the file because it is being used", str(dst))
            replace(src, dst)
        return attempt

    monkeypatch.setattr(slimssl.atomic, "REPLACE_RETRIES", 3)  # as on Windows
    monkeypatch.setattr(slimssl.atomic.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(os, "replace", held_open(times=2))
    save_checkpoint(path, {**payload, "epoch": 2})
    assert len(refusals) == 2 and load_checkpoint(path)["epoch"] == 2

    refusals.clear()
    monkeypatch.setattr(os, "replace", held_open(times=10))
    with pytest.raises(CheckpointError, match="being used"):
        save_checkpoint(path, {**payload, "epoch": 3})
    assert len(refusals) == 4 and load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind


# ---- signals and exact resume -------------------------------------------------------------------------

def test_sigint_saves_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    cfg = config_from_dict(TINY)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in a background job
    with monkeypatch.context() as m:
        signal_at(m, 5, signal.SIGINT)  # mid-epoch: step 5 of 0..11
        with pytest.raises(Interrupted, match="SIGINT at step 6.*last.pt"):
            Trainer(cfg, tmp_path / "a").fit()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    assert load_checkpoint(tmp_path / "a")["train_state"]["step"] == 6  # the step in flight finished
    resumed = Trainer(cfg, tmp_path / "a", resume=True).fit()
    reference = Trainer(cfg, tmp_path / "b").fit()
    assert resumed["steps"] == reference["steps"] == 12
    assert_same_state(model_state(tmp_path / "a"), model_state(tmp_path / "b"))


def test_a_stop_signal_still_exits_3_when_tensorboards_last_flush_fails(tmp_path, monkeypatch, capsys, caplog):
    """TensorBoard's writer is closed however a call ends; its last flush failing (a full disk) is a warning,
    never the error that replaces a saved stop (exit 3, which a scheduler requeues on)."""
    from torch.utils.tensorboard import SummaryWriter

    def full_disk(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "close", full_disk)
    signal_at(monkeypatch, 2, signal.SIGINT)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        code = main(["pretrain", "--config", str(write_config(tmp_path / "t.yaml")), "--out", str(run)])
    assert code == EXIT_INTERRUPTED and load_checkpoint(run)["train_state"]["step"] == 3
    assert "may lack their last records (OSError" in error_text(capsys, caplog)


def stopped_then_sigterm_while_closing(first: int, tmp_path, monkeypatch, capsys, caplog) -> tuple[Path, str]:
    """``slimssl pretrain`` sent ``first`` in step 2, then SIGTERM while the stopped run closes (after its save):
    the run, checked to have exited 3 with step 3 saved, and what it said."""
    signal_at(monkeypatch, 2, first)
    close = Trainer.close

    def close_under_a_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)
        close(self)

    monkeypatch.setattr(Trainer, "close", close_under_a_sigterm)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="slimssl"):
        code = main(["pretrain", "--config", str(write_config(tmp_path / "t.yaml")), "--out", str(run)])
    assert code == EXIT_INTERRUPTED and load_checkpoint(run)["train_state"]["step"] == 3
    return run, error_text(capsys, caplog)


def test_the_same_sigterm_again_after_the_save_still_exits_3_with_the_hint(tmp_path, monkeypatch, capsys, caplog):
    """A scheduler signals every process of a job, and torchrun forwards its own: a SIGTERM repeated while the
    stopped run closes (after its save, outside the training loop) is the same request. It used to kill the
    command (exit 143, no "continue with" line), and a scheduler that requeues on exit 3 did not."""
    run, text = stopped_then_sigterm_while_closing(signal.SIGTERM, tmp_path, monkeypatch, capsys, caplog)
    assert "the same request (a scheduler signals every process" in text and "which the command is ending on" in text
    assert f"continue with: slimssl pretrain --resume {shell_quote(run)}" in text


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_a_schedulers_sigusr1_notice_saves_and_exits_3_and_its_later_sigterm_is_the_same_request(
        tmp_path, monkeypatch, capsys, caplog):
    """Slurm's --signal=USR1@N (Lightning's requeue signal) warns of the time limit; SIGUSR1's default action
    killed the run without a checkpoint (exit 138). The scheduler's SIGTERM at the limit, however long after,
    must not cut the save short; Ctrl-C still does."""
    monkeypatch.setattr(signals, "SAME_REQUEST_SECONDS", 0.0)  # however long after the notice
    run, text = stopped_then_sigterm_while_closing(signal.SIGUSR1, tmp_path, monkeypatch, capsys, caplog)
    assert "received SIGUSR1: finishing the current step, then saving a checkpoint" in text
    assert "Ctrl-C (SIGINT) stops at once, without saving" in text
    assert "SIGTERM" in text and "after SIGUSR1: the same request" in text
    assert f"continue with: slimssl pretrain --resume {shell_quote(run)}" in text
    with caplog.at_level(logging.INFO, logger="slimssl"), SignalGuard() as guard:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # srun and the batch shell may both pass it on
        assert guard.received == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt, match="a second stop signal, SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    with SignalGuard() as guard:  # the notice after the stop: nothing new either
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.received == signal.SIGTERM


def test_sigterm_outside_the_training_loop_stops_the_command_as_ctrl_c_does(tmp_path, monkeypatch, capsys, caplog):
    """Before training (loading, building) a SIGTERM is a one-line stop with exit 130, and the start, which saved
    nothing, is cleaned up; it used to kill the process with its files left behind. A second, different stop
    signal after a saved stop still stops at once."""
    def sigterm_while_setting_up(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_setup_model", sigterm_while_setting_up)
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(write_config(tmp_path / "t.yaml")), "--out", str(run)]) == 130
    assert "interrupted (SIGTERM outside the training loop); nothing it had saved is lost" in \
        error_text(capsys, caplog)
    assert not run.exists()

    with signals.command_stop_signals():
        with SignalGuard():
            os.kill(os.getpid(), signal.SIGINT)  # the loop's stop: saved, then the guard is left
        with pytest.raises(KeyboardInterrupt, match="a second stop signal, SIGINT, after the first"):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_sigterm_after_a_stop_another_process_asked_for_changes_nothing(monkeypatch, caplog):
    """Under torchrun a process stops with the others at a logged step, perhaps without a signal of its own, and
    torchrun may then SIGTERM it while it closes: the stop is saved, so it still exits 3, not 130 with a
    traceback. Ctrl-C there is still a person's way out."""
    with caplog.at_level(logging.INFO, logger="slimssl"), signals.command_stop_signals():
        signals.mark_stop_saved()  # what the loop's _stopped does after its save
        os.kill(os.getpid(), signal.SIGTERM)
        assert "SIGTERM after the run saved its stop: the command is ending" in caplog.text
        with pytest.raises(KeyboardInterrupt, match="SIGINT outside the training loop"):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_torchrun_process_that_saved_its_stop_ignores_sigterm_until_it_exits():
    """torchrun may SIGTERM a rank that already saved and is shutting down; a process of one gets its handlers
    back (slimssl's CLI may run inside a longer-lived Python)."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        with signals.command_stop_signals(ignore_sigterm_after_saved_stop=True):
            signals.mark_stop_saved()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, before)
        with signals.command_stop_signals(ignore_sigterm_after_saved_stop=True):
            pass  # no stop saved: the handlers come back
        assert signal.getsignal(signal.SIGTERM) is before
        with signals.command_stop_signals():
            signals.mark_stop_saved()
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_same_sigterm_again_lets_a_stopped_start_clean_up(caplog):
    """A scheduler's SIGTERM outside the loop stops the command; its duplicate (every process of the job gets
    one, and torchrun forwards its own) must not cut short the removal of the start's files that follows."""
    with caplog.at_level(logging.INFO, logger="slimssl"), signals.command_stop_signals():
        with pytest.raises(KeyboardInterrupt, match="SIGTERM outside the training loop"):
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the clean-up goes on
        assert "the same request (a scheduler" in caplog.text and "which the command is ending on" in caplog.text


def test_a_stop_signal_outside_training_under_torchrun_is_one_line(monkeypatch, caplog):
    from slimssl.train import distributed as dist

    exits = []
    monkeypatch.setattr(dist.os, "_exit", exits.append)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    dist.fail_fast(KeyboardInterrupt("SIGTERM outside the training loop"), 130, traceback=False)
    assert exits == [130]
    assert "rank 1 of 2: interrupted (SIGTERM outside the training loop); nothing it had saved is lost" in caplog.text
    assert "failed" not in caplog.text


def test_resume_after_max_steps_equals_uninterrupted_run(tmp_path):
    cfg = config_from_dict(TINY)
    assert Trainer(cfg, tmp_path / "a").fit(max_steps=3) == {}  # stopped early: no results yet
    Trainer(cfg, tmp_path / "a", resume=True).fit()
    Trainer(cfg, tmp_path / "b").fit()
    assert_same_state(model_state(tmp_path / "a"), model_state(tmp_path / "b"))


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the throughput and the time of writing, which depend on the clock."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("img_per_s", "time")} for line in lines]


@pytest.mark.parametrize("stop_after", [5, 4, 7], ids=["between_records", "at_an_epoch_end", "after_a_trained_step"])
def test_a_run_stopped_and_resumed_logs_the_records_of_a_straight_run(tmp_path, monkeypatch, stop_after):
    # (stopped after step 5, the checkpoint's window holds no loss, step 4 being skipped; after step 7, it holds
    # step 7's, which the record of step 8 must average in after the resume)
    # log_every 3 and epochs of 4 steps: records at steps 3, 4, 6, 8, 9, 12. Step 4 (0-based) is skipped for a
    # NaN loss, so the record of step 6 averages steps 5 and 6 alone, and carries the lr of its last step.
    cfg = config_from_dict(tiny(train={"log_every": 3, "nonfinite": "skip"}, eval={"knn_random_init": False}))

    def trainer(run: Path, resume: bool = False) -> Trainer:
        t = Trainer(cfg, run, resume=resume)
        poison_loss(monkeypatch, t, bad_steps={4}, subnet_index=0)
        return t

    trainer(tmp_path / "straight").fit()
    trainer(tmp_path / "stopped").fit(max_steps=stop_after)
    trainer(tmp_path / "stopped", resume=True).fit()
    assert_same_state(model_state(tmp_path / "stopped"), model_state(tmp_path / "straight"))
    expected = records(tmp_path / "straight")
    assert [r["step"] for r in expected if "loss" in r] == [3, 4, 6, 8, 9, 12]
    assert all(r["lr"] is not None for r in expected if "loss" in r)
    assert records(tmp_path / "stopped") == expected


def test_a_checkpoint_without_metrics_bytes_keeps_the_record_of_its_own_step(tmp_path):
    """Checkpoints saved before 2026-12-06 do not record metrics.jsonl's length: a resume then keeps the records up
    to the checkpoint's step, its own included."""
    cfg = config_from_dict(tiny(eval={"knn_random_init": False}))
    Trainer(cfg, tmp_path / "straight").fit(max_steps=8)
    Trainer(cfg, tmp_path / "old").fit(max_steps=4)
    path = tmp_path / "old" / "checkpoints" / "last.pt"
    data = load_checkpoint(path)
    data.pop("metrics_bytes")
    data["config"] = data["config"].model_dump(mode="json")
    save_checkpoint(path, {k: v for k, v in data.items() if k not in ("format", "version")})
    Trainer(cfg, tmp_path / "old", resume=True).fit(max_steps=8)
    assert records(tmp_path / "old") == records(tmp_path / "straight")


def test_a_resume_keeps_the_epoch_knn_logged_after_its_checkpoint_and_does_not_measure_it_again(tmp_path,
                                                                                               monkeypatch):
    from slimssl.train.monitor import KnnMonitor

    cfg = config_from_dict(tiny(train={"knn_every": 1}, eval={"knn_random_init": False}))
    Trainer(cfg, tmp_path).fit(max_steps=4)  # epoch 1: last.pt, then its kNN record
    before = records(tmp_path)
    assert [r["step"] for r in before if "knn_top1" in r] == [4]
    calls = []
    monkeypatch.setattr(KnnMonitor, "__call__", lambda self, backbone: calls.append(1) or {})
    Trainer(cfg, tmp_path, resume=True).fit(max_steps=5)
    assert calls == [] and records(tmp_path)[:len(before)] == before


@pytest.mark.parametrize("changes, stop_at", [(["optim.lr=0.1"], 4), (["train.batch_size=32"], 8)],
                         ids=["new_lr", "new_batch"])
def test_a_resume_with_changes_killed_before_saving_logs_once_when_run_again(tmp_path, monkeypatch, changes,
                                                                              stop_at):
    """A resume that changes the lr or the batch begins with a record of it (effective_lr, steps_renumbered).
    Killed before its first checkpoint, the same resume again used to keep that record and write it a second
    time; with a larger batch the killed attempt's steps, counted anew, were below the checkpoint's and were
    logged twice too. The checkpoint records metrics.jsonl's length, and a resume keeps what it held then."""
    from slimssl.train.pretrain import pretrain

    cfg = config_from_dict(tiny(eval={"knn_random_init": False}))
    for run in ("straight", "killed"):
        pretrain(cfg, tmp_path / run, max_steps=stop_at)
    pretrain(None, tmp_path / "straight", resume=True, overrides=changes)
    original = Trainer.train_step

    def killed_at_its_second_step(self, step):
        if step == self.state.step and step > stop_at // (2 if "batch" in changes[0] else 1):
            raise Killed
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", killed_at_its_second_step)
    for cleanup in ("_restore_if_unsaved", "_discard_failed_start"):  # what a SIGKILL leaves no time for
        monkeypatch.setattr(f"slimssl.train.pretrain.{cleanup}", lambda *args: None)
    with pytest.raises(Killed):
        pretrain(None, tmp_path / "killed", resume=True, overrides=changes)
    monkeypatch.undo()
    killed_attempt = records(tmp_path / "killed")
    assert any("effective_lr" in r or "steps_renumbered" in r for r in killed_attempt[-3:])  # it logged its own
    pretrain(None, tmp_path / "killed", resume=True, overrides=changes)
    assert records(tmp_path / "killed") == records(tmp_path / "straight")
    assert_same_state(model_state(tmp_path / "killed"), model_state(tmp_path / "straight"))


def test_a_nan_loss_between_records_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    # the NaN of step 5 is not logged before the stop at step 6: the save itself must refuse NaN weights
    cfg = config_from_dict(tiny(train={"log_every": 100}))
    trainer = Trainer(cfg, tmp_path)
    poison_loss(monkeypatch, trainer, bad_steps={5}, subnet_index=1)
    with pytest.raises(NonFiniteLossError, match=f"weights at step 6 are not finite after a non-finite loss of "
                                                 f"sub-network {HALF}.*last good checkpoint is kept"):
        trainer.fit(max_steps=6)
    data = load_checkpoint(tmp_path)
    assert data["train_state"]["step"] == 4 and all_finite(data["model"])


def test_non_finite_weights_under_nonfinite_skip_are_not_told_to_set_it(tmp_path, monkeypatch):
    """train.nonfinite=skip skips steps of a non-finite loss; weights that a finite loss made non-finite (an
    overflowing gradient) stop the run, and the advice is not the setting already on."""
    trainer = Trainer(config_from_dict(tiny(train={"nonfinite": "skip", "log_every": 100})), tmp_path)
    step, calls = trainer.optimizer.step, []

    def overflowing_step(*args, **kwargs):
        step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                trainer.model.online_parameters()[0].fill_(float("inf"))

    monkeypatch.setattr(trainer.optimizer, "step", overflowing_step)
    with pytest.raises(NonFiniteLossError, match=r"weights at step 4 are not finite; no checkpoint had been written "
                                                 r"yet. Lower optim.lr; train.nonfinite=skip \(set\) skips only") as e:
        trainer.fit(max_steps=4)
    assert "or set train.nonfinite=skip" not in str(e.value)


def test_resume_applies_the_optimizer_settings_it_is_given(tmp_path):
    from slimssl.train.prepare import prepare_run

    cfg = tiny(optim={"name": "lars", "weight_decay": 1e-4, "momentum": 0.9, "trust_coefficient": 0.001})
    Trainer(config_from_dict(cfg), tmp_path).fit(max_steps=2)
    changed = ["optim.weight_decay=0.01", "optim.momentum=0.5", "optim.trust_coefficient=0.02"]
    prepared = prepare_run(None, tmp_path, overrides=changed, resume=True)
    groups = Trainer(prepared.cfg, prepared.run_dir, resume=True).optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]  # biases and norms keep none
    assert all(g["momentum"] == 0.5 and g["trust_coefficient"] == 0.02 for g in groups)
    assert all(len(state) for state in Trainer(prepared.cfg, prepared.run_dir, resume=True).optimizer.state.values())


def test_a_resume_on_a_training_set_of_another_size_continues_at_the_same_epoch(tmp_path, caplog):
    """Images added or removed between two calls: the schedule counts epochs, so the run goes on from the epoch
    it had reached (before, the saved step was read in the new epochs: removed images ended the run early)."""
    from slimssl.train.prepare import prepare_run

    cfg = config_from_dict(tiny(eval={"knn_random_init": False}))  # 64 images: 4 steps of 16 per epoch
    Trainer(cfg, tmp_path / "run").fit(max_steps=6)  # epoch 1.5
    prepared = prepare_run(None, tmp_path / "run", overrides=["data.fake_size=32"], resume=True)  # 2 steps an epoch
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        trainer = Trainer(prepared.cfg, prepared.run_dir, resume=True)
    assert (trainer.state.step, trainer.total_steps) == (3, 2 * cfg.train.epochs)
    assert "the training set gives 2 steps per epoch, and gave 4 when the run was saved" in caplog.text
    trainer.fit()
    epochs = [r["epoch"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert epochs[-1] == cfg.train.epochs and all(b >= a for a, b in zip(epochs, epochs[1:]))  # never backwards


def test_a_finished_run_resumed_on_a_training_set_of_another_size_stays_finished_with_its_results(tmp_path):
    from slimssl.train.prepare import prepare_run
    from slimssl.train.pretrain import pretrain

    cfg = config_from_dict(tiny(eval={"knn_random_init": False, "knn_k": 5}))
    pretrain(cfg, tmp_path / "run")
    results = (tmp_path / "run" / "results.json").read_text()
    prepared = prepare_run(None, tmp_path / "run", overrides=["data.fake_size=32"], resume=True)
    trainer = Trainer(prepared.cfg, prepared.run_dir, resume=True)
    assert trainer.state.step == 12  # as trained: nothing left to train, nothing converted
    trainer.fit()
    assert (tmp_path / "run" / "results.json").read_text() == results


def test_a_resume_on_a_much_smaller_training_set_is_not_back_at_step_0(tmp_path):
    from slimssl.train.prepare import prepare_run

    cfg = config_from_dict(tiny(train={"batch_size": 8}, eval={"knn_random_init": False}))  # 8 steps an epoch
    Trainer(cfg, tmp_path / "run").fit(max_steps=1)  # epoch 0.125
    prepared = prepare_run(None, tmp_path / "run", overrides=["data.fake_size=16"], resume=True)  # 2 steps an epoch
    assert Trainer(prepared.cfg, prepared.run_dir, resume=True).state.step == 1


def test_a_resume_on_a_training_set_of_another_size_continues_at_the_nearest_step_of_its_epoch():
    """The epoch reached, in steps of the new length, is rounded to the nearest step (one more can be closer)."""
    from slimssl.train.resume import _step_with_another_training_set as converted

    assert converted(7, 1.75, 4, 5) == 9  # 8.75 steps of the new epochs: rounded, not floored
    assert converted(7, 1.75, 4, 3) == 5  # 5.25
    assert converted(1, 0.05, 20, 4) == 1  # 0.2: never back at step 0


def test_changing_batch_and_training_set_mid_epoch_names_the_steps_of_the_images_there_are_now(tmp_path):
    from slimssl.train.prepare import prepare_run

    cfg = config_from_dict(tiny(eval={"knn_random_init": False}))  # 64 images: 4 steps of 16 per epoch
    Trainer(cfg, tmp_path / "run").fit(max_steps=6)  # epoch 1.5
    prepared = prepare_run(None, tmp_path / "run", overrides=["data.fake_size=32", "train.batch_size=8"],
                           resume=True)
    with pytest.raises(ConfigError, match=r"--max-steps 4 "):  # the end of epoch 2 in steps of 16 on 32 images
        Trainer(prepared.cfg, prepared.run_dir, resume=True)
    follow = prepare_run(None, tmp_path / "run", overrides=["data.fake_size=32"], resume=True)
    Trainer(follow.cfg, follow.run_dir, resume=True).fit(max_steps=4)
    assert load_checkpoint(tmp_path / "run")["epoch"] == 2  # the hint stops at the epoch's end, as it says


def test_a_resume_with_another_batch_continues_at_the_same_epoch(tmp_path):
    # (on fewer processes the batch may have to change). 64 images: 4 steps of 16, or 2 of 32, per epoch
    from slimssl.train.prepare import prepare_run

    cfg = config_from_dict(tiny(eval={"knn_random_init": False}))
    Trainer(cfg, tmp_path / "mid").fit(max_steps=5)
    prepared = prepare_run(None, tmp_path / "mid", overrides=["train.batch_size=32"], resume=True)
    with pytest.raises(ConfigError, match=r"saved at step 5, within an epoch, with train.batch_size 16.*"
                                          r"divides 16: slimssl pretrain --resume .*mid'? --max-steps 8 "
                                          r"\(max_steps=8 in Python\); then change the batch"):
        Trainer(prepared.cfg, prepared.run_dir, resume=True)

    Trainer(cfg, tmp_path / "end").fit(max_steps=8)  # the end of epoch 2
    prepared = prepare_run(None, tmp_path / "end", overrides=["train.batch_size=32"], resume=True)
    trainer = Trainer(prepared.cfg, prepared.run_dir, resume=True)
    assert (trainer.state.step, trainer.total_steps) == (4, 6)
    assert trainer.fit()["steps"] == 6
    logged = [(r["step"], r["epoch"]) for r in records(tmp_path / "end") if "loss" in r]
    assert logged[-4:] == [(7, 1.75), (8, 2.0), (5, 2.5), (6, 3.0)]  # the old steps' records are kept

    # stopped and resumed again at the new batch: the records of the old, higher step numbers stay too
    Trainer(cfg, tmp_path / "twice").fit(max_steps=8)
    prepared = prepare_run(None, tmp_path / "twice", overrides=["train.batch_size=32"], resume=True)
    Trainer(prepared.cfg, prepared.run_dir, resume=True).fit(max_steps=5)
    Trainer(prepared.cfg, prepared.run_dir, resume=True).fit()
    assert records(tmp_path / "twice") == records(tmp_path / "end")


def test_a_run_killed_without_notice_loses_at_most_the_minutes_of_save_every_minutes(tmp_path, monkeypatch):
    """A SIGKILL, an out-of-memory kill or a lost node gives no notice: with train.save_every_minutes, last.pt is
    saved within an epoch too (at a logged step), and the resume from it is the run that was never killed."""
    cfg = config_from_dict(tiny(train={"epochs": 2, "log_every": 2, "save_every_minutes": 1e-9},
                                eval={"knn_random_init": False}))
    killed = Trainer(cfg, tmp_path / "killed")
    original = Trainer.train_step

    def killed_at_step_7(self, step):  # in the second epoch (4 steps each), after the logged step 6
        if step == 6:
            raise KeyboardInterrupt("SIGKILL")  # nothing runs after it in a real kill: no save
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    killed.metrics.close()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert load_checkpoint(tmp_path / "killed")["train_state"]["step"] == 6  # not 4, the epoch's end
    assert Trainer(cfg, tmp_path / "killed", resume=True).fit()["steps"] == 8
    Trainer(cfg, tmp_path / "straight").fit()
    assert_same_state(model_state(tmp_path / "killed"), model_state(tmp_path / "straight"))
    assert records(tmp_path / "killed") == records(tmp_path / "straight")

    every_epoch = config_from_dict(tiny(train={"epochs": 2, "log_every": 2}, eval={"knn_random_init": False}))
    monkeypatch.setattr(Trainer, "train_step", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        Trainer(every_epoch, tmp_path / "default").fit()
    assert load_checkpoint(tmp_path / "default")["train_state"]["step"] == 4  # the default: epoch ends only


def test_a_job_script_that_adds_save_every_minutes_still_continues_its_run(tmp_path):
    import slimssl

    config = tiny(train={"epochs": 2}, eval={"knn_random_init": False})
    slimssl.pretrain(config, tmp_path / "run", resume="auto", max_steps=2)
    run = slimssl.pretrain(config, tmp_path / "run", resume="auto", overrides=["train.save_every_minutes=30"])
    assert run.finished and load_checkpoint(tmp_path / "run")["config"].train.save_every_minutes == 30


def test_a_first_stop_signal_is_a_flag_and_a_second_stops_at_once(caplog):
    with caplog.at_level(logging.WARNING, logger="slimssl"), SignalGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.received == signal.SIGINT  # the work in flight goes on
        with pytest.raises(KeyboardInterrupt, match="a second stop signal, SIGTERM, stopped it at once"):
            os.kill(os.getpid(), signal.SIGTERM)  # the command line says so, not "Ctrl-C"
    assert "A second SIGINT stops at once, without saving" in caplog.text  # the user learns the way out


def test_a_sigterm_repeated_at_once_is_the_same_request(caplog, monkeypatch):
    """A scheduler that signals every process of a job, and torchrun forwarding its own, deliver SIGTERM twice
    within milliseconds: the run still saves. A SIGTERM later, or a second Ctrl-C, stops at once."""
    with caplog.at_level(logging.INFO, logger="slimssl"), SignalGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.received == signal.SIGTERM
        assert "another SIGTERM" in caplog.text and "still saving" in caplog.text
        monkeypatch.setattr(signals, "SAME_REQUEST_SECONDS", 0.0)
        with pytest.raises(KeyboardInterrupt, match="a second stop signal, SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    with SignalGuard():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt, match="a second stop signal, SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)


def test_an_epoch_knn_missed_by_a_hard_stop_is_run_on_resume(tmp_path, monkeypatch):
    cfg = config_from_dict(tiny(train={"knn_every": 1}, eval={"knn_random_init": False, "knn_k": 5}))
    Trainer(cfg, tmp_path / "straight").fit()
    stopped = Trainer(cfg, tmp_path / "stopped")

    def knn_killed():  # a second Ctrl-C, or SIGKILL after a grace period, while the kNN of epoch 1 runs
        raise KeyboardInterrupt

    monkeypatch.setattr(stopped, "knn", knn_killed)
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    stopped.metrics.close()
    assert load_checkpoint(tmp_path / "stopped")["train_state"]["step"] == 4  # saved before the kNN
    Trainer(cfg, tmp_path / "stopped", resume=True).fit()
    knn_epochs = [[r["epoch"] for r in records(tmp_path / run) if "knn_top1" in r] for run in ("straight", "stopped")]
    assert knn_epochs == [[1, 2, 3], [1, 2, 3]]
    assert records(tmp_path / "stopped") == records(tmp_path / "straight")


@pytest.mark.parametrize("when, waits_for", [("random_init", "the kNN at random initialisation and the first step"),
                                             ("epoch", "this epoch's kNN and the next step")])
def test_a_stop_signal_during_a_knn_says_that_it_and_a_step_finish_first(tmp_path, monkeypatch, caplog, when,
                                                                         waits_for):
    """On a large split a kNN takes minutes: the stop warning says what it waits for, and the run stops after the
    step that follows it."""
    cfg = config_from_dict(tiny(train={"knn_every": 1 if when == "epoch" else 0},
                                eval={"knn_random_init": when == "random_init", "knn_k": 5}))
    measure = KnnMonitor.__call__

    def knn_signalled(self, backbone):
        if signal.getsignal(signal.SIGINT) not in (signal.SIG_DFL, signal.default_int_handler, None):
            os.kill(os.getpid(), signal.SIGINT)
        return measure(self, backbone)

    monkeypatch.setattr(KnnMonitor, "__call__", knn_signalled)
    trainer = Trainer(cfg, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="slimssl"), pytest.raises(Interrupted) as stopped:
        trainer.fit()
    assert f"received SIGINT: finishing {waits_for}, then saving a checkpoint" in caplog.text
    assert f"at step {1 if when == 'random_init' else trainer.steps_per_epoch + 1};" in str(stopped.value)


def test_a_stop_signal_as_the_last_step_ends_says_the_final_evaluation_runs_first(tmp_path, monkeypatch, caplog):
    """A signal while the last step's record is written (a callback's work, say) comes after the loop's last look:
    the run is trained, and its final evaluation runs; the warning says so, not only 'finishing the step'."""
    cfg = config_from_dict(tiny(eval={"knn_random_init": False, "knn_k": 5}))
    log_fn = Trainer._log

    def last_record_signalled(self, *args):
        if self.state.step == self.total_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return log_fn(self, *args)

    monkeypatch.setattr(Trainer, "_log", last_record_signalled)
    trainer = Trainer(cfg, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        results = trainer.fit()
    assert "received SIGTERM: the run is trained; its final kNN evaluation and results.json are finished first" \
        in caplog.text and "finishing the current step" not in caplog.text
    assert results["steps"] == 12 and trainer.signal_received == signal.SIGTERM


def test_a_stop_signal_during_the_final_knn_lets_it_end_and_is_reported(tmp_path, monkeypatch, caplog):
    cfg = config_from_dict(tiny(eval={"knn_random_init": False, "knn_k": 5}))
    measure, handled = KnnMonitor.__call__, []

    def knn_signalled(self, backbone):  # SIGTERM while the final kNN runs (a scheduler's notice, say)
        handled.append(signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None))
        if handled[-1]:  # never with the default handler, which would end the test's process
            os.kill(os.getpid(), signal.SIGTERM)
        return measure(self, backbone)

    monkeypatch.setattr(KnnMonitor, "__call__", knn_signalled)
    trainer = Trainer(cfg, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        results = trainer.fit()
    assert "received SIGTERM: the run is trained; its final kNN evaluation and results.json are finished first" \
        in caplog.text
    assert handled == [True]  # the guard's handler was in force
    assert results["steps"] == 12 and all(row["knn_top1"] is not None for row in results["subnets"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 12
    assert trainer.signal_received == signal.SIGTERM  # for the caller to act on (reproduce stops its call)


def _step_and_knn_clock(monkeypatch) -> None:
    """The training loop's clock: one second per step, a thousand for each end-of-epoch kNN."""
    clock = [0.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    step_fn, measure = Trainer.train_step, KnnMonitor.__call__

    def train_step(self, step):
        clock[0] += 1.0
        return step_fn(self, step)

    def knn(self, backbone):
        clock[0] += 1000.0
        return measure(self, backbone)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(KnnMonitor, "__call__", knn)


def test_img_per_s_counts_the_training_steps_and_not_the_epochs_checkpoint_or_knn(tmp_path, monkeypatch):
    _step_and_knn_clock(monkeypatch)
    cfg = config_from_dict(tiny(train={"knn_every": 1}, eval={"knn_random_init": False, "knn_k": 5}))
    Trainer(cfg, tmp_path / "run").fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    speeds = [r["img_per_s"] for r in map(json.loads, lines) if "img_per_s" in r]
    assert len(speeds) == 12 and speeds == [16.0] * 12  # batch 16, one step a second, after each kNN too


def test_the_minutes_to_a_timed_save_leave_out_the_epochs_checkpoint_and_knn(tmp_path, monkeypatch):
    """train.save_every_minutes counts training: an epoch's kNN of 1000 s made the next epoch's first logged step
    write last.pt again, a step after the epoch's own save."""
    _step_and_knn_clock(monkeypatch)
    save, saved = Trainer.save, []

    def recorded_save(self, *args, **kwargs):
        saved.append(self.state.step)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save", recorded_save)
    cfg = config_from_dict(tiny(train={"knn_every": 1, "save_every_minutes": 0.1},  # 6 s: 6 steps
                                eval={"knn_random_init": False, "knn_k": 5}))
    Trainer(cfg, tmp_path / "run").fit()
    assert saved == [4, 8, 12]  # the epochs' ends only: an epoch (4 steps) is shorter than 6 s of training


@pytest.mark.parametrize("unreadable", [True, False])
def test_bad_knn_data_mid_run_says_the_steps_are_saved_and_what_to_resume_with(tmp_path, monkeypatch, unreadable):
    from slimssl.errors import DataError, UnreadableImageError

    cfg = config_from_dict(tiny(train={"knn_every": 1}, eval={"knn_random_init": False, "knn_k": 5}))
    trainer = Trainer(cfg, tmp_path / "run")
    error = UnreadableImageError("cannot decode some/test/file.jpg") if unreadable else DataError("bad some/test")

    def bad(self, backbone):  # a streamed kNN split meets a file it cannot decode, or another fault
        raise error

    monkeypatch.setattr(KnnMonitor, "__call__", bad)
    when = r"\(with --set data.skip_unreadable=true, or once the file is replaced\)" if unreadable else \
        r"\(once the data is fixed\)"  # skipping unreadable files would not help
    with pytest.raises(type(error), match=f"{error}\\nthe 4 steps trained so far are saved in "
                                          rf".*last.pt: continue with slimssl pretrain --resume .+ {when}$"):
        trainer.fit()
    trainer.metrics.close()
    assert load_checkpoint(tmp_path / "run")["train_state"]["step"] == 4


def test_bad_data_met_by_another_rank_than_0_saves_the_steps_trained(tmp_path, monkeypatch):
    # rank 0 would be waiting for this process in the step's all-reduce: the process that met the file saves
    from slimssl.data.files import DataError

    trainer = Trainer(config_from_dict(TINY), tmp_path)
    step_fn = trainer.train_step

    def train_step(step):
        if step == 2:
            raise DataError("cannot decode some/file.png")
        return step_fn(step)

    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(loop.dist, "is_main", lambda: False)
    with pytest.raises(DataError, match="the 2 steps trained so far are saved"):
        trainer.fit()
    assert load_checkpoint(tmp_path)["train_state"]["step"] == 2


def test_auto_resume_starts_again_after_a_start_killed_before_its_first_step(tmp_path):
    from slimssl.train.pretrain import pretrain

    cfg = config_from_dict(tiny(train={"epochs": 1}))
    run = tmp_path / "run"

    def killed_start(metrics: list[dict]) -> None:  # what a start leaves when SIGKILLed during its first kNN
        (run / "tb").mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(cfg.to_yaml())
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))

    killed_start([{"step": 0, "effective_lr": {}}])
    assert pretrain(cfg, run, resume="auto").finished
    # a finished run whose last.pt was renamed is no failed start: nothing of it is removed
    (run / "checkpoints" / "last.pt").rename(run / "checkpoints" / "final.pt")
    (run / "metrics.jsonl").unlink()
    with pytest.raises(SlimsslError, match="holds files of an earlier run"):
        pretrain(cfg, run, resume="auto")
    assert (run / "checkpoints" / "final.pt").is_file() and (run / "results.json").is_file()
    # not a start of these settings: refused as before
    other = config_from_dict(tiny(train={"epochs": 1}, optim={"lr": 0.123}))
    shutil.rmtree(run)
    killed_start([])
    with pytest.raises(SlimsslError, match="holds files of an earlier run.*remove those files to start again"):
        pretrain(other, run, resume="auto")


def test_auto_resume_starts_again_after_a_start_killed_before_its_first_checkpoint(tmp_path, caplog):
    """SIGKILL, an out-of-memory kill or a lost node in the first epoch leaves logged steps that were never
    saved, perhaps with a checkpoint's unfinished temporary file: a job submitted again starts over, as its
    script asks. A later kill during a save leaves such a file beside last.pt: it is removed on resume."""
    from slimssl.train.pretrain import pretrain

    cfg = config_from_dict(tiny(train={"epochs": 1}))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": {FULL: 1.0}}) + "\n")
    (run / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO, logger="slimssl"):
        done = pretrain(cfg, run, resume="auto", max_steps=2)
    assert "stopped before its first checkpoint" in caplog.text
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and done.step == 2  # the old records went with the start that saved nothing

    (run / "checkpoints" / ".last.pt.def456.tmp").write_bytes(b"a save killed midway")
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert pretrain(cfg, run, resume="auto").finished
    assert "removed .last.pt.def456.tmp, left by a checkpoint save that was killed midway" in caplog.text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]

    # a kill while the first checkpoint was written: the epoch's last record (epoch 1.0) is there, not the file
    shutil.rmtree(run)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "epoch": 1.0, "loss": {FULL: 1.0}}) + "\n")
    (run / "checkpoints" / ".last.pt.xyz.tmp").write_bytes(b"half of the first checkpoint")
    assert pretrain(cfg, run, resume="auto").finished

    # a run past its first epoch's end had a checkpoint: one moved away is no failed start, its metrics are kept
    longer = config_from_dict(tiny(train={"epochs": 2}))
    pretrain(longer, tmp_path / "longer", max_steps=6)
    (tmp_path / "longer" / "checkpoints" / "last.pt").rename(tmp_path / "last.pt")
    kept = (tmp_path / "longer" / "metrics.jsonl").read_text()
    with pytest.raises(SlimsslError, match="holds files of an earlier run"):
        pretrain(longer, tmp_path / "longer", resume="auto")
    assert (tmp_path / "longer" / "metrics.jsonl").read_text() == kept


class HeldByAnotherProcess:
    """The training lock of ``folder``, held by a child process until ``kill()`` (a SIGKILL)."""

    def __init__(self, folder: Path):
        script = ("import sys, time; from pathlib import Path; from slimssl.train.lock import TrainingLock; "
                  "lock = TrainingLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)")
        self.process = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


def test_a_run_that_another_process_trains_is_refused_without_touching_its_files(tmp_path):
    """A job submitted twice, or the workers a SIGKILLed torchrun launcher leaves training: a second process
    would write the same checkpoint and log. The lock is the operating system's, so a killed process leaves none."""
    from slimssl.train.pretrain import pretrain

    cfg = config_from_dict(tiny(train={"epochs": 2}))
    run = tmp_path / "run"
    pretrain(cfg, run, max_steps=2)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert (run / ".train.lock").is_file()  # kept, and free again: the next call takes it
    other = HeldByAnotherProcess(run)
    try:
        for config, resume in ((None, True), (cfg, "auto")):
            with pytest.raises(SlimsslError, match=r"is training in .*run now"):
                pretrain(config, run, resume=resume)
        # in its first epoch, a run looks like a start that saved nothing: not removed while it trains
        first = tmp_path / "first"
        pretrain(cfg, first, max_steps=1)
        shutil.rmtree(first / "checkpoints")
        started = HeldByAnotherProcess(first)
        with pytest.raises(SlimsslError, match="is training in"):
            pretrain(cfg, first, resume="auto")
        assert (first / "config.yaml").is_file() and (first / "metrics.jsonl").is_file()
        started.kill()
    finally:
        other.kill()  # a SIGKILL: the lock goes with the process
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    assert pretrain(None, run, resume=True).finished


def test_a_second_lock_in_the_same_process_is_refused_and_keeps_the_first(tmp_path):
    """A record lock is the process's: granted again within it, and dropped by any close of the file. A second
    training of the run in this process (another thread, a call within a call) is refused all the same, and the
    first lock still keeps other processes out."""
    from slimssl.train.lock import TrainingLock, refuse_if_training
    from slimssl.train.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(config_from_dict(tiny(train={"epochs": 2})), run, max_steps=2)
    try_lock = [sys.executable, "-c", "import sys; from pathlib import Path; "
                "from slimssl.train.lock import TrainingLock; TrainingLock(Path(sys.argv[1])).release()", str(run)]
    held = TrainingLock(run)
    try:
        with pytest.raises(SlimsslError, match=r"another process \(or another call in this one\) is training"):
            pretrain(None, run, resume=True)
        with pytest.raises(SlimsslError, match="is training in"):
            refuse_if_training(run)
        assert subprocess.run(try_lock, capture_output=True).returncode != 0  # still held against the others
    finally:
        held.release()
    assert subprocess.run(try_lock, capture_output=True).returncode == 0
    assert pretrain(None, run, resume=True).finished


def test_without_lockf_the_unguarded_run_is_a_warning(tmp_path, monkeypatch, caplog):
    """Windows has no lockf: training goes on, and the user is warned that nothing keeps a second process out."""
    from slimssl.train.lock import TrainingLock

    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl raises ImportError, as on Windows
    with caplog.at_level(logging.WARNING, logger="slimssl"), TrainingLock(tmp_path):
        pass
    assert "is not guarded against a second training process; start one at a time" in caplog.text


def test_a_training_lock_taken_with_with_is_let_go_at_the_end_of_the_block(tmp_path):
    from slimssl.train.lock import TrainingLock

    with pytest.raises(RuntimeError, match="inside"):
        with TrainingLock(tmp_path):
            with pytest.raises(SlimsslError, match="is training in"):
                TrainingLock(tmp_path)  # held: refused, in this process too
            raise RuntimeError("inside")  # an error in the block lets go of it as well
    TrainingLock(tmp_path).release()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked data-loader workers are a POSIX matter")
def test_the_workers_of_a_killed_training_process_do_not_keep_its_lock(tmp_path):
    """Data-loader workers are forked from the training process, with its open files: they must not hold the
    run's lock after it was SIGKILLed (they take seconds to notice), or an immediate resume would be refused."""
    from slimssl.train.lock import TrainingLock

    script = ("import os, sys, time; from pathlib import Path; from slimssl.train.lock import TrainingLock; "
              "lock = TrainingLock(Path(sys.argv[1])); child = os.fork()\n"
              "if child == 0:\n    time.sleep(120)\nelse:\n    print(child, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    try:
        with pytest.raises(SlimsslError, match="is training in"):
            TrainingLock(tmp_path)
        parent.kill()
        parent.wait()
        os.kill(worker, 0)  # the forked worker lives on, with the lock file open
        TrainingLock(tmp_path).release()  # free at once all the same
    finally:
        parent.kill()
        parent.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


class Killed(BaseException):
    """A SIGKILL at a chosen moment: nothing after it runs, no handler catches it."""


def test_a_run_killed_between_its_last_checkpoint_and_the_epochs_copy_resumes_exactly(tmp_path, monkeypatch):
    """The end of an epoch writes last.pt before its kept epoch_XXXX.pt: a kill in between (in the first epoch,
    where no earlier last.pt exists) leaves a run that resumes, and the resume writes the missing copy."""
    from slimssl.train.pretrain import pretrain

    cfg = config_from_dict(tiny(train={"epochs": 2, "checkpoint_every": 1}))
    pretrain(cfg, tmp_path / "straight")
    original = Trainer.save

    def killed_before_the_copy(self, name="last.pt", any_rank=False):
        if name.startswith("epoch_"):
            raise Killed
        return original(self, name, any_rank)

    monkeypatch.setattr(Trainer, "save", killed_before_the_copy)
    with pytest.raises(Killed):
        pretrain(cfg, tmp_path / "run")
    monkeypatch.setattr(Trainer, "save", original)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.pt"]
    assert pretrain(cfg, tmp_path / "run", resume="auto").finished
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0001.pt", "last.pt"]
    for name in ("epoch_0001.pt", "last.pt"):
        assert_same_state(load_checkpoint(checkpoints / name)["model"],
                          load_checkpoint(tmp_path / "straight" / "checkpoints" / name)["model"])


def test_a_run_killed_after_its_last_step_was_saved_saves_the_same_optimiser_state_on_resume(tmp_path, monkeypatch):
    """Killed in its final kNN, a run resumes with no step to train and writes last.pt again: with the lr of its
    last step in the optimiser, as a straight run leaves it (the schedule's peak was put back before)."""
    from slimssl.train.pretrain import pretrain

    cfg = config_from_dict(tiny(train={"epochs": 1}, optim={"warmup_epochs": 0.5}))
    pretrain(cfg, tmp_path / "straight")

    def killed(self):
        raise Killed

    monkeypatch.setattr(Trainer, "finish", killed)
    with pytest.raises(Killed):
        pretrain(cfg, tmp_path / "run")
    monkeypatch.undo()
    assert pretrain(None, tmp_path / "run", resume=True).finished
    saved, straight = (load_checkpoint(run)["optimizer"] for run in (tmp_path / "run", tmp_path / "straight"))
    assert [g["lr"] for g in saved["param_groups"]] == [g["lr"] for g in straight["param_groups"]]
    assert saved["param_groups"] == straight["param_groups"]


SLOW_CLI = """
import sys, time
from slimssl.train.loop import Trainer
step = Trainer.train_step
def slow(self, i):
    time.sleep(0.15)  # so that the signal surely arrives mid-run
    return step(self, i)
Trainer.train_step = slow
from slimssl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SLIMSSL_CACHE": str(tmp_path / "cache"),
            "PYTHONUNBUFFERED": "1"}


@pytest.mark.timing
def test_sigterm_subprocess_exits_3_and_resume_continues_exactly(tmp_path, caplog):
    config = write_config(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    env = _run_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "pretrain", "--config", str(config), "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no metrics after 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "SIGTERM" in err and f"--resume {shell_quote(run)}" in err
    stopped = load_checkpoint(run)["train_state"]["step"]
    # 1 when the signal lands between the first log record and the stop check of the same step (a loaded
    # machine can pause the run there while this process reads the record); any step is a correct stop
    assert 1 <= stopped < 12
    assert not (run / "results.json").exists()

    # the same command line, in this process (a second interpreter start costs ~10 s on a busy machine)
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["pretrain", "--resume", str(run)]) == 0
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step {stopped}" in caplog.text
    assert json.loads((run / "results.json").read_text())["steps"] == 12

    Trainer(config_from_dict(TINY), tmp_path / "reference").fit()
    assert_same_state(model_state(run), model_state(tmp_path / "reference"))


# ---- NaN / Inf losses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [False, True], ids=["nan_value", "nan_weights"])
def test_nan_loss_names_subnet_and_steps_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, weights):
    # log_every 3 does not divide the 4-step epoch: a NaN at step 6 (0-based; the first log is after step 2,
    # the next after step 5) is only seen at the epoch end, after step 7, which must check before it saves.
    cfg = config_from_dict(tiny(train={"log_every": 3, "checkpoint_every": 1}))
    trainer = Trainer(cfg, tmp_path)
    poison_loss(monkeypatch, trainer, bad_steps=range(6, 12), subnet_index=1, weights=weights)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    msg = str(err.value)
    # NaN weights make every later loss NaN, so the first sub-network is named; a NaN loss alone names its own
    assert (FULL if weights else HALF) in msg
    assert "steps 6..7" in msg  # the 0-based steps of the interval that held the NaN
    assert str(tmp_path / "checkpoints") in msg
    data = load_checkpoint(tmp_path)
    assert data["train_state"]["step"] == 4  # the end of epoch 1, before the NaN
    assert all_finite(data["model"])
    assert (tmp_path / "checkpoints" / "epoch_0001.pt").exists()
    assert not (tmp_path / "checkpoints" / "epoch_0002.pt").exists()


def test_cli_nan_loss_before_any_checkpoint_is_one_line_that_says_so(tmp_path, monkeypatch, capsys, caplog):
    init = Trainer.__init__

    def poisoned_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        poison_loss(monkeypatch, self, bad_steps={0}, subnet_index=0)

    monkeypatch.setattr(Trainer, "__init__", poisoned_init)
    config = write_config(tmp_path / "tiny.yaml", tiny(train={"log_every": 1}))
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    text = error_text(capsys, caplog)
    assert "non-finite loss of sub-network" in text and "no checkpoint had been written yet" in text
    assert "train.nonfinite=skip" in text and "Traceback" not in text


def test_nan_loss_then_signal_never_saves_nan_weights(tmp_path, monkeypatch):
    cfg = config_from_dict(tiny(train={"log_every": 100}))
    trainer = Trainer(cfg, tmp_path)
    poison_loss(monkeypatch, trainer, bad_steps={5}, subnet_index=0)
    signal_at(monkeypatch, 5, signal.SIGTERM)
    with pytest.raises(NonFiniteLossError, match=FULL):
        trainer.fit()
    data = load_checkpoint(tmp_path)
    assert data["train_state"]["step"] == 4
    assert all_finite(data["model"])


def test_nonfinite_skip_skips_and_counts(tmp_path, monkeypatch, caplog):
    cfg = config_from_dict(tiny(train={"nonfinite": "skip", "epochs": 2}))
    trainer = Trainer(cfg, tmp_path)
    poison_loss(monkeypatch, trainer, bad_steps={2, 3}, subnet_index=1)
    results = trainer.fit()
    assert results["skipped_steps"] == 2 and results["steps"] == 8
    assert json.loads((tmp_path / "results.json").read_text())["skipped_steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in records if "loss" in r][:5] == [0, 0, 1, 2, 2]
    # a skipped step's NaN never reaches the logged means (log_every=1: those records have no losses)
    assert [bool(r["loss"]) for r in records if "loss" in r][:5] == [True, True, False, False, True]
    assert all(math.isfinite(v) for r in records if "loss" in r for v in r["loss"].values())
    assert "step 3: non-finite loss, step skipped (2 so far)" in caplog.text
    assert all_finite(model_state(tmp_path))


def test_nonfinite_skip_puts_back_the_batchnorm_statistics_of_a_nan_forward(tmp_path):
    # a NaN pixel reaches the BatchNorm running statistics in the forward pass, before the loss shows it
    cfg = config_from_dict(tiny(train={"nonfinite": "skip", "epochs": 2}, eval={"knn_random_init": False}))
    trainer = Trainer(cfg, tmp_path)
    views = trainer.views

    def nan_views(step):
        v1, v2 = views(step)
        if step == 2:
            v1 = v1.clone()
            v1[0, 0, 0, 0] = float("nan")
        return v1, v2

    trainer.views = nan_views
    assert trainer.fit()["skipped_steps"] == 1
    assert all_finite(model_state(tmp_path))


def test_a_nan_loss_that_left_the_weights_finite_is_not_saved_to_be_logged_after_a_resume(tmp_path, monkeypatch):
    # a NaN added to the loss value leaves its gradients finite (as when fp16's loss scaler skips a step)
    trainer = Trainer(config_from_dict(tiny(train={"log_every": 100})), tmp_path)
    poison_loss(monkeypatch, trainer, bad_steps={5}, subnet_index=1, weights=False)
    with pytest.raises(NonFiniteLossError, match=f"losses to log at step 6 are not finite after a non-finite loss "
                                                 f"of sub-network {HALF}"):
        trainer.fit(max_steps=6)
    assert load_checkpoint(tmp_path)["train_state"]["step"] == 4


# ---- bad datasets through `slimssl pretrain --data` ---------------------------------------------------

def _images(folder: Path, n: int, size: int = 8, fmt: str = "png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (i * 10, 50, 100)).save(folder / f"{i}.{fmt}")


def _pretrain(tmp_path: Path, data: Path, *extra: str) -> int:
    config = write_config(tmp_path / "tiny.yaml")
    return main(["pretrain", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", *extra])


def _truncated(root: Path) -> str:
    _images(root / "a", 10)
    good = (root / "a" / "0.png").read_bytes()
    (root / "a" / "5.png").write_bytes(good[: len(good) // 2])
    return "5.png"


def _not_an_image(root: Path) -> str:
    _images(root / "a", 10)
    (root / "a" / "notes.jpg").write_text("this is text, not a JPEG")
    return "notes.jpg"


def _missing(root: Path) -> str:
    return root.name


def _empty(root: Path) -> str:
    root.mkdir()
    return root.name


def _class_without_images(root: Path) -> str:
    _images(root / "a", 10)
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images here")
    return str(root / "b")


@pytest.mark.parametrize("make", [_missing, _empty, _class_without_images, _truncated, _not_an_image])
def test_bad_data_folder_exits_2_naming_the_file(tmp_path, capsys, caplog, make):
    root = tmp_path / "data"
    named = make(root)
    assert _pretrain(tmp_path, root) == 2
    text = error_text(capsys, caplog)
    assert named in text
    assert "Traceback" not in text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skip_unreadable_through_the_cli(tmp_path, capsys, caplog):
    root = tmp_path / "data"
    _truncated(root)
    _images(root / "b", 10)
    assert _pretrain(tmp_path, root) == 2
    assert "data.skip_unreadable" in error_text(capsys, caplog)  # the message says how to skip
    caplog.clear()
    assert _pretrain(tmp_path, root, "--set", "data.skip_unreadable=true") == 0
    assert "skipped 1 unreadable" in caplog.text and "5.png" in caplog.text
    assert load_checkpoint(tmp_path / "run")["train_state"]["step"] == 1


def test_odd_image_modes_are_converted_and_train(tmp_path):
    root = tmp_path / "data"
    _images(root / "rgb", 8)
    odd = root / "odd"
    odd.mkdir()
    for i in range(2):
        Image.new("L", (8, 8), 90 + i).save(odd / f"grey{i}.png")
        Image.new("RGBA", (8, 8), (200, 10, 10, 128 + i)).save(odd / f"rgba{i}.png")
        Image.new("I;16", (8, 8), 40000 + i).save(odd / f"deep{i}.png")
        Image.new("CMYK", (8, 8), (0, 255, 255, i)).save(odd / f"cmyk{i}.jpg")
    assert _pretrain(tmp_path, root) == 0
    assert load_checkpoint(tmp_path / "run")["train_state"]["step"] == 1


# ---- config errors before any work starts -------------------------------------------------------------

@pytest.mark.parametrize("section, values, key, allowed", [
    ("model", {"widht": 1}, "model.widht", "base_width"),
    ("train", {"batch_size": "big"}, "train.batch_size", "integer"),
    ("menu", {"widths": [1.0, 1.5]}, "menu", "(0, 1]"),
    ("menu", {"widths": [1.0], "depths": [[1, 1, 1, 1], [1, 2, 1, 1]]}, "menu", "w1p0_d1-2-1-1"),
    ("menu", {"widths": [0.75, 0.5]}, "menu", FULL),
    ("menu", {"depths": [[1, 1, 1, 1]]}, "menu", "w1p0_d2-1-1-1"),
])
def test_bad_config_exits_2_before_any_work(tmp_path, capsys, caplog, section, values, key, allowed):
    data = tiny(**{section: values})
    if allowed == "w1p0_d2-1-1-1":
        data["model"]["depths"] = [2, 1, 1, 1]
    config = write_config(tmp_path / "bad.yaml", data)
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(out)]) == 2
    text = error_text(capsys, caplog)
    assert str(config) in text and key in text and allowed in text
    assert not out.exists()


def test_menu_must_contain_the_full_network():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["menu.widths=[0.5, 0.25]"])
    msg = str(err.value)
    assert "demo.yaml" in msg and "menu" in msg and "full network w1p0_d1-1-1-1" in msg and "target" in msg
    with pytest.raises(ConfigError, match="w1p0_d3-4-6-3"):
        config_from_dict({"model": {"arch": "resnet34"}, "menu": {"widths": [1.0], "depths": [[2, 2, 2, 2]]}})
    ok = config_from_dict({"model": {"arch": "resnet34"},  # the full network given by name is fine
                           "menu": {"widths": [0.5], "depths": [[2, 2, 2, 2]], "subnets": ["w1p0_d3-4-6-3"]}})
    assert "w1p0_d3-4-6-3" in ok.subnet_menu().names


@pytest.mark.parametrize("world, batch", [(3, 16), (4, 2)])
def test_batch_must_split_over_processes(tmp_path, monkeypatch, capsys, caplog, world, batch):
    monkeypatch.setattr(loop.dist, "world_size", lambda: world)
    monkeypatch.setattr(loop.dist, "fail_fast", lambda *a, **k: None, raising=False)  # it would os._exit
    config = write_config(tmp_path / "tiny.yaml", tiny(train={"batch_size": batch}))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(out)]) == 2
    text = error_text(capsys, caplog)
    # each process's BatchNorm needs two samples, so the smallest allowed batch is twice the processes
    assert str(config) in text and "train.batch_size" in text and f"{2 * world}, {3 * world}, {4 * world}" in text
    assert not out.exists()


def test_check_processes_allows_multiples_only():
    cfg = config_from_dict(tiny(train={"batch_size": 12}))
    for world in (1, 2, 3, 4, 6):
        check_processes(cfg, world, "x.yaml")
    for world in (5, 8, 24):
        with pytest.raises(ConfigError, match=f"(?s)x.yaml.*train.batch_size: 12 .* {world}.*or run on a number of "
                                              r"processes that divides it \(1, 2, 3, 4, 6\)"):  # 2 samples each at least
            check_processes(cfg, world, "x.yaml")


def test_one_sample_per_process_is_refused_unless_batchnorm_is_synchronised():
    """BatchNorm of one sample fails in the first step with torch's "Expected more than 1 value per channel"."""
    with pytest.raises(ConfigError, match=r"(?s)x.yaml.*train.batch_size: 12 over 12 processes leaves each one "
                                          r"sample.*at least 24 .*train.sync_bn"):
        check_processes(config_from_dict(tiny(train={"batch_size": 12})), 12, "x.yaml")
    with pytest.raises(ConfigError, match=r"allowed: 5, 10, 15"):  # synchronised, one sample each may do
        check_processes(config_from_dict(tiny(train={"batch_size": 12, "sync_bn": True})), 5, "x.yaml")
    check_processes(config_from_dict(tiny(train={"batch_size": 12, "sync_bn": True})), 12, "x.yaml")


def _checkpoint(path: Path, data: dict | None = None, **extra) -> Path:
    cfg = config_from_dict(data or TINY)
    supernet = build_supernet(cfg)
    save_checkpoint(path, {"config": cfg.model_dump(mode="json"), "menu": cfg.subnet_menu().names,
                           "model": {"backbone." + k: v for k, v in supernet.state_dict().items()}, **extra})
    return path


@pytest.mark.parametrize("command", [
    # the sub-network is checked before the data is read: the bad --data is never reached
    ["finetune", "CK", "--subnet", "0.3", "--label-fraction", "0.1", "--device", "cpu", "--no-save",
     "--data", "MISSING"],
    ["export", "CK", "--subnet", "0.3", "--out", "OUT"],
])
def test_subnet_outside_private_bn_menu_exits_2(tmp_path, capsys, caplog, command):
    ck = _checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "out"
    named = {"CK": ck, "OUT": out, "MISSING": tmp_path / "no-such-folder"}
    argv = [str(named.get(a, a)) for a in command]
    assert main(argv) == 2
    text = error_text(capsys, caplog)
    assert "w0p3_d1-1-1-1" in text and FULL in text and HALF in text
    assert not out.exists() and not list(tmp_path.glob("finetune*"))


# ---- checkpoint errors through the CLI ----------------------------------------------------------------

def _junk(path: Path) -> tuple[Path, list[str]]:
    path.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    return path, ["not a readable slimssl checkpoint (not a zip archive, as torch.save writes: another kind of "
                  "file)"]


def _cut_short(path: Path) -> tuple[Path, list[str]]:
    whole = _checkpoint(path).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a copy or a save that stopped half way
    return path, ["not a complete zip archive, as torch.save writes: the file is cut short or damaged"]


def _foreign(path: Path) -> tuple[Path, list[str]]:
    torch.save({"state_dict": {}}, path)
    return path, ["found format None", "slimssl-checkpoint"]


def _newer(path: Path) -> tuple[Path, list[str]]:
    return _checkpoint(path, version=7), ["version 7", "up to 1"]


def _incomplete(path: Path) -> tuple[Path, list[str]]:
    save_checkpoint(path, {"config": TINY, "menu": [FULL, HALF]})
    return path, ["lacks ['model']"]


@pytest.mark.parametrize("make", [_junk, _cut_short, _foreign, _newer, _incomplete])
@pytest.mark.parametrize("command", ["knn", "export"])
def test_bad_checkpoint_exits_2_saying_found_and_expected(tmp_path, capsys, caplog, make, command):
    path, expected = make(tmp_path / "bad.pt")
    out = tmp_path / "out"
    argv = ["knn", str(path), "--device", "cpu"] if command == "knn" else ["export", str(path), "--all", "--out", str(out)]
    assert main(argv) == 2
    text = error_text(capsys, caplog)
    assert str(path) in text
    for part in expected:
        assert part in text
    assert "Traceback" not in text and not out.exists()


def test_a_damaged_last_checkpoint_points_to_the_runs_latest_kept_one(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("epoch_0002.pt", "epoch_0004.pt"):
        _checkpoint(folder / name)
    _cut_short(folder / "last.pt")
    with pytest.raises(CheckpointError, match=r"cut short or damaged.*The run keeps an earlier checkpoint, "
                                              r"epoch_0004.pt: to continue from it, copy it over last.pt"):
        load_checkpoint(tmp_path / "run")


def test_a_byte_changed_inside_a_checkpoint_is_found_by_its_checksum(tmp_path):
    """torch.load does not check the archive's CRCs: a flipped bit in a tensor loaded as a changed weight, and a
    resume went on from it. The checksum names the damaged entry, and the run's earlier checkpoint is pointed to."""
    import zipfile

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    _checkpoint(folder / "epoch_0002.pt")
    marker = torch.full((64,), 1.2345)
    _checkpoint(folder / "last.pt", marker=marker)
    load_checkpoint(tmp_path / "run")  # whole, it loads
    raw = bytearray((folder / "last.pt").read_bytes())
    at = bytes(raw).index(marker.numpy().tobytes())
    raw[at + 5] ^= 0x10  # one bit of one float of the marker
    (folder / "last.pt").write_bytes(bytes(raw))
    assert zipfile.is_zipfile(folder / "last.pt")  # still an archive: only the checksum tells
    with pytest.raises(CheckpointError, match=r"last.pt is damaged: its entry archive/data/\d+ no longer matches "
                                              r"the checksum.*earlier checkpoint, epoch_0002.pt"):
        load_checkpoint(tmp_path / "run")


def test_a_checkpoint_saved_without_checksums_loads(tmp_path):
    """torch can save archives without CRCs (every one 0): nothing to check then, rather than all "damaged"."""
    config = getattr(pytest.importorskip("torch.utils.serialization"), "config", None)
    if config is None:
        pytest.skip("this torch has no serialization config: it always writes CRCs")
    with config.patch({"save.compute_crc32": False}):  # (its own undo: the config is no plain object)
        path = _checkpoint(tmp_path / "ck.pt")
    assert load_checkpoint(path)["menu"]


def test_a_checkpoint_in_torchs_legacy_format_still_loads(tmp_path):
    """Re-saved with _use_new_zipfile_serialization=False it is no zip archive and has no checksums to check."""
    path = _checkpoint(tmp_path / "ck.pt")
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path)["menu"]


def test_load_checkpoint_missing_keys_is_a_checkpoint_error(tmp_path):
    path, _ = _incomplete(tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="expected at least"):
        load_checkpoint(path)


class _RunsCodeWhenUnpickled:
    """An object whose unpickling calls a function: what a malicious checkpoint would hold."""

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    payload = _RunsCodeWhenUnpickled()
    payload.marker = tmp_path / "code-ran"
    path = _checkpoint(tmp_path / "evil.pt")
    data = torch.load(path, weights_only=True)
    data["extra"] = payload
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="holds objects of .* only if you trust"):
        load_checkpoint(path)
    assert not payload.marker.exists()


@pytest.mark.parametrize("edit, match", [
    ({"base_width": 100_000}, r"size mismatch for conv1\.weight: the weights hold \[\d+, 3, 3, 3\], the config "
                              r"makes \[100000, 3, 3, 3\]"),
    ({"depths": [1, 1, 1, 20_000]}, r"the config's stages have \[1, 1, 1, 20000\] blocks, the weights' \[1, 1, 1, 1\]"),
])
def test_a_checkpoint_whose_config_asks_for_a_huge_network_is_refused_before_it_is_built(tmp_path, edit, match):
    path = _checkpoint(tmp_path / "ck.pt")
    data = torch.load(path, weights_only=True)
    data["config"]["model"].update(edit)  # a few bytes of a hand-edited (or hostile) file: gigabytes to build
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="the stored weights do not fit the stored config .*" + match):
        slimssl.load_supernet(path)


class _CallsABlockedModule:
    def __reduce__(self):
        return (os.system, ("true",))  # os is a module torch blocks by name: its message differs


def test_a_checkpoint_calling_a_blocked_module_is_named_without_torchs_advice_to_load_it_anyway(tmp_path):
    path = _checkpoint(tmp_path / "evil.pt")
    data = torch.load(path, weights_only=True)
    data["extra"] = _CallsABlockedModule()
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=r"holds objects of \S*system, .* only if you trust") as info:
        load_checkpoint(path)
    assert "will likely succeed" not in str(info.value)


def test_load_checkpoint_blames_a_bad_device_not_the_file(tmp_path):
    path = _checkpoint(tmp_path / "ck.pt")
    with pytest.raises(slimssl.DeviceError, match="'nodevice' is not a device") as info:
        load_checkpoint(path, map_location="nodevice")
    assert not isinstance(info.value, CheckpointError)


def test_resume_with_another_menu_names_both(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    Trainer(config_from_dict(TINY), run).fit(max_steps=1)
    assert main(["pretrain", "--resume", str(run), "--set", "menu.widths=[1.0, 0.25]"]) == 2
    text = error_text(capsys, caplog)
    assert HALF in text and "w0p25_d1-1-1-1" in text



@pytest.mark.parametrize("flags, expected", [
    (["--set", "method.shuffle_bn=true"], "method.shuffle_bn needs the batch normalised in several groups"),
    pytest.param(["--device", "cuda"], "train.device (--device) is cuda, but PyTorch sees no CUDA device here: use cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (["--device", "cuda:99"], "train.device (--device) is cuda:99, but PyTorch sees"),  # on any machine
])
def test_settings_the_trainer_refuses_get_one_line_and_exit_2(tmp_path, capsys, caplog, flags, expected):
    caplog.set_level(logging.INFO, logger="slimssl")
    config = write_config(tmp_path / "tiny.yaml")
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run"), *flags]) == 2
    text = error_text(capsys, caplog)
    assert expected in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()  # the run directory it made is removed again
    if "--device" in flags:  # a device the machine lacks is said before the folder is made
        assert "removed what this run had written" not in text

# ---- never lose work already saved --------------------------------------------------------------------

@pytest.fixture
def saved_run(tmp_path) -> tuple[Path, bytes]:
    run = tmp_path / "run"
    Trainer(config_from_dict(TINY), run).fit(max_steps=2)
    return run, (run / "checkpoints" / "last.pt").read_bytes()


def test_pretrain_refuses_a_directory_holding_a_run(tmp_path, saved_run, capsys, caplog):
    run, before = saved_run
    config = write_config(tmp_path / "tiny.yaml")
    assert main(["pretrain", "--config", str(config), "--out", str(run)]) == 2
    text = error_text(capsys, caplog)
    assert "already holds a run" in text and f"--resume {shell_quote(run)}" in text
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_failing_resume_keeps_the_checkpoint(tmp_path, saved_run, capsys, caplog):
    run, before = saved_run
    (run / "config.yaml").write_text("# the run's config as saved\n")
    assert main(["pretrain", "--resume", str(run), "--data", str(tmp_path / "missing")]) == 2
    assert (run / "config.yaml").read_text() == "# the run's config as saved\n"
    assert "missing" in error_text(capsys, caplog)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]
    assert load_checkpoint(run)["train_state"]["step"] == 2


def test_resuming_a_finished_run_keeps_its_results(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    Trainer(config_from_dict(TINY), run).fit()
    results = json.loads((run / "results.json").read_text())
    results["subnets"][0]["linear_top1"] = 42.0  # as 'slimssl linear RUN' merges it
    (run / "results.json").write_text(json.dumps(results))
    before = (run / "results.json").read_bytes(), (run / "checkpoints" / "last.pt").read_bytes()
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["pretrain", "--resume", str(run)]) == 0
    assert "finished at step 12 already" in caplog.text
    assert ((run / "results.json").read_bytes(), (run / "checkpoints" / "last.pt").read_bytes()) == before
    assert "| w1p0_d1-1-1-1" in capsys.readouterr().out  # the table is printed all the same


def test_a_run_stopped_before_its_results_json_finishes_with_one_final_knn_record(tmp_path):
    run = tmp_path / "run"
    Trainer(config_from_dict(TINY), run).fit()
    (run / "results.json").unlink()  # stopped after the final kNN was logged, before results.json was written
    assert main(["pretrain", "--resume", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_top1" in r].count(12) == 1
    assert json.loads((run / "results.json").read_text())["steps"] == 12


def test_training_a_finished_run_on_says_what_changes_and_what_goes(tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(config_from_dict(TINY), run).fit()
    results = json.loads((run / "results.json").read_text())
    results["protocols"] = {"linear": {"epochs": 1}}  # as 'slimssl linear RUN' records its settings
    results["subnets"][0]["linear_top1"] = 42.0
    (run / "results.json").write_text(json.dumps(results))
    epochs = TINY["train"]["epochs"]
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["pretrain", "--resume", str(run), "--epochs", str(epochs + 1)]) == 0
    assert f"settings changed from the saved run:\n  train.epochs: saved {epochs}, now {epochs + 1}" in caplog.text
    assert "evaluations of the network as it was at an earlier end (linear)" in caplog.text
    after = json.loads((run / "results.json").read_text())
    assert after["steps"] > results["steps"] and "linear_top1" not in after["subnets"][0]


def test_a_checkpoint_of_another_run_copied_into_a_run_is_refused_on_resume(tmp_path, capsys, caplog):
    """A last.pt copied in from another run (a damaged one replaced by the wrong file) would continue that run
    here: config.yaml rewritten to the other run's settings, and two runs' metrics in one file."""
    from slimssl.train.pretrain import pretrain

    pretrain(config_from_dict(TINY), tmp_path / "byol", max_steps=2)
    pretrain(config_from_dict(tiny(method={"name": "mocov3", "temperature": 0.2})), tmp_path / "mocov3", max_steps=2)
    run = tmp_path / "byol"
    shutil.copy(tmp_path / "mocov3" / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    kept = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    assert main(["pretrain", "--resume", str(run)]) == 2
    text = error_text(capsys, caplog)
    assert f"{run / 'checkpoints' / 'last.pt'} is not the checkpoint of the run" in text
    assert "method.name: config.yaml 'byol', checkpoints/last.pt 'mocov3'" in text
    assert {name: (run / name).read_bytes() for name in kept} == kept


def test_an_edited_config_yaml_is_said_to_have_no_effect_on_resume(tmp_path, caplog):
    from slimssl.train.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(config_from_dict(TINY), run, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="slimssl"):  # changes given to the resume are no edits
        pretrain(None, run, resume=True, overrides=["train.epochs=4"], max_steps=3)
    assert "does not read config.yaml" not in caplog.text
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["train"]["epochs"] = 5
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        pretrain(None, run, resume=True, max_steps=4)
    assert "train.epochs: config.yaml 5, resumed with 4" in caplog.text
    assert "a resume does not read config.yaml" in caplog.text and "overrides=['KEY=VALUE']" in caplog.text
    # a resume with changes, killed before its next checkpoint (its checkpoint put back here), left config.yaml
    # with them: the same call again finds what it asks for there, and says nothing
    saved = (run / "checkpoints" / "last.pt").read_bytes()
    pretrain(None, run, resume=True, overrides=["optim.lr=0.01"], max_steps=5)
    (run / "checkpoints" / "last.pt").write_bytes(saved)
    assert "lr: 0.01" in (run / "config.yaml").read_text()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        pretrain(None, run, resume=True, overrides=["optim.lr=0.01"], max_steps=5)
    assert "does not read config.yaml" not in caplog.text


def test_resume_with_another_architecture_names_the_settings(tmp_path, saved_run, capsys, caplog):
    run, before = saved_run
    assert main(["pretrain", "--resume", str(run), "--set", "model.base_width=8"]) == 2
    text = error_text(capsys, caplog)
    assert "model.base_width: saved 4, now 8" in text and "Traceback" not in text
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("setting, said", [("optim.name=adamw", "optim.name: saved 'sgd', now 'adamw'"),
                                           ("optim.no_decay_1d=false", "optim.no_decay_1d: saved True, now False")])
def test_resume_with_another_optimiser_names_the_setting(tmp_path, saved_run, capsys, caplog, setting, said):
    run, before = saved_run
    assert main(["pretrain", "--resume", str(run), "--set", setting]) == 2
    text = error_text(capsys, caplog)
    assert said in text and "start a new run" in text and "Traceback" not in text
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert main(["pretrain", "--resume", str(run), "--set", "optim.weight_decay=0.001"]) == 0  # others may change


def test_resume_drops_a_metrics_record_cut_short_by_a_kill(tmp_path, saved_run, caplog):
    run, _ = saved_run
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss')  # killed while writing the next record
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        assert main(["pretrain", "--resume", str(run)]) == 0
    assert "cut short" in caplog.text
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line reads
    assert {r["step"] for r in records if "loss" in r} >= {3, 12}


def test_resume_refuses_a_config_file_of_other_settings(tmp_path, saved_run, capsys, caplog):
    run, before = saved_run
    other = write_config(tmp_path / "t.yaml", {**TINY, "optim": {"lr": 0.5}})
    assert main(["pretrain", "--resume", str(run), "--config", str(other)]) == 2
    text = error_text(capsys, caplog)
    assert "the config given differs from it:\n  optim.lr: the run's " in text and "drop --config" in text
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_takes_the_call_that_started_the_run(tmp_path, saved_run):
    """A notebook or job script that started a run may make the same call to resume it: config and overrides."""
    run, _ = saved_run
    assert slimssl.pretrain(TINY, run, resume=True, max_steps=3).step == 3
    started = slimssl.pretrain(TINY, tmp_path / "longer", overrides=["train.epochs=4"], max_steps=1)
    resumed = slimssl.pretrain(TINY, started.run_dir, overrides=["train.epochs=4"], resume=True, max_steps=2)
    assert (resumed.step, resumed.total_steps) == (2, 16)
    with pytest.raises(slimssl.UsageError, match=r"differs from it:\n  train.epochs: the run's 4, given 3\n"):
        slimssl.pretrain(TINY, started.run_dir, resume=True, max_steps=3)  # the overrides left out


def test_pretrain_refuses_a_directory_holding_a_run_without_its_checkpoint(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    Trainer(config_from_dict(TINY), run).fit()
    (run / "checkpoints" / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["pretrain", "--config", str(write_config(tmp_path / "t.yaml")), "--out", str(run)]) == 2
    assert "holds files of an earlier run (config.yaml, results.json, metrics.jsonl, tb)" in error_text(capsys, caplog)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_recalibrate_never_writes_over_the_checkpoint_it_reads(tmp_path, saved_run, capsys, caplog):
    run, before = saved_run
    last = run / "checkpoints" / "last.pt"
    assert main(["recalibrate", str(run), "--subnet", "0.5", "--out", str(last), "--device", "cpu"]) == 2
    assert "is the checkpoint being read" in error_text(capsys, caplog)
    assert last.read_bytes() == before
    other = tmp_path / "other" / "checkpoints" / "last.pt"  # another run's checkpoint
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another run")
    assert main(["recalibrate", str(run), "--subnet", "0.5", "--out", str(other), "--device", "cpu"]) == 2
    assert "is in a run's checkpoints folder" in error_text(capsys, caplog)
    assert other.read_bytes() == b"another run"


def test_recalibrate_knows_the_checkpoint_it_reads_however_its_path_is_spelt(tmp_path, saved_run, monkeypatch,
                                                                             capsys, caplog):
    """macOS' file system ignores letter case, which Path.resolve keeps: RUN/Checkpoints/last.pt there is the
    run's own last.pt, and a loose MODEL.pt the model.pt being read. A hard link stands in for the second here,
    and os.path.samefile answering as macOS would for the first."""
    run, before = saved_run
    cased = run / "Checkpoints" / "last.pt"
    cased.parent.mkdir()  # on Linux another folder: recalibrate may write there
    assert main(["recalibrate", str(run), "--subnet", "0.5", "--out", str(cased), "--device", "cpu"]) == 0
    cased.unlink()
    samefile = os.path.samefile
    monkeypatch.setattr(os.path, "samefile", lambda a, b: samefile(a, b) or {Path(a).name, Path(b).name} == {
        "Checkpoints", "checkpoints"})
    assert main(["recalibrate", str(run), "--subnet", "0.5", "--out", str(cased), "--device", "cpu"]) == 2
    assert "is in a run's checkpoints folder" in error_text(capsys, caplog)
    assert not cased.exists()
    monkeypatch.undo()
    loose = tmp_path / "model.pt"
    loose.write_bytes(before)
    alias = tmp_path / "MODEL.pt"
    os.link(loose, alias)
    assert main(["recalibrate", str(loose), "--subnet", "0.5", "--out", str(alias), "--device", "cpu"]) == 2
    assert "is the checkpoint being read" in error_text(capsys, caplog)
    assert loose.read_bytes() == before


def test_pretrain_never_overwrites_a_config_yaml_in_its_output_folder(tmp_path, capsys, caplog):
    run = tmp_path / "exp"
    run.mkdir()
    mine = write_config(run / "config.yaml")
    mine.write_text("# my notes\n" + mine.read_text())
    before = mine.read_text()
    for auto in ([], ["--auto-resume"]):  # not taken for a start of the same settings that saved nothing
        assert main(["pretrain", "--config", str(mine), "--out", str(run), "--max-steps", "1", *auto]) == 2
        assert "holds the config file given" in error_text(capsys, caplog)
    other = write_config(tmp_path / "other.yaml", tiny(optim={"lr": 0.123}))
    assert main(["pretrain", "--config", str(other), "--out", str(run), "--max-steps", "1"]) == 2
    assert "holds files of an earlier run (config.yaml)" in error_text(capsys, caplog)
    assert mine.read_text() == before and sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_a_start_of_the_same_settings_that_saved_nothing_is_pointed_to_auto_resume(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_from_dict(TINY).to_yaml())  # a start killed during its set-up
    config = write_config(tmp_path / "tiny.yaml")
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--max-steps", "1"]) == 2
    assert "or --auto-resume to start again" in error_text(capsys, caplog)
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--max-steps", "1", "--auto-resume"]) == 0


def test_a_resume_that_fails_before_saving_puts_config_yaml_back(tmp_path, saved_run, monkeypatch):
    from slimssl.data.files import DataError
    from slimssl.train.pretrain import pretrain

    run, before = saved_run
    (run / "config.yaml").write_text("# as the run left it\n")

    def failing_fit(self, max_steps=None):
        raise DataError("an image could not be read")

    monkeypatch.setattr(Trainer, "fit", failing_fit)
    with pytest.raises(DataError):
        pretrain(out=run, resume=True, overrides=["optim.lr=0.5"])
    assert (run / "config.yaml").read_text() == "# as the run left it\n"
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_ctrl_c_outside_training_exits_130_with_one_line(monkeypatch, capsys, caplog):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("slimssl.train.command.cmd_config", interrupted)
    assert main(["config"]) == 130
    text = error_text(capsys, caplog)
    assert "slimssl config: interrupted (Ctrl-C)" in text and "Traceback" not in text


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_schedulers_signal_stops_a_command_that_does_not_train_as_ctrl_c_does(monkeypatch, capsys, caplog, name):
    """A scheduler's SIGTERM (or its SIGUSR1 notice) during knn, linear, export, ... is one line and exit 130; it
    used to kill the process without a word (exit 143, 138). The handler before the command comes back after it."""
    if not hasattr(signal, name):
        pytest.skip(f"no {name} on this platform")
    signum = getattr(signal, name)

    def terminated(args):
        os.kill(os.getpid(), signum)
        raise AssertionError(f"the command went on after {name}")

    monkeypatch.setattr("slimssl.train.command.cmd_config", terminated)
    before = signal.getsignal(signum)
    assert main(["config"]) == 130
    text = error_text(capsys, caplog)
    assert f"slimssl config: interrupted ({name}); nothing it had saved is lost" in text and "Traceback" not in text
    assert signal.getsignal(signum) is before


def test_a_failed_resume_leaves_metrics_jsonl_as_it_was(tmp_path, saved_run, monkeypatch):
    run, before = saved_run
    metrics = (run / "metrics.jsonl").read_text()

    def out_of_memory(self, step):  # the first step fails, after the resume has logged its new learning rate
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        slimssl.pretrain(out=run, resume=True, overrides=["optim.lr=0.1"])
    assert (run / "metrics.jsonl").read_text() == metrics
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_the_resume_hint_quotes_a_folder_with_spaces(tmp_path, capsys, caplog):
    run = tmp_path / "my run"
    with caplog.at_level(logging.INFO, logger="slimssl"):
        assert main(["pretrain", "--config", str(write_config(tmp_path / "t.yaml")), "--out", str(run),
                     "--max-steps", "1"]) == 0
    assert f"continue with: slimssl pretrain --resume '{run}'" in error_text(capsys, caplog)


def test_a_full_disk_or_a_read_only_folder_is_a_one_line_error_and_keeps_what_was_saved(tmp_path, monkeypatch,
                                                                                        capsys, caplog):
    import errno

    from slimssl.train.metrics import MetricsLogger

    config, run = write_config(tmp_path / "tiny.yaml"), tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--max-steps", "4"]) == 0
    saved = load_checkpoint(run)["train_state"]["step"]
    write = MetricsLogger.write

    def full(self, record):
        if "loss" in record and record["step"] > saved:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return write(self, record)

    monkeypatch.setattr(MetricsLogger, "write", full)
    assert main(["pretrain", "--resume", str(run)]) == 2
    text = error_text(capsys, caplog)
    assert f"slimssl pretrain: error: {run / 'metrics.jsonl'}: No space left on device; free space, or fix the " \
           f"place's permissions, then continue with: slimssl pretrain --resume {shell_quote(run)} (what was saved " \
           "before is kept)" in text
    assert "Traceback" not in text and load_checkpoint(run)["train_state"]["step"] == saved

    # before the first checkpoint, the start's files are removed again: the same command starts it over
    monkeypatch.setattr(MetricsLogger, "write", lambda self, record: full(self, {**record, "step": saved + 1}))
    new = tmp_path / "new"
    assert main(["pretrain", "--config", str(config), "--out", str(new), "--max-steps", "4"]) == 2
    assert "No space left on device; free space, or fix the place's permissions, then run the command again" \
           in error_text(capsys, caplog)
    assert not (new / "config.yaml").exists()

    monkeypatch.setattr(MetricsLogger, "write", write)
    monkeypatch.setattr("slimssl.eval.results.write_json_atomic", _refusing(errno.EROFS, "Read-only file system"))
    assert main(["knn", str(run), "--device", "cpu"]) == 2
    assert "Read-only file system; free space, or fix the place's permissions" in error_text(capsys, caplog)
    monkeypatch.setattr("slimssl.eval.results.write_json_atomic", _refusing(errno.EIO, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):  # not the machine's state as we know it: a traceback
        main(["knn", str(run), "--device", "cpu"])


def _refusing(code: int, text: str):
    def write_json_atomic(path, *args, **kwargs):
        raise OSError(code, text, str(path))
    return write_json_atomic


def test_a_process_failing_because_another_did_says_so_in_one_line(monkeypatch, caplog):
    from slimssl.train import distributed as dist

    gloo = RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:13200. This is typically caused by "
                        "a remote worker crashing.")
    assert dist.failed_because_of_another(gloo) and dist.failed_because_of_another(
        RuntimeError("[gloo] Timed out waiting 10000ms for recv operation"))
    assert not dist.failed_because_of_another(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    exits = []
    monkeypatch.setattr(dist.os, "_exit", exits.append)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    dist.fail_fast(gloo, 1)
    assert exits == [1]
    assert "rank 0 of 2 stopped: another process exited, or stopped answering for longer than " \
           "$SLIMSSL_DIST_TIMEOUT (1800 s)" in caplog.text and "Traceback" not in caplog.text


def test_resume_takes_the_config_given_with_overrides_that_change_the_run(tmp_path, saved_run):
    """A job script that resumes with its config and a new --set: the config given, with the overrides, is what
    the run continues with, not a difference from it."""
    run, _ = saved_run
    resumed = slimssl.pretrain(TINY, run, overrides=["train.epochs=4"], resume=True, max_steps=3)
    assert (resumed.step, resumed.total_steps) == (3, 16)


def test_resume_with_the_starting_call_whose_data_is_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs" / "a", 4)
    _images(tmp_path / "imgs" / "b", 4)
    cfg = {**TINY, "data": {"source": "imgs", "resolution": 8}, "train": {**TINY["train"], "batch_size": 4}}
    started = slimssl.pretrain(cfg, "run", max_steps=1)
    assert load_checkpoint(started.run_dir / "checkpoints" / "last.pt")["config"].data.source == \
        str(tmp_path / "imgs")
    assert slimssl.pretrain(cfg, "run", resume=True, max_steps=2).step == 2


def test_an_edited_config_yaml_of_an_older_run_is_still_compared_on_resume(tmp_path, saved_run, caplog):
    run, _ = saved_run
    written = load_checkpoint(run / "checkpoints" / "last.pt")["config"].model_dump(mode="json")
    written["slim"]["slow_start_lr"] = 0  # as runs before 0 was refused wrote it
    written["optim"]["lr"] = 0.5  # an edit by hand, which a resume does not read
    (run / "config.yaml").write_text(yaml.safe_dump(written))
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        slimssl.pretrain(None, run, resume=True, max_steps=3)
    assert "differs from the settings the run resumes with" in caplog.text and "optim.lr" in caplog.text


def test_an_infinite_loss_is_non_finite_as_nan_is():
    assert loop.nonfinite_losses({"a": float("inf"), "b": 1.0, "c": torch.tensor(float("nan")),
                                  "d": torch.tensor(-float("inf")), "e": torch.tensor(0.5)}) == ["a", "c", "d"]


def test_a_plain_state_dict_or_a_file_of_an_export_given_as_a_checkpoint_is_named_as_such(tmp_path):
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "sd.pt")  # torchvision's, or one's own
    with pytest.raises(CheckpointError, match="holds a plain state_dict .*: not a slimssl checkpoint"):
        load_checkpoint(tmp_path / "sd.pt")
    supernet = build_supernet(config_from_dict(TINY))
    folder = slimssl.export_subnet(supernet, "1.0", tmp_path / "exported", check_bn_statistics=False)
    with pytest.raises(CheckpointError, match=f"is a file of the exported sub-network {folder}: give that folder"):
        load_checkpoint(folder / "model.safetensors")
