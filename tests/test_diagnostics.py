"""SlimCLR's gradient-imbalance diagnostic: logged per sub-network during pretraining, plotted by report."""

import json

from slimssl.cli import main
from slimssl.config import config_from_dict
from slimssl.train.loop import Trainer

from test_pretrain import tiny


def test_grad_norms_are_logged_per_subnet_and_split_by_the_shared_slice(tmp_path):
    cfg = config_from_dict(tiny("byol", train={"grad_diagnostics_every": 2}))
    trainer = Trainer(cfg, tmp_path)
    for step in range(3):
        trainer.train_step(step)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    grads = [r for r in records if "grad_norm" in r]
    assert [r["step"] for r in grads] == [1, 3]  # steps 0 and 2, counted from 1 like the other records
    norms = grads[0]["grad_norm"]
    assert list(norms) == cfg.subnet_menu().names
    smallest, largest = cfg.subnet_menu().names[-1], cfg.subnet_menu().names[0]
    # the smallest sub-network only ever touches the slice it shares with every other one
    assert norms[smallest]["shared"] > 0 and norms[smallest]["rest"] == 0
    # the full network also drives the channels the smallest one does not have
    assert norms[largest]["shared"] > 0 and norms[largest]["rest"] > 0


def test_grad_norms_leave_out_the_fp16_loss_scale():
    import torch

    from slimssl.models.build import build_supernet
    from slimssl.slim.diagnostics import GradientImbalance

    cfg = config_from_dict(tiny("byol"))
    records = []
    for scale in (1.0, 1024.0):
        torch.manual_seed(0)
        backbone = build_supernet(cfg)
        probe = GradientImbalance(backbone, 0.25)
        probe.start(grad_scale=scale)
        (backbone(torch.randn(4, 3, 8, 8), subnet="0.5").square().mean() * scale).backward()
        probe.after_backward("w0p5")
        records.append(probe.record["w0p5"])
    assert records[0]["shared"] > 0 and records[0]["rest"] > 0
    for part in ("shared", "rest"):
        assert abs(records[1][part] - records[0][part]) <= 1e-5 * records[0][part]


def test_report_plots_the_diagnostic(tmp_path):
    run = tmp_path / "run"
    cfg_file = tmp_path / "tiny.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(tiny("mocov3", train={"grad_diagnostics_every": 1, "epochs": 1})))
    assert main(["pretrain", "--config", str(cfg_file), "--out", str(run), "--set", "eval.knn_random_init=false"]) == 0
    png = tmp_path / "grad.png"
    assert main(["report", str(run), "--plot-grad", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
