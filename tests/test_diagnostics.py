"""Diagnostics logged per sub-network during pretraining: SlimCLR's gradient imbalance (plotted by report), and
how far each sub-network's outputs are from collapse."""

import json

import pytest

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
        probe = GradientImbalance(backbone, backbone.menu.smallest)
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


def test_blocks_deeper_than_the_smallest_subnet_share_nothing():
    """With depth menus, "shared" means what the smallest sub-network runs: the first blocks of each stage."""
    import torch

    from slimssl.models.build import build_supernet
    from slimssl.nn.layers import SlimConv2d
    from slimssl.nn.spec import SubnetSpec
    from slimssl.slim.diagnostics import GradientImbalance

    data = tiny("byol")
    data["model"] = {**data["model"], "depths": [2, 2, 2, 2], "zero_init_residual": False}
    backbone = build_supernet(config_from_dict(data))
    torch.manual_seed(0)
    backbone(torch.randn(4, 3, 8, 8)).square().mean().backward()  # the full network: every block
    records = {}
    for depths in ((2, 2, 2, 2), (1, 1, 1, 1)):
        probe = GradientImbalance(backbone, SubnetSpec(0.5, depths))
        probe.previous = [torch.zeros_like(w) for w, _ in probe.weights]  # all of the gradient is this backward's
        probe.after_backward("full")
        records[depths] = probe.record["full"]
    assert len(probe.weights) == sum(isinstance(m, SlimConv2d) for m in backbone.modules())  # every conv, once

    def half(channels: int) -> int:  # width 0.5 of base width 4: 2, 4, 8, 16 channels; the image's 3 stay whole
        return channels if channels == 3 else channels // 2

    def shared_norm_sq(blocks: int) -> float:  # by hand: the stem and the first `blocks` blocks of each stage
        convs = [backbone.conv1] + [m for stage in backbone.stages() for block in list(stage)[:blocks]
                                    for m in block.modules() if isinstance(m, SlimConv2d)]
        return sum(float(c.weight.grad[: half(c.weight.shape[0]), : half(c.weight.shape[1])].pow(2).sum())
                   for c in convs)

    deep, shallow = records[(2, 2, 2, 2)], records[(1, 1, 1, 1)]
    assert deep["shared"] ** 2 == pytest.approx(shared_norm_sq(2), rel=1e-5)
    assert shallow["shared"] ** 2 == pytest.approx(shared_norm_sq(1), rel=1e-5) and shallow["shared"] < deep["shared"]
    # the gradient is only split otherwise: its total stays
    assert shallow["shared"] ** 2 + shallow["rest"] ** 2 == pytest.approx(deep["shared"] ** 2 + deep["rest"] ** 2,
                                                                          rel=1e-5)


def test_output_spread_reads_one_for_outputs_spread_over_the_sphere_and_zero_for_a_collapse():
    import torch

    from slimssl.train.metrics import output_spread

    gen = torch.Generator().manual_seed(0)
    spread_out = torch.randn(4096, 32, generator=gen)
    assert float(output_spread([spread_out])) == pytest.approx(1.0, abs=0.02)
    one_way = torch.ones(64, 32) + 1e-4 * torch.randn(64, 32, generator=gen)  # every image at the same point
    assert float(output_spread([one_way])) < 0.01
    in_two_dims = torch.zeros(4096, 32)
    in_two_dims[:, :2] = torch.randn(4096, 2, generator=gen)  # a dimensional collapse: 2 of 32 directions used
    assert float(output_spread([in_two_dims])) == pytest.approx((2 / 32) ** 0.5, abs=0.01)  # sqrt(used / all)
    assert float(output_spread([None, spread_out])) == pytest.approx(1.0, abs=0.02)  # the first view it has
    assert output_spread([{"z": spread_out}]) is None and output_spread([spread_out[:1]]) is None


@pytest.mark.parametrize("method", ["byol", "mocov2"])
def test_every_loss_record_carries_each_sub_networks_output_spread(tmp_path, method):
    cfg = config_from_dict(tiny(method, train={"log_every": 3, "epochs": 1}))
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    with_loss = [r for r in records if "loss" in r]
    assert [r["step"] for r in with_loss] == [3, trainer.steps_per_epoch]  # every 3 steps, and the epoch's end
    for record in with_loss:
        assert list(record["spread"]) == list(record["loss"]) == cfg.subnet_menu().names
        assert all(0 < value < 1.5 for value in record["spread"].values())
