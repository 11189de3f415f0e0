"""Commands killed at the worst moments (from a crash-consistency audit: SIGKILL and SIGTERM at random times):
a start killed after its first record is started again by --auto-resume, a SIGTERM while the process exits keeps
the command's exit code, an export killed between its two files is replaced by the same export (one that fails
there leaves the earlier export), and the temporary files of killed writes do not stay in a run directory or
beside a recalibrated checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_eval import make_checkpoint
from test_fault_tolerance import tiny

import slimssl
from slimssl import atomic
from slimssl.cli import main
from slimssl.eval.results import merge_results
from slimssl import ExportError, load_exported

@pytest.fixture
def tiny_yaml(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SLIMSSL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(data={"fake_size": 32}, train={"epochs": 1}, eval={"knn_random_init": False})))
    return path


def _slimssl(tmp_path: Path, *args: str, **kwargs) -> subprocess.Popen:
    """``python -m slimssl ARGS``: the command as its own process, as the ``slimssl`` script runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIMSSL_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "slimssl", *args], cwd=tmp_path, env=env, text=True, **kwargs)


KILLED_AFTER_FIRST_RECORD = """
import os
from slimssl.train import metrics

write = metrics.MetricsLogger.write
def killed(self, record):
    write(self, record)
    os._exit(9)  # as SIGKILL: no cleanup
metrics.MetricsLogger.write = killed
"""


