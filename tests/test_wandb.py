"""``slimssl pretrain --wandb PROJECT``: the run's records go to Weights & Biases as metrics.jsonl gets them, one
W&B run per run directory, continued by a resume. W&B itself is replaced by a stand-in that records the calls
(the tests make no account and no network call)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from slimssl.cli import main

TINY = ["--config", "demo", "--set", "train.epochs=2", "train.batch_size=64", "data.fake_size=128",
        "data.source=fake", "train.knn=false", "train.log_every=1", "--device", "cpu"]


class StandIn:
    """The calls a run makes of ``wandb``: ``init`` keywords, the values of each ``log``, the runs finished. Like
    W&B, it ignores a ``log`` at a ``step`` below the last one."""

    def __init__(self):
        self.inits: list[dict] = []
        self.logs: list[dict] = []
        self.ignored: list[dict] = []
        self.finished = 0
        self.module = types.ModuleType("wandb")
        self.module.init = self.init

    def init(self, **kwargs):
        self.inits.append(kwargs)
        current = [0]

        def log(values, step=None):
            if step is not None and step < current[0]:
                self.ignored.append(values)
                return
            current[0] = step if step is not None else current[0] + 1
            self.logs.append(values)

        return types.SimpleNamespace(log=log, define_metric=lambda *args, **kwargs: None,
                                     finish=lambda: setattr(self, "finished", self.finished + 1))


@pytest.fixture
def wandb(monkeypatch):
    stand_in = StandIn()
    monkeypatch.setitem(sys.modules, "wandb", stand_in.module)
    return stand_in


def test_every_record_goes_to_one_wandb_run_that_a_resume_continues(tmp_path, wandb, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--max-steps", "2", "--wandb", "slim", *TINY]) == 0
    (first,) = wandb.inits
    assert first["project"] == "slim" and first["name"] == "run" and first["resume"] == "allow"
    assert first["config"]["train"]["epochs"] == 2  # the run's resolved config
    assert wandb.finished == 1  # ended by the command, before it printed anything
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    logged = [values for values in wandb.logs if any(k.startswith("loss/") for k in values)]
    assert [values["step"] for values in logged] == [r["step"] for r in losses] == [1, 2]
    for values, record in zip(logged, losses):
        assert values["lr"] == record["lr"] and values["epoch"] == record["epoch"]
        assert {k: v for k, v in values.items() if k.startswith("loss/")} == \
            {f"loss/{name}": v for name, v in record["loss"].items()}
    # resumed with twice the batch: its steps are renumbered (step 1 of the new batch), and still logged
    assert main(["pretrain", "--resume", str(run), "--max-steps", "2", "--wandb", "slim",
                 "--set", "train.batch_size=128"]) == 0
    assert len(wandb.inits) == 2 and wandb.inits[1]["id"] == first["id"]  # the same W&B run
    assert wandb.ignored == [] and wandb.finished == 2
    assert wandb.logs[-1]["step"] == 2 and any(values["step"] == 1 for values in wandb.logs[len(logged):])
    other = tmp_path / "other"
    assert main(["pretrain", "--out", str(other), "--max-steps", "1", "--wandb", "slim", *TINY]) == 0
    assert wandb.inits[2]["id"] != first["id"]


def test_without_wandb_the_flag_is_refused_before_anything_is_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--wandb", "slim", *TINY]) == 2
    assert "--wandb needs the wandb package: pip install wandb" in caplog.text
    assert not (tmp_path / "run").exists()
