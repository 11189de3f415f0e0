"""Edge cases of pretraining: a training set smaller than the batch, metrics.jsonl
after a resume from a checkpoint that does not record its length, BatchNorm groups that do not fit the batch of
each process, and a resume pointed at the checkpoints folder."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_pretrain import tiny

import slimssl
from slimssl.config import ConfigError, check_processes, config_from_dict
from slimssl.data.files import DataError
from slimssl.train.loop import Trainer
from slimssl.train.metrics import RENUMBERED, MetricsLogger


def test_a_training_set_smaller_than_the_batch_is_refused_before_training(tmp_path):
    """Else an epoch would be 0 steps: the run would "finish" at once, with nothing trained."""
    cfg = tiny(train={"batch_size": 8})
    cfg["data"] = {**cfg["data"], "fake_size": 6}
    with pytest.raises(DataError, match="has 6 images, fewer than train.batch_size 8"):
        Trainer(config_from_dict(cfg), tmp_path / "run")


def _records(path):
    """metrics.jsonl's records without the time each was written."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def _write(path, records, cut_tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + cut_tail)


def test_every_record_carries_the_time_it_was_written_and_tensorboard_the_same(tmp_path):
    """A log file without timestamps leaves metrics.jsonl to say when a loss was reached or a run stalled."""
    import time

    run = tmp_path / "run"
    run.mkdir()
    logger = MetricsLogger(run)
    before = time.time()
    logger.write({"step": 1, "lr": 0.1, "loss": {"a": 0.5}})
    after = time.time()
    logger.close()
    (record,) = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    assert before - 0.001 <= record["time"] <= after + 0.001
    if logger.tb is None:
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert "time" not in events.Tags()["scalars"]  # it is TensorBoard's own wall time, not a value
    assert [e.wall_time for e in events.Scalars("loss/a")] == [pytest.approx(record["time"], abs=1e-3)]


def test_a_resume_from_a_checkpoint_without_metrics_length_drops_the_records_after_its_step(tmp_path, caplog):
    """A checkpoint that did not record metrics.jsonl's length (older ones): the records of steps past the
    checkpoint, which the resumed run trains again, go by their step; those before the last renumbering (a
    resume with another batch) count other steps and stay; a last record cut short by a kill goes too."""
    run = tmp_path / "run"
    run.mkdir()
    earlier = [{"step": 10, "loss": {"a": 1.0}}, {"step": 20, "loss": {"a": 0.9}},
               {"step": 5, RENUMBERED: {"from": 20, "batch_size": 4, "steps_per_epoch": 2}}]
    current = [{"step": 6, "loss": {"a": 0.8}}, {"step": 7, "loss": {"a": 0.7}}, {"step": 8, "loss": {"a": 0.6}}]
    _write(run / "metrics.jsonl", earlier + current, cut_tail='{"step": 9, "lo')
    with caplog.at_level(logging.INFO, logger="slimssl"):
        logger = MetricsLogger(run, resumed_at=6, saved_bytes=None)
        logger.close()
    assert _records(run / "metrics.jsonl") == earlier + current[:1]
    assert "dropped 2 records of steps after 6" in caplog.text
    assert "dropped its last record, cut short" in caplog.text
    # the resumed run's own records follow the kept ones
    logger = MetricsLogger(run)
    logger.write({"step": 7, "loss": {"a": 0.5}})
    logger.close()
    assert _records(run / "metrics.jsonl")[-2:] == [current[0], {"step": 7, "loss": {"a": 0.5}}]


def test_metrics_shorter_than_the_checkpoint_recorded_fall_back_to_the_steps(tmp_path):
    """metrics.jsonl shorter than when the checkpoint was saved (edited, or copied without its end): its length
    says nothing any more, and the records are kept by their steps."""
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": {"a": 1.0 / s}} for s in (1, 2, 3, 4)]
    _write(run / "metrics.jsonl", records)
    size = (run / "metrics.jsonl").stat().st_size
    MetricsLogger(run, resumed_at=2, saved_bytes=size + 100).close()
    assert _records(run / "metrics.jsonl") == records[:2]


def test_a_resume_whose_records_are_all_before_its_step_leaves_metrics_as_they_are(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "metrics.jsonl", [{"step": 1}, {"step": 2}])
    before = (run / "metrics.jsonl").stat()
    MetricsLogger(run, resumed_at=2, saved_bytes=None).close()
    assert (run / "metrics.jsonl").stat().st_mtime_ns == before.st_mtime_ns  # not rewritten
    assert _records(run / "metrics.jsonl") == [{"step": 1}, {"step": 2}]