def test_a_start_killed_after_its_first_record_is_started_again_by_auto_resume(tmp_path, tiny_yaml):
    (tmp_path / "killer.py").write_text(KILLED_AFTER_FIRST_RECORD)
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(tiny_yaml), "--out", str(run), "--auto-resume"]
    proc = _slimssl(tmp_path, "--import", "killer.py", *args, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err
    assert (run / "metrics.jsonl").is_file()
    assert (run / "config.yaml").is_file()  # written before the first record: the folder is this run's start
    assert main(args) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 2


EXITS_SLOWLY = """
import atexit, sys, time
from pathlib import Path

def exiting():  # stands for Python's own exit, which takes about a second once torch is loaded
    print("exiting", file=sys.stderr, flush=True)
    end = time.monotonic() + 60
    while not Path("go-on").exists() and time.monotonic() < end:
        time.sleep(0.01)
atexit.register(exiting)
"""


def test_a_sigterm_while_the_process_exits_keeps_the_commands_exit_code(tmp_path, tiny_yaml):
    (tmp_path / "slow_exit.py").write_text(EXITS_SLOWLY)
    proc = _slimssl(tmp_path, "--import", "slow_exit.py", "pretrain", "--config", str(tiny_yaml),
                    "--out", str(tmp_path / "run"), "--max-steps", "1", stderr=subprocess.PIPE)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.strip() == "exiting":
            proc.send_signal(signal.SIGTERM)  # the scheduler's, as the job ends
            (tmp_path / "go-on").touch()
            break
    lines += proc.stderr.readlines()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, "".join(lines)  # stopped at max-steps, as asked: 0, not 143


KILLED_BETWEEN_THE_RENAMES = """
import os, sys
import slimssl
from slimssl import atomic

replace = atomic._replace
def killed_after_the_first(tmp, path):
    replace(tmp, path)
    print(path.name, flush=True)
    os._exit(9)  # as SIGKILL: no cleanup
atomic._replace = killed_after_the_first
slimssl.export_run(sys.argv[1], sys.argv[2], 0.5)
"""


def test_an_export_killed_between_its_two_files_is_refused_then_replaced_by_the_same_export(tmp_path):
    make_checkpoint(tmp_path / "in.pt")
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_THE_RENAMES, str(tmp_path / "in.pt"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert (killed.returncode, killed.stdout) == (9, "config.json\n"), killed.stderr  # the config goes first
    folder = tmp_path / "out" / "w0p5_d1-1-1-1"
    with pytest.raises(ExportError, match="missing"):
        load_exported(folder)
    slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", 0.5)  # no --overwrite: it is this source's export
    assert load_exported(folder).metadata["subnet"] == "w0p5_d1-1-1-1"


def test_a_first_export_whose_weights_cannot_follow_its_config_leaves_no_config(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "in.pt")
    replace = atomic.os.replace

    def disk_full(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", disk_full)
    with pytest.raises(ExportError, match="No space left"):
        slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", 0.5)
    assert not (tmp_path / "out" / "w0p5_d1-1-1-1").exists()  # neither a config nor the folder it made


def test_exports_refusal_names_the_flag_on_the_command_line_and_the_argument_in_python(tmp_path, caplog):
    make_checkpoint(tmp_path / "in.pt")
    foreign = tmp_path / "out" / "w0p5_d1-1-1-1"
    foreign.mkdir(parents=True)
    (foreign / "model.safetensors").write_bytes(b"a model of one's own")
    with pytest.raises(ExportError, match=r"replace it with overwrite=True$"):
        slimssl.export_run(tmp_path / "in.pt", tmp_path / "out", 0.5)
    assert main(["export", str(tmp_path / "in.pt"), "--subnet", "0.5", "--out", str(tmp_path / "out")]) == 2
    assert caplog.records[-1].getMessage().endswith("replace it with --overwrite")


def _temporary(folder: Path, name: str, age: float = 0) -> Path:
    """A temporary file of ``name`` as atomic_write names them, ``age`` seconds old."""
    path = folder / f".{name}.{int(age)}x.tmp"
    path.write_text("half written")
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_merge_removes_results_temporaries_of_killed_writes_but_not_one_being_written(tmp_path):
    old = _temporary(tmp_path, "results.json", age=atomic.STALE_SECONDS + 5)
    young = _temporary(tmp_path, "results.json")  # perhaps pretraining's own, written without the merge's lock
    other = _temporary(tmp_path, "notes.txt", age=3600)  # not slimssl's
    merge_results(tmp_path, {"w1p0_d1-1-1-1": {"knn_top1": 50.0}})
    assert not old.exists() and young.exists() and other.exists()
    assert json.loads((tmp_path / "results.json").read_text())["subnets"] == [
        {"subnet": "w1p0_d1-1-1-1", "knn_top1": 50.0}]


def test_a_resume_removes_the_temporaries_that_killed_writes_left_in_the_run(tmp_path, tiny_yaml):
    run = tmp_path / "run"
    slimssl.pretrain(tiny_yaml, run, max_steps=1)
    left = [_temporary(run, "config.yaml"), _temporary(run, "metrics.jsonl"),
            _temporary(run, "results.json", age=atomic.STALE_SECONDS + 5)]
    assert slimssl.pretrain(out=run, resume=True).finished
    assert not any(path.exists() for path in left)


def test_recalibrate_removes_the_temporary_of_an_earlier_save_to_its_output_killed_midway(tmp_path):
    make_checkpoint(tmp_path / "in.pt", bn="shared")
    left = _temporary(tmp_path, "re.pt")
    slimssl.recalibrate_checkpoint(tmp_path / "in.pt", 0.5, tmp_path / "re.pt", batches=1, device="cpu")
    assert (tmp_path / "re.pt").is_file() and not left.exists()


def test_resume_of_a_start_that_saved_nothing_says_to_start_it_again_with_auto_resume(tmp_path, tiny_yaml, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(tiny_yaml.read_text())
    assert main(["pretrain", "--resume", str(run)]) == 2
    message = caplog.records[-1].getMessage()
    assert "checkpoints/last.pt does not exist" in message
    assert "start it again with the command that started it and --auto-resume" in message
    with pytest.raises(slimssl.UsageError, match="the call that started it and resume='auto'"):
        slimssl.pretrain(out=run, resume=True)
    (run / "config.yaml").write_text("a: config of one's own\n")  # no run's: no hint
    with pytest.raises(slimssl.UsageError) as refused:
        slimssl.pretrain(out=run, resume=True)
    assert str(refused.value).endswith("checkpoints/last.pt does not exist")


def test_a_failed_start_whose_clean_up_stops_midway_is_still_started_again_by_auto_resume(tmp_path, tiny_yaml,
                                                                                          monkeypatch):
    """The clean-up of a failed start removes config.yaml after the logs: stopped in between, it leaves a start
    that --auto-resume recognises, not logs of no run's."""
    from slimssl.train import loop, prepare

    def broken(self, step):
        raise RuntimeError("a bug in the first step")

    def tb_held(path):  # TensorBoard's folder cannot go (held open elsewhere, say): the clean-up stops there
        raise OSError(16, "Device or resource busy", str(path))

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(loop.Trainer, "train_step", broken)
        patched.setattr(prepare.shutil, "rmtree", tb_held)
        with pytest.raises(RuntimeError, match="a bug in the first step"):
            slimssl.pretrain(tiny_yaml, run, resume="auto")
    assert (run / "config.yaml").is_file() and (run / "tb").is_dir()
    assert slimssl.pretrain(tiny_yaml, run, resume="auto").finished


def test_the_end_of_pretraining_writes_its_results_under_the_evaluations_lock(tmp_path, monkeypatch):
    """A `slimssl knn` merging as a run finished could write its older copy of results.json back over the run's
    final results: the end of pretraining now writes them under the lock the merges take."""
    from filelock import FileLock, Timeout

    from slimssl.train import loop

    held_while_writing = []
    write = loop.write_results

    def checking_write(run_dir, data):
        try:  # another holder: refused while the end of pretraining holds the lock
            FileLock(str(Path(run_dir) / ".results.json.lock")).acquire(timeout=0)
            held_while_writing.append(False)
        except Timeout:
            held_while_writing.append(True)
        return write(run_dir, data)

    monkeypatch.setattr(loop, "write_results", checking_write)
    run = slimssl.pretrain(tiny(data={"fake_size": 32}, train={"epochs": 1}), tmp_path / "run")
    assert held_while_writing == [True] and run.results["steps"] == run.step
    merge_results(run.run_dir, {"w1p0_d1-1-1-1": {"knn_top5": 90.0}})  # the lock was let go
    assert json.loads((run.run_dir / "results.json").read_text())["steps"] == run.step


def test_a_lock_left_by_a_killed_merge_delays_the_end_of_pretraining_but_does_not_fail_it(tmp_path, monkeypatch,
                                                                                         caplog):
    from filelock import FileLock

    from slimssl.train import loop

    monkeypatch.setattr(loop, "FINAL_RESULTS_LOCK_SECONDS", 0.1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    left = FileLock(str(run_dir / ".results.json.lock"))
    left.acquire()  # as a merge killed on a file system without locks leaves it
    try:
        run = slimssl.pretrain(tiny(data={"fake_size": 32}, train={"epochs": 1}), run_dir)
    finally:
        left.release()
    assert json.loads((run_dir / "results.json").read_text())["steps"] == run.step
    assert ".results.json.lock was held for 0.1 s" in caplog.text and "writing results.json without it" in caplog.text
