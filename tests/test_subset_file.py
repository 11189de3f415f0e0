"""``slimssl finetune --subset-file``: the labelled subset a file lists (SimCLR's ImageNet 1percent.txt lists
file names), instead of one drawn from a seed."""

from __future__ import annotations

import hashlib
import json

import pytest

import slimssl
from slimssl.data.eval_images import load_eval_split

from test_eval import RES, make_checkpoint
from test_stream_eval import _folder

HALF = "w0p5_d1-1-1-1"
QUICK = dict(epochs=1, device="cpu", eval_batch_size=16)


def test_the_files_a_subset_file_names_are_the_labelled_images_and_name_the_result(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    data = _folder(tmp_path / "data")  # 12 train images in each of 3 classes, named 000.jpg ... 011.jpg
    subset = tmp_path / "four.txt"
    # a path from the split's folder, one from the dataset's, a Windows spelling; a comment, a blank, a repeat
    subset.write_text("# four images\nblue/003.jpg\ntrain/red/005.jpg\n\ngreen\\001.jpg\nred/011.jpg\nblue/003.jpg\n")
    (row,) = slimssl.finetune(run, "0.5", subset_file=subset, data=data, **QUICK)
    train = load_eval_split(str(data), "train", loader="stream", resolution=RES)
    where = {train.files.relative(i): i for i in range(len(train))}
    expected = sorted(where[f"train/{p}"] for p in ("blue/003.jpg", "red/005.jpg", "green/001.jpg", "red/011.jpg"))
    assert row["indices"] == expected and row["num_labelled"] == 4
    assert row["label_fraction"] == pytest.approx(4 / 36)
    record = {"name": "four.txt", "sha256": hashlib.sha256(subset.read_bytes()).hexdigest(), "entries": 4}
    assert row["subset_file"] == record
    # named by the file, filed under the protocol of its share of the split (4/36: 11%), with the file recorded
    saved = json.loads((run / "finetune" / f"{HALF}_list-four_seed0.json").read_text())
    assert saved["indices"] == expected and saved["subset_file"] == record
    results = json.loads((run / "results.json").read_text())
    assert results["protocols"]["finetune_11pct"]["subset_file"] == record
    assert {r["subnet"]: r for r in results["subnets"]}[HALF]["finetune_11pct_top1"] == row["top1"]


def test_indices_list_a_subset_of_a_dataset_without_files(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    subset = tmp_path / "mine.txt"
    subset.write_text("7\n0\n5\n")  # as a fine-tuning result's indices, in any order
    (row,) = slimssl.finetune(run, "0.5", subset_file=subset, save=False, **QUICK)  # the run's fake data
    assert row["indices"] == [0, 5, 7] and row["subset_file"]["entries"] == 3


@pytest.mark.parametrize("lines, keywords, error, message", [
    ("003.jpg\n", {}, slimssl.DataError, "'003.jpg' names 3 files of the train split"),
    ("blue/003.jpg\nn01440764_10026.JPEG\n", {}, slimssl.DataError,
     r"1 of the subset file's 2 entries name no file .* 'n01440764_10026.JPEG'"),
    ("blue/003.jpg\n", {"loader": "memory"}, slimssl.UsageError, "decoded in memory, which keeps no file names"),
    ("0\n400\n", {}, slimssl.DataError, "index 400 is outside the 36 images"),
    ("# nothing\n\n", {}, slimssl.UsageError, "lists no images"),
    ("blue/003.jpg\n", {"label_fractions": 0.1}, slimssl.UsageError, "label fractions or a subset file, not both"),
])
def test_a_subset_file_that_does_not_fit_the_data_is_refused(tmp_path, lines, keywords, error, message):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    subset = tmp_path / "bad.txt"
    subset.write_text(lines)
    with pytest.raises(error, match=message):
        slimssl.finetune(run, "0.5", subset_file=subset, data=_folder(tmp_path / "data"), **QUICK, **keywords)
    assert not (run / "finetune").exists()


def test_the_command_takes_a_subset_file_or_label_fractions(tmp_path, capsys, caplog):
    from slimssl.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    subset = tmp_path / "two.txt"
    subset.write_text("1\n2\n")
    assert main(["finetune", str(run), "--subnet", "0.5", "--subset-file", str(subset), "--epochs", "1",
                 "--device", "cpu", "--json", "--no-save"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["indices"] == [1, 2]
    assert main(["finetune", str(run), "--subnet", "0.5", "--device", "cpu"]) == 2
    assert "give --label-fraction F [F ...] (a class-balanced subset drawn from --seed) or --subset-file" in caplog.text


def test_spellings_of_one_file_count_it_once_and_whole_crops_stream_the_folder(tmp_path, caplog):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    data = _folder(tmp_path / "data")
    subset = tmp_path / "spelt.txt"
    subset.write_text("blue/003.jpg\n./train/blue/003.jpg\nblue\\003.jpg\n/red/002.jpg\n")
    # eval.train_crop whole needs the pictures of a streamed split: names make the folder streamed first
    (row,) = slimssl.finetune(run, "0.5", subset_file=subset, data=data, train_crop="whole", save=False, **QUICK)
    assert row["num_labelled"] == 2 and len(set(row["indices"])) == 2
    assert "name the same image" in caplog.text
    subset.write_text("7\n07\n3\n")
    (row,) = slimssl.finetune(run, "0.5", subset_file=subset, save=False, **QUICK)
    assert row["indices"] == [3, 7]


@pytest.mark.parametrize("fractions", [0, 0.0, []])
def test_label_fractions_that_are_none_of_them_are_refused_not_replaced_by_the_defaults(tmp_path, fractions):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints" / "last.pt")
    with pytest.raises(slimssl.UsageError, match=r"label fractions must be numbers in \(0, 1\]"):
        slimssl.finetune(run, "0.5", fractions, **QUICK)


def test_a_listed_subset_is_filed_under_its_share_to_two_significant_digits():
    from slimssl.eval.finetune import fraction_tag
    from slimssl.eval.subsets import listed_share_name

    assert fraction_tag(listed_share_name(12811 / 1281167)) == "1pct"  # SimCLR's 1percent.txt on ImageNet
    assert fraction_tag(listed_share_name(128116 / 1281167)) == "10pct"
    assert fraction_tag(listed_share_name(0.0095)) == "0p95pct"


def test_a_report_of_runs_says_that_one_fine_tuned_on_a_listed_subset():
    from slimssl.report.report import settings_apart

    listed = {"run": "a", "protocols": {"finetune_1pct": {"seed": 0, "subset_file": {"name": "1percent.txt"}}}}
    drawn = {"run": "b", "protocols": {"finetune_1pct": {"seed": 0}}}
    assert settings_apart([listed, drawn]) == ["finetune_1pct subset_file: a {'name': '1percent.txt'}, b None"]
