"""``benchmarks/reproduce_gpu.sh``, the reproduction's one call on a lent GPU machine, run here on the CPU.

What the lent machines demand of it: the call ends by itself before the machine's 10-minute limit (so its
results come back), it always leaves the results tarball in ``$OUT``, and a tarball committed as
``docs/results/repro-results.tgz`` lets a fresh machine continue instead of starting over.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_gpu.sh"
RECIPE = "cifar10_r18_dspnet_byol"
TINY = ["model.depths=[1,1,1,1]", "model.base_width=4", "menu.widths=[1.0,0.5]", "method.proj_hidden=32",
        "method.proj_dim=16", "method.pred_hidden=32", "data.resolution=8", "train.precision=fp32",
        "eval.knn_k=5", "eval.batch_size=32"]


def fake_cifar_zip(root: Path) -> None:
    """``.data/cifar10.zip``: train/ and test/ of two classes of 12 px JPEGs, as the shared zip is laid out."""
    rng = np.random.default_rng(0)
    (root / ".data").mkdir()
    with zipfile.ZipFile(root / ".data" / "cifar10.zip", "w") as z:
        for split, count in (("train", 16), ("test", 8)):
            for label, scale in (("dark", 2), ("bright", 1)):
                for i in range(count):
                    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) // scale
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, "JPEG")
                    z.writestr(f"{split}/{label}/{i}.jpg", buffer.getvalue())


def call_args(root: Path, out: Path, epochs: int, **env: str) -> tuple[list[str], dict[str, str]]:
    args = ["bash", str(SCRIPT), "--recipes", RECIPE, "--epochs", str(epochs), "--batch-size", "8",
            "--probe-epochs", "1"]
    for assignment in TINY:
        args += ["--set", assignment]
    environment = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PREFLIGHT": "0", "TMPDIR": str(root),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    return args, environment


def call(root: Path, out: Path, epochs: int, **env: str) -> subprocess.CompletedProcess:
    args, environment = call_args(root, out, epochs, **env)
    return subprocess.run(args, cwd=root, env=environment, capture_output=True, text=True, timeout=300)


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.mark.timing
def test_the_call_stops_itself_at_its_deadline_and_still_returns_the_results(tmp_path):
    fake_cifar_zip(tmp_path)
    # the deadline counts from the script's start: 60 s is past the setup (torch import, unzip, decode) even on a
    # 2-core machine under twice CI's load, where 12 s and then 30 s were not (a SIGTERM before slimssl handles it
    # ends the call with 143)
    done = call(tmp_path, tmp_path / "out", epochs=1000, DEADLINE="60", BUDGET="1000")
    assert done.returncode == 3, done.stdout + done.stderr  # stopped by SIGTERM after saving
    assert "stopped by SIGTERM" in done.stderr
    assert "run the same command again" in done.stderr and "pretrain --resume" not in done.stderr
    files = tar_members(tmp_path / "out" / "repro-results.tgz")
    timing = json.loads(files[f"repro/{RECIPE}/slim/timing.json"])
    assert 0 < timing["step"] < 1000 * 4 and timing["pretrain_seconds"] > 0
    assert not any("checkpoints" in name for name in files)  # too large to come back from a lent machine
    assert (tmp_path / ".runs" / "repro" / RECIPE / "slim" / "checkpoints" / "last.pt").is_file()


def test_a_committed_tarball_lets_a_fresh_machine_continue(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for root in (first, second):
        root.mkdir()
        fake_cifar_zip(root)
    done = call(first, first / "out", epochs=1, PREFLIGHT="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "preflight: a tiny reproduction on fake images passed on cpu" in done.stdout
    assert (first / "out" / "reproduction.md").is_file()
    runs = first / ".runs" / "repro" / RECIPE
    timings = {run.name: (run / "timing.json").read_text() for run in runs.iterdir() if run.is_dir()}
    assert set(timings) == {"slim", "alone-w1p0_d1-1-1-1", "alone-w0p5_d1-1-1-1"}

    # the next session: a fresh machine, the tarball committed where the script looks for it
    (second / "docs" / "results").mkdir(parents=True)
    (first / "out" / "repro-results.tgz").rename(second / "docs" / "results" / "repro-results.tgz")
    done = call(second, second / "out", epochs=1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "continuing from docs/results/repro-results.tgz" in done.stdout
    assert "pretraining from step" not in done.stderr  # nothing trained again
    for name, timing in timings.items():
        assert (second / ".runs" / "repro" / RECIPE / name / "timing.json").read_text() == timing
    assert (second / "out" / "reproduction.md").read_text().split("## ")[1:] == \
        (first / ".runs" / "repro" / "reproduction.md").read_text().split("## ")[1:]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA to fail on")
def test_a_failed_preflight_starts_nothing(tmp_path):
    fake_cifar_zip(tmp_path)
    done = call(tmp_path, tmp_path / "out", epochs=1, PREFLIGHT="1", DEVICE="cuda")  # no GPU here: it fails
    assert done.returncode == 5, done.stdout + done.stderr
    assert "CUDA" in done.stdout and "the real one was not started" in done.stdout  # the tiny run's error, shown
    assert not (tmp_path / ".runs" / "repro").exists()
    assert not list(tmp_path.glob("tmp.*"))  # the preflight's folder (in $TMPDIR) is removed on failure too


@pytest.mark.timing
def test_a_call_killed_outright_still_returns_its_log_and_the_runs_packed_so_far(tmp_path):
    """The lent machine kills a call that outlives its limit, whole process group at once, and returns $OUT as
    it is: the log is written as it goes and the runs are packed every PACK_EVERY seconds."""
    import signal
    import time

    fake_cifar_zip(tmp_path)
    out = tmp_path / "out"
    args, env = call_args(tmp_path, out, epochs=1000, DEADLINE="1000", BUDGET="1000", PACK_EVERY="2")
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            packed = out / "repro-results.tgz"
            if packed.is_file() and any(name.endswith("slim/timing.json") for name in tar_members(packed)):
                break
            time.sleep(1)
        assert process.poll() is None, "the call ended by itself"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    files = tar_members(out / "repro-results.tgz")
    assert f"repro/{RECIPE}/slim/config.yaml" in files and not any("checkpoints" in name for name in files)
    assert "pretraining from step 0" in (out / "repro.log").read_text()


def test_options_the_script_sets_itself_and_a_bad_deadline_are_refused(tmp_path):
    fake_cifar_zip(tmp_path)
    for extra, env, message in [(["--out", "elsewhere"], {}, "give no --out: the runs go to $RUNS"),
                                (["--data=fake"], {}, "give no --data=fake"),
                                (["--time-budget", "5"], {}, "give no --time-budget: the budget follows DEADLINE"),
                                ([], {"DEADLINE": "soon"}, "DEADLINE must be a number of seconds, got 'soon'")]:
        args, environment = call_args(tmp_path, tmp_path / "out", epochs=1, **env)
        done = subprocess.run(args + extra, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / ".runs" / "repro").exists()


def test_a_tree_unpacked_from_another_zip_is_unpacked_again(tmp_path):
    """A CPU check leaves .data/cifar10 of a fake zip; carried with the real zip, it must not be trained on."""
    fake_cifar_zip(tmp_path)
    stale = tmp_path / ".data" / "cifar10" / "train" / "stale"
    stale.mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(stale / "0.jpg")
    (tmp_path / ".data" / "cifar10.unpacked").write_text("123\n")  # the size of the zip it came from
    # decimals: whole seconds are used; far from the call's 300 s, for a loaded machine (100 s was not enough)
    done = call(tmp_path, tmp_path / "out", epochs=1, DEADLINE="280.7")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not stale.exists() and sorted(p.name for p in (tmp_path / ".data" / "cifar10" / "train").iterdir()) == \
        ["bright", "dark"]
    assert (tmp_path / ".data" / "cifar10.unpacked").read_text().strip() == \
        str((tmp_path / ".data" / "cifar10.zip").stat().st_size)
    names = {p.name for p in (tmp_path / "out").iterdir()}  # at most 8 files come back from a lent machine
    assert {"repro-results.tgz", "repro.log", "reproduction.md"} < names and len(names) <= 8, names
    assert not any(name.endswith(".part") for name in names)