def test_a_record_cut_short_by_a_kill_is_dropped_even_when_no_step_is_trained_again(tmp_path):
    """Else the resumed run's first record would be appended to the cut one: one unreadable line, two lost."""
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "metrics.jsonl", [{"step": 1}, {"step": 2}], cut_tail='{"step": 3, "lo')
    logger = MetricsLogger(run, resumed_at=2, saved_bytes=None)
    logger.write({"step": 3, "lr": 0.1})
    logger.close()
    assert _records(run / "metrics.jsonl") == [{"step": 1}, {"step": 2}, {"step": 3, "lr": 0.1}]


def test_batchnorm_groups_must_divide_the_batch_of_each_process(tmp_path):
    """16 images over 2 processes: 8 each, which groups of 16 (fine for one process) cannot split."""
    cfg = tiny("mocov2", train={"batch_size": 16})
    cfg = config_from_dict({**cfg, "model": {**cfg["model"], "bn_group_size": 16}})
    check_processes(cfg, 1, "x.yaml")
    with pytest.raises(ConfigError, match=r"bn_group_size 16 must divide the per-process batch 8 "
                                          r"\(train.batch_size 16 over 2 processes"):
        check_processes(cfg, 2, "x.yaml")
    cfg8 = config_from_dict({**tiny("mocov2", train={"batch_size": 16}),
                             "model": {**tiny()["model"], "bn_group_size": 8}})
    check_processes(cfg8, 2, "x.yaml")  # 8 per process, one group each


def test_a_resume_given_the_checkpoints_folder_names_the_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")  # only its place matters here
    with pytest.raises(slimssl.UsageError) as caught:
        slimssl.pretrain(out=run / "checkpoints", resume=True)
    message = str(caught.value)
    assert f"not {run / 'checkpoints'}" in message
    assert f"this one is in the run directory {run}: out={str(run)!r}" in message


def test_a_test_split_without_labels_skips_the_knn_at_the_start_not_after_the_last_epoch(tmp_path, caplog):
    """ILSVRC's validation images unpack into one flat val/: found before training, the run ends as one
    without a kNN, not with an error once every epoch is trained."""
    from PIL import Image

    for i in range(16):
        folder = tmp_path / "data" / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 15, 40 * (i % 2), 0)).save(folder / f"{i}.png")
    (tmp_path / "data" / "val").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (0, i * 50, 0)).save(tmp_path / "data" / "val" / f"{i}.png")
    cfg = tiny(train={"epochs": 1})
    cfg["data"] = {"source": str(tmp_path / "data"), "resolution": 8}
    with caplog.at_level(logging.INFO, logger="slimssl"):
        run = slimssl.pretrain(cfg, out=tmp_path / "run")
    assert run.finished
    assert "the test split of 'data' has no labels (a folder without class sub-folders, or images registered " \
           "without labels): kNN evaluation during pretraining is skipped" in caplog.text
    assert (tmp_path / "run" / "results.json").is_file()  # the run's sub-networks, their costs


def test_the_start_of_a_run_says_what_data_it_found(tmp_path, caplog):
    """A folder of ImageNet's size takes seconds to list: the counts show a wrong folder before hours of training."""
    cfg = tiny(train={"epochs": 1})
    with caplog.at_level(logging.INFO, logger="slimssl"):
        slimssl.pretrain(cfg, out=tmp_path / "run")
    assert "training set fake: 32 images, 4 steps per epoch of 8" in caplog.text
    assert "kNN evaluation during pretraining: 32 test images, a bank of 32 train images" in caplog.text


def test_a_grouped_shared_batchnorm_run_measures_its_knn_as_slimssl_knn_does(tmp_path):
    """Its BatchNorm statistics are re-estimated over whole batches (groups imitate training on several GPUs):
    results.json's kNN is the one `slimssl knn` measures of the checkpoint, and a batch that the groups do not
    divide is no crash after the last epoch."""
    cfg = tiny(train={"epochs": 1}, optim={"lr": 0.05})
    cfg["model"] = {**cfg["model"], "bn": "shared", "bn_group_size": 2}
    cfg["data"]["fake_size"] = 64
    cfg["eval"] = {"knn_k": 5, "batch_size": 8, "knn_random_init": False}
    run = slimssl.pretrain(cfg, out=tmp_path / "run")
    during = {row["subnet"]: row["knn_top1"] for row in run.results["subnets"]}
    after = {row["subnet"]: row["knn_top1"] for row in slimssl.knn(tmp_path / "run", save=False, device="cpu")}
    assert during == after
    odd = tiny(train={"epochs": 1}, optim={"lr": 0.05})
    odd["model"] = {**odd["model"], "bn": "shared", "bn_group_size": 4}
    odd["eval"] = {"knn_k": 5, "batch_size": 6, "knn_random_init": False}  # 6 % 4: groups would refuse it
    assert slimssl.pretrain(odd, out=tmp_path / "odd").results["subnets"][0]["knn_top1"] is not None


def test_a_recalibration_batch_with_one_value_per_channel_names_the_setting(tmp_path):
    """One 8 px image ends in a 1x1 feature map: no batch statistics, said with the setting (torch's own error
    names none); one 32 px image has 16 values per channel, and a run of eval.batch_size 1 (stored in its config)
    still opens and is measured."""
    from slimssl.models.build import build_supernet
    from slimssl.nn.slimmable import recalibrate_bn
    from slimssl.nn.spec import SubnetError

    cfg = tiny(train={"epochs": 1}, optim={"lr": 0.05})
    cfg["model"] = {**cfg["model"], "bn": "shared"}
    supernet = build_supernet(config_from_dict(cfg))
    with pytest.raises(SubnetError, match=r"got a batch of 1 image\(s\), whose smallest feature map leaves "
                                          r"BatchNorm one value per channel: give larger batches \(eval.batch_size"):
        recalibrate_bn(supernet, 0.5, [torch.rand(1, 3, 8, 8)])
    recalibrate_bn(supernet, 0.5, [torch.rand(1, 3, 32, 32)])
    cfg["data"] = {**cfg["data"], "resolution": 32}
    cfg["eval"] = {"knn_k": 5, "batch_size": 1}
    slimssl.pretrain(cfg, out=tmp_path / "run", max_steps=1)
    assert len(slimssl.knn(tmp_path / "run", subnets=[0.5], save=False, device="cpu", eval_batch_size=2)) == 1


def test_a_warmup_as_long_as_the_run_is_said(tmp_path, caplog):
    """A recipe's 10 warm-up epochs in a 2-epoch trial run: the lr would only rise, and never decay."""
    cfg = tiny(train={"epochs": 1}, optim={"warmup_epochs": 2})
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        Trainer(config_from_dict(cfg), tmp_path / "run").close()
    assert "optim.warmup_epochs 2 is as long as the run (train.epochs 1): the lr only rises, to 50% of its peak, " \
           "and never decays" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        Trainer(config_from_dict(tiny(train={"epochs": 3}, optim={"warmup_epochs": 2})), tmp_path / "ok").close()
    assert "warmup" not in caplog.text


def test_a_slow_start_that_leaves_the_sub_networks_no_step_is_refused(tmp_path):
    """They would be evaluated and exported as pretrained, as they were initialised."""
    cfg = tiny(slim={"slow_start": 0.99999999})  # 8 steps: joins at step 8, after the last
    with pytest.raises(ConfigError, match="slim.slow_start 0.99999999 of 8 steps leaves no step for the sub-networks"):
        Trainer(config_from_dict(cfg), tmp_path / "run")
    Trainer(config_from_dict(tiny(slim={"slow_start": 0.8})), tmp_path / "ok").close()  # joins at step 6


def test_an_empty_data_source_is_refused_by_the_config():
    """An unset shell variable in `data.source: $DATA`: named as such, not as a run inside a dataset ''."""
    cfg = tiny()
    with pytest.raises(ConfigError, match="data.source"):
        config_from_dict({**cfg, "data": {**cfg["data"], "source": ""}})


def test_a_knn_bank_this_machine_cannot_hold_is_skipped_at_the_start(tmp_path, caplog, monkeypatch):
    """Found at the first kNN (a recipe's: after the last epoch) it would end the run in an error: said, and
    skipped, before the first step; the run trains and ends."""
    from slimssl.eval import knn

    monkeypatch.setattr(knn, "physical_memory", lambda: 1000)  # the bank: 32 x (16+12+8+4 features) x 4 bytes
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        run = slimssl.pretrain(tiny(train={"epochs": 1}), out=tmp_path / "run")
    assert run.finished
    assert "the bank's features of 32 train images for 4 sub-networks would take 0.0 GB, more than this machine's " \
           "memory (0.0 GB): kNN evaluation during pretraining is skipped" in caplog.text
    assert all(row.get("knn_top1") is None for row in run.results["subnets"])
